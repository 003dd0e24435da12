"""What every job kind shares on a cluster, with the kubernetes Python client (kubeconfig, or the in-cluster
service account): the connection, one API call with one-line errors, the CRD and Secret checks, a free name,
pods, ages, conditions and logs. The kind-specific submit / status / logs / delete live in each kind's own module
(kinds.py: the protocol and the registry); nothing here knows a job kind."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
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


def api_call(
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
                f"forbidden: {what} in namespace {cluster.namespace!r}: {api_message(e)}; "
                f"an admin can grant it with k8s/examples/rbac.yaml"
            ) from None
        raise


def api_message(e: Any) -> str:
    """The API server's one-line message of an ApiException (its reason when the body has none)."""
    import json

    try:
        return " ".join(str(json.loads(e.body).get("message", "")).split()) or str(e.reason)
    except (ValueError, TypeError, AttributeError):
        return str(e.reason)


def get_path(
    cluster: Cluster,
    what: str,
    path: str,
    path_params: dict[str, str],
    query: list[tuple[str, Any]],
    passthrough: tuple[int, ...] = (),
) -> Any:
    """GET one API path the generated client has no method for (a subresource of an aggregated API, such as
    Kueue's /apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/{namespace}/localqueues/{name}/pendingworkloads),
    its JSON answer as a dict: the client's own serialization (path parameters quoted, the kubeconfig's bearer
    token), through api_call (the same timeouts and one-line errors as every other call)."""
    api = cluster.custom.api_client

    def get(_request_timeout: Any) -> Any:
        method, url, headers, body, post = api.param_serialize(
            "GET",
            path,
            path_params=path_params,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(method, url, headers, body, post, _request_timeout=_request_timeout)
        resp.read()
        return api.response_deserialize(resp, {"200": "object"}).data  # ApiException for any other status

    return api_call(cluster, what, get, passthrough=passthrough)


def custom_call(cluster: Cluster, verb: str, group: str, version: str, plural: str, *args: Any, **kw: Any) -> Any:
    """One call on a namespaced custom resource: verb get|list|create|replace|patch|delete (api_call's errors)."""
    fn = getattr(cluster.custom, f"{verb}_namespaced_custom_object")
    return api_call(cluster, f"{verb} {plural}", fn, group, version, cluster.namespace, plural, *args, **kw)


def get_custom(cluster: Cluster, group: str, version: str, plural: str, name: str) -> dict | None:
    """The namespaced custom object, or None when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        return custom_call(cluster, "get", group, version, plural, name, passthrough=(404,))
    except ApiException:
        return None


def require_api(cluster: Cluster, group: str, version: str, plurals: set[str], missing: UserError) -> None:
    """Raise `missing` (the install command) unless group/version serves every resource in `plurals`."""
    from kubernetes.client.exceptions import ApiException

    try:
        res = api_call(cluster, f"discover {group}/{version}", cluster.custom.get_api_resources, group, version)
    except ApiException as e:
        if e.status == 404:
            raise missing from None
        raise
    if not plurals <= {r.name for r in (res.resources or [])}:
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
                f"warning: cannot check Secret {job.s3_secret!r} ({api_message(e)}); submitting anyway",
                file=sys.stderr,
            )
            return
        raise


def free_name(cluster: Cluster, group: str, version: str, plural: str, name: str) -> str:
    """A name `<name>-<n>` no object of `plural` in the namespace has (a suggestion for an error message)."""
    try:
        listed = custom_call(cluster, "list", group, version, plural)
        taken = {item["metadata"]["name"] for item in listed.get("items", [])}
    except Exception:  # only a suggestion: never fail the error message itself
        taken = {name}
    i = 2
    while f"{name}-{i}" in taken:
        i += 1
    return f"{name}-{i}"


def create_error(e: Any, kind: str, name: str, namespace: str) -> UserError | None:
    """The one-line UserError for a failed create (namespace missing, rejected), None when not one of those."""
    msg = api_message(e)
    if e.status == 404 and "namespace" in msg.lower():
        return UserError(f"namespace {namespace!r} does not exist: kubectl create namespace {namespace}")
    if e.status in (400, 422):
        return UserError(f"the API server rejected {kind} {name!r}: {msg}")
    return None


def age(ts: Any) -> str:
    """How long ago a timestamp (RFC 3339 text or datetime) was: 5s, 3m, 2h, 4d; `-` when unset."""
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


def state_of(conds: list[dict], otherwise: str) -> str:
    """The type of the last True condition, else `otherwise`."""
    return next((c["type"] for c in reversed(conds) if c.get("status") == "True"), otherwise)


def condition_lines(conds: list[dict]) -> list[str]:
    """The `conditions:` block of a status report."""
    lines = ["conditions:"]
    for c in conds:
        lines.append(
            f"  {c.get('type', ''):11s} {c.get('status', ''):6s} {c.get('reason', ''):24s} "
            f"{age(c.get('lastTransitionTime')):>5s}  {c.get('message', '')}"
        )
    if not conds:
        lines.append("  (none yet)")
    return lines


def list_pods(cluster: Cluster, selector: str) -> list:
    """The namespace's pods matching a label selector."""
    return api_call(
        cluster, "list pods", cluster.core.list_namespaced_pod, cluster.namespace, label_selector=selector
    ).items


def container_state(pod: Any, container: str) -> tuple[int, str]:
    """(restarts, `exit N (reason)` | `waiting: reason` | "") of one container of a pod."""
    restarts, detail = 0, ""
    for cs in pod.status.container_statuses or []:
        if cs.name != container:
            continue
        restarts, s = cs.restart_count, cs.state
        if s and s.terminated:
            detail = f"exit {s.terminated.exit_code} ({s.terminated.reason or ''})"
        elif s and s.waiting:
            detail = f"waiting: {s.waiting.reason or ''}"
    return restarts, detail


def open_pod_log(cluster: Cluster, pod: str, container: str, follow: bool) -> Any:
    """The container's log as a streaming response; ApiException (400/404) while the pod cannot serve it yet."""
    return api_call(
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


def delete_custom(cluster: Cluster, group: str, version: str, plural: str, name: str, kind: str) -> None:
    """Delete a namespaced custom object in the background (its pods are garbage-collected); UserError if absent."""
    from kubernetes.client.exceptions import ApiException

    try:
        custom_call(cluster, "delete", group, version, plural, name, propagation_policy="Background")
    except ApiException as e:
        if e.status == 404:
            raise UserError(f"{kind} {name!r} not found in namespace {cluster.namespace!r}") from None
        raise


# ---------------------------------------------------------------------------------------------------
# What `make status` and `make logs` read from pods, shared by every kind: the state the pods are in, why a
# pending pod waits, the trainer's progress line, restarts and the last failure.

WAIT_REASONS_IGNORED = ("ContainerCreating", "PodInitializing")
LOG_TAIL_LINES = 200  # how much of rank 0's log status reads to find the last `progress` line
FAILURE_TAIL_LINES = 5  # the log lines shown under the last failure
LOG_HEAD_BYTES = 65536  # how much of the head of rank 0's log status reads for the crash the run kept
# What the trainer's rank 0 prints near the top of its log when the previous start crashed (trainer/crash_budget.py
# failure_report): the header, then the crashed rank's traceback tail, one `  | ` line each.
FAILURE_HEADER = "previous start failed: "
FAILURE_LINE = "  | "
STARTS_HEADER = "run starts: "  # and, at every recorded start, its number in the run's record (starts_line)


def pod_state(pods: list) -> str | None:
    """`Pending (k of n pods pending, m running)` | `Running (m/n pods running)` from the pods' phases (finished
    pods left out); `Restarting (...)` when every pod failed (job_state asks only for a job not finished: its
    controller recreates them); None when there is no pod (the job's conditions then say it)."""
    live = [p for p in pods if (p.status.phase or "Pending") not in ("Succeeded", "Failed")]
    failed = sum(1 for p in pods if p.status.phase == "Failed")
    if not live:
        return f"Restarting ({failed} pod(s) failed, none running: new pods come)" if failed else None
    running = sum(1 for p in live if p.status.phase == "Running")
    pending = len(live) - running
    if pending:
        return f"Pending ({pending} of {len(live)} pods pending, {running} running)"
    return f"Running ({running}/{len(live)} pods running)"


def job_state(conds: list[dict], pods: list, terminal: tuple[str, ...], otherwise: str) -> str:
    """A finished job's terminal condition; Suspended while Kueue has not admitted it; else what the pods do."""
    done = next((c["type"] for c in reversed(conds) if c.get("status") == "True" and c.get("type") in terminal), None)
    if done:
        return done
    if any(c.get("type") == "Suspended" and c.get("status") == "True" for c in conds):
        return "Suspended (not admitted by Kueue, or evicted)"
    return pod_state(pods) or state_of(conds, otherwise)


def wait_reason(pod: Any) -> str:
    """Why a pod is not running yet, in one line: `Unschedulable: 0/4 nodes are available: ...` (PodScheduled
    False) or a container's waiting reason such as `ImagePullBackOff: Back-off pulling image ...`; "" if none."""
    if pod.status.phase not in (None, "Pending"):
        return ""
    for c in pod.status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False":
            return f"{c.reason or 'NotScheduled'}: {' '.join((c.message or '').split())}".rstrip(": ")
    for cs in (pod.status.init_container_statuses or []) + (pod.status.container_statuses or []):
        w = cs.state.waiting if cs.state else None
        if w and w.reason and w.reason not in WAIT_REASONS_IGNORED:
            return f"{w.reason}: {' '.join((w.message or '').split())}".rstrip(": ")
    return ""


def scheduling_lines(pods: list) -> list[str]:
    """The `waiting:` block: each pending pod's scheduling or image-pull reason."""
    lines = [
        f"  {p.metadata.name}: {why}" for p in sorted(pods, key=lambda p: p.metadata.name) if (why := wait_reason(p))
    ]
    return ["waiting:"] + lines if lines else []


def parse_progress(line: str) -> dict[str, str] | None:
    """The key=value words of the trainer's `progress step=... percent=... eta=... loss=...` log line (the same
    reading as trainer.progress.parse_line, kept here so the light client imports nothing more from trainer/)."""
    text = line.strip()
    at = text.find("progress ")
    if at < 0:
        return None
    words = [w.split("=", 1) for w in text[at + len("progress ") :].split()]
    out = {w[0]: w[1] for w in words if len(w) == 2}
    return out or None


def format_eta(seconds: Any) -> str:
    """340 -> 5m40s, 7300 -> 2h01m (the trainer's own format)."""
    try:
        h, rest = divmod(int(float(seconds)), 3600)
    except (TypeError, ValueError):
        return "?"
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(p: dict, source: str) -> str:
    """`progress: 12% (step 120/1000, epoch 1.2), ETA 5m40s, loss 0.53, top1 0.81   (source)`."""
    parts = [f"{p['percent']}%" if p.get("percent") is not None else "?%"]
    if p.get("step"):
        where = f"step {p['step']}" + (f"/{p['total_steps']}" if p.get("total_steps") else "")
        parts[0] += f" ({where}" + (f", epoch {p['epoch']}" if p.get("epoch") else "") + ")"
    eta = p.get("eta") or (format_eta(p["eta_s"]) if p.get("eta_s") is not None else None)
    parts += [f"ETA {eta}"] if eta else []
    parts += [f"{k} {p[k]}" for k in ("loss", "top1") if p.get(k) is not None]
    return f"progress: {', '.join(parts)}   ({source})"


def read_log(
    cluster: Cluster, pod: str, container: str, tail: int, previous: bool = False, head_bytes: int = 0
) -> str | None:
    """The last `tail` lines of a container's log (the previous container's with previous=True), or with
    `head_bytes` its first that many bytes; None when the API cannot serve it (pod gone, container not
    started, no previous container)."""
    from kubernetes.client.exceptions import ApiException

    kw: dict = {"container": container, **({"limit_bytes": head_bytes} if head_bytes else {"tail_lines": tail})}
    if previous:
        kw["previous"] = True
    try:
        return api_call(
            cluster,
            "read pods/log",
            cluster.core.read_namespaced_pod_log,
            pod,
            cluster.namespace,
            passthrough=(400, 404),
            **kw,
        )
    except ApiException:
        return None


def log_progress(cluster: Cluster, pod: str, container: str) -> dict | None:
    """The last `progress` line in the last LOG_TAIL_LINES lines of a pod's log, parsed; None if there is none."""
    text = read_log(cluster, pod, container, LOG_TAIL_LINES) or ""
    return next((p for line in reversed(text.splitlines()) if (p := parse_progress(line))), None)


def exit_meaning(code: int) -> str:
    """What trainer/exits.py STATUSES says of an exit status, with what Kubernetes does: `meaning [retried]`."""
    from trainer.exits import FIRST_RETRIED, STATUSES

    rows = {s: (m, a) for s, _, m, a in STATUSES}
    row = rows.get(str(code))
    if row is None and code >= FIRST_RETRIED:
        row = next((v for s, v in rows.items() if s.startswith(f"{FIRST_RETRIED}+N")), None)
    return f"{row[0]} [{row[1]}]" if row else "not a status the trainer exits with (see python -m trainer.exits)"


def restart_count(pods: list, container: str, label: str | None = None) -> int:
    """Restarts of the job: the container restarts of its live pods, plus (with `label`, JobSet's
    restart-attempt label) the highest restart attempt on a pod: a recreated pod starts again at restartCount 0."""
    n = 0
    for p in pods:
        for cs in p.status.container_statuses or []:
            if cs.name == container:
                n += cs.restart_count or 0
    if label:
        n += max((int((p.metadata.labels or {}).get(label, "0") or 0) for p in pods), default=0)
    return n


def parse_failure_report(text: str) -> tuple[str, list[str]] | None:
    """(header, traceback tail) of the last `previous start failed: ...` block in a log, None without one."""
    lines, found = text.splitlines(), None
    for i, line in enumerate(lines):
        at = line.find(FAILURE_HEADER)
        if at < 0:
            continue
        prefix, tail = line[:at], []  # a log collector's or torchrun's prefix, the same on every line
        for follow in lines[i + 1 :]:
            if not follow.startswith(prefix + FAILURE_LINE):
                break
            tail.append(follow[len(prefix) + len(FAILURE_LINE) :])
        found = (line[at + len(FAILURE_HEADER) :], tail)
    return found


def log_head(cluster: Cluster, pods: list, rank0: str | None, container: str) -> str:
    """The first LOG_HEAD_BYTES of rank 0's log ('' when that pod has not started): where the trainer prints what
    the run's record says at each start (its start count, the previous start's crash)."""
    live = [p for p in pods if p.metadata.name == rank0 and p.status.phase in ("Running", "Succeeded", "Failed")]
    return (read_log(cluster, rank0, container, 0, head_bytes=LOG_HEAD_BYTES) or "") if rank0 and live else ""


def run_restarts(head: str) -> str | None:
    """`restarts: 3 (the run's start record: ...)` from the last `run starts: N (before this one: ...)` line in
    the head of rank 0's log (trainer/crash_budget.py starts_line), None without one."""
    found = None
    for line in head.splitlines():
        at = line.find(STARTS_HEADER)
        if at >= 0:
            found = line[at + len(STARTS_HEADER) :].split(" ", 1)
    if not found or not found[0].isdigit():
        return None
    detail = found[1].strip("() ").removeprefix("before this one: ") if len(found) > 1 else ""
    return f"restarts: {int(found[0]) - 1} (the run's start record, from rank 0's log: {detail})"


def recorded_failure(head: str) -> list[str]:
    """The crash the run kept (see parse_failure_report) from the head of rank 0's current log: what is left of a
    failure once the operator replaced the crashed pod, whose own log went with it."""
    report = parse_failure_report(head)
    if report is None:
        return []
    header, tail = report
    code = header.split()[1] if header.startswith("exit ") else ""
    meaning = f": {exit_meaning(int(code))}" if code.isdigit() else ""
    lines = [f"last failure: {header}, kept by the run (the crashed pod was replaced){meaning}"]
    return lines + [f"  | {line}" for line in tail[-FAILURE_TAIL_LINES:]]


def last_failure(cluster: Cluster, pods: list, container: str, head: str = "") -> list[str]:
    """The newest non-zero exit of the trainer container among the pods (its current state, or the previous
    container's), its meaning, and its last lines: the container's termination message (what the launcher
    wrote: the crashed rank's traceback tail), else the last lines of its log while the API still has it.
    When no pod shows a failure but the pods were replaced, the crash the run kept, from `head` (log_head)."""
    found = []
    for p in pods:
        for cs in p.status.container_statuses or []:
            if cs.name != container:
                continue
            for prev, st in ((False, cs.state), (True, cs.last_state)):
                t = st.terminated if st else None
                if t and t.exit_code:
                    found.append((str(t.finished_at or ""), p.metadata.name, prev, t))
    if not found:
        return recorded_failure(head)
    _, pod, prev, t = max(found, key=lambda f: f[0])
    lines = [
        f"last failure: {pod} exit {t.exit_code} ({t.reason or '?'}"
        f"{', previous container' if prev else ''}, {age(t.finished_at)} ago): {exit_meaning(t.exit_code)}"
    ]
    text = t.message or read_log(cluster, pod, container, FAILURE_TAIL_LINES, previous=prev)
    lines += [f"  | {line}" for line in (text or "").splitlines()[-FAILURE_TAIL_LINES:]]
    return lines


LOG_WAIT_S = 120.0  # make logs' default bound on waiting for the pod
LOG_POLL_S = 2.0


def stream_when_ready(
    cluster: Cluster,
    find_pod: Callable[[], tuple[Any, str]],
    container: str,
    follow: bool,
    previous: bool,
    wait_s: float,
    out: Any,
    what: str,
    src: str,
    hint: str,
) -> None:
    """Stream the log of the pod `find_pod()` returns ((pod or None, why not)) once it can serve one: while
    waiting, one line on stderr each time the reason changes (no pod yet, the pod's scheduling or image-pull
    reason, the API's answer); after wait_s, UserError with the last reason. previous=True reads the previous
    container's log and stops at once when there is none."""
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + wait_s
    said = None
    while True:
        pod, why = find_pod()
        if pod is not None:
            pname = pod.metadata.name
            if pod.status.phase in (None, "Pending") and not previous:
                why = f"pod {pname} is pending: {wait_reason(pod) or 'ContainerCreating'}"
            else:
                try:
                    resp = api_call(
                        cluster,
                        "read pods/log",
                        cluster.core.read_namespaced_pod_log,
                        pname,
                        cluster.namespace,
                        container=container,
                        follow=follow and not previous,
                        _preload_content=False,
                        passthrough=(400, 404),
                        **({"previous": True} if previous else {}),
                    )
                    copy_log(resp, out)
                    return
                except ApiException as e:
                    if previous:
                        raise UserError(
                            f"{what}: pod {pname} has no previous container log ({api_message(e)})"
                        ) from None
                    why = f"pod {pname}: {api_message(e)}"
        if why != said:
            print(f"waiting for {src} of {what}: {why}", file=sys.stderr)
            said = why
        if time.monotonic() >= deadline:
            raise UserError(f"{what}: no {src} log after {wait_s:g} s ({why}); see {hint}")
        time.sleep(min(LOG_POLL_S, max(0.0, deadline - time.monotonic())))


def pod_recreations(cluster: Cluster, kind: str, name: str) -> int | None:
    """How many times the job's controller recreated its most recreated pod, from its `SuccessfulCreatePod`
    events (`Created pod: NAME`, aggregated into `count`); None when events cannot be read. Events expire
    (the API server's --event-ttl, 1 h by default): older recreations are not counted."""
    from kubernetes.client.exceptions import ApiException

    try:
        events = api_call(
            cluster,
            "list events",
            cluster.core.list_namespaced_event,
            cluster.namespace,
            field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
            passthrough=(403, 404),
        ).items
    except ApiException:
        return None
    per_pod: dict[str, int] = {}
    for ev in events:
        if ev.reason == "SuccessfulCreatePod" and (ev.message or "").startswith("Created pod: "):
            pod = ev.message.split(": ", 1)[1].strip()
            per_pod[pod] = per_pod.get(pod, 0) + (ev.count or 1)
    return max((n - 1 for n in per_pod.values()), default=0)
