"""render(spec, part): the YAML text of one part of a job, dispatching on the job kind.

A job kind is a module with `build(spec) -> dict` (the job object) and `rank0_pod(obj) -> str`; KINDS maps
its name to it. The spec (spec.py) and the pod template (pod.py) are shared by every kind.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Iterable

import yaml

from . import convert, monitoring, pytorchjob, trainjob
from .errors import UserError
from .spec import JobSpec

KINDS: dict[str, ModuleType] = {"pytorchjob": pytorchjob, "trainjob": trainjob}
PARTS = ("job", "runtime", "convert", "monitoring", "all")  # runtime: the TrainJob's TrainingRuntime


def dump(docs: Iterable[dict | str]) -> str:
    """Multi-document YAML; strings are emitted verbatim (comments kept)."""
    parts = []
    for d in docs:
        text = d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=120)
        parts.append(text.rstrip("\n") + "\n")
    return "---\n".join(parts)


def job_object(spec: JobSpec, kind: str | None = None) -> dict:
    kind = kind or spec.api
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind].build(spec)


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
    kind = kind or spec.api
    docs: list[dict | str] = []
    if part == "runtime" and kind != "trainjob":
        raise UserError("--part runtime is the TrainJob's TrainingRuntime: add --spec api=trainjob (API=trainjob)")
    if kind == "trainjob" and part in ("runtime", "all"):
        docs.append(trainjob.runtime(spec))
    if part in ("job", "all"):
        docs.append(job_object(spec, kind))
    if part in ("convert", "all"):
        cj = convert.build(spec)
        if cj is None and part == "convert":
            raise UserError(f"job {spec.name!r} has no convert section (its dataset is prepared elsewhere)")
        if cj is not None:
            docs.append(cj)
    if part in ("monitoring", "all"):
        docs += monitoring.monitoring_texts(spec.namespace)
        docs.append(monitoring.alert_rule_doc(spec))
    return dump(docs)
