"""Kueue on a shared cluster: which LocalQueue a job goes to, and whether Kueue took it.

Kueue admits a job whose own metadata carries `kueue.x-k8s.io/queue-name`; the job is created suspended and
Kueue unsuspends it on admission. For every job kind it manages, Kueue creates a `Workload`
(kueue.x-k8s.io/v1beta1) owned by the job (ownerReferences, the job's uid). A kind Kueue does not manage gets
no Workload and is never unsuspended: since kubernetes-sigs/kueue PR #12606 Kueue's default configuration no
longer enables `kubeflow.org/pytorchjob` (the deprecated Trainer v1 integration), while
`trainer.kubeflow.org/trainjob` stays enabled. So submit waits a few seconds for the Workload and stops with the
fix when none appears, instead of leaving a job that silently never starts.

Without a queue in the spec, a namespace with exactly one LocalQueue gets it (a namespace set up for Kueue
usually has one, and a job outside it would bypass the team's quota, or be refused by a policy); with several
submit lists them and stops; without Kueue (its API absent: 404) or without LocalQueues the job runs unqueued.

`make status` prints the Workload's state, and for one not admitted its place in the queue: the Workload carries
no position, Kueue's on-demand visibility API (visibility.kueue.x-k8s.io, an aggregated API served by
kueue-controller-manager since Kueue 0.6, feature gate VisibilityOnDemand) does, as the LocalQueue's
`pendingworkloads` subresource. Reading it needs `get` on localqueues/pendingworkloads in the namespace
(k8s/examples/rbac.yaml); without it, or without that API, status says why the position is unknown.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .cluster import api_call, api_message, get_path
from .errors import UserError
from .spec import JobSpec

GROUP, VERSION = "kueue.x-k8s.io", "v1beta1"
DEFAULT_WAIT_S = 15.0  # Kueue's job reconciler creates the Workload within a second on a healthy cluster
POLL_S = 1.0
CONFIG_HINT = (
    "integrations.frameworks in Kueue's Configuration (ConfigMap kueue-manager-config in kueue-system, or the "
    "Helm value managerConfig.controllerManagerConfigYaml), then restart kueue-controller-manager"
)


def _list(cluster, plural: str) -> tuple[str, list[dict]]:
    """('ok', items) | ('absent', []) when Kueue's API is not served (404) | ('forbidden', [])."""
    from kubernetes.client.exceptions import ApiException

    try:
        listed = api_call(
            cluster,
            f"list {plural}",
            cluster.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            cluster.namespace,
            plural,
            passthrough=(403, 404),
        )
    except ApiException as e:
        return ("absent" if e.status == 404 else "forbidden"), []
    return "ok", list(listed.get("items") or [])


def resolve_queue(job: JobSpec, cluster) -> None:
    """Set job.scheduling.queue from the namespace's LocalQueues when the spec names none; check a named one."""
    state, items = _list(cluster, "localqueues")
    names = sorted(i["metadata"]["name"] for i in items)
    queue, ns = job.scheduling.queue, cluster.namespace
    if state == "forbidden":
        print(f"warning: cannot list Kueue LocalQueues in {ns!r} (forbidden); queue unchecked", file=sys.stderr)
        return
    if queue:
        if state == "absent":
            raise UserError(
                f"queue {queue!r} is set but Kueue is not installed (no {GROUP}/{VERSION} API): the job would stay "
                f"suspended forever; drop the spec key queue"
            )
        if queue not in names:
            raise UserError(
                f"queue {queue!r}: no such Kueue LocalQueue in namespace {ns!r}; "
                f"allowed: {', '.join(names) or '(none: ask the platform team for one)'}"
            )
        return
    if len(names) == 1:
        job.scheduling.queue = names[0]
        print(f"queue: {names[0]} (the only Kueue LocalQueue in namespace {ns!r})", file=sys.stderr)
    elif len(names) > 1:
        raise UserError(
            f"namespace {ns!r} has {len(names)} Kueue LocalQueues ({', '.join(names)}): choose one with "
            f'SPEC="queue=NAME" (--spec queue=NAME)'
        )


def wait_for_workload(cluster, kind: Any, name: str, uid: str, wait_s: float = DEFAULT_WAIT_S) -> str | None:
    """The name of the Workload Kueue made for the job (uid); UserError naming the fix when none appears.
    `kind` is the job's kinds.JobKind (its NAME, KUEUE_FRAMEWORK, KUEUE_HINT and MAKE_API)."""
    deadline = time.monotonic() + wait_s
    while True:
        state, items = _list(cluster, "workloads")
        if state != "ok":  # forbidden (or Kueue gone): cannot tell, the job stays as submitted
            print(f"warning: cannot list Kueue Workloads ({state}); cannot tell if Kueue took the job", file=sys.stderr)
            return None
        for wl in items:
            if any(o.get("uid") == uid for o in wl["metadata"].get("ownerReferences") or []):
                return wl["metadata"]["name"]
        if time.monotonic() >= deadline:
            break
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    fw = kind.KUEUE_FRAMEWORK
    raise UserError(
        f"{kind.NAME} {cluster.namespace}/{name} is suspended but Kueue made no Workload for it within {wait_s:g} s: "
        f"Kueue is not managing {fw}; fix: add `{fw}` to {CONFIG_HINT}{kind.KUEUE_HINT}; then make delete JOB={name} "
        f"NAMESPACE={cluster.namespace}{kind.MAKE_API} and submit again"
    )


QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VISIBILITY_GROUP = "visibility.kueue.x-k8s.io"
VISIBILITY_VERSIONS = ("v1beta1", "v1beta2")  # v1beta1 since Kueue 0.6; newer Kueue also serves v1beta2
PENDING_PATH = "/apis/" + VISIBILITY_GROUP + "/{version}/namespaces/{namespace}/localqueues/{queue}/pendingworkloads"
PENDING_PAGE = 1000  # the visibility API's default limit: one page, a position beyond it is `> 1000`
RBAC_HINT = f"grant get on localqueues/pendingworkloads ({VISIBILITY_GROUP}), see k8s/examples/rbac.yaml"


def _not_found_name(e: Any) -> str | None:
    """The name in a 404 Status's details (`localqueue "q" not found`), None for a path nobody serves."""
    import json

    try:
        return (json.loads(e.body).get("details") or {}).get("name")
    except (ValueError, TypeError, AttributeError):
        return None


def queue_position(cluster, queue: str, workload: str) -> str:
    """Where a pending Workload stands, from Kueue's on-demand visibility API (the LocalQueue's
    pendingworkloads: positionInLocalQueue and positionInClusterQueue, from 0, printed from 1): `position 2 of 3
    in the queue, 4 in clusterqueue gpu`; `position > 1000 in the queue` beyond the first page; `position
    unknown: why` when the API is not served (404 on both versions: Kueue < 0.6, or its VisibilityOnDemand
    feature gate off), forbidden (403), or its aggregated API server does not answer (503). Never raises: status
    works without it."""
    from kubernetes.client.exceptions import ApiException

    summary = None
    for version in VISIBILITY_VERSIONS:
        try:
            summary = get_path(
                cluster,
                f"get localqueues/pendingworkloads ({VISIBILITY_GROUP}/{version})",
                PENDING_PATH,
                {"version": version, "namespace": cluster.namespace, "queue": queue},
                [("limit", PENDING_PAGE), ("offset", 0)],
                passthrough=(403, 404, 503),
            )
            break
        except ApiException as e:
            if e.status == 404 and _not_found_name(e) == queue:
                return f"position unknown: Kueue has no LocalQueue {queue}"
            if e.status == 404:
                continue  # this version is not served: try the next one
            if e.status == 403:
                return f"position unknown: forbidden, {RBAC_HINT}"
            if e.status == 503:
                return "position unknown: Kueue's visibility API server is down (503)"
            return f"position unknown: Kueue's visibility API answered {e.status} ({api_message(e)[:120]})"
        except Exception as e:  # unreachable, timed out (a UserError from api_call): the position is only a hint
            return f"position unknown: Kueue's visibility API did not answer ({' '.join(str(e).split())[:120]})"
    if summary is None:
        return "position unknown: Kueue's visibility API is not served"
    items = summary.get("items") or [] if isinstance(summary, dict) else []
    item = next((i for i in items if (i.get("metadata") or {}).get("name") == workload), None)
    full = len(items) >= PENDING_PAGE
    if item is None:
        if full:
            return f"position > {PENDING_PAGE} in the queue"
        return f"position unknown: not among the queue's {len(items)} pending workloads"
    count = f"{PENDING_PAGE} or more" if full else str(len(items))
    text = f"position {int(item.get('positionInLocalQueue') or 0) + 1} of {count} in the queue"
    if item.get("positionInClusterQueue") is not None:
        text += f", {int(item['positionInClusterQueue']) + 1} in clusterqueue {_cluster_queue(cluster, queue)}"
    return text


def _cluster_queue(cluster, queue: str) -> str:
    """The ClusterQueue the LocalQueue feeds (its spec.clusterQueue), `?` when it cannot be read."""
    try:
        _, items = _list(cluster, "localqueues")
    except Exception:  # only a name in a status line
        return "?"
    return (
        next(((q.get("spec") or {}).get("clusterQueue") for q in items if q["metadata"]["name"] == queue), None) or "?"
    )


def workload_lines(cluster, obj: dict) -> list[str]:
    """`make status`'s Kueue line for a job: its Workload (owned by the job's uid), admitted or not, the queue
    and why not (the False QuotaReserved/Admitted condition's message: `couldn't assign flavors ...`). Kueue's
    Workload status carries no queue position, so for a Workload not admitted it is read from Kueue's visibility
    API (queue_position: the LocalQueue's pendingworkloads), to tell how many jobs wait ahead; when that API is
    absent, forbidden or down the line says so and stays otherwise the same."""
    md = obj.get("metadata", {})
    queue = (md.get("labels") or {}).get(QUEUE_LABEL)
    if not queue:
        return []
    state, items = _list(cluster, "workloads")
    if state != "ok":
        return [f"kueue: queue {queue}; cannot list Workloads ({state})"]
    uid = md.get("uid")
    wl = next((w for w in items if any(o.get("uid") == uid for o in w["metadata"].get("ownerReferences") or [])), None)
    if wl is None:
        return [f"kueue: queue {queue}; no Workload for this job: Kueue does not manage it (see make submit's error)"]
    st = wl.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    name, queue = wl["metadata"]["name"], (wl.get("spec") or {}).get("queueName", queue)
    finished = conds.get("Finished", {}).get("status") == "True"
    if conds.get("Admitted", {}).get("status") == "True" or (st.get("admission") and not finished):
        cq = (st.get("admission") or {}).get("clusterQueue")
        return [f"kueue: admitted (workload {name}, queue {queue}{f', clusterqueue {cq}' if cq else ''})"]
    if finished:
        return [f"kueue: finished (workload {name}, queue {queue})"]
    why = next(
        (
            c
            for t, bad in (("Evicted", "True"), ("QuotaReserved", "False"), ("Admitted", "False"))
            if (c := conds.get(t)) and c.get("status") == bad
        ),
        None,
    )
    where = f"workload {name}, queue {queue}, {queue_position(cluster, queue, name)}"
    if why is None:
        return [f"kueue: not admitted ({where}): no condition yet"]
    msg = " ".join(str(why.get("message", "")).split())
    return [f"kueue: not admitted ({where}): {why.get('type')}={why.get('status')} {why.get('reason', '')}: {msg}"]
