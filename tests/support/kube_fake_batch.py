"""batch/v1 Jobs for tests/support/kube_fake.py: what the API server and the Job controller do with a Job,
written from their documented behaviour (kubernetes.io/docs/concepts/workloads/controllers/job), not from the
renderer.

  GET    /apis/batch/v1                                   discovery
  POST   /apis/batch/v1/namespaces/NS/jobs                create (409 AlreadyExists, 404 no namespace)
  GET    /apis/batch/v1/namespaces/NS/jobs[/NAME]         list / get (404 NotFound)
  DELETE /apis/batch/v1/namespaces/NS/jobs/NAME           delete; its pods go only with propagationPolicy
                                                          Background|Foreground (the API's default orphans them)

A created Job that is not suspended gets one pod `<job>-<5 chars>` labelled batch.kubernetes.io/job-name and
controller-uid (Running, unless `fake.batch_pending` names a scheduler message: then Pending, Unschedulable),
and `status.active: 1`. A Job labelled kueue.x-k8s.io/queue-name is reported to the FakeKueue as batch/job.
finish(fake, ns, job, exit_code) ends its newest pod the way the controller would: exit 0 -> Complete; exit 2
(the rendered podFailurePolicy's FailJob rule) -> Failed, reason PodFailurePolicy.
"""

from __future__ import annotations

import copy
import re
import uuid

from tests.support.kube_fake import _now
from tests.support.kube_fake import _status as _st

BASE = "/apis/batch/v1"
JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def _pod(ns: str, job: dict, pending: str | None) -> dict:
    name = job["metadata"]["name"]
    tmpl = job["spec"]["template"]
    labels = {**tmpl.get("metadata", {}).get("labels", {}), JOB_NAME_LABEL: name, "job-name": name}
    labels["batch.kubernetes.io/controller-uid"] = job["metadata"]["uid"]
    containers = tmpl["spec"]["containers"]
    status: dict = {"phase": "Pending" if pending else "Running"}
    if pending:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": pending}
        ]
    else:
        status["containerStatuses"] = [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": _now()}},
            }
            for c in containers
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{uuid.uuid4().hex[:5]}",
            "namespace": ns,
            "labels": labels,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": _now(),
        },
        "spec": {
            "nodeName": None if pending else "cpu-node-0",
            "containers": [{"name": c["name"], "image": c["image"]} for c in containers],
        },
        "status": status,
    }


def _jobs(fake) -> dict:
    if not hasattr(fake, "batch_jobs"):
        fake.batch_jobs = {}  # (namespace, name) -> Job
    return fake.batch_jobs


def finish(fake, ns: str, name: str, exit_code: int) -> None:
    """End the Job's newest pod with `exit_code` and set the Job's status as the controller would."""
    with fake._lock:
        job = _jobs(fake)[(ns, name)]
        pods = [p for p in fake.pods.values() if p["metadata"]["labels"].get(JOB_NAME_LABEL) == name]
        pod = max(pods, key=lambda p: p["metadata"]["creationTimestamp"])
        reason = "Completed" if exit_code == 0 else "Error"
        pod["status"] = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        st = job["status"]
        st.pop("active", None)
        if exit_code == 0:
            st["succeeded"] = 1
            conds = [("SuccessCriteriaMet", "CompletionsReached", ""), ("Complete", "CompletionsReached", "")]
        else:
            st["failed"] = st.get("failed", 0) + 1
            msg = f"Container convert for pod {ns}/{pod['metadata']['name']} failed with exit code {exit_code}"
            conds = [("FailureTarget", "PodFailurePolicy", msg), ("Failed", "PodFailurePolicy", msg)]
        st["conditions"] = [
            {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": _now()} for t, r, m in conds
        ]


def dispatch(fake, method: str, path: str, query: dict, body: dict) -> tuple[int, dict | str]:
    if path == BASE and method == "GET":
        res = {"name": "jobs", "singularName": "job", "namespaced": True, "kind": "Job", "verbs": ["create", "get"]}
        return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "batch/v1", "resources": [res]}
    m = JOBS.match(path)
    if not m:
        return 404, _st(404, "NotFound", "the server could not find the requested resource")
    ns, name = m.group(1), m.group(2)
    jobs = _jobs(fake)
    if ns not in fake.namespaces:
        return 404, _st(404, "NotFound", f'namespaces "{ns}" not found')
    if name is None and method == "GET":
        items = [j for (n, _), j in sorted(jobs.items()) if n == ns]
        return 200, {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items}
    if name is None and method == "POST":
        jname = body.get("metadata", {}).get("name", "")
        if (ns, jname) in jobs:
            return 409, _st(409, "AlreadyExists", f'jobs.batch "{jname}" already exists')
        job = copy.deepcopy(body)
        job["metadata"].update(
            {"namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(), "resourceVersion": "1"}
        )
        job["status"] = {}
        jobs[(ns, jname)] = job
        if not job["spec"].get("suspend"):
            pod = _pod(ns, job, getattr(fake, "batch_pending", None))
            fake.pods[(ns, pod["metadata"]["name"])] = pod
            fake.logs[(ns, pod["metadata"]["name"])] = f"converting into {jname}\nwrote 10 samples\n"
            job["status"] = {"active": 1, "startTime": _now()}
        if fake.kueue is not None:
            fake.kueue.job_created(ns, job, "batch/job")
        return 201, job
    if (ns, name) not in jobs:
        return 404, _st(404, "NotFound", f'jobs.batch "{name}" not found')
    if method == "GET":
        return 200, jobs[(ns, name)]
    if method == "DELETE":
        del jobs[(ns, name)]
        if query.get("propagationPolicy", [""])[0] in ("Background", "Foreground"):
            for key in [
                k for k, p in fake.pods.items() if k[0] == ns and p["metadata"]["labels"].get(JOB_NAME_LABEL) == name
            ]:
                del fake.pods[key]
        details = {"name": name, "group": "batch", "kind": "jobs"}
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
    return 405, _st(405, "MethodNotAllowed", f"{method} is not supported here")
