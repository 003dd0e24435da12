"""What every pod of a job shares, whatever the job kind: the trainer container, its env and volumes, the
`restricted` Pod Security Standard settings, QoS, labels and scheduling fields.

A job kind (pytorchjob.py today) wraps `pod_template(spec)` in its own replica layout.
"""

from __future__ import annotations

from .spec import JobSpec, Resources, label_value, require_image

CONTAINER = "pytorch"  # the training operator reads exit codes and adds its port only on this container
RDZV_PORT = 23456  # the operator's default `pytorchjob-port`
UID = 1000  # the image's user (docker/setup.sh)
# Labels Kueue reads on the job object itself (kueue.sigs.k8s.io, "Run a PyTorchJob"; constants in
# kubernetes-sigs/kueue pkg/controller/constants/constants.go): the LocalQueue and the WorkloadPriorityClass.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_MAX_EXEC_LABEL = "kueue.x-k8s.io/max-exec-time-seconds"  # Kueue stops the workload after this run time
CRASH_RESTARTS_ENV = "GNP_CRASH_RESTARTS"  # the trainer's default of run.crash_restarts (exit 3 when spent)
# Room for what the container writes outside its volumes (its log files under /var/log/pods count against
# the container's ephemeral-storage; the root file system is read-only).
LOG_ALLOWANCE_MI = 1024
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_UNITS.update({"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1})


def pod_security() -> dict:
    """Pod-level settings of the `restricted` Pod Security Standard (kubernetes.io/docs/concepts/security/
    pod-security-standards): non-root, RuntimeDefault seccomp. fsGroupChangePolicy OnRootMismatch: the
    kubelet re-owns a volume only when its root does not already belong to fsGroup, not at every mount of a
    large dataset PVC (kubernetes.io/docs/tasks/configure-pod-container/security-context)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict:
    """Container-level settings of the `restricted` profile (no privilege escalation, every capability
    dropped), plus a read-only root file system (the trainer writes only to its volumes)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def quantity_bytes(text: str) -> int:
    """Bytes of a Kubernetes quantity as spec.py accepts them (an integer or decimal with a binary/SI suffix)."""
    num = text.rstrip("KMGTPEikm")
    unit = text[len(num) :]
    if unit == "m":  # milli-bytes: only meaningful for CPU, but a valid quantity
        return int(float(num) / 1000)
    return int(float(num) * _UNITS[unit])


def ephemeral_storage(*sizes: str) -> str:
    """The container's ephemeral-storage: the disk-backed emptyDirs it writes (their sizeLimits) plus the
    log allowance. The scheduler places the pod only where that much node disk is free, and the kubelet
    evicts it past the limit instead of letting it fill the node's disk under other tenants' pods."""
    total = sum(quantity_bytes(s) for s in sizes) + LOG_ALLOWANCE_MI * 2**20
    return f"{-(-total // 2**20)}Mi"


def resources(res: Resources, extra: dict[str, str] | None = None, scratch: str | None = None) -> dict:
    """requests and limits; memory's limit is its request, CPU's too when `guaranteed` (QoS Guaranteed:
    every container's requests equal its limits for CPU and memory; ephemeral-storage does not enter QoS).
    `scratch`: the container's ephemeral-storage, request = limit."""
    disk = {"ephemeral-storage": scratch} if scratch else {}
    requests = {"cpu": res.cpu, "memory": res.memory, **disk, **(extra or {})}
    limits = {"memory": res.memory, **disk, **(extra or {})}
    if res.guaranteed:
        limits["cpu"] = res.cpu
    return {"requests": requests, "limits": limits}


def s3_env(spec: JobSpec) -> list[dict]:
    """S3 access for boto3: from the spec's Secret, or nothing but the checksum settings when the pod's
    identity (its service account: IRSA, EKS Pod Identity, GKE Workload Identity) gives the credentials."""
    out = []
    if spec.s3_auth == "secret":

        def ref(key: str, optional: bool) -> dict:
            sel = {"name": spec.s3_secret, "key": key}
            if optional:
                sel["optional"] = True
            return {"name": key, "valueFrom": {"secretKeyRef": sel}}

        out += [
            ref("AWS_ACCESS_KEY_ID", False),
            ref("AWS_SECRET_ACCESS_KEY", False),
            ref("AWS_ENDPOINT_URL_S3", True),
            ref("AWS_DEFAULT_REGION", True),
        ]
    # botocore >= 1.36 sends CRC checksums by default, which several S3-compatible stores (older MinIO,
    # Ceph RGW, SeaweedFS) reject; "when_required" restores the former behaviour (boto3 docs,
    # "Data Integrity Protections for Amazon S3", request_checksum_calculation).
    out += [
        {"name": "AWS_REQUEST_CHECKSUM_CALCULATION", "value": "when_required"},
        {"name": "AWS_RESPONSE_CHECKSUM_VALIDATION", "value": "when_required"},
    ]
    return out


def job_labels(spec: JobSpec, component: str = "training") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "gnp-trainer",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
        "gnp.training/recipe": label_value(spec.recipe),
    }


def queue_labels(spec: JobSpec, training: bool = True) -> dict[str, str]:
    """Kueue's labels for the job object's own metadata (Kueue reads them there, not on pod templates).
    The run-time cap (max_exec_seconds) is sized for training, so the conversion Job does not get it."""
    out = {}
    sch = spec.scheduling
    if sch.queue:
        out[KUEUE_QUEUE_LABEL] = sch.queue
    if sch.workload_priority:
        out[KUEUE_PRIORITY_LABEL] = sch.workload_priority
    if training and sch.max_exec_seconds:
        out[KUEUE_MAX_EXEC_LABEL] = str(sch.max_exec_seconds)
    return out


def meta(name: str, namespace: str | None, labels: dict) -> dict:
    out: dict = {"name": name}
    if namespace:
        out["namespace"] = namespace
    out["labels"] = dict(labels)
    return out


def volumes_and_mounts(spec: JobSpec) -> tuple[list[dict], list[dict]]:
    """The training pod's volumes: the dataset (PVC read-only, or an emptyDir the entrypoint fills from S3),
    a checkpoint PVC if any, /tmp and /dev/shm (the root file system is read-only)."""
    ds = spec.dataset
    if ds.pvc:
        volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": ds.pvc, "readOnly": True}}]
        mounts = [{"name": "data", "mountPath": "/data", "readOnly": True}]
    else:
        volumes = [{"name": "data", "emptyDir": {"sizeLimit": ds.size}}]
        mounts = [{"name": "data", "mountPath": "/data"}]
    ck = spec.checkpoint
    if ck and ck.pvc:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": ck.pvc}})
        mounts.append({"name": "checkpoints", "mountPath": "/checkpoints"})
    volumes += [
        {"name": "tmp", "emptyDir": {"sizeLimit": spec.resources.tmp}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm}},
    ]
    mounts += [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return volumes, mounts


# A pod that comes back after a loss must be able to join the next rendezvous round. With torchrun's default
# shared TCPStore, each agent builds the bootstrap store info (MASTER_ADDR/PORT) only in the first round it
# took part in and caches it (pytorch v2.14 torch/distributed/elastic/rendezvous/dynamic_rendezvous.py,
# DynamicRendezvousHandler.next_rendezvous), so a recreated worker-1 waits for keys of the new round that
# worker-0 never writes and its agent fails after 60 s (tests/test_elastic_drill.py ran into exactly this).
# This documented opt-out makes every round publish them again.
REJOIN_ENV = {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"}


def train_env(spec: JobSpec) -> list[dict]:
    env: list[dict] = [{"name": "GNP_JOB_NAME", "value": spec.name}]
    if spec.dataset.s3:
        env += [{"name": "GNP_DATA_S3", "value": spec.dataset.s3}, {"name": "GNP_DATA_DIR", "value": "/data"}]
    if spec.uses_s3:
        env += s3_env(spec)
    env.append({"name": "GNP_RETRY_CRASHES", "value": "1" if spec.retry_crashes else "0"})
    env.append({"name": CRASH_RESTARTS_ENV, "value": str(spec.crash_restarts)})
    env.append(REJOIN_ENV)
    env += [{"name": k, "value": v} for k, v in spec.env.items()]
    return env


def train_container(spec: JobSpec) -> dict:
    ports = [{"name": "pytorchjob-port", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    ports += [
        {"name": f"metrics-{i}", "containerPort": spec.metrics_port + i, "protocol": "TCP"} for i in range(spec.nproc)
    ]
    gpus = {spec.gpu_resource: str(spec.gpus)} if spec.gpus else None
    _, mounts = volumes_and_mounts(spec)
    return {
        "name": CONTAINER,
        "image": require_image(spec),
        "imagePullPolicy": spec.pull_policy,
        "args": spec.args,
        "env": train_env(spec),
        "ports": ports,
        "resources": resources(spec.resources, gpus, train_scratch(spec)),
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }


def train_scratch(spec: JobSpec) -> str:
    """ephemeral-storage of the training container: /tmp, plus /data when S3 fills it (/dev/shm is memory)."""
    return ephemeral_storage(spec.resources.tmp, *([spec.dataset.size] if spec.dataset.s3 else []))


def scheduling_fields(spec: JobSpec, *, training: bool = True) -> dict:
    """Pod-spec fields for placement. GPU tolerations and the GPU node selector belong to training pods
    only: a CPU-only conversion pod must not take a GPU node's room."""
    out: dict = {}
    if spec.service_account:
        out["serviceAccountName"] = spec.service_account
    if training and spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if training and spec.tolerations:
        out["tolerations"] = list(spec.tolerations)
    if spec.scheduling.priority_class:
        out["priorityClassName"] = spec.scheduling.priority_class
    if spec.scheduling.scheduler_name:
        out["schedulerName"] = spec.scheduling.scheduler_name
    if spec.pull_secrets:
        out["imagePullSecrets"] = [{"name": s} for s in spec.pull_secrets]
    return out


def pod_template(spec: JobSpec) -> dict:
    """The training pod template shared by every replica of every job kind."""
    # The operator adds training.kubeflow.org/job-name to every pod itself (the PodMonitor selects on it);
    # setting the same value here makes the selection visible in the manifest and testable offline.
    labels = {**job_labels(spec), **spec.labels, "training.kubeflow.org/job-name": spec.name}
    annotations = {"sidecar.istio.io/inject": "false", **spec.annotations}
    volumes, _ = volumes_and_mounts(spec)
    return {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            # The trainer needs no API access; IRSA / EKS Pod Identity add their own projected token volume
            # and GKE Workload Identity answers on the metadata server, so identity works without it.
            "automountServiceAccountToken": False,
            "securityContext": pod_security(),
            **scheduling_fields(spec),
            "containers": [train_container(spec)],
            "volumes": volumes,
        },
    }
