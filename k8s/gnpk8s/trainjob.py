"""The trainer.kubeflow.org/v1alpha1 TrainJob of a JobSpec, for Kubeflow Trainer v2 (CRDs of v2.3.0).

Trainer v2 builds a JobSet from a training runtime (the Job and pod layout) and a TrainJob (what one run
changes: image, args, env, nodes, processes, resources, and `runtimePatches` on the pod template). The stock
`torch-distributed` runtime cannot carry this project's jobs, because a TrainJob can only patch a few pod
fields (labels, annotations, nodeSelector, tolerations, affinity, serviceAccountName, imagePullSecrets,
securityContext, volumes, and per container volumeMounts + securityContext) and none of these:
  - the container's named metrics ports `metrics-<r>` (the PodMonitor scrapes named ports only),
  - the Job's podFailurePolicy and restartPolicy Never, which map the entrypoint's exit statuses (below),
  - the JobSet's failurePolicy and ttlSecondsAfterFinished,
  - automountServiceAccountToken, priorityClassName, schedulerName, imagePullPolicy, gang scheduling.
So each job gets a runtime of its own, and the TrainJob references it. What a user sets per run stays in the
TrainJob (trainer.* and runtimePatches), where the v2 API puts it.

Why a namespaced TrainingRuntime (`gnp-<name>` in the job's namespace, `--part runtime`), not a
ClusterTrainingRuntime: a ClusterTrainingRuntime is cluster-scoped, so whoever may write one can change the pods
of every TrainJob in every namespace that uses it (the stock `torch-distributed` included); platform teams keep
that to their administrators. A TrainingRuntime is a team's own object: a namespaced Role grants it
(k8s/examples/rbac.yaml), and it can be owned by the TrainJob.

Lifetime: the runtime goes away with its TrainJob. An ownerReference must name an object that exists, in the
same namespace, by uid, so submit creates the runtime, then the TrainJob, then patches the TrainJob's
ownerReference onto the runtime (submit deletes the runtime again if the TrainJob cannot be created). The
garbage collector then deletes the runtime whenever the TrainJob is deleted (kubectl delete, or `make delete`,
which also deletes it explicitly in case the patch failed; the TrainJob has no TTL of its own:
ttlSecondsAfterFinished removes only the JobSet). The reference has controller: false (no controller manages
the runtime; the Trainer controller only reads it) and blockOwnerDeletion: false (nothing must wait for the
runtime's deletion, and setting it true needs `update` on trainjobs/finalizers under the
OwnerReferencesPermissionEnforcement admission plugin).

Exit statuses (docker/entrypoint.sh: 2 = permanent, 3 = the trainer's crash budget spent (EXIT_CRASH_LOOP,
permanent), >= 128 retried). v2 has no `restartPolicy: ExitCode`;
the runtime maps it with the two policies Kubernetes and JobSet offer:
  - the Job: restartPolicy Never, backoffLimit 0, podFailurePolicy: a pod disruption (eviction, preemption,
    node drain: condition DisruptionTarget) is Ignored (the pod is recreated, nothing counted); an exit 1-127
    of the `node` container is FailJob (reason PodFailurePolicy); anything else (>= 128) fails the Job with
    BackoffLimitExceeded;
  - the JobSet: failurePolicy rule `permanent` FailJobSet on reason PodFailurePolicy (the TrainJob fails at
    once); any other Job failure restarts the whole JobSet (every pod recreated, resuming from the last
    checkpoint), at most `backoff_limit` times (maxRestarts).
(kubernetes.io/docs/tasks/job/pod-failure-policy; JobSet's failurePolicy: an unmatched failure takes the default
action RestartJobSet, counted against maxRestarts, jobset.sigs.k8s.io docs "Failure Policy".)
Not the same as ExitCode: the PyTorchJob operator recreates a retried pod alone and without a count (only the
deadline bounds it); here a retried status recreates every pod of the job and `backoff_limit` bounds it.

Rendezvous: the torch plugin (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go) sets PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR=<job>-node-0-0.<job> and PET_MASTER_PORT=29500 and refuses those names in
trainer.env. The TrainJob adds PET_RDZV_BACKEND=c10d with its endpoint on node 0 (same host and port) and
PET_MAX_RESTARTS, so torchrun rendezvouses and restarts in the pod (`max_restarts`) as in the PyTorchJob; the
REJOIN_ENV of pod.py applies unchanged.
Elastic specs: Trainer v2.2 removed ElasticPolicy, so an elastic spec renders as a fixed-size job of `nodes`
pods, with a one-line notice on stderr.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from . import cluster as kube
from .errors import FIRST_RETRIED, UserError
from .kueue import resolve_queue
from .pod import (
    container_security,
    job_labels,
    meta,
    pod_security,
    pod_template,
    queue_labels,
    resources,
    scheduling_fields,
    train_env,
    train_scratch,
    volumes_and_mounts,
)
from .spec import JobSpec, require_image

NAME = "trainjob"  # the spec's `api` and the CLI's --api
GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
MAKE_API = " API=trainjob"  # what make status|logs|delete add to name this kind
KUEUE_FRAMEWORK = "trainer.kubeflow.org/trainjob"  # Kueue's integrations.frameworks entry
KUEUE_HINT = ""
RUNTIME_PLURAL, RUNTIME_KIND = "trainingruntimes", "TrainingRuntime"  # namespaced (see above)
CONTAINER = "node"  # Trainer v2 finds the trainer container by this name (it injects PET_* only there)
NODE_JOB = "node"  # the replicated job the torch plugin sizes (numNodes)
RDZV_PORT = 29500  # the torch plugin's PET_MASTER_PORT (kubeflow/trainer pkg/constants: ContainerTrainerPort)
PATCH_MANAGER = "gnp.training/render"
OWNER_LABEL = "app.kubernetes.io/instance"  # the job a runtime belongs to (job_labels)
# Labels JobSet puts on every pod it creates (kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go):
# the JobSet is named after the TrainJob; the Job's completion index is the node rank.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"  # marks the trainer step (stock runtime too)
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
# Kubeflow Trainer v2.3.0 install (its README): the controller, the CRDs, then the stock runtimes.
TRAINER_INSTALL = (
    'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"'
)


def runtime_name(spec: JobSpec) -> str:
    """The job's own TrainingRuntime, in the job's namespace (`gnp-`: delete removes only what submit made)."""
    return f"gnp-{spec.name}"


def notice(spec: JobSpec) -> str | None:
    """The one-line notice for what v2 cannot run as the spec says (an elastic range), else None."""
    if spec.elastic:
        lo, hi = spec.elastic
        return (
            f"notice: {spec.name}: Trainer v2 has no ElasticPolicy (removed in v2.2): elastic {lo}-{hi} "
            f"renders as a fixed-size TrainJob of {spec.nodes} node(s)"
        )
    return None


def pod_selector(name: str) -> str:
    """Label selector of a TrainJob's training pods."""
    return f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE_JOB}"


def rank0_selector(name: str) -> str:
    """Label selector of node 0's pod (pod names end in a random suffix, so they are found by label)."""
    return f"{pod_selector(name)},{COMPLETION_INDEX_LABEL}=0"


def _ports(spec: JobSpec) -> list[dict]:
    return [
        {"name": f"metrics-{i}", "containerPort": spec.metrics_port + i, "protocol": "TCP"} for i in range(spec.nproc)
    ]


def pod_failure_policy() -> dict:
    """The Job's podFailurePolicy: exit statuses 1-127 permanent, disruptions ignored, the rest counted."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(range(1, FIRST_RETRIED))},
            },
        ]
    }


def failure_policy(spec: JobSpec) -> dict:
    """The JobSet's failurePolicy: a permanent Job failure ends the JobSet; any other restarts it."""
    return {
        "maxRestarts": spec.backoff_limit,
        "rules": [{"name": "permanent", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
    }


def runtime(spec: JobSpec) -> dict:
    """The job's TrainingRuntime (validates against the v2.3.0 CRD)."""
    pod_spec: dict = {"restartPolicy": "Never", "automountServiceAccountToken": False}
    if spec.scheduling.priority_class:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class
    if spec.scheduling.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduling.scheduler_name
    pod_spec["containers"] = [
        {"name": CONTAINER, "image": require_image(spec), "imagePullPolicy": spec.pull_policy, "ports": _ports(spec)}
    ]
    out: dict = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": RUNTIME_KIND,
        "metadata": meta(
            runtime_name(spec),
            spec.namespace,
            {**job_labels(spec, "runtime"), "trainer.kubeflow.org/framework": "torch"},
        ),
        "spec": {
            "mlPolicy": {"numNodes": spec.nodes, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": failure_policy(spec),
                    "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
                    "replicatedJobs": [
                        {
                            "name": NODE_JOB,
                            "template": {
                                # the trainjobstatus plugin injects its progress-reporting env only here
                                "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                                "spec": {
                                    "backoffLimit": 0,
                                    "podFailurePolicy": pod_failure_policy(),
                                    "template": {"spec": pod_spec},
                                },
                            },
                        }
                    ],
                }
            },
        },
    }
    if spec.scheduling.gang:
        # Trainer v2 creates the PodGroup itself from podGroupPolicy (all numNodes pods or none).
        sched = spec.scheduling.scheduler_name or ""
        out["spec"]["podGroupPolicy"] = {"volcano": {}} if "volcano" in sched else {"coscheduling": {}}
    return out


def trainer_env(spec: JobSpec) -> list[dict]:
    """The pod's env (as in the PyTorchJob) plus torchrun's c10d rendezvous on node 0 and max_restarts."""
    rdzv_host = f"{spec.name}-{NODE_JOB}-0-0.{spec.name}"  # JobSet: <jobset>-<rjob>-<job index>-<pod index>.<svc>
    return train_env(spec) + [
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": f"{rdzv_host}:{RDZV_PORT}"},
        {"name": "PET_MAX_RESTARTS", "value": str(spec.max_restarts)},
    ]


def pod_patch(spec: JobSpec) -> dict:
    """runtimePatches entry: the pod-template fields a TrainJob may set, taken from the shared pod template."""
    tmpl = pod_template(spec)
    labels = dict(tmpl["metadata"]["labels"])
    volumes, mounts = volumes_and_mounts(spec)
    pod: dict = {}
    sched = scheduling_fields(spec)
    for key in ("serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets"):
        if key in sched:
            pod[key] = copy.deepcopy(sched[key])
    pod["securityContext"] = pod_security()
    pod["volumes"] = volumes
    pod["containers"] = [{"name": CONTAINER, "securityContext": container_security(), "volumeMounts": mounts}]
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE_JOB,
                            "template": {
                                "spec": {
                                    "template": {
                                        "metadata": {
                                            "labels": labels,
                                            "annotations": dict(tmpl["metadata"]["annotations"]),
                                        },
                                        "spec": pod,
                                    }
                                }
                            },
                        }
                    ]
                }
            }
        },
    }


def build(spec: JobSpec) -> dict:
    """The TrainJob object (validates against the v2.3.0 CRD); prints the elastic notice if any."""
    text = notice(spec)
    if text:
        print(text, file=sys.stderr)
    gpus = {spec.gpu_resource: str(spec.gpus)} if spec.gpus else None
    md = meta(spec.name, spec.namespace, {**job_labels(spec), **queue_labels(spec)})
    if spec.scheduling.gang and spec.scheduling.gang_queue:
        md["annotations"] = {VOLCANO_QUEUE_ANNOTATION: spec.scheduling.gang_queue}
    out: dict = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": md,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": runtime_name(spec)},
            "trainer": {
                "image": require_image(spec),
                "args": list(spec.args),
                "env": trainer_env(spec),
                "numNodes": spec.nodes,
                "numProcPerNode": spec.nproc,
                "resourcesPerNode": resources(spec.resources, gpus, train_scratch(spec)),
            },
            "runtimePatches": [pod_patch(spec)],
        },
    }
    if spec.active_deadline_seconds is not None:
        out["spec"]["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.scheduling.queue:
        # Kueue's TrainJob integration admits a job by un-suspending it; created suspended, no pod exists
        # before admission.
        out["spec"]["suspend"] = True
    return out


def render(spec: JobSpec) -> list[dict]:
    """Every object submit creates, in order: the job's TrainingRuntime, then the TrainJob."""
    return [runtime(spec), build(spec)]


def rank0_pod(obj: dict) -> str:
    """Not a name: node 0's pod is found by rank0_selector (its name has a random suffix)."""
    return rank0_selector(obj["metadata"]["name"])


# ---------------------------------------------------------------------------------------------------
# Cluster calls for a TrainJob: submit, status, logs, delete (kinds.py dispatches here)


def require_crds(cluster: kube.Cluster) -> None:
    """UserError with the install command unless trainer.kubeflow.org/v1alpha1 serves trainjobs and runtimes."""
    missing = UserError(
        f"the Kubeflow Trainer v2 CRDs ({PLURAL}/{RUNTIME_PLURAL}.{GROUP}/{VERSION}) are not installed in the "
        f"cluster at {cluster.host}; install Trainer v2.3: {TRAINER_INSTALL}"
    )
    kube.require_api(cluster, GROUP, VERSION, {PLURAL, RUNTIME_PLURAL}, missing)


def get(cluster: kube.Cluster, name: str) -> dict:
    """The TrainJob; UserError when the CRDs or the job are missing."""
    require_crds(cluster)
    obj = kube.get_custom(cluster, GROUP, VERSION, PLURAL, name)
    if obj is None:
        raise UserError(
            f"trainjob {name!r} not found in namespace {cluster.namespace!r} "
            f"(kubectl -n {cluster.namespace} get trainjobs lists them)"
        )
    return obj


def _runtime_call(cluster: kube.Cluster, verb: str, *args: Any, **kw: Any) -> Any:
    """One call on the namespace's trainingruntimes."""
    return kube.custom_call(cluster, verb, GROUP, VERSION, RUNTIME_PLURAL, *args, **kw)


def _apply_runtime(cluster: kube.Cluster, body: dict) -> None:
    """Create the job's TrainingRuntime, or replace one left by an earlier submit of the same job."""
    from kubernetes.client.exceptions import ApiException

    name = body["metadata"]["name"]
    old = kube.get_custom(cluster, GROUP, VERSION, RUNTIME_PLURAL, name)
    try:
        if old is None:
            _runtime_call(cluster, "create", body)
            return
        want = body["metadata"]["labels"][OWNER_LABEL]
        have = (old.get("metadata", {}).get("labels") or {}).get(OWNER_LABEL)
        if have != want:  # another job's runtime, or one this tool did not make: never overwrite it
            raise UserError(
                f"trainingruntime {name!r} exists in namespace {cluster.namespace!r} and does not belong to job "
                f"{want!r} ({OWNER_LABEL}: {have!r}); submit under another NAME="
            )
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": old["metadata"].get("resourceVersion")}}
        _runtime_call(cluster, "replace", name, body)
    except ApiException as e:
        if e.status in (400, 422):
            raise UserError(f"the API server rejected trainingruntime {name!r}: {kube.api_message(e)}") from None
        raise


def owner_reference(trainjob: dict) -> dict:
    """The TrainJob as the runtime's owner (why controller and blockOwnerDeletion are false: module doc)."""
    md = trainjob["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": md["name"],
        "uid": md["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


def _own_runtime(cluster: kube.Cluster, name: str, trainjob: dict) -> None:
    """Patch the TrainJob's ownerReference onto its runtime; a failure leaves it for `make delete` (a warning)."""
    from kubernetes.client.exceptions import ApiException

    patch = {"metadata": {"ownerReferences": [owner_reference(trainjob)]}}
    try:
        _runtime_call(cluster, "patch", name, patch)
    except (ApiException, UserError) as e:
        print(
            f"warning: trainingruntime {name!r} not owned by its TrainJob ({' '.join(str(e).split())[:160]}); "
            f"make delete removes it, kubectl delete of the TrainJob alone does not",
            file=sys.stderr,
        )


def _delete_runtime(cluster: kube.Cluster, name: str) -> None:
    """Delete the job's runtime; already gone (the garbage collector) or not ours to delete is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        _runtime_call(cluster, "delete", name, passthrough=(403, 404))
    except ApiException:
        pass


def _create(cluster: kube.Cluster, job: JobSpec, body: dict) -> dict:
    """Create the TrainJob; UserError for a missing namespace, AlreadyExists, a rejection."""
    from kubernetes.client.exceptions import ApiException

    try:
        return kube.custom_call(cluster, "create", GROUP, VERSION, PLURAL, body)
    except ApiException as e:
        if e.status == 409:
            raise UserError(f"trainjob {job.name!r} already exists in namespace {job.namespace!r}") from None
        raise (kube.create_error(e, NAME, job.name, job.namespace) or e) from None


def submit(job: JobSpec, cluster: kube.Cluster) -> dict:
    """Create the job's TrainingRuntime, then the TrainJob, then make the TrainJob the runtime's owner (an
    ownerReference names an existing object by uid, hence this order); no TrainJob, no runtime left."""
    require_crds(cluster)
    if kube.get_custom(cluster, GROUP, VERSION, PLURAL, job.name) is not None:
        # before the runtime: a running job's runtime stays as it is
        raise UserError(
            f"trainjob {job.name!r} already exists in namespace {job.namespace!r}; delete it "
            f"(make delete JOB={job.name} API=trainjob NAMESPACE={job.namespace}) or submit under another "
            f"name: NAME={kube.free_name(cluster, GROUP, VERSION, PLURAL, job.name)}"
        )
    kube.require_s3_secret(job, cluster)
    resolve_queue(job, cluster)
    rt, body = render(job)
    _apply_runtime(cluster, rt)
    try:
        created = _create(cluster, job, body)
    except BaseException:
        _delete_runtime(cluster, rt["metadata"]["name"])
        raise
    _own_runtime(cluster, rt["metadata"]["name"], created)
    return created


RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"  # JobSet labels each pod with its JobSet restart


def trainer_progress(st: dict) -> str | None:
    """The progress line from TrainJob.status.trainerStatus (what rank 0 posts), None when it has none."""
    ts = st.get("trainerStatus") or {}
    if not ts:
        return None
    metrics = {m.get("name"): m.get("value") for m in ts.get("metrics") or []}
    p = {
        "percent": ts.get("progressPercentage"),
        "eta_s": ts.get("estimatedRemainingSeconds"),
        **{k: metrics.get(k) for k in ("step", "total_steps", "epoch", "loss", "top1")},
    }
    return kube.progress_line(p, f"trainerStatus, updated {kube.age(ts.get('lastUpdatedTime'))} ago")


def status(cluster: kube.Cluster, name: str) -> str:
    """What a TrainJob does, as a small report: its state (from the pods' phases: JobSet counts pending pods as
    active), Kueue's answer, why pending pods wait, progress from status.trainerStatus, restarts and the last
    failure; then conditions, the JobSet's jobs and the pods."""
    from .kueue import workload_lines

    obj = get(cluster, name)
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    pods = kube.list_pods(cluster, pod_selector(name))
    # A running TrainJob has no True condition (Trainer v2 sets Suspended, Complete or Failed): its pods say it.
    state = kube.job_state(
        conds, pods, ("Complete", "Failed"), "Pending (no pod yet: is the Trainer controller running?)"
    )
    md = obj.get("metadata", {})
    recipe = md.get("labels", {}).get("gnp.training/recipe", "?")
    rt, age = obj.get("spec", {}).get("runtimeRef", {}).get("name", "?"), kube.age(md.get("creationTimestamp"))
    lines = [f"trainjob {cluster.namespace}/{name}: {state}   (recipe {recipe}, runtime {rt}, created {age} ago)"]
    lines += workload_lines(cluster, obj)
    lines += kube.scheduling_lines(pods)
    prog = trainer_progress(st)
    if prog:
        lines.append(prog)
    node0 = [p for p in pods if (p.metadata.labels or {}).get(COMPLETION_INDEX_LABEL) == "0"]
    rank0 = max(node0, key=lambda p: str(p.metadata.creation_timestamp or "")).metadata.name if node0 else None
    head = kube.log_head(cluster, pods, rank0, CONTAINER)  # the run's own record: start count, kept crash
    n = kube.restart_count(pods, CONTAINER, RESTART_ATTEMPT_LABEL)
    lines.append(kube.run_restarts(head) or f"restarts: {n} (JobSet restart attempt of the pods + container restarts)")
    lines += kube.last_failure(cluster, pods, CONTAINER, head)
    lines += kube.condition_lines(conds)
    for js in st.get("jobsStatus") or []:
        lines.append(
            f"job {js.get('name', '?')}: active {js.get('active', 0)}, ready {js.get('ready', 0)}, "
            f"succeeded {js.get('succeeded', 0)}, failed {js.get('failed', 0)}, suspended {js.get('suspended', 0)}"
        )
    return "\n".join(lines + _pod_lines(pods))


def _pod_lines(pods: list) -> list[str]:
    lines = ["pods:"] + ([] if pods else ["  (none)"])
    for p in sorted(pods, key=lambda p: p.metadata.name):
        restarts, detail = kube.container_state(p, CONTAINER)
        node_rank = (p.metadata.labels or {}).get(COMPLETION_INDEX_LABEL, "?")
        lines.append(
            f"  {p.metadata.name:40s} node {node_rank:>2s} {p.status.phase or '':10s} restarts {restarts:<3d} "
            f"on {p.spec.node_name or '-':20s} {detail}".rstrip()
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
    """Print (follow=True: stream) the `node` container log of node `rank` (0 by default: global rank 0 runs
    there; the previous container's with previous=True), saying what it waits for, for at most wait_s. Of
    several pods of that node (a JobSet restart), the newest that has not failed, else the newest."""
    get(cluster, name)
    node = 0 if rank is None else rank
    selector = f"{pod_selector(name)},{COMPLETION_INDEX_LABEL}={node}"

    def find() -> tuple[Any, str]:
        pods = kube.list_pods(cluster, selector)
        if not pods:
            return None, f"no node-{node} pod yet"
        newest = sorted(pods, key=lambda p: str(p.metadata.creation_timestamp or ""))
        alive = [p for p in newest if p.status.phase != "Failed"]
        return (alive or newest)[-1], ""

    kube.stream_when_ready(
        cluster,
        find,
        CONTAINER,
        follow,
        previous,
        wait_s,
        out or sys.stdout,
        f"trainjob {name!r}",
        f"node-{node}",
        f"make status JOB={name} API=trainjob",
    )


def delete(cluster: kube.Cluster, name: str) -> None:
    """Delete the TrainJob (its JobSet and pods go with it), then the job's own runtime: the garbage collector
    removes it too (ownerReference), unless submit could not patch that reference."""
    obj = get(cluster, name)
    kube.delete_custom(cluster, GROUP, VERSION, PLURAL, name, NAME)
    ref = obj.get("spec", {}).get("runtimeRef", {})
    if ref.get("kind") == RUNTIME_KIND and str(ref.get("name", "")).startswith("gnp-"):
        _delete_runtime(cluster, ref["name"])  # only the runtime this tool made for the job; a shared one stays


def follow_up(name: str, namespace: str) -> str:
    """The commands to watch a submitted TrainJob."""
    sel = rank0_selector(name)
    return "\n".join(
        [
            f"  make status JOB={name} API=trainjob NAMESPACE={namespace}   # state, Kueue, progress, failure",
            f"  make logs JOB={name} API=trainjob NAMESPACE={namespace}     # node 0 ({CONTAINER}); FOLLOW=1 streams",
            f"  make delete JOB={name} API=trainjob NAMESPACE={namespace}",
            f"  kubectl -n {namespace} get trainjob {name} -w",
            f"  kubectl -n {namespace} logs -f -l {sel} -c {CONTAINER}",
        ]
    )
