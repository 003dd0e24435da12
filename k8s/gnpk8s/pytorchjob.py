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
    """What a PyTorchJob does, as a small report: its state (from the pods' phases while it runs), Kueue's
    answer, why pending pods wait, progress from the last `progress` line of rank 0's log, restarts and the
    last failure; then conditions, replica statuses and pods."""
    from .kueue import workload_lines

    obj = get(cluster, name)
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    pods = kube.list_pods(cluster, f"training.kubeflow.org/job-name={name}")
    state = kube.job_state(
        conds, pods, ("Succeeded", "Failed"), "Unknown (no conditions: is the training operator running?)"
    )
    md = obj.get("metadata", {})
    recipe = md.get("labels", {}).get("gnp.training/recipe", "?")
    lines = [
        f"pytorchjob {cluster.namespace}/{name}: {state}   "
        f"(recipe {recipe}, created {kube.age(md.get('creationTimestamp'))} ago)"
    ]
    lines += workload_lines(cluster, obj)
    lines += kube.scheduling_lines(pods)
    rank0 = rank0_pod(obj)
    live0 = [p for p in pods if p.metadata.name == rank0 and p.status.phase in ("Running", "Succeeded", "Failed")]
    prog = kube.log_progress(cluster, rank0, CONTAINER) if live0 else None
    if prog:
        lines.append(kube.progress_line(prog, f"{rank0} log"))
    # The operator replaces a pod that exits with a retried status (ExitCode policy) by a new one of the same
    # name, restartCount 0. The run's own start record (printed at the top of rank 0's log) counts every start;
    # without it, the SuccessfulCreatePod events count recreations (while the events last, 1 h by default).
    head = kube.log_head(cluster, pods, rank0, CONTAINER)
    lines.append(kube.run_restarts(head) or _restarts_from_the_api(cluster, name, pods))
    lines += kube.last_failure(cluster, pods, CONTAINER, head)
    lines += kube.condition_lines(conds)
    for rtype, rs in (st.get("replicaStatuses") or {}).items():
        lines.append(
            f"replicas {rtype}: active {rs.get('active', 0)}, succeeded {rs.get('succeeded', 0)}, "
            f"failed {rs.get('failed', 0)}"
        )
    return "\n".join(lines + _pod_lines(pods))


def _restarts_from_the_api(cluster: kube.Cluster, name: str, pods: list) -> str:
    """The restarts line without the run's record (rank 0 not started yet, or an older trainer image)."""
    restarts = kube.restart_count(pods, CONTAINER)
    recreated = kube.pod_recreations(cluster, KIND, name)
    if recreated is None:
        return f"restarts: {restarts} (container restarts; events unreadable: recreated pods not counted)"
    return f"restarts: {restarts + recreated} (pods recreated, from the last hour's events, + container restarts)"


def _pod_lines(pods: list) -> list[str]:
    lines = ["pods:"] + ([] if pods else ["  (none)"])
    for p in sorted(pods, key=lambda p: p.metadata.name):
        restarts, detail = kube.container_state(p, CONTAINER)
        lines.append(
            f"  {p.metadata.name:32s} {p.status.phase or '':10s} restarts {restarts:<3d} "
            f"node {p.spec.node_name or '-':20s} {detail}".rstrip()
        )
    return lines


def logs(
    cluster: kube.Cluster,
    name: str,
    follow: bool = True,
    wait_s: float = kube.LOG_WAIT_S,
    out: Any = None,
    rank: int | None = None,
    previous: bool = False,
) -> None:
    """Print (follow=True: stream) the `pytorch` container log of worker `rank` (rank 0's pod by default; the
    previous container's with previous=True), saying what it waits for, for at most wait_s."""
    obj = get(cluster, name)
    pod = rank0_pod(obj) if rank is None else f"{name}-worker-{rank}"

    def find() -> tuple[Any, str]:
        found = [p for p in kube.list_pods(cluster, f"training.kubeflow.org/job-name={name}") if p.metadata.name == pod]
        if found:
            return found[0], ""
        suspended = any(c.get("type") == "Suspended" and c.get("status") == "True" for c in kube_conds(cluster, name))
        return None, f"no pod {pod} yet" + (" (the job is suspended: not admitted by Kueue)" if suspended else "")

    kube.stream_when_ready(
        cluster,
        find,
        CONTAINER,
        follow,
        previous,
        wait_s,
        out or sys.stdout,
        f"pytorchjob {name!r}",
        pod,
        f"make status JOB={name}",
    )


def kube_conds(cluster: kube.Cluster, name: str) -> list[dict]:
    """The job's conditions now ([] when it is gone)."""
    obj = kube.get_custom(cluster, GROUP, VERSION, PLURAL, name) or {}
    return (obj.get("status") or {}).get("conditions") or []


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
            f"  make status JOB={name}{nsarg}     # state, Kueue, pods, progress, last failure (WATCH=1)",
            f"  make logs JOB={name}{nsarg}       # rank 0's log; FOLLOW=1 streams it ({pod}, container {CONTAINER})",
            f"  make delete JOB={name}{nsarg}",
            f"  kubectl -n {namespace} get pytorchjob {name} -w",
            f"  kubectl -n {namespace} wait --for=condition=Succeeded pytorchjob/{name} --timeout=168h",
            f"  kubectl -n {namespace} logs -f {pod} -c {CONTAINER}",
        ]
    )
