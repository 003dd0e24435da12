"""render(spec, part): the YAML text of one part of a job, dispatching on the job kind (kinds.py).

The spec (spec.py) and the pod template (pod.py) are shared by every kind.
"""

from __future__ import annotations

import sys
from typing import Iterable

import yaml

from . import convert, kinds, monitoring
from .alerts import alert_rule_doc
from .errors import UserError
from .spec import JobSpec

# runtime: what a kind creates besides its job object (the TrainJob's TrainingRuntime)
PARTS = ("job", "runtime", "convert", "monitoring", "all")


def dump(docs: Iterable[dict | str]) -> str:
    """Multi-document YAML; strings are emitted verbatim (comments kept)."""
    parts = []
    for d in docs:
        text = d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=120)
        parts.append(text.rstrip("\n") + "\n")
    return "---\n".join(parts)


def render(spec: JobSpec, part: str = "job", kind: str | None = None) -> str:
    """Manifest text for one part: job, convert, monitoring or all."""
    if part not in PARTS:
        raise UserError(f"unknown part {part!r}; allowed: {', '.join(PARTS)}")
    ports = monitoring.podmonitor_ports()
    if ports is not None and spec.nproc > len(ports):
        print(
            f"warning: {spec.name}: {spec.nproc} processes per pod but k8s/monitoring/podmonitor.yaml scrapes "
            f"only {len(ports)} ports ({ports[0]}..{ports[-1]})",
            file=sys.stderr,
        )
    jk = kinds.get(kind) if kind else kinds.get(spec.api, spec.where)
    docs: list[dict | str] = []
    if part in ("runtime", "all"):
        objects = jk.render(spec)  # the job object last
        if part == "runtime" and len(objects) < 2:
            raise UserError("--part runtime is the TrainJob's TrainingRuntime: add --spec api=trainjob (API=trainjob)")
        docs += objects if part == "all" else objects[:-1]
    elif part == "job":
        docs.append(jk.build(spec))
    if part in ("convert", "all"):
        cj = convert.build(spec) if part == "convert" else convert.conversion_job(spec)
        if cj is not None and cj not in docs:  # (with api=convert, `all` has it already)
            docs.append(cj)
    if part in ("monitoring", "all"):
        docs += monitoring.monitoring_texts(spec.namespace)
        docs.append(alert_rule_doc(spec))
    return dump(docs)
