"""A small in-process fake of the Kubernetes API subset that k8s/render.py's submit/status/logs/delete use.

No real kube-apiserver can be installed on the development machines (no Debian or PyPI package ships one;
kind, minikube and k3s need docker or downloads), so the client code path is exercised
against this HTTP server on 127.0.0.1 instead. It speaks the real wire format the kubernetes Python client
expects (JSON bodies, `Status` objects for errors) for:

  GET    /apis/kubeflow.org/v1                                         discovery (404 when the CRD is absent)
  POST   /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs               create (409 AlreadyExists, 404 no namespace)
  GET    /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs[/NAME]        list / get (404 NotFound)
  DELETE /apis/kubeflow.org/v1/namespaces/NS/pytorchjobs/NAME          delete (and the job's pods)
  GET    /api/v1/namespaces/NS/pods?labelSelector=k=v,...              list pods by equality selectors
  GET    /api/v1/namespaces/NS/pods/NAME/log?container=C               the pod's log text (&tailLines=N,
                                                                       &limitBytes=N: the first N bytes,
                                                                       &previous=true: `previous_logs`; 400
                                                                       while the pod is Pending)
  GET    /api/v1/namespaces/NS/events?fieldSelector=k=v,...           Events (the operator's SuccessfulCreatePod)
  GET    /api/v1/namespaces/NS/secrets/NAME                            a Secret (404 unless in `secrets`)
  GET    /apis/kueue.x-k8s.io/v1beta1/namespaces/NS/{localqueues,workloads}   with `kueue=FakeKueue(...)`
                                                                       (tests/support/kube_fake_kueue.py), else 404
  GET    /apis/visibility.kueue.x-k8s.io/V/namespaces/NS/localqueues/Q/pendingworkloads   Kueue's visibility
                                                                       API (the same), else 404
  GET/POST/DELETE /apis/batch/v1/namespaces/NS/jobs[/NAME]             batch/v1 Jobs and their pod
                                                                       (tests/support/kube_fake_batch.py)

Like the training operator, a created job gets a `Created` condition and one Running pod per replica
(`<job>-master-0`, `<job>-worker-<i>`) labelled training.kubeflow.org/job-name; `Running` is then set. A job
created with runPolicy.suspend gets no pods and a `Suspended` condition (Kueue has not admitted it).
Everything it does not implement answers 404 with a Status, and every request is recorded in `requests`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

GROUP_PATH = "/apis/kubeflow.org/v1"
KUEUE_PATH = "/apis/kueue.x-k8s.io/"
VISIBILITY_PATH = "/apis/visibility.kueue.x-k8s.io/"  # Kueue's aggregated visibility API (kube_fake_kueue.py)
TRAINER_PATH = "/apis/trainer.kubeflow.org/"  # Kubeflow Trainer v2: served by tests/support/kube_fake_trainer.py
BATCH_PATH = "/apis/batch/v1"  # batch/v1 Jobs: served by tests/support/kube_fake_batch.py
JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
SECRETS = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(/log)?)?$")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _suspended(name: str) -> dict:
    return {
        "type": "Suspended",
        "status": "True",
        "reason": "PyTorchJobSuspended",
        "message": f"PyTorchJob {name} is suspended.",
        "lastTransitionTime": _now(),
    }


class FakeKube:
    """The fake API server; use as a context manager. `url` is its base URL."""

    def __init__(
        self,
        crd_installed: bool = True,
        namespaces: tuple[str, ...] = ("default", "gnp"),
        secrets: tuple[str, ...] = ("gnp-s3",),
        kueue=None,
    ) -> None:
        self.kueue = kueue  # a tests.support.kube_fake_kueue.FakeKueue, or None: Kueue not installed
        # (METHOD, plural) -> (status, message): what an admission webhook, RBAC or the API server would answer
        # instead, e.g. faults[("POST", "trainjobs")] = (422, "admission webhook denied the request")
        self.faults: dict[tuple[str, str], tuple[int, str]] = {}
        self.crd_installed = crd_installed
        self.namespaces = set(namespaces)
        self.secrets = {(ns, s) for ns in self.namespaces for s in secrets}  # (namespace, name) that exist
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.previous_logs: dict[tuple[str, str], str] = {}  # the previous container's log (?previous=true)
        self.events: list[dict] = []  # core/v1 Events (the operator's SuccessfulCreatePod ones: recreate_pod)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeKube":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def kubeconfig(self, path: Path, namespace: str | None = None) -> Path:
        """Write a kubeconfig for this server (token auth, plain HTTP) and return its path."""
        ctx = {"cluster": "fake", "user": "tester"}
        if namespace:
            ctx["namespace"] = namespace
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": ctx}],
        }
        path.write_text(json.dumps(cfg))
        return path

    # -- the operator's part -----------------------------------------------------------------------

    def _spawn_pods(self, ns: str, job: dict) -> None:
        name = job["metadata"]["name"]
        for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items():
            for i in range(rs.get("replicas", 1)):
                pod_name = f"{name}-{rtype.lower()}-{i}"
                labels = {
                    **rs["template"].get("metadata", {}).get("labels", {}),
                    "training.kubeflow.org/job-name": name,
                    "training.kubeflow.org/replica-type": rtype.lower(),
                    "training.kubeflow.org/replica-index": str(i),
                }
                containers = rs["template"]["spec"]["containers"]
                self.pods[(ns, pod_name)] = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name,
                        "namespace": ns,
                        "labels": labels,
                        "uid": str(uuid.uuid4()),
                        "creationTimestamp": _now(),
                    },
                    "spec": {
                        "nodeName": f"node-{i}",
                        "containers": [{"name": c["name"], "image": c["image"]} for c in containers],
                    },
                    "status": {
                        "phase": "Running",
                        "containerStatuses": [
                            {
                                "name": c["name"],
                                "image": c["image"],
                                "imageID": "",
                                "ready": True,
                                "restartCount": 0,
                                "state": {"running": {"startedAt": _now()}},
                            }
                            for c in containers
                        ],
                    },
                }
                self.logs[(ns, pod_name)] = f"log of {pod_name}\nstep 1 loss 2.30\n"
                self.pod_created_event(ns, job, pod_name)
        job["status"] = {
            "conditions": [
                {
                    "type": "Created",
                    "status": "True",
                    "reason": "PyTorchJobCreated",
                    "message": f"PyTorchJob {name} is created.",
                    "lastTransitionTime": _now(),
                },
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "PyTorchJobRunning",
                    "message": f"PyTorchJob {ns}/{name} is running.",
                    "lastTransitionTime": _now(),
                },
            ],
            "replicaStatuses": {
                rtype: {"active": rs.get("replicas", 1)} for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items()
            },
            "startTime": _now(),
        }

    def pod_created_event(self, ns: str, job: dict, pod_name: str) -> None:
        """The training operator's event for a pod it created (pod_control.go: reason SuccessfulCreatePod,
        message `Created pod: NAME`); the event recorder aggregates repeats of one message into `count`."""
        md = job["metadata"]
        for ev in self.events:
            if ev["involvedObject"]["uid"] == md["uid"] and ev["message"] == f"Created pod: {pod_name}":
                ev["count"] += 1
                ev["lastTimestamp"] = _now()
                return
        self.events.append(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{md['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
                "involvedObject": {
                    "apiVersion": job["apiVersion"],
                    "kind": job["kind"],
                    "name": md["name"],
                    "namespace": ns,
                    "uid": md["uid"],
                },
                "reason": "SuccessfulCreatePod",
                "message": f"Created pod: {pod_name}",
                "type": "Normal",
                "count": 1,
                "firstTimestamp": _now(),
                "lastTimestamp": _now(),
                "source": {"component": "pytorchjob-controller"},
            }
        )

    def recreate_pod(self, ns: str, pod_name: str) -> None:
        """What the operator does with a pod that exited with a retried status: a new pod of the same name
        (new uid, Running, restartCount 0) and one more SuccessfulCreatePod event."""
        pod = self.pods[(ns, pod_name)]
        job = self.jobs[(ns, pod["metadata"]["labels"]["training.kubeflow.org/job-name"])]
        pod["metadata"].update({"uid": str(uuid.uuid4()), "creationTimestamp": _now()})
        pod["status"]["phase"] = "Running"
        for cs in pod["status"]["containerStatuses"]:
            cs.update({"ready": True, "restartCount": 0, "state": {"running": {"startedAt": _now()}}})
            cs.pop("lastState", None)
        self.pod_created_event(ns, job, pod_name)

    # -- HTTP -------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body: dict | str) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                with fake._lock:
                    fake.requests.append((method, self.path))
                    code, body = fake._dispatch(
                        method, url.path, query, self._body() if method in ("POST", "PUT", "PATCH") else {}
                    )
                self._send(code, body)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._route("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._route("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._route("PUT")

            def do_PATCH(self) -> None:  # noqa: N802
                self._route("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                self._route("DELETE")

        return Handler

    def _dispatch(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict | str]:
        for (m, plural), (code, message) in self.faults.items():
            if m == method and re.search(f"/namespaces/[^/]+/{plural}(/|$)", path):
                reason = {403: "Forbidden", 409: "Conflict", 422: "Invalid"}.get(code, "InternalError")
                return code, _status(code, reason, message)
        if path.startswith(KUEUE_PATH):
            if self.kueue is None:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            return self.kueue.dispatch(method, path)
        if path.startswith(VISIBILITY_PATH):
            if self.kueue is None:
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            return self.kueue.visibility(method, path, query)
        if path.startswith(TRAINER_PATH):
            from tests.support.kube_fake_trainer import dispatch

            return dispatch(self, method, path, body)
        if path == BATCH_PATH or path.startswith(BATCH_PATH + "/"):
            from tests.support import kube_fake_batch

            return kube_fake_batch.dispatch(self, method, path, query, body)
        if path.startswith(GROUP_PATH) and not self.crd_installed:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        if path == GROUP_PATH and method == "GET":
            return 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "kubeflow.org/v1",
                "resources": [
                    {
                        "name": "pytorchjobs",
                        "singularName": "pytorchjob",
                        "namespaced": True,
                        "kind": "PyTorchJob",
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    },
                    {
                        "name": "pytorchjobs/status",
                        "singularName": "",
                        "namespaced": True,
                        "kind": "PyTorchJob",
                        "verbs": ["get", "patch", "update"],
                    },
                ],
            }
        m = JOBS.match(path)
        if m:
            return self._jobs(method, m.group(1), m.group(2), body)
        m = SECRETS.match(path)
        if m and method == "GET":
            if (m.group(1), m.group(2)) not in self.secrets:
                return 404, _status(404, "NotFound", f'secrets "{m.group(2)}" not found')
            meta = {"name": m.group(2), "namespace": m.group(1)}
            return 200, {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": {}}
        m = EVENTS.match(path)
        if m and method == "GET":
            wanted = dict(t.partition("=")[::2] for t in ",".join(query.get("fieldSelector", [])).split(",") if t)

            def field(ev: dict, key: str) -> str:
                obj: object = ev
                for part in key.split("."):
                    obj = obj.get(part, "") if isinstance(obj, dict) else ""
                return str(obj)

            items = [
                e
                for e in self.events
                if e["metadata"]["namespace"] == m.group(1) and all(field(e, k) == v for k, v in wanted.items())
            ]
            return 200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}
        m = PODS.match(path)
        if m and method == "GET":
            return self._pods(m.group(1), m.group(2), bool(m.group(3)), query)
        return 404, _status(404, "NotFound", "the server could not find the requested resource")

    def _jobs(self, method: str, ns: str, name: str | None, body: dict) -> tuple[int, dict | str]:
        if ns not in self.namespaces:
            return 404, _status(404, "NotFound", f'namespaces "{ns}" not found')
        if name is None and method == "GET":
            items = [j for (n, _), j in sorted(self.jobs.items()) if n == ns]
            return 200, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJobList", "metadata": {}, "items": items}
        if name is None and method == "POST":
            jname = body.get("metadata", {}).get("name", "")
            if (ns, jname) in self.jobs:
                return 409, _status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{jname}" already exists')
            job = json.loads(json.dumps(body))
            job["metadata"].update(
                {"namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(), "resourceVersion": "1"}
            )
            self.jobs[(ns, jname)] = job
            if job["spec"].get("runPolicy", {}).get("suspend"):
                job["status"] = {"conditions": [_suspended(jname)]}
            else:
                self._spawn_pods(ns, job)
            if self.kueue is not None:
                self.kueue.job_created(ns, job, "kubeflow.org/pytorchjob")
            return 201, job
        if name is not None and (ns, name) not in self.jobs:
            return 404, _status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found')
        if method == "GET":
            return 200, self.jobs[(ns, name)]
        if method == "DELETE":
            del self.jobs[(ns, name)]
            for key in [
                k
                for k, p in self.pods.items()
                if k[0] == ns and p["metadata"]["labels"].get("training.kubeflow.org/job-name") == name
            ]:
                del self.pods[key]
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "group": "kubeflow.org", "kind": "pytorchjobs"},
            }
        return 405, _status(405, "MethodNotAllowed", f"{method} is not supported here")

    def _pods(self, ns: str, name: str | None, log: bool, query: dict) -> tuple[int, dict | str]:
        if name is None:
            wanted = {}
            for term in ",".join(query.get("labelSelector", [])).split(","):
                if term:
                    k, _, v = term.partition("=")
                    wanted[k] = v
            items = [
                p
                for (n, _), p in sorted(self.pods.items())
                if n == ns and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
            ]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if (ns, name) not in self.pods:
            return 404, _status(404, "NotFound", f'pods "{name}" not found')
        if log:
            return self._log(ns, name, query)
        return 200, self.pods[(ns, name)]

    def _log(self, ns: str, name: str, query: dict) -> tuple[int, dict | str]:
        """A pod's log as the kubelet serves it: 400 while its container waits to start; previous=true the
        previous container's (`previous_logs`; 400 when there is none); tailLines the last N lines; limitBytes
        the first N bytes."""
        pod = self.pods[(ns, name)]
        container = (query.get("container") or [""])[0]
        if (query.get("previous") or [""])[0] == "true":
            if (ns, name) not in self.previous_logs:
                return 400, _status(
                    400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found'
                )
            text = self.previous_logs[(ns, name)]
        else:
            if pod["status"].get("phase") == "Pending":
                return 400, _status(
                    400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating'
                )
            text = self.logs.get((ns, name), "")
        tail = (query.get("tailLines") or [""])[0]
        if tail:
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        limit = (query.get("limitBytes") or [""])[0]
        if limit:  # the first N bytes of what would be served (the kubelet stops reading there)
            text = text.encode()[: int(limit)].decode(errors="ignore")
        return 200, text


# -- what the kubelet, the scheduler and a crashing trainer do to a pod (for tests of make status/logs) --------


def pod_unschedulable(pod: dict, message: str) -> None:
    """The scheduler found no node: Pending with PodScheduled False, reason Unschedulable."""
    pod["spec"].pop("nodeName", None)
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": _now(),
            }
        ],
    }


def pod_waiting(pod: dict, reason: str, message: str) -> None:
    """Scheduled, its containers waiting (ErrImagePull, ImagePullBackOff, ...)."""
    pod["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}],
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
            for c in pod["spec"]["containers"]
        ],
    }


def pod_terminated(
    pod: dict, exit_code: int, finished_at: str, previous: bool = False, restarts: int = 0, message: str = ""
) -> None:
    """The trainer container exited with `exit_code`: the pod Failed (previous=False) or, with previous=True,
    Running again with that exit as its lastState and `restarts` container restarts. `message`: what the
    container wrote to its terminationMessagePath (the kubelet's `terminated.message`)."""
    term = {
        "terminated": {"exitCode": exit_code, "reason": "Error", "startedAt": finished_at, "finishedAt": finished_at}
    }
    if message:
        term["terminated"]["message"] = message
    for cs in pod["status"]["containerStatuses"]:
        if previous:
            cs.update({"lastState": term, "restartCount": restarts})
        else:
            cs.update({"state": term, "ready": False})
    if not previous:
        pod["status"]["phase"] = "Failed"
