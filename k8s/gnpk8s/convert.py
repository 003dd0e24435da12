"""The batch/v1 Job that writes a JobSpec's FFCV dataset (its `convert:` section), and the job kind `convert`
(kinds.py): render, submit, status, logs and delete of that Job, like the training kinds.

The kind's NAME argument (status, logs, delete) is the training job's name, as for the other kinds: the Job is
`<name>-convert` (job_name). `make submit|status|logs|delete JOB=<spec> API=convert` (the CLI: `submit JOB
--spec api=convert`, `status|logs|delete NAME --api convert`). Its pods carry the Job controller's label
batch.kubernetes.io/job-name; a failed pod's exit status is explained from trainer.exits.STATUSES (exit 2:
wrong input, and the podFailurePolicy fails the Job at once instead of retrying).
"""

from __future__ import annotations

import sys
from typing import Any

from trainer.exits import FIRST_RETRIED, STATUSES

from . import cluster as kube
from .errors import EXIT_USER, UserError
from .kueue import resolve_queue
from .pod import (
    container_security,
    ephemeral_storage,
    job_labels,
    meta,
    pod_security,
    queue_labels,
    resources,
    s3_env,
    scheduling_fields,
)
from .spec import JobSpec, require_image

NAME = "convert"  # the spec's `api` and the CLI's --api
GROUP, VERSION, PLURAL, KIND = "batch", "v1", "jobs", "Job"
MAKE_API = " API=convert"
KUEUE_FRAMEWORK = "batch/job"  # Kueue's integrations.frameworks entry (on by default)
KUEUE_HINT = ""
CONTAINER = "convert"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods (Kubernetes >= 1.27)
SUFFIX = "-convert"


def job_name(name: str) -> str:
    """The conversion Job's name for the job (spec) `name`."""
    return f"{name}{SUFFIX}"[:63].rstrip("-")


def build(spec: JobSpec) -> dict:
    """The conversion Job; UserError when the spec has no convert section."""
    obj = conversion_job(spec)
    if obj is None:
        raise UserError(f"job {spec.name!r} has no convert section (its dataset is prepared elsewhere)")
    return obj


def conversion_job(spec: JobSpec) -> dict | None:
    """The conversion Job (None if the spec has no convert section).

    It runs on CPU nodes: no GPU toleration or GPU node selector. It gets S3 credentials only when it reads
    (convert.source_s3) or writes (dataset.s3) S3. A dataset PVC is mounted read-write here (this Job writes
    it), so the claim must allow a writer: ReadWriteOnce / ReadWriteMany, not ReadOnlyMany.
    """
    cv = spec.convert
    if cv is None:
        return None
    name = job_name(spec.name)
    env = [{"name": "GNP_JOB_NAME", "value": spec.name}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": cv.resources.tmp}}]
    args = ["convert", "--dataset", cv.dataset]
    if spec.dataset.pvc:
        out = spec.data_path  # the last --set data.path wins, as in the training pods
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.dataset.pvc}})
        mounts.append({"name": "data", "mountPath": "/data"})
    else:
        out = "/tmp/gnp-convert-out"  # then uploaded to the dataset's S3 prefix by the entrypoint
        env.append({"name": "GNP_DATA_S3", "value": spec.dataset.s3})
    if cv.source_s3:
        env.append({"name": "GNP_CONVERT_SOURCE_S3", "value": cv.source_s3})
    elif cv.source:
        args += ["--source", cv.source]
    args += ["--out", out, *cv.args]
    if cv.source_s3 or spec.dataset.s3:
        env += s3_env(spec)
    container = {
        "name": "convert",
        "image": require_image(spec),
        "imagePullPolicy": spec.pull_policy,
        "args": args,
        "env": env,
        "resources": resources(cv.resources, scratch=ephemeral_storage(cv.resources.tmp)),
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    labels = job_labels(spec, "dataset-conversion")
    # The queue label only, no `suspend: true` in the rendered Job: Kueue's batch/job integration (on by
    # default) suspends a labelled Job in its webhook, and this text may be applied with kubectl (no Workload
    # check there): one suspended here by hand would wait forever on a cluster whose Kueue skips Jobs. submit
    # adds `suspend: true`, then checks that Kueue made a Workload (kinds.submit).
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta(name, spec.namespace, {**labels, **queue_labels(spec, training=False)}),
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
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
                    "securityContext": pod_security(),
                    **scheduling_fields(spec, training=False),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def render(spec: JobSpec) -> list[dict]:
    """Every object submit creates, in order: the conversion Job alone (submit adds `suspend: true` when queued)."""
    return [build(spec)]


def rank0_pod(obj: dict) -> str:
    """The label selector of the Job's pods (one at a time; a retry makes a new one)."""
    return f"{JOB_NAME_LABEL}={obj['metadata']['name']}"


# ---------------------------------------------------------------------------------------------------
# Cluster calls for the conversion Job: submit, status, logs, delete (kinds.py dispatches here). batch/v1 is
# reached through the same generic object calls as the custom resources (/apis/batch/v1/namespaces/NS/jobs).


def submit(job: JobSpec, cluster: kube.Cluster) -> dict:
    """Create the conversion Job; UserError for no convert section, S3 Secret missing, AlreadyExists, missing
    namespace, rejection."""
    from kubernetes.client.exceptions import ApiException

    build(job)  # no convert section: stop before any cluster call
    cv = job.convert
    if cv is not None and (cv.source_s3 or job.dataset.s3):
        kube.require_s3_secret(job, cluster)
    resolve_queue(job, cluster)
    obj = build(job)  # again: resolve_queue may have chosen the namespace's only LocalQueue
    if job.scheduling.queue:
        # As the training kinds do: created suspended, so no pod runs before Kueue admits it (by un-suspending
        # it), and kinds.submit's Workload check stops with the fix when Kueue does not manage batch/job.
        obj["spec"]["suspend"] = True
    name = obj["metadata"]["name"]
    try:
        return kube.custom_call(cluster, "create", GROUP, VERSION, PLURAL, obj)
    except ApiException as e:
        if e.status == 409:
            raise UserError(
                f"conversion Job {name!r} already exists in namespace {job.namespace!r}: it converted (or is "
                f"converting) this dataset; see make status JOB={job.name}{MAKE_API}, or delete it (make delete "
                f"JOB={job.name} NAMESPACE={job.namespace}{MAKE_API}) and submit again"
            ) from None
        known = kube.create_error(e, "conversion Job", name, job.namespace)
        if known is not None:
            raise known from None
        raise


def get(cluster: kube.Cluster, name: str) -> dict:
    """The conversion Job of job `name`; UserError when it does not exist."""
    obj = kube.get_custom(cluster, GROUP, VERSION, PLURAL, job_name(name))
    if obj is None:
        raise UserError(
            f"conversion Job {job_name(name)!r} not found in namespace {cluster.namespace!r} (submit it with "
            f"make submit JOB={name}{MAKE_API}; kubectl -n {cluster.namespace} get jobs lists them)"
        )
    return obj


def exit_meaning(code: int) -> str:
    """`permanent: wrong input ...` for exit status `code`, from trainer.exits.STATUSES."""
    for status, _who, meaning, action in STATUSES:
        if status == str(code) or (code >= FIRST_RETRIED and status.startswith(f"{FIRST_RETRIED}+N")):
            return f"{action}: {meaning}"
    return "unknown exit status (see python -m trainer.exits)"


def pod_detail(pod: Any) -> str:
    """Why a pod is where it is: the pending reason, the container's waiting reason, or its exit and meaning."""
    for cs in pod.status.container_statuses or []:
        if cs.name != CONTAINER or cs.state is None:
            continue
        if cs.state.terminated:
            t = cs.state.terminated
            return f"exit {t.exit_code} ({t.reason or ''}): {exit_meaning(t.exit_code)}"
        if cs.state.waiting:
            w = cs.state.waiting
            return f"waiting: {w.reason or ''} {w.message or ''}".rstrip()
    if pod.status.phase == "Pending":
        for c in pod.status.conditions or []:
            if c.type == "PodScheduled" and c.status != "True":
                return f"pending: {c.reason or ''}: {' '.join((c.message or '').split())}"
        return "pending"
    return ""


def pods(cluster: kube.Cluster, name: str) -> list:
    """The Job's pods, oldest first."""
    found = kube.list_pods(cluster, f"{JOB_NAME_LABEL}={job_name(name)}")
    return sorted(found, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))


def status(cluster: kube.Cluster, name: str) -> str:
    """Conditions, pod counts and pods of the conversion Job (a failed pod's exit status and its meaning)."""
    obj = get(cluster, name)
    st, spec, md = obj.get("status") or {}, obj.get("spec") or {}, obj.get("metadata", {})
    conds = st.get("conditions") or []
    if spec.get("suspend"):
        otherwise = "Suspended (waiting for Kueue to admit it)"
    else:
        otherwise = "Running" if st.get("active") else "Pending"
    state = kube.state_of(conds, otherwise)
    recipe = md.get("labels", {}).get("gnp.training/recipe", "?")
    lines = [
        f"convert {cluster.namespace}/{job_name(name)}: {state}   "
        f"(dataset-conversion Job of {name}, recipe {recipe}, created {kube.age(md.get('creationTimestamp'))} ago)"
    ]
    lines += kube.condition_lines(conds)
    lines.append(
        f"counts: active {st.get('active', 0)}, succeeded {st.get('succeeded', 0)}, failed {st.get('failed', 0)}"
    )
    found = pods(cluster, name)
    lines += ["pods:"] + ([] if found else ["  (none)"])
    for p in found:
        restarts, _ = kube.container_state(p, CONTAINER)
        lines.append(
            f"  {p.metadata.name:32s} {p.status.phase or '':10s} restarts {restarts:<3d} "
            f"node {p.spec.node_name or '-':20s} {pod_detail(p)}"
        )
    return "\n".join(lines)


def logs(
    cluster: kube.Cluster,
    name: str,
    follow: bool = True,
    wait_s: float = kube.LOG_WAIT_S,
    out: Any = None,
    rank: int | None = None,
    previous: bool = False,
) -> None:
    """Print (follow=True: stream) the newest started pod's `convert` log (the previous container's with
    previous=True), saying what it waits for, for at most wait_s. The Job has one pod: rank is 0 or None."""
    if rank not in (None, 0):
        raise UserError(f"--rank: {rank}; the conversion Job {job_name(name)!r} has one pod (rank 0)")
    get(cluster, name)

    def find() -> tuple[Any, str]:
        found = pods(cluster, name)  # the newest: a pending one says why it waits
        return (found[-1], "") if found else (None, "no pod yet")

    kube.stream_when_ready(
        cluster,
        find,
        CONTAINER,
        follow,
        previous,
        wait_s,
        out or sys.stdout,
        f"conversion Job {job_name(name)!r}",
        CONTAINER,  # "no convert log after ..."
        f"make status JOB={name}{MAKE_API}",
    )


def delete(cluster: kube.Cluster, name: str) -> None:
    """Delete the conversion Job and its pods (propagationPolicy Background: the API's default for a Job
    orphans its pods)."""
    kube.delete_custom(cluster, GROUP, VERSION, PLURAL, job_name(name), "conversion Job")


def follow_up(name: str, namespace: str) -> str:
    """The commands to watch a submitted conversion Job."""
    nsarg = f" NAMESPACE={namespace}{MAKE_API}"
    job = job_name(name)
    return "\n".join(
        [
            f"  make status JOB={name}{nsarg}     # conditions, pods, exit status",
            f"  make logs JOB={name}{nsarg}       # the conversion log",
            f"  make delete JOB={name}{nsarg}     # the Job and its pods",
            f"  kubectl -n {namespace} wait --for=condition=Complete job/{job} --timeout=24h",
            f"  kubectl -n {namespace} logs -f -l {JOB_NAME_LABEL}={job} -c {CONTAINER}",
        ]
    )
