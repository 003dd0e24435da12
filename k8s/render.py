#!/usr/bin/env python3
"""Kubernetes tooling for the GNP trainer: job specs -> Kubeflow PyTorchJob manifests, submit, status, logs, delete.

    python k8s/render.py jobs                          list the job specs in k8s/jobs/
    python k8s/render.py render JOB [options]          print the manifest (no cluster needed)
    python k8s/render.py submit JOB [options]          render, then create it with the kubernetes client
    python k8s/render.py status NAME [-n NS]           job conditions, replica counts and pods
    python k8s/render.py logs NAME [-n NS]             follow the rank-0 pod's `pytorch` container
    python k8s/render.py delete NAME [-n NS]           delete the PyTorchJob (its pods go with it)

JOB is a spec name (k8s/jobs/JOB.yaml) or a path to a spec file; NAME is a submitted PyTorchJob's name (the
spec name unless `--name` chose another). Options of render/submit: `--set k=v` (trainer override, repeatable),
`--spec key=value` (job spec override, e.g. nodes=4), `--image`, `--namespace/-n`, `--name`, and for render
`--part job|convert|monitoring|all`.

A job spec is small YAML (keys in SPEC_DOC below) merged over k8s/jobs/_defaults.yaml. It renders to a
`kubeflow.org/v1` PyTorchJob for the training operator v1.9: Master (1) + Workers (nodes-1) with
`restartPolicy: ExitCode`, or Workers only with an `elasticPolicy` when elastic.min_nodes < max_nodes
(the operator's c10d rendezvous lives on worker-0 and needs no Master). The container runs the image's
entrypoint (docker/entrypoint.sh: torchrun reads the operator's PET_* variables; exit 2 = permanent user
error, >= 128 = retried).

User errors (unknown spec, bad spec value, invalid name, no kubeconfig, unreachable cluster, CRD missing,
job exists, forbidden) print one line `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from trainer.exits import EXIT_USER  # 2: permanent under the ExitCode restart policy

K8S_DIR = Path(__file__).resolve().parent
ROOT = K8S_DIR.parent
JOBS_DIR = K8S_DIR / "jobs"
DEFAULTS_FILE = JOBS_DIR / "_defaults.yaml"
MONITORING_DIR = K8S_DIR / "monitoring"
MONITORING_FILES = ("podmonitor.yaml",)  # applied verbatim
DASHBOARD_FILE = MONITORING_DIR / "dashboard.json"  # rendered into the Grafana sidecar's ConfigMap
DASHBOARD_KEY = "gnp-training.json"  # the file name the sidecar writes into Grafana's dashboard folder

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
OPERATOR_INSTALL = (
    "kubectl apply --server-side -k "
    '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"'
)
CONTAINER = "pytorch"  # the operator reads exit codes and adds its port only on this container
RDZV_PORT = 23456  # the operator's default `pytorchjob-port`
METRICS_PORT = 9300  # trainer default metrics.port; rank r listens on port + r
UID = 1000  # the image's user (docker/setup.sh)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
TEMPLATE_KEYS = ("name", "recipe", "namespace")

SPEC_DOC = """\
recipe                      trainer recipe (python -m trainer recipes)                       required
image                       container image built from docker/Dockerfile                     required
nodes                       pods (Master + Workers); the initial count when elastic          1
gpus_per_node               nvidia.com/gpu per pod (0: CPU only)                             0
nproc_per_node              torchrun processes per pod                                       gpus_per_node
elastic.min_nodes/max_nodes elastic range; min < max renders an elasticPolicy (Workers only)  -
max_restarts                torchrun group restarts inside a pod (elasticPolicy.maxRestarts) 3
resources.cpu/memory        per-pod requests (memory is also the limit; it covers /dev/shm)  required
resources.shm/tmp           sizes of the /dev/shm (memory) and /tmp emptyDirs                8Gi / 20Gi
dataset.pvc/path            FFCV dataset folder on a PVC (mounted read-only at /data)        one of
dataset.s3/size             or an s3:// prefix fetched into an emptyDir /data of that size   these two
checkpoint.uri              s3://bucket/prefix ({name} {recipe} {namespace} expand)           local /tmp
checkpoint.pvc/path         or a folder on a PVC mounted at /checkpoints                     -
s3_secret                   Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ optional  gnp-s3
                            AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION); used when S3 is used
retry_crashes               crashed ranks exit 201 (retried) instead of 1 (permanent)        true
backoff_limit / ttl_seconds_after_finished / active_deadline_seconds   runPolicy             3 / 7d / -
node_selector / tolerations / priority_class / labels / annotations / env   pod template     -
set                         extra trainer overrides (section.key=value)                      []
convert.dataset/source/source_s3/args/resources   the dataset-conversion Job                 -
name / namespace / description / gpu_resource / image_pull_policy / image_pull_secrets        -
alerts.<threshold>          this job's alert thresholds (ALERT_DEFAULTS; README "Alerts")     -
"""

SPEC_KEYS = {
    "name",
    "recipe",
    "description",
    "image",
    "namespace",
    "nodes",
    "gpus_per_node",
    "gpu_resource",
    "nproc_per_node",
    "elastic",
    "max_restarts",
    "resources",
    "dataset",
    "checkpoint",
    "s3_secret",
    "retry_crashes",
    "backoff_limit",
    "ttl_seconds_after_finished",
    "active_deadline_seconds",
    "node_selector",
    "tolerations",
    "priority_class",
    "labels",
    "annotations",
    "env",
    "set",
    "convert",
    "image_pull_policy",
    "image_pull_secrets",
    "alerts",
}


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits 2."""


# ---------------------------------------------------------------------------------------------------
# Job specs


def list_jobs() -> list[str]:
    """Names of the job specs in k8s/jobs/ (files starting with `_` hold shared defaults)."""
    return sorted(p.stem for p in JOBS_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _read_yaml(path: Path) -> Any:
    from trainer.config import strict_yaml_load  # refuses duplicate keys, like the trainer's recipes

    try:
        return strict_yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None


def _merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise UserError(f"--spec {dotted}: {p!r} is not a mapping")
    data[parts[-1]] = value


def spec_path(job: str) -> Path:
    """The spec file for a name in k8s/jobs/ or a path; UserError with the available names otherwise."""
    if job.endswith((".yaml", ".yml")) or os.sep in job:
        path = Path(job)
        if not path.is_file():
            raise UserError(f"job spec file {job!r} does not exist")
        return path
    path = JOBS_DIR / f"{job}.yaml"
    if job.startswith("_") or not path.is_file():
        names = list_jobs()
        close = difflib.get_close_matches(job, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown job {job!r}; {hint}available: {', '.join(names)} (or a path to a spec file)")
    return path


def load_spec(job: str, spec_overrides: Iterable[str] = ()) -> tuple[str, dict]:
    """(default job name, merged raw spec) for JOB, with `key=value` overrides (values parse as YAML)."""
    path = spec_path(job)
    raw = _read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must hold a mapping of spec keys, got {type(raw).__name__}")
    defaults = (_read_yaml(DEFAULTS_FILE) or {}) if DEFAULTS_FILE.is_file() else {}
    spec = _merge(defaults, raw)
    for text in spec_overrides:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UserError(f"--spec {text!r} is not of the form key=value")
        _set_path(spec, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return str(spec.get("name") or path.stem), spec


# ---------------------------------------------------------------------------------------------------
# Typed access to the spec, one-line errors naming the key.


@dataclass
class _Reader:
    where: str
    data: dict
    prefix: str = ""

    def get(self, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
        full = f"{self.prefix}{key}"
        if key not in self.data or self.data[key] is None:
            if required:
                raise UserError(f"{self.where}: {full} is required ({_doc_line(full)})")
            return copy.deepcopy(default)
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise UserError(f"{self.where}: {full}: expected {names}, got {value!r}")
        return value

    def int(self, key: str, default: int | None = None, minimum: int = 0, required: bool = False) -> int | None:
        value = self.get(key, int, default, required)
        if value is not None and value < minimum:
            raise UserError(f"{self.where}: {self.prefix}{key}: expected an integer >= {minimum}, got {value}")
        return value

    def sub(self, key: str) -> "_Reader | None":
        value = self.get(key, dict)
        return None if value is None else _Reader(self.where, value, f"{self.prefix}{key}.")

    def check_unknown(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UserError(
                    f"{self.where}: {self.prefix}{key}: unknown key; {hint}allowed: {', '.join(sorted(allowed))}"
                )


def _doc_line(key: str) -> str:
    for line in SPEC_DOC.splitlines():
        if line.startswith(key.split(".")[0]):
            return " ".join(line.split()[1:-1])
    return "see k8s/render.py"


def _quantity(reader: _Reader, key: str, default: str | None = None, required: bool = False) -> str | None:
    value = reader.get(key, (str, int, float), default, required)
    if value is None:
        return None
    text = str(value)
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", text):
        raise UserError(
            f"{reader.where}: {reader.prefix}{key}: {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)"
        )
    return text


def _s3_uri(reader: _Reader, key: str, value: str) -> str:
    if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?", value):
        raise UserError(f"{reader.where}: {reader.prefix}{key}: {value!r} is not an s3://bucket/prefix URI")
    return value.rstrip("/")


def _rel_path(reader: _Reader, key: str, value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise UserError(f"{reader.where}: {reader.prefix}{key}: {value!r} must be a relative path inside the volume")
    return value.strip("/")


def check_name(name: str, max_index: int = 0) -> str:
    """DNS-1035 check of a PyTorchJob name, leaving room for the `-worker-<i>` Service names (63 chars)."""
    limit = 63 - len(f"-worker-{max_index}")
    if not DNS1035.match(name) or len(name) > limit:
        raise UserError(
            f"job name {name!r} is not a valid DNS-1035 label: lowercase letters, digits and '-', "
            f"starting with a letter, ending with a letter or digit, at most {limit} characters "
            f"(63 minus '-worker-{max_index}')"
        )
    return name


# ---------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Job:
    """A validated job spec, ready to render."""

    name: str
    namespace: str | None
    recipe: str
    image: str
    nodes: int
    nproc: int
    gpus: int
    gpu_resource: str
    elastic: tuple[int, int] | None
    max_restarts: int
    args: list[str]
    env: list[dict]
    volumes: list[dict]
    mounts: list[dict]
    resources: dict
    pod_labels: dict
    pod_annotations: dict
    pod_extra: dict
    job_labels: dict
    run_policy: dict
    metrics_port: int
    convert: dict | None
    uses_s3: bool
    s3_secret: str
    data_volume: dict
    pull_policy: str
    alerts: dict | None = None  # alert thresholds when the spec sets `alerts:` (its own PrometheusRule)


def _expand(text: str, values: dict) -> str:
    for k in TEMPLATE_KEYS:
        text = text.replace("{" + k + "}", values.get(k) or "")
    return text


def _override_value(sets: list[str], key: str) -> str | None:
    """The last `--set key=value` for `key` among trainer overrides (raw text)."""
    found = None
    for text in sets:
        k, _, v = text.partition("=")
        if k.strip() == key:
            found = v.strip()
    return found


def build_job(
    job: str,
    *,
    sets: Iterable[str] = (),
    spec_overrides: Iterable[str] = (),
    image: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
) -> Job:
    """Validate spec JOB (+ overrides) and resolve everything the manifests need."""
    default_name, data = load_spec(job, spec_overrides)
    where = str(spec_path(job).relative_to(ROOT)) if spec_path(job).is_relative_to(ROOT) else job
    r = _Reader(where, data)
    r.check_unknown(SPEC_KEYS)
    recipe = r.get("recipe", str, required=True)
    image = image or r.get("image", str, required=True)
    namespace = namespace or r.get("namespace", str)
    name = name or default_name
    nodes = r.int("nodes", 1, minimum=1)
    gpus = r.int("gpus_per_node", 0, minimum=0)
    nproc = r.int("nproc_per_node", gpus or None, minimum=1)
    if nproc is None:
        raise UserError(f"{where}: nproc_per_node is required when gpus_per_node is 0 (CPU processes per pod)")
    el = r.sub("elastic")
    elastic = None
    if el is not None:
        el.check_unknown({"min_nodes", "max_nodes"})
        lo, hi = el.int("min_nodes", required=True, minimum=1), el.int("max_nodes", required=True, minimum=1)
        if lo > hi or not lo <= nodes <= hi:
            raise UserError(f"{where}: elastic: need min_nodes <= nodes <= max_nodes, got {lo} <= {nodes} <= {hi}")
        elastic = (lo, hi) if lo < hi else None
    check_name(name, (elastic[1] if elastic else nodes) - 1)
    values = {"name": name, "recipe": recipe, "namespace": namespace or ""}

    # Trainer arguments: what the pod needs, then the spec's `set`, then the command line's (later wins).
    spec_sets = [str(s) for s in r.get("set", list, [])]
    user_sets = list(sets)
    for s in spec_sets + user_sets:
        if "=" not in s:
            raise UserError(f"{where}: set: {s!r} is not of the form section.key=value")
    base_sets = ["run.dir=/tmp/run", "metrics.prometheus=true"]
    env: list[dict] = [{"name": "GNP_JOB_NAME", "value": name}]
    volumes: list[dict] = []
    mounts: list[dict] = []
    uses_s3 = False

    ds = r.sub("dataset")
    if ds is None:
        raise UserError(f"{where}: dataset is required (dataset.pvc + dataset.path, or dataset.s3)")
    ds.check_unknown({"pvc", "path", "s3", "size"})
    if ds.get("pvc", str) and ds.get("s3", str):
        raise UserError(f"{where}: dataset: give either pvc (+ path) or s3, not both")
    if ds.get("pvc", str):
        path = _rel_path(ds, "path", _expand(ds.get("path", str, ""), values))
        data_volume = {"name": "data", "persistentVolumeClaim": {"claimName": ds.get("pvc", str)}}
        volumes.append(
            {**data_volume, "persistentVolumeClaim": {**data_volume["persistentVolumeClaim"], "readOnly": True}}
        )
        mounts.append({"name": "data", "mountPath": "/data", "readOnly": True})
        base_sets.append(f"data.path={'/data/' + path if path else '/data'}")
    elif ds.get("s3", str):
        uri = _s3_uri(ds, "s3", _expand(ds.get("s3", str), values))
        size = _quantity(ds, "size", "50Gi")
        data_volume = {"name": "data", "emptyDir": {"sizeLimit": size}}
        volumes.append(data_volume)
        mounts.append({"name": "data", "mountPath": "/data"})
        env += [{"name": "GNP_DATA_S3", "value": uri}, {"name": "GNP_DATA_DIR", "value": "/data"}]
        base_sets.append("data.path=/data")
        uses_s3 = True
    else:
        raise UserError(f"{where}: dataset needs pvc (+ path) or s3")

    ck = r.sub("checkpoint")
    if ck is not None:
        ck.check_unknown({"uri", "pvc", "path"})
        if ck.get("uri", str) and ck.get("pvc", str):
            raise UserError(f"{where}: checkpoint: give either uri or pvc (+ path), not both")
        if ck.get("uri", str):
            uri = _s3_uri(ck, "uri", _expand(ck.get("uri", str), values))
            base_sets.append(f"checkpoint.uri={uri}")
            uses_s3 = True
        elif ck.get("pvc", str):
            path = _rel_path(ck, "path", _expand(ck.get("path", str, "{name}"), values))
            volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": ck.get("pvc", str)}})
            mounts.append({"name": "checkpoints", "mountPath": "/checkpoints"})
            base_sets.append(f"checkpoint.uri=/checkpoints/{path}")
    all_sets = base_sets + spec_sets + user_sets
    _check_trainer_config(where, recipe, all_sets, nproc, nodes, elastic)

    s3_secret = r.get("s3_secret", str, "gnp-s3")
    # a `--set checkpoint.uri=s3://...` given by hand needs the credentials too
    uses_s3 = uses_s3 or (_override_value(all_sets, "checkpoint.uri") or "").startswith("s3://")
    if uses_s3:
        env += _s3_env(s3_secret)
    retry = r.get("retry_crashes", bool, True)
    env.append({"name": "GNP_RETRY_CRASHES", "value": "1" if retry else "0"})
    for k, v in (r.get("env", dict, {}) or {}).items():
        env.append({"name": str(k), "value": str(v)})

    res = r.sub("resources")
    if res is None:
        raise UserError(f"{where}: resources is required (resources.cpu and resources.memory)")
    res.check_unknown({"cpu", "memory", "shm", "tmp"})
    requests = {"cpu": _quantity(res, "cpu", required=True), "memory": _quantity(res, "memory", required=True)}
    limits = {"memory": requests["memory"]}
    gpu_resource = r.get("gpu_resource", str, "nvidia.com/gpu")
    if gpus:
        requests[gpu_resource] = limits[gpu_resource] = str(gpus)
    volumes += [
        {"name": "tmp", "emptyDir": {"sizeLimit": _quantity(res, "tmp", "20Gi")}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(res, "shm", "8Gi")}},
    ]
    mounts += [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]

    port = _override_value(all_sets, "metrics.port")
    metrics_port = int(port) if port and port.isdigit() else METRICS_PORT
    labels = {
        "app.kubernetes.io/name": "gnp-trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "training",
        "gnp.training/recipe": recipe,
    }
    extra_labels = {str(k): str(v) for k, v in (r.get("labels", dict, {}) or {}).items()}
    # The operator adds training.kubeflow.org/job-name to every pod itself (the PodMonitor selects on it);
    # setting the same value here makes the selection visible in the manifest and testable offline.
    pod_labels = {**labels, **extra_labels, "training.kubeflow.org/job-name": name}
    pod_annotations = {
        "sidecar.istio.io/inject": "false",
        **{str(k): str(v) for k, v in (r.get("annotations", dict, {}) or {}).items()},
    }
    pod_extra: dict = {}
    if r.get("node_selector", dict):
        pod_extra["nodeSelector"] = {str(k): str(v) for k, v in r.get("node_selector", dict).items()}
    if r.get("tolerations", list):
        pod_extra["tolerations"] = r.get("tolerations", list)
    if r.get("priority_class", str):
        pod_extra["priorityClassName"] = r.get("priority_class", str)
    if r.get("image_pull_secrets", list):
        pod_extra["imagePullSecrets"] = [{"name": str(s)} for s in r.get("image_pull_secrets", list)]

    # backoffLimit only counts restarts of running pods; ExitCode recreates pods instead, so
    # activeDeadlineSeconds is the bound that always holds (platform.md §1.2).
    # cleanPodPolicy Running: when the job ends (e.g. the Master failed with exit 2), pods still running
    # (Workers waiting on a dead rendezvous) are deleted; finished pods stay for their logs until the TTL.
    run_policy = {
        "cleanPodPolicy": "Running",
        "backoffLimit": r.int("backoff_limit", 3),
        "ttlSecondsAfterFinished": r.int("ttl_seconds_after_finished", 7 * 24 * 3600),
    }
    deadline = r.int("active_deadline_seconds", None, minimum=1)
    if deadline is not None:
        run_policy["activeDeadlineSeconds"] = deadline
    r.get("description", str)
    pull_policy = r.get("image_pull_policy", str, "IfNotPresent")
    if pull_policy not in ("Always", "IfNotPresent", "Never"):
        raise UserError(f"{where}: image_pull_policy: expected Always, IfNotPresent or Never, got {pull_policy!r}")
    convert = _convert_spec(r, where, values, ds)
    return Job(
        name=name,
        namespace=namespace,
        recipe=recipe,
        image=image,
        nodes=nodes,
        nproc=nproc,
        gpus=gpus,
        gpu_resource=gpu_resource,
        elastic=elastic,
        max_restarts=r.int("max_restarts", 3),
        args=["train", "--recipe", recipe] + [a for s in all_sets for a in ("--set", s)],
        env=env,
        volumes=volumes,
        mounts=mounts,
        resources={"requests": requests, "limits": limits},
        pod_labels=pod_labels,
        pod_annotations=pod_annotations,
        pod_extra=pod_extra,
        job_labels=labels,
        run_policy=run_policy,
        metrics_port=metrics_port,
        convert=convert,
        uses_s3=uses_s3,
        s3_secret=s3_secret,
        data_volume=data_volume,
        pull_policy=pull_policy,
        alerts=alert_thresholds(r.sub("alerts")) if r.get("alerts", dict) else None,
    )


def _s3_env(secret: str) -> list[dict]:
    def ref(key: str, optional: bool) -> dict:
        sel = {"name": secret, "key": key}
        if optional:
            sel["optional"] = True
        return {"name": key, "valueFrom": {"secretKeyRef": sel}}

    return [
        ref("AWS_ACCESS_KEY_ID", False),
        ref("AWS_SECRET_ACCESS_KEY", False),
        ref("AWS_ENDPOINT_URL_S3", True),
        ref("AWS_DEFAULT_REGION", True),
        # S3-compatible stores reject botocore's default CRC checksums (platform.md §3)
        {"name": "AWS_REQUEST_CHECKSUM_CALCULATION", "value": "when_required"},
        {"name": "AWS_RESPONSE_CHECKSUM_VALIDATION", "value": "when_required"},
    ]


def _check_trainer_config(
    where: str, recipe: str, sets: list[str], nproc: int, nodes: int, elastic: tuple[int, int] | None
) -> None:
    """Load the trainer config the pod will load, so typos fail here rather than in the cluster."""
    sys.path.insert(0, str(ROOT))
    try:
        from trainer import config as tconfig
    finally:
        sys.path.pop(0)
    try:
        cfg = tconfig.load(recipe, sets)
    except tconfig.ConfigError as e:
        raise UserError(f"{where}: the trainer rejects the pod's arguments: {' '.join(str(e).split())}") from None
    if cfg.loop.batch_size_mode == "global":
        sizes = range(elastic[0], elastic[1] + 1) if elastic else [nodes]
        bad = [n * nproc for n in sizes if cfg.loop.batch_size % (n * nproc)]
        if bad:
            raise UserError(
                f"{where}: loop.batch_size {cfg.loop.batch_size} is not divisible by the world size "
                f"{bad[0]} ({bad[0] // nproc} node(s) x {nproc}); change nodes/elastic or the batch "
                f"size, or --set loop.batch_size_mode=per_rank"
            )


def _convert_spec(r: _Reader, where: str, values: dict, ds: _Reader) -> dict | None:
    cv = r.sub("convert")
    if cv is None:
        return None
    cv.check_unknown({"dataset", "source", "source_s3", "args", "resources"})
    out = {"dataset": cv.get("dataset", str, required=True), "args": [str(a) for a in cv.get("args", list, [])]}
    if cv.get("source", str) and cv.get("source_s3", str):
        raise UserError(f"{where}: convert: give either source or source_s3, not both")
    if cv.get("source_s3", str):
        out["source_s3"] = _s3_uri(cv, "source_s3", _expand(cv.get("source_s3", str), values))
    elif cv.get("source", str):
        src = _expand(cv.get("source", str), values)
        # relative: inside the dataset volume; absolute: inside the image (e.g. /usr/share/datasets/...)
        if not src.startswith("/"):
            if not ds.get("pvc", str):
                raise UserError(
                    f"{where}: convert.source {src!r} is relative to the dataset PVC, but the "
                    f"dataset is on S3: use convert.source_s3 or an absolute path in the image"
                )
            src = "/data/" + _rel_path(cv, "source", src)
        out["source"] = src
    res = cv.sub("resources")
    out["resources"] = {"cpu": "4", "memory": "16Gi", "tmp": "50Gi"}
    if res is not None:
        res.check_unknown({"cpu", "memory", "tmp"})
        out["resources"] = {
            "cpu": _quantity(res, "cpu", "4"),
            "memory": _quantity(res, "memory", "16Gi"),
            "tmp": _quantity(res, "tmp", "50Gi"),
        }
    return out


def _pod_security() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _meta(name: str, namespace: str | None, labels: dict) -> dict:
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    return meta


def render_pytorchjob(job: Job) -> dict:
    """The kubeflow.org/v1 PyTorchJob (training-operator v1.9 CRD + webhook rules)."""
    ports = [{"name": "pytorchjob-port", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    ports += [
        {"name": f"metrics-{i}", "containerPort": job.metrics_port + i, "protocol": "TCP"} for i in range(job.nproc)
    ]
    container = {
        "name": CONTAINER,
        "image": job.image,
        "imagePullPolicy": job.pull_policy,
        "args": job.args,
        "env": job.env,
        "ports": ports,
        "resources": job.resources,
        "securityContext": _container_security(),
        "volumeMounts": job.mounts,
    }
    template = {
        "metadata": {"labels": job.pod_labels, "annotations": job.pod_annotations},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(),
            **job.pod_extra,
            "containers": [container],
            "volumes": job.volumes,
        },
    }

    def replica(n: int) -> dict:
        return {"replicas": n, "restartPolicy": "ExitCode", "template": copy.deepcopy(template)}

    spec: dict = {"nprocPerNode": str(job.nproc), "runPolicy": dict(job.run_policy)}
    if job.elastic:
        # Elastic: Workers only; torchrun's c10d rendezvous runs on worker-0 (PET_RDZV_ENDPOINT); the job
        # succeeds when any Worker succeeds. nProcPerNode inside elasticPolicy is deprecated: spec.nprocPerNode.
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "minReplicas": job.elastic[0],
            "maxReplicas": job.elastic[1],
            "maxRestarts": job.max_restarts,
        }
        spec["pytorchReplicaSpecs"] = {"Worker": replica(job.nodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replica(1)}
        if job.nodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = replica(job.nodes - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": _meta(job.name, job.namespace, job.job_labels),
        "spec": spec,
    }


def render_convert_job(job: Job) -> dict | None:
    """The batch/v1 Job that writes the FFCV dataset the PyTorchJob reads (None if the spec has no convert)."""
    cv = job.convert
    if cv is None:
        return None
    name = f"{job.name}-convert"[:63].rstrip("-")
    env = [{"name": "GNP_JOB_NAME", "value": job.name}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": cv["resources"]["tmp"]}}]
    args = ["convert", "--dataset", cv["dataset"]]
    if "persistentVolumeClaim" in job.data_volume:
        out = [a.split("=", 1)[1] for a in job.args if a.startswith("data.path=")][-1]  # the last --set wins
        volumes.append(job.data_volume)  # read-write here: this Job writes the dataset
        mounts.append({"name": "data", "mountPath": "/data"})
    else:
        out = "/tmp/gnp-convert-out"  # then uploaded to the dataset's S3 prefix by the entrypoint
        env.append(next(e for e in job.env if e["name"] == "GNP_DATA_S3"))
    if cv.get("source_s3"):
        env.append({"name": "GNP_CONVERT_SOURCE_S3", "value": cv["source_s3"]})
    elif cv.get("source"):
        args += ["--source", cv["source"]]
    args += ["--out", out, *cv["args"]]
    if job.uses_s3:
        env += _s3_env(job.s3_secret)
    container = {
        "name": "convert",
        "image": job.image,
        "imagePullPolicy": job.pull_policy,
        "args": args,
        "env": env,
        "resources": {
            "requests": {"cpu": cv["resources"]["cpu"], "memory": cv["resources"]["memory"]},
            "limits": {"memory": cv["resources"]["memory"]},
        },
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    labels = {**job.job_labels, "app.kubernetes.io/component": "dataset-conversion"}
    pod_extra = {k: v for k, v in job.pod_extra.items() if k in ("tolerations", "imagePullSecrets")}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(name, job.namespace, labels),
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": job.run_policy["ttlSecondsAfterFinished"],
            # exit 2 = bad arguments or source data: retrying cannot help
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "convert", "operator": "In", "values": [EXIT_USER]},
                    }
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    **pod_extra,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def monitoring_texts() -> list[str]:
    """k8s/monitoring/podmonitor.yaml verbatim, then the dashboard ConfigMap rendered from dashboard.json
    (apply them once per cluster)."""
    out = []
    for fname in MONITORING_FILES:
        path = MONITORING_DIR / fname
        if not path.is_file():
            raise UserError(f"{path.relative_to(ROOT)} is missing")
        out.append(path.read_text())
    out.append(dashboard_configmap())
    return out


def dashboard_configmap(path: Path | None = None) -> str:
    """The ConfigMap that Grafana's dashboard sidecar imports, carrying dashboard.json byte for byte.

    A YAML literal block keeps the JSON readable in `kubectl get -o yaml` and diffs; its chomping indicator
    is chosen so that the loaded value ends exactly as the file does.
    """
    path = path or DASHBOARD_FILE
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        raise UserError(f"{where} is missing")
    text = path.read_text()
    try:
        dash = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e}); expected a Grafana dashboard model") from None
    if not isinstance(dash, dict) or "panels" not in dash:
        raise UserError(f"{where}: expected a Grafana dashboard model (a JSON object with `panels`)")
    stripped = text.rstrip("\n")
    chomp = "-" if stripped == text else ("" if stripped + "\n" == text else "+")
    body = "".join(f"    {line}\n" if line else "\n" for line in stripped.split("\n"))
    body += "\n" * (len(text) - len(stripped) - 1)  # the newlines beyond one, kept by "+"
    return (
        f"# Rendered from {where} by k8s/render.py (--part monitoring); edit the JSON, not this.\n"
        "# Grafana's dashboard sidecar (kube-prometheus-stack grafana.sidecar.dashboards: label\n"
        '# grafana_dashboard, labelValue "1") imports it. Apply it in Grafana\'s namespace unless the\n'
        "# sidecar's searchNamespace is ALL.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: gnp-training-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/name: gnp-trainer\n"
        "    app.kubernetes.io/component: monitoring\n"
        "data:\n"
        f"  {DASHBOARD_KEY}: |{chomp}\n" + body
    )


def podmonitor_ports() -> list[str] | None:
    """Port names the PodMonitor scrapes (None when the file is absent)."""
    path = MONITORING_DIR / "podmonitor.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text())
    return [str(e.get("port")) for e in doc.get("spec", {}).get("podMetricsEndpoints", []) if e.get("port")]


# ---------------------------------------------------------------------------------------------------
# Alerts: the PrometheusRule of k8s/monitoring/prometheusrule.yaml (thresholds from the spec's `alerts:`)

ALERT_RULE_FILE = "prometheusrule.yaml"
ALERT_RULE_NAME = "gnp-training-alerts"
# A job rendered with its own `alerts:` thresholds gets its own rule, which also records this series for its
# job_name; the cluster-wide rule skips those jobs (`unless on (job_name)`), so no alert pages twice.
ALERT_OVERRIDE_SERIES = "gnp:alert_overrides"
# Longest look-back of the stall alert: a process that has not stepped within it is measured from its start.
STALL_LOOKBACK = "6h"

# key: (default, kind, meaning). Durations are Prometheus durations (30s, 10m, 1h); None = alert off.
ALERT_DEFAULTS: dict[str, tuple[Any, str, str]] = {
    "scrape_interval": ("15s", "duration", "the PodMonitor's interval; 4x it is the window that detects a step"),
    "pending": ("2m", "duration", "`for:` of the stall, loss, scaler, explosion and checkpoint-age alerts"),
    "stall_factor": (5, "number", "stalled: no step for stall_factor x the job's usual gap between steps"),
    "stall_floor": ("10m", "duration", "stalled: but never less than this (evaluation, checkpoints, startup)"),
    "scaler_skip_fraction": (0.5, "ratio", "GradScaler: share of the steps in scaler_window it skipped"),
    "scaler_window": ("30m", "duration", "GradScaler: over this window"),
    "explode_factor_g1": (10, "number", "exploding: ||g1|| above this x its median over explode_window"),
    "explode_factor_loss": (4, "number", "exploding: the loss above this x its median over explode_window"),
    "explode_window": ("1h", "duration", "exploding: the history the median is taken over"),
    "max_restarts": (3, "count", "restarts: more than this many new training processes of rank 0"),
    "restarts_window": ("1h", "duration", "restarts: within this window"),
    "checkpoint_failing_for": ("1h", "duration", "checkpoints: failures and no success for this long"),
    "checkpoint_stale_factor": (3, "number", "checkpoints: last success older than this x the usual interval"),
    "data_wait_fraction": (0.3, "ratio", "input-bound: share of wall time waiting for the data loader"),
    "data_wait_for": ("15m", "duration", "input-bound: averaged over this window"),
    "gpu_idle_percent": (10, "percent", "GPUs idle: DCGM utilization of the pod's GPUs below this"),
    "gpu_idle_for": ("15m", "duration", "GPUs idle: for this long"),
    "accuracy_drop": (None, "ratio", "accuracy: top-1 below its best by more than this (off by default)"),
    "accuracy_window": ("3d", "duration", "accuracy: the best is taken over this window"),
}
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
_DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def alert_thresholds(reader: _Reader | None) -> dict[str, Any]:
    """ALERT_DEFAULTS overridden by the spec's `alerts:` mapping (one-line UserError on a bad key or value)."""
    out = {k: v[0] for k, v in ALERT_DEFAULTS.items()}
    if reader is None:
        return out
    reader.check_unknown(ALERT_DEFAULTS)
    for key, (_, kind, _) in ALERT_DEFAULTS.items():
        if key not in reader.data:
            continue
        value, full = reader.data[key], f"{reader.where}: {reader.prefix}{key}"
        if value is None and key == "accuracy_drop":
            out[key] = None
        elif kind == "duration":
            if not isinstance(value, str) or not _DURATION.fullmatch(value) or _seconds(value) <= 0:
                raise UserError(f"{full}: expected a Prometheus duration such as 30s, 10m or 1h, got {value!r}")
            out[key] = value
        else:
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = {
                "number": number and value > 0,
                "ratio": number and 0 < value < 1,
                "percent": number and 0 < value <= 100,
                "count": number and isinstance(value, int) and value >= 0,
            }[kind]
            if not ok:
                allowed = {
                    "number": "a number > 0",
                    "ratio": "a number between 0 and 1 (exclusive)",
                    "percent": "a number in (0, 100]",
                    "count": "an integer >= 0",
                }[kind]
                raise UserError(f"{full}: expected {allowed}, got {value!r}")
            out[key] = value
    return out


def _seconds(duration: str) -> float:
    m = _DURATION.fullmatch(duration)
    return int(m.group(1)) * _DURATION_S[m.group(2)]


def _promdur(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds < 1 or seconds != int(seconds) else f"{int(seconds)}s"


def render_alert_rule(thresholds: dict[str, Any], job: str | None = None, namespace: str | None = None) -> dict:
    """The PrometheusRule: for every GNP job (job=None) or only for `job` (its own thresholds).

    Every alert keeps the labels namespace, job_name and rank (GPU idle: pod) for its summary, and carries
    severity plus a runbook annotation (what to look at, which make command).
    """
    t = thresholds
    sel = f'job_name="{job}"' if job else 'job_name!=""'
    skip = "" if job else f"\nunless on (job_name) {ALERT_OVERRIDE_SERIES}"
    w = _promdur(4 * _seconds(t["scrape_interval"]))  # at least 2 scrapes, so increase() sees a step
    floor = _seconds(t["stall_floor"])
    who = "{{ $labels.namespace }}/{{ $labels.job_name }} rank {{ $labels.rank }}"
    make = "make status JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}"
    logs = "make logs JOB={{ $labels.job_name }} NAMESPACE={{ $labels.namespace }}"

    def m(name: str, extra: str = "") -> str:
        return f"{name}{{{sel}{', ' + extra if extra else ''}}}"

    # The usual gap between two rises of the step counter, from the job's own history: seconds spent stepping
    # or waiting for data (evaluation and checkpoint pauses excluded) per observed rise. Stalls do not inflate
    # it (both sides stop growing), and it covers log_every and the scrape interval.
    gap = (
        f"(increase({m('gnp_step_duration_seconds_sum')}[{STALL_LOOKBACK}]) "
        f"+ increase({m('gnp_data_wait_seconds_total')}[{STALL_LOOKBACK}]))\n"
        f"  / changes({m('gnp_steps_total')}[{STALL_LOOKBACK}])"
    )
    # Seconds since the counter last rose (to within the window w), never more than the process's age.
    since_step = f"time() - max_over_time((timestamp(increase({m('gnp_steps_total')}[{w}]) > 0))[{STALL_LOOKBACK}:])"
    age = f"time() - {m('gnp_process_start_time_seconds')}"
    stall_expr = (
        f"(\n  ({since_step})\n  < ({age})\n  or ({age})\n)\n"
        f"> (\n  ({t['stall_factor']} * {gap} > {floor:g})\n  or ({m('gnp_steps_total')} * 0 + {floor:g})\n)"
    )
    ckpt = m("gnp_checkpoint_last_success_timestamp_seconds")
    start0 = m("gnp_process_start_time_seconds", 'rank="0"')  # rank 0 saves; all ranks restart together
    dcgm = (
        'label_replace(label_replace(DCGM_FI_DEV_GPU_UTIL, "pod", "$1", "exported_pod", "(.+)"), '
        '"namespace", "$1", "exported_namespace", "(.+)")'
    )
    alerts = [
        (
            "GNPTrainingStalled",
            "critical",
            stall_expr,
            t["pending"],
            f"{who}: no optimizer step for {{{{ $value | humanizeDuration }}}}",
            f"The step counter has not risen for longer than max({t['stall_floor']}, {t['stall_factor']} x the "
            f"job's usual gap between steps) while the process is up: a hung collective (a lost or stopped peer), "
            f"a blocked data path or a deadlock. The GPUs stay allocated until activeDeadlineSeconds.",
            f"Look for the rank that stopped (its endpoint down, or its last log line): `{logs}`, `{make}`; "
            f"py-spy dump --pid <rank pid> in the pod. Delete the job if it does not recover: "
            f"make delete JOB={{{{ $labels.job_name }}}} NAMESPACE={{{{ $labels.namespace }}}}",
        ),
        (
            "GNPLossNotFinite",
            "critical",
            # x * 0 != 0 holds exactly for NaN and +-Inf
            f"{m('gnp_train_loss')} * 0 != 0",
            t["pending"],
            f"{who}: training loss is not finite",
            "The cross-entropy at the last log step is NaN or infinite: the run diverged and every further step "
            "wastes the GPUs.",
            f"Check lr, r/alpha and AMP in the recipe; `{logs}`; resume from the last good checkpoint with a "
            f"lower learning rate.",
        ),
        (
            "GNPScalerSkippingSteps",
            "critical",
            # fp16's GradScaler skips a step whose gradients overflowed; a few are normal while the scale adapts,
            # most of them means the weights no longer move
            f"increase({m('gnp_scaler_skipped_steps_total')}[{t['scaler_window']}])\n"
            f"> {t['scaler_skip_fraction']} * increase({m('gnp_steps_total')}[{t['scaler_window']}])\n"
            f"and increase({m('gnp_steps_total')}[{t['scaler_window']}]) > 0",
            t["pending"],
            f"{who}: the fp16 GradScaler skipped {{{{ $value | humanize }}}} steps in {t['scaler_window']}",
            f"More than {t['scaler_skip_fraction']} of the steps of the last {t['scaler_window']} were skipped "
            "for inf/NaN gradients: the weights barely move while the GPUs stay busy.",
            f"Dashboard 'Loss at θ and θ+ε'; try loop.precision=bf16 (no scaler) or a lower lr; `{logs}`.",
        ),
        (
            "GNPGradNormExploding",
            "warning",
            f"{m('gnp_grad_norm_g1')}\n> {t['explode_factor_g1']} * quantile_over_time(0.5, "
            f"{m('gnp_grad_norm_g1')}[{t['explode_window']}])",
            t["pending"],
            f"{who}: ||g1|| is {{{{ $value | humanize }}}}, over {t['explode_factor_g1']}x its recent median",
            f"The penalized gradient norm exceeds {t['explode_factor_g1']} x its median over the last "
            f"{t['explode_window']}: the GNP step is about to diverge.",
            f"Dashboard row 'GNP optimization' (gradient norms, sharpness); lower lr or r; `{logs}`.",
        ),
        (
            "GNPLossExploding",
            "warning",
            f"{m('gnp_train_loss')}\n> {t['explode_factor_loss']} * quantile_over_time(0.5, "
            f"{m('gnp_train_loss')}[{t['explode_window']}])",
            t["pending"],
            f"{who}: loss is {{{{ $value | humanize }}}}, over {t['explode_factor_loss']}x its recent median",
            f"The training loss exceeds {t['explode_factor_loss']} x its median over the last {t['explode_window']}.",
            f"Dashboard 'Loss at θ and θ+ε' and 'Learning rate' (a warmup or schedule error?); `{logs}`.",
        ),
        (
            "GNPTrainingRestarting",
            "warning",
            f"changes(max by (namespace, job_name, rank) ({start0})[{t['restarts_window']}:])\n> {t['max_restarts']}",
            "0s",
            f"{who}: restarted {{{{ $value }}}} times in {t['restarts_window']}",
            f"More than {t['max_restarts']} new training processes within {t['restarts_window']} (torchrun "
            f"group restarts and recreated pods both count): the job crash-loops and will keep its GPUs until "
            f"its deadline.",
            f"`{logs}` for the traceback, `{make}` for pod events (OOMKilled, Xid, evictions).",
        ),
        (
            "GNPCheckpointUploadFailing",
            "critical",
            f"increase({m('gnp_checkpoint_failures_total')}[{t['checkpoint_failing_for']}]) > 0\n"
            f"and (time() - ({ckpt} or {start0})) > "
            f"{_seconds(t['checkpoint_failing_for']):g}",
            "0s",
            f"{who}: checkpoint uploads failing for over {t['checkpoint_failing_for']}",
            f"Checkpoint saves or uploads failed and none succeeded for {t['checkpoint_failing_for']}: a restart "
            f"now would lose that much training.",
            f"`{logs}` (search 'checkpoint'); check the S3 secret, endpoint and bucket quota.",
        ),
        (
            "GNPCheckpointStale",
            "warning",
            # the mean gap between successes over the last 12h (needs two of them)
            f"time() - {ckpt}\n> {t['checkpoint_stale_factor']} * (max_over_time({ckpt}[12h]) - "
            f"min_over_time({ckpt}[12h])) / changes({ckpt}[12h])",
            t["pending"],
            f"{who}: last checkpoint {{{{ $value | humanizeDuration }}}} ago",
            f"The last successful checkpoint is older than {t['checkpoint_stale_factor']} x the job's usual "
            f"interval between checkpoints.",
            f"Is the job stepping (GNPTrainingStalled)? `{logs}`; check the checkpoint URI and credentials.",
        ),
        (
            "GNPInputBound",
            "warning",
            f"rate({m('gnp_data_wait_seconds_total')}[{t['data_wait_for']}]) > {t['data_wait_fraction']}",
            "0s",
            f"{who}: {{{{ $value | humanizePercentage }}}} of the time waiting for data",
            f"Over the last {t['data_wait_for']} the rank waited for its data loader more than "
            f"{t['data_wait_fraction']:.0%} of the wall time: the GPUs idle on the input pipeline.",
            "Dashboard 'Data-loader wait'; raise data.workers / cpu requests, check the dataset volume, "
            "`make bench-data`.",
        ),
        (
            "GNPGPUsIdle",
            "warning",
            f"(avg by (namespace, pod) ({dcgm}) < {t['gpu_idle_percent']})\n"
            f"* on (namespace, pod) group_left (job_name) group by (namespace, pod, job_name) "
            f"({m('gnp_process_start_time_seconds')})",
            t["gpu_idle_for"],
            "{{ $labels.namespace }}/{{ $labels.job_name }} pod {{ $labels.pod }}: GPUs {{ $value | humanize }}% busy",
            f"DCGM utilization of the pod's GPUs averaged below {t['gpu_idle_percent']}% for "
            f"{t['gpu_idle_for']} while the job runs.",
            f"Input-bound or stalled? See those alerts and the dashboard's GPU row; `{logs}`.",
        ),
    ]
    if t["accuracy_drop"] is not None:
        acc = m("gnp_eval_top1_accuracy")
        alerts.append(
            (
                "GNPAccuracyDropped",
                "warning",
                f"max_over_time({acc}[{t['accuracy_window']}]) - {acc} > {t['accuracy_drop']}",
                "0s",
                f"{who}: top-1 accuracy {{{{ $value | humanizePercentage }}}} below its best",
                f"Validation top-1 fell more than {t['accuracy_drop']} below its best of the last "
                f"{t['accuracy_window']}.",
                f"Dashboard 'Validation accuracy'; `{logs}`; consider stopping and keeping the best checkpoint.",
            )
        )
    rules: list[dict] = []
    for name, severity, expr, pending, summary, description, runbook in alerts:
        rules.append(
            {
                "alert": name,
                "expr": f"{expr}{skip}\n" if not name.startswith("GNPGPUs") else f"({expr}){skip}\n",
                "for": pending,
                "labels": {"severity": severity},
                "annotations": {"summary": summary, "description": description, "runbook": runbook},
            }
        )
    if job:
        rules.append({"record": ALERT_OVERRIDE_SERIES, "expr": "vector(1)", "labels": {"job_name": job}})
    name = f"{ALERT_RULE_NAME}-{job}" if job else ALERT_RULE_NAME
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta(
            name,
            namespace,
            {
                "app.kubernetes.io/name": "gnp-trainer",
                "app.kubernetes.io/component": "monitoring",
                # kube-prometheus-stack's ruleSelector (ruleSelectorNilUsesHelmValues) needs it, as the PodMonitor
                "release": "kube-prometheus-stack",
            },
        ),
        "spec": {"groups": [{"name": name, "rules": rules}]},
    }


def default_alert_rule_text() -> str:
    """The committed k8s/monitoring/prometheusrule.yaml: the rule for every job, default thresholds."""
    header = (
        "# GENERATED by k8s/render.py (render_alert_rule with ALERT_DEFAULTS); regenerate with\n"
        "#   .venv/bin/python -m tests.test_alerts\n"
        "# Alerts for every GNP training job (label job_name). A job whose spec sets `alerts:` renders its own\n"
        "# rule (make render JOB=... PART=monitoring), which this one then skips. The `release:` label is what\n"
        "# kube-prometheus-stack's ruleSelector matches (ruleSelectorNilUsesHelmValues), like the PodMonitor's.\n"
    )
    return header + rule_yaml(render_alert_rule(alert_thresholds(None)))


class _RuleDumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL) as literal blocks, readable in the file and in `kubectl get -o yaml`."""


_RuleDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def rule_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_RuleDumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def alert_rule_doc(job: Job) -> str:
    """The monitoring part's rule: the committed cluster-wide file, or the job's own when it sets `alerts:`."""
    if job.alerts is None:
        path = MONITORING_DIR / ALERT_RULE_FILE
        if not path.is_file():
            raise UserError(f"{path.relative_to(ROOT)} is missing")
        return path.read_text()
    return rule_yaml(render_alert_rule(job.alerts, job.name, job.namespace))


def dump(docs: Iterable[dict | str]) -> str:
    """Multi-document YAML; strings are emitted verbatim (comments kept)."""
    parts = []
    for d in docs:
        text = d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=120)
        parts.append(text.rstrip("\n") + "\n")
    return "---\n".join(parts)


def render(job: Job, part: str = "job") -> str:
    """Manifest text for one part: job, convert, monitoring or all."""
    ports = podmonitor_ports()
    if ports is not None and job.nproc > len(ports):
        print(
            f"warning: {job.name}: {job.nproc} processes per pod but k8s/monitoring/podmonitor.yaml scrapes "
            f"only {len(ports)} ports ({ports[0]}..{ports[-1]})",
            file=sys.stderr,
        )
    docs: list[dict | str] = []
    if part in ("job", "all"):
        docs.append(render_pytorchjob(job))
    if part in ("convert", "all"):
        cj = render_convert_job(job)
        if cj is None and part == "convert":
            raise UserError(f"job {job.name!r} has no convert section (its dataset is prepared elsewhere)")
        if cj is not None:
            docs.append(cj)
    if part in ("monitoring", "all"):
        docs += monitoring_texts()
        docs.append(alert_rule_doc(job))
    return dump(docs)


# ---------------------------------------------------------------------------------------------------
# Cluster access (kubernetes Python client: kubeconfig, or the in-cluster service account)


@dataclass
class Cluster:
    """API clients plus the namespace to use."""

    custom: Any
    core: Any
    namespace: str
    host: str


def connect(namespace: str | None = None, context: str | None = None) -> Cluster:
    """Load kubeconfig ($KUBECONFIG or ~/.kube/config) or the in-cluster config; UserError if neither."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    ns = namespace
    # read $KUBECONFIG now (the client reads it once, at import time); a ':'-separated list is merged
    kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
        if ns is None:
            try:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                ns = (active or {}).get("context", {}).get("namespace")
            except (ConfigException, KeyError, TypeError):
                ns = None
    except (ConfigException, FileNotFoundError, TypeError) as kube_err:
        try:
            config.load_incluster_config()
        except ConfigException:
            where = os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise UserError(
                f"no Kubernetes configuration: no usable kubeconfig ({where}: "
                f"{' '.join(str(kube_err).split())[:160]}) and not running inside a cluster; "
                f"set KUBECONFIG or run `kubectl config use-context ...`"
            ) from None
        if ns is None:
            sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            ns = sa_ns.read_text().strip() if sa_ns.is_file() else None
    cfg = client.Configuration.get_default_copy()
    cfg.retries = 1  # fail fast when the API server is unreachable
    api = client.ApiClient(cfg)
    return Cluster(
        custom=client.CustomObjectsApi(api), core=client.CoreV1Api(api), namespace=ns or "default", host=cfg.host
    )


TIMEOUT = (5, 30)


def _api_call(cluster: Cluster, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run one API call; turn unreachable servers and auth failures into one-line UserErrors."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return fn(*args, _request_timeout=TIMEOUT, **kwargs)
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"cannot reach the Kubernetes API server at {cluster.host} ({what}): "
            f"{' '.join(str(reason).split())[:200]}; check the kubeconfig context and the network"
        ) from None
    except ApiException as e:
        if e.status == 401:
            raise UserError(
                f"the Kubernetes API server at {cluster.host} rejected the credentials ({what}): "
                f"log in again / refresh the kubeconfig"
            ) from None
        if e.status == 403:
            raise UserError(
                f"forbidden: {what} in namespace {cluster.namespace!r}: {_api_message(e)}; "
                f"an admin can grant it with k8s/examples/rbac.yaml"
            ) from None
        raise


def _api_message(e: Any) -> str:
    import json

    try:
        return " ".join(str(json.loads(e.body).get("message", "")).split()) or str(e.reason)
    except (ValueError, TypeError, AttributeError):
        return str(e.reason)


def require_crd(cluster: Cluster) -> None:
    """UserError with the install command unless the API server serves kubeflow.org/v1 pytorchjobs."""
    from kubernetes.client.exceptions import ApiException

    missing = UserError(
        f"the PyTorchJob CRD ({PLURAL}.{GROUP}/{VERSION}) is not installed in the cluster at "
        f"{cluster.host}; install the Kubeflow training operator v1.9: {OPERATOR_INSTALL}"
    )
    try:
        resources = _api_call(cluster, "discover kubeflow.org/v1", cluster.custom.get_api_resources, GROUP, VERSION)
    except ApiException as e:
        if e.status == 404:
            raise missing from None
        raise
    if not any(res.name == PLURAL for res in (resources.resources or [])):
        raise missing


def _free_name(cluster: Cluster, name: str) -> str:
    try:
        listed = _api_call(
            cluster,
            "list pytorchjobs",
            cluster.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
        )
        taken = {item["metadata"]["name"] for item in listed.get("items", [])}
    except Exception:  # only a suggestion: never fail the error message itself
        taken = {name}
    i = 2
    while f"{name}-{i}" in taken:
        i += 1
    return f"{name}-{i}"


def follow_up(name: str, namespace: str, elastic: bool) -> str:
    """The commands to watch a submitted job."""
    pod = f"{name}-worker-0" if elastic else f"{name}-master-0"
    nsarg = f" NAMESPACE={namespace}"
    return "\n".join(
        [
            f"  make status JOB={name}{nsarg}     # conditions, replicas, pods",
            f"  make logs JOB={name}{nsarg}       # follow rank 0 ({pod}, container {CONTAINER})",
            f"  make delete JOB={name}{nsarg}",
            f"  kubectl -n {namespace} get pytorchjob {name} -w",
            f"  kubectl -n {namespace} wait --for=condition=Succeeded pytorchjob/{name} --timeout=168h",
            f"  kubectl -n {namespace} logs -f {pod} -c {CONTAINER}",
        ]
    )


def submit(job: Job, cluster: Cluster) -> dict:
    """Create the PyTorchJob; UserError for CRD missing, AlreadyExists, missing namespace, webhook rejection."""
    from kubernetes.client.exceptions import ApiException

    job.namespace = job.namespace or cluster.namespace
    cluster.namespace = job.namespace
    require_crd(cluster)
    body = render_pytorchjob(job)
    try:
        return _api_call(
            cluster,
            "create pytorchjobs",
            cluster.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            job.namespace,
            PLURAL,
            body,
        )
    except ApiException as e:
        msg = _api_message(e)
        if e.status == 409:
            raise UserError(
                f"pytorchjob {job.name!r} already exists in namespace {job.namespace!r}; delete it "
                f"(make delete JOB={job.name} NAMESPACE={job.namespace}) or submit under another "
                f"name: NAME={_free_name(cluster, job.name)}"
            ) from None
        if e.status == 404:
            if "namespace" in msg.lower():
                raise UserError(
                    f"namespace {job.namespace!r} does not exist: kubectl create namespace {job.namespace}"
                ) from None
            raise UserError(
                f"the PyTorchJob CRD is not served ({msg}); install the Kubeflow training operator "
                f"v1.9: {OPERATOR_INSTALL}"
            ) from None
        if e.status in (400, 422):
            raise UserError(f"the API server rejected pytorchjob {job.name!r}: {msg}") from None
        raise


def _get_job(cluster: Cluster, name: str) -> dict:
    from kubernetes.client.exceptions import ApiException

    require_crd(cluster)
    try:
        return _api_call(
            cluster,
            "get pytorchjobs",
            cluster.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
            name,
        )
    except ApiException as e:
        if e.status == 404:
            raise UserError(
                f"pytorchjob {name!r} not found in namespace {cluster.namespace!r} "
                f"(kubectl -n {cluster.namespace} get pytorchjobs lists them)"
            ) from None
        raise


def _age(ts: Any) -> str:
    import datetime as dt

    if not ts:
        return "-"
    if isinstance(ts, str):
        ts = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    secs = int((dt.datetime.now(dt.timezone.utc) - ts).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{max(secs, 0)}s"


def status_text(cluster: Cluster, name: str) -> str:
    """Conditions, replica statuses and pods of a PyTorchJob, as a small report."""
    obj = _get_job(cluster, name)
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    state = next(
        (c["type"] for c in reversed(conds) if c.get("status") == "True"),
        "Unknown (no conditions: is the training operator running?)",
    )
    meta = obj.get("metadata", {})
    lines = [
        f"pytorchjob {cluster.namespace}/{name}: {state}   "
        f"(recipe {meta.get('labels', {}).get('gnp.training/recipe', '?')}, "
        f"created {_age(meta.get('creationTimestamp'))} ago)"
    ]
    lines.append("conditions:")
    for c in conds:
        lines.append(
            f"  {c.get('type', ''):11s} {c.get('status', ''):6s} {c.get('reason', ''):24s} "
            f"{_age(c.get('lastTransitionTime')):>5s}  {c.get('message', '')}"
        )
    if not conds:
        lines.append("  (none yet)")
    for rtype, rs in (st.get("replicaStatuses") or {}).items():
        lines.append(
            f"replicas {rtype}: active {rs.get('active', 0)}, succeeded {rs.get('succeeded', 0)}, "
            f"failed {rs.get('failed', 0)}"
        )
    pods = _api_call(
        cluster,
        "list pods",
        cluster.core.list_namespaced_pod,
        cluster.namespace,
        label_selector=f"training.kubeflow.org/job-name={name}",
    )
    lines.append("pods:")
    if not pods.items:
        lines.append("  (none)")
    for p in sorted(pods.items, key=lambda p: p.metadata.name):
        restarts, detail = 0, ""
        for cs in p.status.container_statuses or []:
            if cs.name != CONTAINER:
                continue
            restarts = cs.restart_count
            s = cs.state
            if s and s.terminated:
                detail = f"exit {s.terminated.exit_code} ({s.terminated.reason or ''})"
            elif s and s.waiting:
                detail = f"waiting: {s.waiting.reason or ''}"
        lines.append(
            f"  {p.metadata.name:32s} {p.status.phase or '':10s} restarts {restarts:<3d} "
            f"node {p.spec.node_name or '-':20s} {detail}"
        )
    return "\n".join(lines)


def rank0_pod(obj: dict) -> str:
    """Pod of global rank 0: master-0, or worker-0 for elastic jobs (which have no Master)."""
    name = obj["metadata"]["name"]
    specs = obj.get("spec", {}).get("pytorchReplicaSpecs", {})
    return f"{name}-master-0" if "Master" in specs else f"{name}-worker-0"


def logs(cluster: Cluster, name: str, follow: bool = True, wait_s: float = 300, out: Any = None) -> None:
    """Stream the rank-0 pod's `pytorch` container log, waiting up to wait_s for it to start."""
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout

    pod = rank0_pod(_get_job(cluster, name))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            resp = _api_call(
                cluster,
                "read pods/log",
                cluster.core.read_namespaced_pod_log,
                pod,
                cluster.namespace,
                container=CONTAINER,
                follow=follow,
                _preload_content=False,
            )
            break
        except ApiException as e:
            if e.status not in (400, 404) or time.monotonic() > deadline:
                if e.status in (400, 404):
                    raise UserError(
                        f"pod {pod} has no log yet after {wait_s:.0f} s ({_api_message(e)}); see make status JOB={name}"
                    ) from None
                raise
            print(f"waiting for {pod}: {_api_message(e)}", file=sys.stderr)
            time.sleep(2)
    try:
        for chunk in resp.stream(4096):
            out.write(chunk.decode("utf-8", "replace"))
            out.flush()
    finally:
        resp.release_conn()


def delete(cluster: Cluster, name: str) -> None:
    """Delete the PyTorchJob; the operator's pods and Services are garbage-collected with it."""
    from kubernetes.client.exceptions import ApiException

    require_crd(cluster)
    try:
        _api_call(
            cluster,
            "delete pytorchjobs",
            cluster.custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
            name,
            propagation_policy="Background",
        )
    except ApiException as e:
        if e.status == 404:
            raise UserError(f"pytorchjob {name!r} not found in namespace {cluster.namespace!r}") from None
        raise


# ---------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python k8s/render.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="job spec keys:\n" + SPEC_DOC,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("jobs", help="list the job specs")

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("job", metavar="JOB", help="spec name in k8s/jobs/ or path to a spec file")
        sp.add_argument(
            "--set",
            dest="sets",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="trainer override added to the pod's arguments (repeatable)",
        )
        sp.add_argument(
            "--spec",
            dest="spec",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="job spec override, e.g. nodes=4 or resources.memory=64Gi (repeatable)",
        )
        sp.add_argument("--image", help="container image (default: the spec's image)")
        sp.add_argument("--name", help="PyTorchJob name (default: the spec name)")
        sp.add_argument("-n", "--namespace", help="namespace (default: spec, then kubeconfig context, then default)")

    r = sub.add_parser("render", help="print the manifests (no cluster needed)")
    job_args(r)
    r.add_argument(
        "--part",
        choices=["job", "convert", "monitoring", "all"],
        default="job",
        help="job: the PyTorchJob; convert: the dataset-conversion Job; monitoring: PodMonitor + "
        "dashboard ConfigMap (rendered from k8s/monitoring/dashboard.json); all: every one of them",
    )
    s = sub.add_parser("submit", help="render and create the PyTorchJob")
    job_args(s)
    s.add_argument("--context", help="kubeconfig context")
    for cmd, text in (
        ("status", "job conditions and pods"),
        ("logs", "follow the rank-0 log"),
        ("delete", "delete the PyTorchJob"),
    ):
        c = sub.add_parser(cmd, help=text)
        c.add_argument("name", metavar="NAME", help="PyTorchJob name")
        c.add_argument("-n", "--namespace")
        c.add_argument("--context", help="kubeconfig context")
        if cmd == "logs":
            c.add_argument("--no-follow", action="store_true", help="print the log so far and exit")
            c.add_argument("--wait", type=float, default=300, help="seconds to wait for the pod to start")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "jobs":
        for name in list_jobs():
            _, data = load_spec(name)
            print(f"{name:28s} {data.get('description', '')}")
        return 0
    if args.command in ("render", "submit"):
        job = build_job(
            args.job,
            sets=args.sets,
            spec_overrides=args.spec,
            image=args.image,
            namespace=args.namespace,
            name=args.name,
        )
        if args.command == "render":
            sys.stdout.write(render(job, args.part))
            return 0
        cluster = connect(job.namespace, args.context)
        submit(job, cluster)
        shape = (
            f"{job.nodes} pod(s), elastic {job.elastic[0]}-{job.elastic[1]}" if job.elastic else f"{job.nodes} pod(s)"
        )
        print(
            f"submitted pytorchjob {job.namespace}/{job.name}: recipe {job.recipe}, {shape} x {job.nproc} "
            f"process(es), image {job.image}"
        )
        print("follow it with:\n" + follow_up(job.name, job.namespace, bool(job.elastic)))
        return 0
    check_name(args.name)
    cluster = connect(args.namespace, args.context)
    if args.command == "status":
        print(status_text(cluster, args.name))
    elif args.command == "logs":
        logs(cluster, args.name, follow=not args.no_follow, wait_s=args.wait)
    elif args.command == "delete":
        delete(cluster, args.name)
        print(f"deleted pytorchjob {cluster.namespace}/{args.name} (its pods and services are garbage-collected)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
