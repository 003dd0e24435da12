"""The job spec: k8s/jobs/NAME.yaml merged over k8s/jobs/_defaults.yaml, validated into a typed JobSpec.

The YAML is read with trainer.config's strict loader (a key given twice is an error, as in recipes). Every
check raises UserError with one line naming the file and the key. Nothing here knows a manifest layout: the
manifest modules (pytorchjob.py, convert.py, ...) turn a JobSpec into objects.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError
from .thresholds import alert_thresholds

K8S_DIR = Path(__file__).resolve().parent.parent
ROOT = K8S_DIR.parent
JOBS_DIR = K8S_DIR / "jobs"
DEFAULTS_FILE = JOBS_DIR / "_defaults.yaml"
METRICS_PORT = 9300  # trainer default metrics.port; rank r listens on port + r
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# a label value: at most 63 characters, alphanumerics with - _ . inside (Kubernetes object-meta validation)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
TEMPLATE_KEYS = ("name", "recipe", "namespace")
IMAGE_ENV = "GNP_IMAGE"  # the project-level image a user sets once (make image and make submit both read it)

SPEC_DOC = """\
recipe                      trainer recipe (python -m trainer recipes, or a path)            required
image                       container image built from docker/Dockerfile and pushed           required
                            (--image / IMAGE=, else the spec, else $GNP_IMAGE)
nodes                       pods; the initial count when elastic                             1
gpus_per_node               nvidia.com/gpu per pod (0: CPU only)                             0
nproc_per_node              torchrun processes per pod                                       gpus_per_node
elastic.min_nodes/max_nodes elastic range (min < max): fewer pods go on when a Worker        -
                            other than worker-0 (the rendezvous host) is lost
max_restarts                torchrun group restarts inside a pod (elasticPolicy.maxRestarts) 3
resources.cpu/memory        per-pod requests (memory is also the limit; it covers /dev/shm)  required
resources.guaranteed        CPU limit = request too: the pod's QoS class is Guaranteed        false
resources.shm/tmp           sizes of the /dev/shm (memory) and /tmp emptyDirs                8Gi / 20Gi
dataset.pvc/path            FFCV dataset folder on a PVC (mounted read-only at /data)        one of
dataset.s3/size             or an s3:// prefix fetched into an emptyDir /data of that size   these two
checkpoint.uri              s3://bucket/prefix ({name} {recipe} {namespace} expand)           local /tmp
checkpoint.pvc/path         or a folder on a PVC mounted at /checkpoints                     -
s3_auth                     secret: keys from s3_secret; identity: the pod's service account  secret
                            (IRSA, EKS Pod Identity, GKE Workload Identity), no AWS_* Secret
s3_secret                   Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ optional  gnp-s3
                            AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION); checked before submit
service_account             pods' serviceAccountName (required by s3_auth: identity)          -
queue                       Kueue LocalQueue (label kueue.x-k8s.io/queue-name; the job is     -
                            created suspended and Kueue admits it)
                            (without it, submit uses the namespace's only LocalQueue, if any)
workload_priority           Kueue WorkloadPriorityClass (label kueue.x-k8s.io/priority-class) -
max_exec_seconds            Kueue's run-time cap (label kueue.x-k8s.io/max-exec-time-seconds) -
priority_class              pods' PriorityClass (also the gang's priorityClass)              -
scheduler_name              pods' schedulerName (e.g. volcano, scheduler-plugins-scheduler)   -
gang                        runPolicy.schedulingPolicy: all pods or none (Volcano or          false
                            scheduler-plugins, the operator's --gang-scheduler-name)
gang_queue                  the gang's Volcano queue (schedulingPolicy.queue)                -
retry_crashes               crashed ranks exit 201 (retried) instead of 1 (permanent)        true
crash_restarts              crashed starts in a row from one checkpoint before the run stops 3
                            with exit 3 (permanent); pod env GNP_CRASH_RESTARTS, the trainer's
                            run.crash_restarts default
backoff_limit / ttl_seconds_after_finished / active_deadline_seconds   runPolicy             3 / 7d / -
node_selector / tolerations / labels / annotations / env               pod template          -
gpu_product                 training pods' nodeSelector nvidia.com/gpu.product (GPU Feature   -
                            Discovery's label, e.g. NVIDIA-A100-SXM4-80GB); unset: any GPU
set                         extra trainer overrides (section.key=value)                      []
convert.dataset/source/source_s3/args/resources   the dataset-conversion Job                 -
name / namespace / description / gpu_resource / image_pull_policy / image_pull_secrets        -
alerts.<threshold>          this job's alert thresholds (ALERT_DEFAULTS; k8s/monitoring/README.md) -
api                         pytorchjob (operator v1.9), trainjob (Trainer v2.3), convert      pytorchjob
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
    "s3_auth",
    "s3_secret",
    "service_account",
    "queue",
    "workload_priority",
    "priority_class",
    "scheduler_name",
    "gang",
    "gang_queue",
    "retry_crashes",
    "crash_restarts",
    "max_exec_seconds",
    "gpu_product",
    "backoff_limit",
    "ttl_seconds_after_finished",
    "active_deadline_seconds",
    "node_selector",
    "tolerations",
    "labels",
    "annotations",
    "env",
    "set",
    "convert",
    "image_pull_policy",
    "image_pull_secrets",
    "alerts",
    "api",
}


# ---------------------------------------------------------------------------------------------------
# Reading the YAML


def list_jobs() -> list[str]:
    """Names of the job specs in k8s/jobs/ (files starting with `_` hold shared defaults)."""
    return sorted(p.stem for p in JOBS_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _read_yaml(path: Path) -> Any:
    from trainer.config import strict_yaml_load  # the loader of recipes: duplicate keys are errors

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
    from trainer.config import strict_yaml_load

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
        try:
            parsed = strict_yaml_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise UserError(f"--spec {text!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
        _set_path(spec, key.strip(), parsed)
    return str(spec.get("name") or path.stem), spec


# ---------------------------------------------------------------------------------------------------
# Typed access, one-line errors naming the key


@dataclass
class Reader:
    """Typed getters over one mapping of the spec; `where` is the file, `prefix` the dotted path so far."""

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
        ok = bool in kinds if isinstance(value, bool) else isinstance(value, kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise UserError(f"{self.where}: {full}: expected {names}, got {value!r}")
        return value

    def int(self, key: str, default: int | None = None, minimum: int = 0, required: bool = False) -> int | None:
        value = self.get(key, int, default, required)
        if value is not None and value < minimum:
            raise UserError(f"{self.where}: {self.prefix}{key}: expected an integer >= {minimum}, got {value}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            raise UserError(f"{self.where}: {self.prefix}{key}: expected one of {', '.join(allowed)}, got {value!r}")
        return value

    def strmap(self, key: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.get(key, dict, {}) or {}).items()}

    def sub(self, key: str) -> "Reader | None":
        value = self.get(key, dict)
        return None if value is None else Reader(self.where, value, f"{self.prefix}{key}.")

    def check_unknown(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UserError(
                    f"{self.where}: {self.prefix}{key}: unknown key; {hint}allowed: {', '.join(sorted(allowed))}"
                )

    def quantity(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.get(key, (str, int, float), default, required)
        if value is None:
            return None
        text = str(value)
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", text):
            raise UserError(
                f"{self.where}: {self.prefix}{key}: {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)"
            )
        return text

    def s3_uri(self, key: str, value: str) -> str:
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?", value):
            raise UserError(f"{self.where}: {self.prefix}{key}: {value!r} is not an s3://bucket/prefix URI")
        return value.rstrip("/")

    def rel_path(self, key: str, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise UserError(f"{self.where}: {self.prefix}{key}: {value!r} must be a relative path inside the volume")
        return value.strip("/")

    def dns_name(self, key: str, kind: str) -> str | None:
        """An optional object name (Kubernetes DNS-1123 subdomain rules, lowercase)."""
        value = self.get(key, str)
        if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
            raise UserError(f"{self.where}: {self.prefix}{key}: {value!r} is not a valid {kind} name")
        return value


def _doc_line(key: str) -> str:
    for line in SPEC_DOC.splitlines():
        if line.startswith(key.split(".")[0]):
            return " ".join(line.split()[1:-1])
    return "see python k8s/render.py --help"


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


def label_value(text: str) -> str:
    """`text` as a valid label value: a recipe path keeps its file stem; other characters become '-'."""
    if text.endswith((".yaml", ".yml")) or "/" in text:
        text = Path(text).stem
    text = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", text)


def _expand(text: str, values: dict) -> str:
    for k in TEMPLATE_KEYS:
        text = text.replace("{" + k + "}", values.get(k) or "")
    return text


def override_value(sets: Iterable[str], key: str) -> str | None:
    """The last `--set key=value` for `key` among trainer overrides (raw text)."""
    found = None
    for text in sets:
        k, _, v = text.partition("=")
        if k.strip() == key:
            found = v.strip()
    return found


# ---------------------------------------------------------------------------------------------------
# The typed spec


@dataclass
class Resources:
    cpu: str
    memory: str
    shm: str = "8Gi"
    tmp: str = "20Gi"
    guaranteed: bool = False  # CPU limit = request (memory always is): QoS class Guaranteed


@dataclass
class Dataset:
    """Exactly one of pvc (with a relative path) or s3 (fetched into an emptyDir of `size`)."""

    pvc: str | None = None
    path: str = ""
    s3: str | None = None
    size: str = "50Gi"


@dataclass
class Checkpoint:
    """uri (s3://) or pvc + path; None in JobSpec means the run's local /tmp."""

    uri: str | None = None
    pvc: str | None = None
    path: str = ""


@dataclass
class Scheduling:
    """How a shared cluster queues and places the job (all optional)."""

    queue: str | None = None  # Kueue LocalQueue
    workload_priority: str | None = None  # Kueue WorkloadPriorityClass
    priority_class: str | None = None  # PriorityClass of the pods
    scheduler_name: str | None = None
    gang: bool = False  # runPolicy.schedulingPolicy (Volcano / scheduler-plugins)
    gang_queue: str | None = None
    max_exec_seconds: int | None = None  # Kueue's kueue.x-k8s.io/max-exec-time-seconds


@dataclass
class Convert:
    dataset: str
    args: list[str]
    source: str | None = None  # a path in the image, or /data/... on the dataset PVC
    source_s3: str | None = None
    resources: Resources = field(default_factory=lambda: Resources("4", "16Gi", tmp="50Gi"))


@dataclass
class JobSpec:
    """A validated job spec: everything a manifest builder needs, nothing about a manifest layout."""

    name: str
    namespace: str | None
    recipe: str
    image: str | None  # None: not named yet (require_image refuses the manifests that run it)
    nodes: int
    nproc: int
    gpus: int
    gpu_resource: str
    elastic: tuple[int, int] | None  # (min, max) pods when min < max
    max_restarts: int
    sets: list[str]  # the pod's trainer overrides: platform's, then the spec's, then the command line's
    resources: Resources
    dataset: Dataset
    checkpoint: Checkpoint | None
    s3_auth: str  # "secret" | "identity"
    s3_secret: str
    uses_s3: bool
    service_account: str | None
    scheduling: Scheduling
    retry_crashes: bool
    crash_restarts: int  # GNP_CRASH_RESTARTS: the trainer exits 3 (EXIT_CRASH_LOOP) after that many crashes
    backoff_limit: int
    ttl_seconds_after_finished: int
    active_deadline_seconds: int | None
    node_selector: dict[str, str]
    tolerations: list
    labels: dict[str, str]
    annotations: dict[str, str]
    env: dict[str, str]
    pull_policy: str
    pull_secrets: list[str]
    metrics_port: int
    convert: Convert | None
    alerts: dict | None = None  # alert thresholds when the spec sets `alerts:` (its own PrometheusRule)
    description: str = ""
    api: str = "pytorchjob"  # the job kind, a key of kinds.KINDS: pytorchjob (kubeflow.org/v1), trainjob or convert
    where: str = ""  # the spec file, for messages about it

    @property
    def args(self) -> list[str]:
        """The container's arguments (the image's entrypoint runs `train` under torchrun)."""
        return ["train", "--recipe", self.recipe] + [a for s in self.sets for a in ("--set", s)]

    @property
    def data_path(self) -> str:
        return override_value(self.sets, "data.path") or "/data"


def load_job(
    job: str,
    *,
    sets: Iterable[str] = (),
    spec_overrides: Iterable[str] = (),
    image: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
) -> JobSpec:
    """Read spec JOB (+ overrides), validate every key, and return the JobSpec."""
    default_name, data = load_spec(job, spec_overrides)
    path = spec_path(job)
    where = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else job
    r = Reader(where, data)
    r.check_unknown(SPEC_KEYS)
    recipe = r.get("recipe", str, required=True)
    name = name or default_name
    namespace = namespace or r.get("namespace", str)
    values = {"name": name, "recipe": recipe, "namespace": namespace or ""}
    nodes, nproc, gpus, elastic = _shape(r)
    check_name(name, (elastic[1] if elastic else nodes) - 1)
    dataset = _dataset(r, values)
    checkpoint = _checkpoint(r, values)
    sets = _trainer_sets(r, recipe, dataset, checkpoint, list(sets), nproc, nodes, elastic)
    uses_s3 = bool(dataset.s3) or (override_value(sets, "checkpoint.uri") or "").startswith("s3://")
    s3_auth = r.choice("s3_auth", ("secret", "identity"), "secret")
    service_account = r.dns_name("service_account", "ServiceAccount")
    if s3_auth == "identity" and not service_account:
        raise UserError(
            f"{where}: s3_auth: identity needs service_account (the ServiceAccount annotated for IRSA, "
            f"EKS Pod Identity or GKE Workload Identity)"
        )
    port = override_value(sets, "metrics.port")
    pull_policy = r.choice("image_pull_policy", ("Always", "IfNotPresent", "Never"), "IfNotPresent")
    r.get("description", str)
    return JobSpec(
        name=name,
        namespace=namespace,
        recipe=recipe,
        image=_image(r, image),
        nodes=nodes,
        nproc=nproc,
        gpus=gpus,
        gpu_resource=r.get("gpu_resource", str, "nvidia.com/gpu"),
        elastic=elastic,
        max_restarts=r.int("max_restarts", 3),
        sets=sets,
        resources=_resources(r),
        dataset=dataset,
        checkpoint=checkpoint,
        s3_auth=s3_auth,
        s3_secret=r.dns_name("s3_secret", "Secret") or "gnp-s3",
        uses_s3=uses_s3,
        service_account=service_account,
        scheduling=_scheduling(r),
        retry_crashes=r.get("retry_crashes", bool, True),
        crash_restarts=r.int("crash_restarts", 3),
        backoff_limit=r.int("backoff_limit", 3),
        ttl_seconds_after_finished=r.int("ttl_seconds_after_finished", 7 * 24 * 3600),
        active_deadline_seconds=r.int("active_deadline_seconds", None, minimum=1),
        node_selector=_node_selector(r),
        tolerations=r.get("tolerations", list, []),
        labels=r.strmap("labels"),
        annotations=r.strmap("annotations"),
        env=r.strmap("env"),
        pull_policy=pull_policy,
        pull_secrets=[str(s) for s in r.get("image_pull_secrets", list, [])],
        metrics_port=int(port) if port and port.isdigit() else METRICS_PORT,
        convert=_convert(r, values, dataset),
        alerts=_alerts(r),
        description=r.get("description", str, ""),
        api=r.get("api", str, "pytorchjob"),  # checked by kinds.get (the registry), which the CLI asks at once
        where=where,
    )


GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on GPU nodes by NVIDIA GPU Feature Discovery


def _node_selector(r: Reader) -> dict[str, str]:
    """node_selector plus gpu_product (a spec key of its own, so the specs name no GPU model by default)."""
    out = r.strmap("node_selector")
    product = r.get("gpu_product", str)
    if product is not None:
        if not LABEL_VALUE.match(product) or not product:
            raise UserError(f"{r.where}: gpu_product: {product!r} is not a label value (e.g. NVIDIA-A100-SXM4-80GB)")
        if out.get(GPU_PRODUCT_LABEL, product) != product:
            raise UserError(
                f"{r.where}: gpu_product {product!r} and node_selector {GPU_PRODUCT_LABEL}: "
                f"{out[GPU_PRODUCT_LABEL]!r} disagree; keep one"
            )
        out[GPU_PRODUCT_LABEL] = product
    return out


def _image(r: Reader, given: str | None) -> str | None:
    """--image / IMAGE=, else the spec's `image`, else $GNP_IMAGE; None when none is set (nothing invented:
    the manifests that run the image refuse it, see require_image)."""
    image = given or r.get("image", str) or os.environ.get(IMAGE_ENV, "").strip() or None
    if image is not None and (any(c.isspace() for c in image) or not image.strip()):
        raise UserError(f"{r.where}: image {image!r} is not an image reference")
    return image


def require_image(spec: "JobSpec") -> str:
    """The image of a manifest that runs it; one-line UserError naming how to set it when none is named."""
    if not spec.image:
        raise UserError(
            "no container image: build and push one (make image IMAGE=<registry>/gnp-trainer:<tag>), then pass "
            f"IMAGE=... to make (--image), set `image:` in the job spec, or export {IMAGE_ENV}=... once"
        )
    return spec.image


def _shape(r: Reader) -> tuple[int, int, int, tuple[int, int] | None]:
    nodes = r.int("nodes", 1, minimum=1)
    gpus = r.int("gpus_per_node", 0, minimum=0)
    nproc = r.int("nproc_per_node", gpus or None, minimum=1)
    if nproc is None:
        raise UserError(f"{r.where}: nproc_per_node is required when gpus_per_node is 0 (CPU processes per pod)")
    el = r.sub("elastic")
    elastic = None
    if el is not None:
        el.check_unknown({"min_nodes", "max_nodes"})
        lo, hi = el.int("min_nodes", required=True, minimum=1), el.int("max_nodes", required=True, minimum=1)
        if lo > hi or not lo <= nodes <= hi:
            raise UserError(f"{r.where}: elastic: need min_nodes <= nodes <= max_nodes, got {lo} <= {nodes} <= {hi}")
        elastic = (lo, hi) if lo < hi else None
    return nodes, nproc, gpus, elastic


def _dataset(r: Reader, values: dict) -> Dataset:
    ds = r.sub("dataset")
    if ds is None:
        raise UserError(f"{r.where}: dataset is required (dataset.pvc + dataset.path, or dataset.s3)")
    ds.check_unknown({"pvc", "path", "s3", "size"})
    if ds.get("pvc", str) and ds.get("s3", str):
        raise UserError(f"{r.where}: dataset: give either pvc (+ path) or s3, not both")
    if ds.get("pvc", str):
        return Dataset(pvc=ds.get("pvc", str), path=ds.rel_path("path", _expand(ds.get("path", str, ""), values)))
    if ds.get("s3", str):
        return Dataset(s3=ds.s3_uri("s3", _expand(ds.get("s3", str), values)), size=ds.quantity("size", "50Gi"))
    raise UserError(f"{r.where}: dataset needs pvc (+ path) or s3")


def _checkpoint(r: Reader, values: dict) -> Checkpoint | None:
    ck = r.sub("checkpoint")
    if ck is None:
        return None
    ck.check_unknown({"uri", "pvc", "path"})
    if ck.get("uri", str) and ck.get("pvc", str):
        raise UserError(f"{r.where}: checkpoint: give either uri or pvc (+ path), not both")
    if ck.get("uri", str):
        return Checkpoint(uri=ck.s3_uri("uri", _expand(ck.get("uri", str), values)))
    if ck.get("pvc", str):
        return Checkpoint(
            pvc=ck.get("pvc", str), path=ck.rel_path("path", _expand(ck.get("path", str, "{name}"), values))
        )
    return None


def _trainer_sets(
    r: Reader,
    recipe: str,
    dataset: Dataset,
    checkpoint: Checkpoint | None,
    user_sets: list[str],
    nproc: int,
    nodes: int,
    elastic: tuple[int, int] | None,
) -> list[str]:
    """What the pod needs, then the spec's `set`, then the command line's (later wins); checked by the trainer."""
    spec_sets = [str(s) for s in r.get("set", list, [])]
    for s in spec_sets + user_sets:
        if "=" not in s:
            raise UserError(f"{r.where}: set: {s!r} is not of the form section.key=value")
    base = ["run.dir=/tmp/run", "metrics.prometheus=true"]
    if dataset.pvc:
        base.append(f"data.path={'/data/' + dataset.path if dataset.path else '/data'}")
    else:
        base.append("data.path=/data")
    if checkpoint and checkpoint.uri:
        base.append(f"checkpoint.uri={checkpoint.uri}")
    elif checkpoint and checkpoint.pvc:
        base.append(f"checkpoint.uri=/checkpoints/{checkpoint.path}")
    out = base + spec_sets + user_sets
    _check_trainer_config(r.where, recipe, out, nproc, nodes, elastic)
    return out


def _check_trainer_config(
    where: str, recipe: str, sets: list[str], nproc: int, nodes: int, elastic: tuple[int, int] | None
) -> None:
    """Load the trainer config the pod will load, so typos fail here rather than in the cluster."""
    from trainer import config as tconfig  # installed with gnpk8s (pip install [--no-deps] -e .)

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


def _resources(r: Reader) -> Resources:
    res = r.sub("resources")
    if res is None:
        raise UserError(f"{r.where}: resources is required (resources.cpu and resources.memory)")
    res.check_unknown({"cpu", "memory", "shm", "tmp", "guaranteed"})
    return Resources(
        cpu=res.quantity("cpu", required=True),
        memory=res.quantity("memory", required=True),
        shm=res.quantity("shm", "8Gi"),
        tmp=res.quantity("tmp", "20Gi"),
        guaranteed=res.get("guaranteed", bool, False),
    )


def _scheduling(r: Reader) -> Scheduling:
    gang = r.get("gang", bool, False)
    gang_queue = r.get("gang_queue", str)
    if gang_queue and not gang:
        raise UserError(f"{r.where}: gang_queue is set but gang is false (set gang: true)")
    return Scheduling(
        queue=r.dns_name("queue", "Kueue LocalQueue"),
        workload_priority=r.dns_name("workload_priority", "Kueue WorkloadPriorityClass"),
        priority_class=r.dns_name("priority_class", "PriorityClass"),
        scheduler_name=r.get("scheduler_name", str),
        gang=gang,
        gang_queue=gang_queue,
        max_exec_seconds=r.int("max_exec_seconds", None, minimum=1),
    )


def _convert(r: Reader, values: dict, dataset: Dataset) -> Convert | None:
    cv = r.sub("convert")
    if cv is None:
        return None
    cv.check_unknown({"dataset", "source", "source_s3", "args", "resources"})
    out = Convert(dataset=cv.get("dataset", str, required=True), args=[str(a) for a in cv.get("args", list, [])])
    if cv.get("source", str) and cv.get("source_s3", str):
        raise UserError(f"{r.where}: convert: give either source or source_s3, not both")
    if cv.get("source_s3", str):
        out.source_s3 = cv.s3_uri("source_s3", _expand(cv.get("source_s3", str), values))
    elif cv.get("source", str):
        src = _expand(cv.get("source", str), values)
        # relative: inside the dataset volume; absolute: inside the image (e.g. /usr/share/datasets/...)
        if not src.startswith("/"):
            if not dataset.pvc:
                raise UserError(
                    f"{r.where}: convert.source {src!r} is relative to the dataset PVC, but the "
                    f"dataset is on S3: use convert.source_s3 or an absolute path in the image"
                )
            src = "/data/" + cv.rel_path("source", src)
        out.source = src
    res = cv.sub("resources")
    if res is not None:
        res.check_unknown({"cpu", "memory", "tmp"})
        out.resources = Resources(
            cpu=res.quantity("cpu", "4"), memory=res.quantity("memory", "16Gi"), tmp=res.quantity("tmp", "50Gi")
        )
    return out


def _alerts(r: Reader) -> dict | None:
    if not r.get("alerts", dict):
        return None
    return alert_thresholds(r.sub("alerts"))
