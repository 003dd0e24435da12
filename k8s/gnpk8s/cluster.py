"""Cluster calls with the kubernetes Python client (kubeconfig, or the in-cluster service account):
submit (after checking what would otherwise leave pods holding GPUs), status, logs, delete."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .pod import CONTAINER
from .pytorchjob import GROUP, OPERATOR_INSTALL, PLURAL, VERSION, build, rank0_pod
from .spec import JobSpec


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


def _api_call(
    cluster: Cluster, what: str, fn: Callable, *args: Any, passthrough: tuple[int, ...] = (), **kwargs: Any
) -> Any:
    """Run one API call; turn unreachable servers and auth failures into one-line UserErrors (statuses in
    `passthrough` stay ApiExceptions, for the caller to handle)."""
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
        if e.status in passthrough:
            raise
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


def require_s3_secret(job: JobSpec, cluster: Cluster) -> None:
    """UserError unless the S3 Secret the pods read exists: without it every pod would sit in
    CreateContainerConfigError while holding its GPUs until the deadline."""
    from kubernetes.client.exceptions import ApiException

    if not job.uses_s3 or job.s3_auth != "secret":
        return
    try:
        cluster.core.read_namespaced_secret(job.s3_secret, cluster.namespace, _request_timeout=TIMEOUT)
    except ApiException as e:  # (the CRD check before this one already proved the server reachable)
        if e.status == 404:
            raise UserError(
                f"Secret {job.s3_secret!r} (S3 credentials, spec key s3_secret) does not exist in namespace "
                f"{cluster.namespace!r}: create it (k8s/examples/s3-secret.yaml), name another with "
                f"--spec s3_secret=NAME, or use the pod's identity with --spec s3_auth=identity"
            ) from None
        if e.status == 403:  # may create pods but not read Secrets: the kubelet will tell
            print(
                f"warning: cannot check Secret {job.s3_secret!r} ({_api_message(e)}); submitting anyway",
                file=sys.stderr,
            )
            return
        raise


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


def follow_up(name: str, namespace: str, api: str = "pytorchjob") -> str:
    """The commands to watch a submitted job."""
    if api == "trainjob":
        from . import trainjob

        return trainjob.follow_up(name, namespace)
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


def submit(job: JobSpec, cluster: Cluster, wait_s: float | None = None) -> dict:
    """Create the job (PyTorchJob, or TrainJob + its TrainingRuntime); with a Kueue queue, wait up to wait_s
    (default kueue.DEFAULT_WAIT_S) for Kueue's Workload and stop with the fix when none appears."""
    from . import kueue

    job.namespace = job.namespace or cluster.namespace
    cluster.namespace = job.namespace
    if job.api == "trainjob":
        from . import trainjob

        created = trainjob.submit(job, cluster)
    else:
        created = _submit_pytorchjob(job, cluster)
    if job.scheduling.queue:
        uid = created.get("metadata", {}).get("uid", "")
        wait = kueue.DEFAULT_WAIT_S if wait_s is None else wait_s
        wl = kueue.wait_for_workload(cluster, job.api, job.name, uid, wait)
        if wl:
            print(f"queued: Kueue Workload {wl} in LocalQueue {job.scheduling.queue}", file=sys.stderr)
    return created


def _submit_pytorchjob(job: JobSpec, cluster: Cluster) -> dict:
    """Create the PyTorchJob; UserError for CRD missing, AlreadyExists, missing namespace, webhook rejection."""
    from kubernetes.client.exceptions import ApiException

    from .kueue import resolve_queue

    require_crd(cluster)
    require_s3_secret(job, cluster)
    resolve_queue(job, cluster)
    body = build(job)
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


def status_text(cluster: Cluster, name: str, api: str = "pytorchjob") -> str:
    """Conditions, replica statuses and pods of a PyTorchJob, as a small report."""
    if api == "trainjob":
        from . import trainjob

        return trainjob.status_text(cluster, name)
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


def logs(
    cluster: Cluster, name: str, follow: bool = True, wait_s: float = 300, out: Any = None, api: str = "pytorchjob"
) -> None:
    """Stream the rank-0 pod's `pytorch` container log, waiting up to wait_s for it to start."""
    from kubernetes.client.exceptions import ApiException

    if api == "trainjob":
        from . import trainjob

        return trainjob.logs(cluster, name, follow, wait_s, out)

    out = out or sys.stdout

    pod = rank0_pod(_get_job(cluster, name))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            resp = open_pod_log(cluster, pod, CONTAINER, follow)
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
    copy_log(resp, out)


def open_pod_log(cluster: Cluster, pod: str, container: str, follow: bool) -> Any:
    """The container's log as a streaming response; ApiException (400/404) while the pod cannot serve it yet."""
    return _api_call(
        cluster,
        "read pods/log",
        cluster.core.read_namespaced_pod_log,
        pod,
        cluster.namespace,
        container=container,
        follow=follow,
        _preload_content=False,
    )


def copy_log(resp: Any, out: Any) -> None:
    """Write a log response to `out` as it arrives, then give the connection back."""
    try:
        for chunk in resp.stream(4096):
            out.write(chunk.decode("utf-8", "replace"))
            out.flush()
    finally:
        resp.release_conn()


def delete(cluster: Cluster, name: str, api: str = "pytorchjob") -> None:
    """Delete the PyTorchJob; the operator's pods and Services are garbage-collected with it."""
    from kubernetes.client.exceptions import ApiException

    if api == "trainjob":
        from . import trainjob

        return trainjob.delete(cluster, name)

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
