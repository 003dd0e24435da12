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


class FakeKueue:
    def __init__(
        self,
        local_queues: dict[str, list[str]] | None = None,
        frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS,
        workload_delay_s: float = 0.0,
        forbidden: bool = False,
    ) -> None:
        self.local_queues = local_queues if local_queues is not None else {"gnp": ["team-a"]}
        self.frameworks = set(frameworks)
        self.workload_delay_s = workload_delay_s
        self.forbidden = forbidden
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
                {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": {"name": q, "namespace": ns}}
                for q in self.local_queues.get(ns, [])
            ]
            kind = "LocalQueueList"
        else:
            now = time.monotonic()
            items = [wl for t, n, wl in self.workloads if n == ns and t <= now]
            kind = "WorkloadList"
        return 200, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": kind, "metadata": {}, "items": items}
