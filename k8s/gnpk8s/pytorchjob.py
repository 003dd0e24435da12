"""The kubeflow.org/v1 PyTorchJob of a JobSpec, for the Kubeflow training operator v1.9.

Layout: Workers only, always with an `elasticPolicy` (c10d rendezvous on worker-0; min = max pods for a
fixed-size job). Why not Master + Workers: for a job with a Master the v1.9 operator injects an
`init-pytorch` container into every Worker pod (pkg/controller.v1/pytorch/initcontainer.go at v1.9.0: an
alpine image that loops on `nslookup <job>-master-0`, with resources but no securityContext), which a
namespace enforcing the `restricted` Pod Security Standard refuses and an air-gapped cluster cannot pull.
With no Master replica the operator injects nothing. The elasticPolicy is also what makes the operator set
PET_MAX_RESTARTS (pkg/controller.v1/pytorch/envvar_elastic.go), so `max_restarts` holds for every job.

What a loss does (c10d keeps its store inside worker-0's agent):
  - a Worker other than worker-0 lost: the other agents re-form the group (elastic jobs go on with fewer
    pods down to min_nodes; fixed-size jobs wait for the recreated pod), every rank restarts from the last
    checkpoint, and the recreated pod joins at the next rendezvous;
  - worker-0 lost: the store is gone, every other agent exits within seconds with a retried status (200 for
    the RendezvousConnectionError, or 201 when its rank's collective failed first; both retried under
    `restartPolicy: ExitCode`), the operator recreates the pods and the job resumes from its last
    checkpoint. tests/test_elastic_drill.py runs both with two real agents.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

from . import cluster as kube
from .errors import UserError
from .kueue import resolve_queue
from .pod import CONTAINER, job_labels, meta, pod_template, queue_labels
from .spec import JobSpec

NAME = "pytorchjob"  # the spec's `api` and the CLI's --api
GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
MAKE_API = ""  # what make status|logs|delete add to name this kind
KUEUE_FRAMEWORK = "kubeflow.org/pytorchjob"  # Kueue's integrations.frameworks entry
# Kueue's default configuration no longer enables the Trainer v1 integration (kubernetes-sigs/kueue PR #12606)
KUEUE_HINT = "; or submit with API=trainjob (Kueue manages TrainJobs by default)"
OPERATOR_INSTALL = (
    "kubectl apply --server-side -k "
    '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"'
)


def run_policy(spec: JobSpec) -> dict:
    """runPolicy: restarts, clean-up, deadline, and how a shared cluster queues and gangs the job."""
    # backoffLimit only counts restarts of running pods; ExitCode recreates pods instead, so
    # activeDeadlineSeconds is the bound that always holds (training-operator v1.9.0,
    # pkg/controller.v1/common/job.go: pastBackoffLimit counts container restarts of OnFailure/Always pods).
    # cleanPodPolicy Running: when the job ends, pods still running (agents waiting on a dead rendezvous)
    # are deleted; finished pods stay for their logs until the TTL.
    out: dict = {
        "cleanPodPolicy": "Running",
        "backoffLimit": spec.backoff_limit,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }
    if spec.active_deadline_seconds is not None:
        out["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.scheduling.queue:
        # Kueue's PyTorchJob integration admits a job by un-suspending it (kubernetes-sigs/kueue
        # pkg/controller/jobs/kubeflow/kubeflowjob: IsSuspended/Suspend read runPolicy.suspend); created
        # suspended, no pod exists before admission even if Kueue's webhook is not in the path.
        out["suspend"] = True
    sch = spec.scheduling
    if sch.gang:
        # The operator, started with --gang-scheduler-name=volcano|scheduler-plugins, creates a PodGroup from
        # this (pkg/controller.v1/common/job.go at v1.9.0); minAvailable = every pod, so none starts alone.
        sp: dict = {"minAvailable": spec.nodes}
        if sch.gang_queue:
            sp["queue"] = sch.gang_queue
        if sch.priority_class:
            sp["priorityClass"] = sch.priority_class
        out["schedulingPolicy"] = sp
    return out


def elastic_policy(spec: JobSpec) -> dict:
    lo, hi = spec.elastic or (spec.nodes, spec.nodes)
    # nProcPerNode inside elasticPolicy is deprecated in v1.9: spec.nprocPerNode carries it.
    return {"rdzvBackend": "c10d", "minReplicas": lo, "maxReplicas": hi, "maxRestarts": spec.max_restarts}


def build(spec: JobSpec) -> dict:
    """The PyTorchJob object (validates against the v1.9 CRD and its webhook rules)."""
    replica = {"replicas": spec.nodes, "restartPolicy": "ExitCode", "template": copy.deepcopy(pod_template(spec))}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": meta(spec.name, spec.namespace, {**job_labels(spec), **queue_labels(spec)}),
        "spec": {
            "nprocPerNode": str(spec.nproc),
            "runPolicy": run_policy(spec),
            "elasticPolicy": elastic_policy(spec),
            "pytorchReplicaSpecs": {"Worker": replica},
        },
    }


def render(spec: JobSpec) -> list[dict]:
    """Every object submit creates, in order: the PyTorchJob alone."""
    return [build(spec)]


def rank0_pod(obj: dict) -> str:
    """Pod of global rank 0: worker-0 (master-0 for a job created with a Master by an older renderer)."""
    name = obj["metadata"]["name"]
    specs = obj.get("spec", {}).get("pytorchReplicaSpecs", {})
    return f"{name}-master-0" if "Master" in specs else f"{name}-worker-0"


# ---------------------------------------------------------------------------------------------------
# Cluster calls for a PyTorchJob: submit, status, logs, delete (kinds.py dispatches here)


def require_crd(cluster: kube.Cluster) -> None:
    """UserError with the install command unless the API server serves kubeflow.org/v1 pytorchjobs."""
    missing = UserError(
        f"the PyTorchJob CRD ({PLURAL}.{GROUP}/{VERSION}) is not installed in the cluster at "
        f"{cluster.host}; install the Kubeflow training operator v1.9: {OPERATOR_INSTALL}"
    )
    kube.require_api(cluster, GROUP, VERSION, {PLURAL}, missing)


def submit(job: JobSpec, cluster: kube.Cluster) -> dict:
    """Create the PyTorchJob; UserError for CRD missing, AlreadyExists, missing namespace, webhook rejection."""
    from kubernetes.client.exceptions import ApiException

    require_crd(cluster)
    kube.require_s3_secret(job, cluster)
    resolve_queue(job, cluster)
    try:
        return kube.custom_call(cluster, "create", GROUP, VERSION, PLURAL, build(job))
    except ApiException as e:
        raise _create_error(e, job, cluster) from None


def _create_error(e: Any, job: JobSpec, cluster: kube.Cluster) -> Exception:
    if e.status == 409:
        return UserError(
            f"pytorchjob {job.name!r} already exists in namespace {job.namespace!r}; delete it "
            f"(make delete JOB={job.name} NAMESPACE={job.namespace}) or submit under another "
            f"name: NAME={kube.free_name(cluster, GROUP, VERSION, PLURAL, job.name)}"
        )
    known = kube.create_error(e, NAME, job.name, job.namespace)
    if known is not None:
        return known
    if e.status == 404:
        return UserError(
            f"the PyTorchJob CRD is not served ({kube.api_message(e)}); install the Kubeflow training operator "
            f"v1.9: {OPERATOR_INSTALL}"
        )
    return e


def get(cluster: kube.Cluster, name: str) -> dict:
    """The PyTorchJob; UserError when the CRD or the job is missing."""
    require_crd(cluster)
    obj = kube.get_custom(cluster, GROUP, VERSION, PLURAL, name)
    if obj is None:
        raise UserError(
            f"pytorchjob {name!r} not found in namespace {cluster.namespace!r} "
            f"(kubectl -n {cluster.namespace} get pytorchjobs lists them)"
        )
    return obj


def status(cluster: kube.Cluster, name: str) -> str:
    """Conditions, replica statuses and pods of a PyTorchJob, as a small report."""
    obj = get(cluster, name)
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    state = kube.state_of(conds, "Unknown (no conditions: is the training operator running?)")
    md = obj.get("metadata", {})
    recipe = md.get("labels", {}).get("gnp.training/recipe", "?")
    lines = [
        f"pytorchjob {cluster.namespace}/{name}: {state}   "
        f"(recipe {recipe}, created {kube.age(md.get('creationTimestamp'))} ago)"
    ]
    lines += kube.condition_lines(conds)
    for rtype, rs in (st.get("replicaStatuses") or {}).items():
        lines.append(
            f"replicas {rtype}: active {rs.get('active', 0)}, succeeded {rs.get('succeeded', 0)}, "
            f"failed {rs.get('failed', 0)}"
        )
    return "\n".join(lines + _pod_lines(cluster, name))


def _pod_lines(cluster: kube.Cluster, name: str) -> list[str]:
    pods = kube.list_pods(cluster, f"training.kubeflow.org/job-name={name}")
    lines = ["pods:"] + ([] if pods else ["  (none)"])
    for p in sorted(pods, key=lambda p: p.metadata.name):
        restarts, detail = kube.container_state(p, CONTAINER)
        lines.append(
            f"  {p.metadata.name:32s} {p.status.phase or '':10s} restarts {restarts:<3d} "
            f"node {p.spec.node_name or '-':20s} {detail}"
        )
    return lines


def logs(cluster: kube.Cluster, name: str, follow: bool = True, wait_s: float = 300, out: Any = None) -> None:
    """Stream the rank-0 pod's `pytorch` container log, waiting up to wait_s for it to start."""
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout
    pod = rank0_pod(get(cluster, name))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            resp = kube.open_pod_log(cluster, pod, CONTAINER, follow)
            break
        except ApiException as e:
            if e.status not in (400, 404):
                raise
            if time.monotonic() > deadline:
                raise UserError(
                    f"pod {pod} has no log yet after {wait_s:.0f} s ({kube.api_message(e)}); see make status JOB={name}"
                ) from None
            print(f"waiting for {pod}: {kube.api_message(e)}", file=sys.stderr)
            time.sleep(2)
    kube.copy_log(resp, out)


def delete(cluster: kube.Cluster, name: str) -> None:
    """Delete the PyTorchJob; the operator's pods and Services are garbage-collected with it."""
    require_crd(cluster)
    kube.delete_custom(cluster, GROUP, VERSION, PLURAL, name, NAME)


def follow_up(name: str, namespace: str) -> str:
    """The commands to watch a submitted PyTorchJob."""
    pod = f"{name}-worker-0"
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
