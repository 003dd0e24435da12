"""Kueue (kueue.x-k8s.io/v1beta1) for tests/support/kube_fake.py: LocalQueues and the Workloads Kueue's job
reconcilers create, written from Kueue's documented behaviour (kueue.sigs.k8s.io "Run a TrainJob", "Run a
PyTorchJob"; pkg/controller/jobframework), not from the code under test.

  GET /apis/kueue.x-k8s.io/v1beta1/namespaces/NS/localqueues    the namespace's LocalQueues
  GET /apis/kueue.x-k8s.io/v1beta1/namespaces/NS/workloads      the Workloads made so far

A job created with the label kueue.x-k8s.io/queue-name, of a kind whose integration is in `frameworks`, gets a
Workload owned by it (ownerReferences: the job's uid, controller true) once `workload_delay_s` has passed. Its
default `frameworks` are Kueue's defaults since kubernetes-sigs/kueue PR #12606: batch/job and
trainer.kubeflow.org/trainjob on, kubeflow.org/pytorchjob off. Kueue absent = FakeKube(kueue=None): every
kueue.x-k8s.io path answers 404, as an API server without Kueue's CRDs does. `forbidden=True` answers 403.

Kueue's on-demand visibility API (an aggregated API served by kueue-controller-manager; kubernetes-sigs/kueue
apis/visibility/v1beta1/types.go, v1beta2 the same shape):

  GET /apis/visibility.kueue.x-k8s.io/VERSION/namespaces/NS/localqueues/Q/pendingworkloads?limit=N&offset=M

answers a PendingWorkloadsSummary of the LocalQueue's pending Workloads (not admitted, no quota reserved, not
finished), in StrictFIFO order: priority (spec.priority) descending, then creation, then the order they were
made. positionInClusterQueue counts every pending Workload of the LocalQueues feeding the same ClusterQueue
(`cluster_queues`: LocalQueue name -> ClusterQueue, else `cluster-queue`), in any namespace; offset (default 0)
and limit (default 1000) cut the page. Only the versions in `visibility_versions` are served, the others answer
404 like an APIService that is not registered (`()`: the API is not installed: Kueue < 0.6 or the feature gate
VisibilityOnDemand off); `visibility_forbidden=True` answers 403 (a Role without localqueues/pendingworkloads);
`visibility_down=True` answers 503 as kube-aggregator does when the APIService's server does not answer; a
LocalQueue Kueue does not know answers 404 NotFound naming it.
"""

from __future__ import annotations

import re
import time
import uuid

from tests.support.kube_fake import _now
from tests.support.kube_fake import _status as _st

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PATH = re.compile(r"^/apis/kueue\.x-k8s\.io/v1beta1/namespaces/([^/]+)/(localqueues|workloads)$")
DEFAULT_FRAMEWORKS = ("batch/job", "trainer.kubeflow.org/trainjob")
VISIBILITY = re.compile(
    r"^/apis/visibility\.kueue\.x-k8s\.io/([^/]+)/namespaces/([^/]+)/localqueues/([^/]+)/pendingworkloads$"
)
DEFAULT_CLUSTER_QUEUE = "cluster-queue"


class FakeKueue:
    def __init__(
        self,
        local_queues: dict[str, list[str]] | None = None,
        frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS,
        workload_delay_s: float = 0.0,
        forbidden: bool = False,
        visibility_versions: tuple[str, ...] = ("v1beta1", "v1beta2"),
        visibility_forbidden: bool = False,
        visibility_down: bool = False,
        cluster_queues: dict[str, str] | None = None,
    ) -> None:
        self.local_queues = local_queues if local_queues is not None else {"gnp": ["team-a"]}
        self.frameworks = set(frameworks)
        self.workload_delay_s = workload_delay_s
        self.forbidden = forbidden
        self.visibility_versions = set(visibility_versions)
        self.visibility_forbidden = visibility_forbidden
        self.visibility_down = visibility_down
        self.cluster_queues = cluster_queues or {}  # LocalQueue name -> its spec.clusterQueue
        self.workloads: list[tuple[float, str, dict]] = []  # (visible from, namespace, Workload)

    def job_created(self, ns: str, job: dict, framework: str) -> None:
        """What Kueue's reconciler for `framework` does with a new job: a Workload when it manages it."""
        md = job["metadata"]
        queue = (md.get("labels") or {}).get(QUEUE_LABEL)
        if framework not in self.frameworks or not queue:
            return
        kind = job["kind"]
        wl = {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "Workload",
            "metadata": {
                # Kueue names it <kind>-<job name>-<hash>
                "name": f"{kind.lower()}-{md['name']}-{uuid.uuid4().hex[:5]}",
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "ownerReferences": [
                    {
                        "apiVersion": job["apiVersion"],
                        "kind": kind,
                        "name": md["name"],
                        "uid": md["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {"queueName": queue, "podSets": []},
        }
        self.workloads.append((time.monotonic() + self.workload_delay_s, ns, wl))

    def dispatch(self, method: str, path: str) -> tuple[int, dict]:
        m = PATH.match(path)
        if not m or method != "GET":
            return 404, _st(404, "NotFound", "the server could not find the requested resource")
        if self.forbidden:
            return 403, _st(403, "Forbidden", f'{m.group(2)}.kueue.x-k8s.io is forbidden: User "tester" cannot list')
        ns, plural = m.group(1), m.group(2)
        if plural == "localqueues":
            items = [
                {
                    "apiVersion": "kueue.x-k8s.io/v1beta1",
                    "kind": "LocalQueue",
                    "metadata": {"name": q, "namespace": ns},
                    "spec": {"clusterQueue": self.cluster_queue(q)},
                }
                for q in self.local_queues.get(ns, [])
            ]
            kind = "LocalQueueList"
        else:
            now = time.monotonic()
            items = [wl for t, n, wl in self.workloads if n == ns and t <= now]
            kind = "WorkloadList"
        return 200, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": kind, "metadata": {}, "items": items}

    # -- the visibility API ------------------------------------------------------------------------

    def cluster_queue(self, local_queue: str) -> str:
        return self.cluster_queues.get(local_queue, DEFAULT_CLUSTER_QUEUE)

    def add_workload(self, ns: str, name: str, queue: str, priority: int = 0, created: str | None = None) -> dict:
        """A Workload of some other job (another user's), pending in `queue`."""
        wl = {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "Workload",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": created or _now(),
            },
            "spec": {"queueName": queue, "priority": priority, "podSets": []},
        }
        self.workloads.append((time.monotonic(), ns, wl))
        return wl

    def _pending(self) -> list[dict]:
        """Every pending Workload, in StrictFIFO order (priority descending, then creation, then made first)."""
        now = time.monotonic()
        out = []
        for i, (t, _, wl) in enumerate(self.workloads):
            st = wl.get("status") or {}
            true = {c.get("type") for c in st.get("conditions") or [] if c.get("status") == "True"}
            if t <= now and not st.get("admission") and not true & {"Admitted", "QuotaReserved", "Finished"}:
                out.append(
                    (-int((wl.get("spec") or {}).get("priority") or 0), wl["metadata"]["creationTimestamp"], i, wl)
                )
        return [wl for *_, wl in sorted(out, key=lambda x: x[:3])]

    def visibility(self, method: str, path: str, query: dict) -> tuple[int, dict]:
        m = VISIBILITY.match(path)
        if not m or method != "GET" or m.group(1) not in self.visibility_versions:
            return 404, _st(404, "NotFound", "the server could not find the requested resource")
        if self.visibility_down:
            return 503, _st(503, "ServiceUnavailable", "the server is currently unable to handle the request")
        version, ns, lq = m.groups()
        if self.visibility_forbidden:
            return 403, _st(
                403,
                "Forbidden",
                f'localqueues.visibility.kueue.x-k8s.io "{lq}" is forbidden: User "tester" cannot get resource '
                f'"localqueues/pendingworkloads" in API group "visibility.kueue.x-k8s.io" in the namespace "{ns}"',
            )
        if lq not in self.local_queues.get(ns, []):
            body = _st(404, "NotFound", f'localqueue.visibility.kueue.x-k8s.io "{lq}" not found')
            body["details"] = {"name": lq, "group": "visibility.kueue.x-k8s.io", "kind": "localqueue"}
            return 404, body
        offset = int((query.get("offset") or ["0"])[0])
        limit = int((query.get("limit") or ["1000"])[0])
        cq = self.cluster_queue(lq)
        items, in_lq = [], 0
        for in_cq, wl in enumerate(w for w in self._pending() if self.cluster_queue(w["spec"]["queueName"]) == cq):
            md = wl["metadata"]
            if md["namespace"] != ns or wl["spec"]["queueName"] != lq:
                continue
            items.append(
                {
                    "metadata": {
                        "name": md["name"],
                        "namespace": ns,
                        "ownerReferences": md.get("ownerReferences", []),
                        "creationTimestamp": md["creationTimestamp"],
                    },
                    "priority": int(wl["spec"].get("priority") or 0),
                    "localQueueName": lq,
                    "positionInClusterQueue": in_cq,
                    "positionInLocalQueue": in_lq,
                }
            )
            in_lq += 1
        return 200, {
            "kind": "PendingWorkloadsSummary",
            "apiVersion": f"visibility.kueue.x-k8s.io/{version}",
            "metadata": {},
            "items": items[offset : offset + limit],
        }
