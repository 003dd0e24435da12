"""Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1) for tests/support/kube_fake.py: what the API server, the
Trainer controller and JobSet do with a TrainJob, written from their documented behaviour, not from the renderer.

  GET    /apis/trainer.kubeflow.org/v1alpha1                                   discovery (404 when not installed)
  GET/POST/PUT/DELETE       /apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes[/NAME]
  GET/POST/PUT/PATCH/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainingruntimes[/NAME]
  GET/POST/DELETE           /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs[/NAME]

Bodies are validated strictly against the v2.3.0 CRDs in tests/data/crds (422 Invalid, like the API server
with unknown fields refused). A TrainJob must name an existing runtime of the kind its runtimeRef
says (Trainer's webhook refuses it otherwise). PATCH is a JSON merge patch (RFC 7386, what the client sends for
a dict). Like the garbage collector, deleting a TrainJob deletes the namespace's TrainingRuntimes whose
ownerReferences name its uid, and a patch that names an owner uid absent from the namespace makes the runtime
a dangling dependent, which the garbage collector deletes. Unless suspended, the controller side builds the
node pod (runtime template, then the TrainJob's runtimePatches, then trainer.* and the torch plugin's PET_*
variables) and creates numNodes pods named <job>-node-0-<i>-<suffix> with JobSet's labels.
`fake.trainer_installed = False` takes the group away.
"""

from __future__ import annotations

import copy
import re
import uuid
from pathlib import Path

from tests.support.kube_fake import _now
from tests.support.kube_fake import _status as _st
from tests.support.prom import cr_errors, crd_schema

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"
BASE = "/apis/trainer.kubeflow.org/v1alpha1"
RUNTIMES = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/clustertrainingruntimes(?:/([^/]+))?$")
NS_RUNTIMES = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainingruntimes(?:/([^/]+))?$")
TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
_SCHEMAS: dict[str, dict] = {}


def schema(kind: str) -> dict:
    files = {
        "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
        "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml",
        "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
    }
    if kind not in _SCHEMAS:
        _SCHEMAS[kind] = crd_schema(CRDS / files[kind], "trainer.kubeflow.org/v1alpha1", strict=True)
    return _SCHEMAS[kind]


def _state(fake) -> dict:
    if not hasattr(fake, "trainer"):
        import yaml

        stock = yaml.safe_load((CRDS / "trainer-v2.3.0_runtime_torch-distributed.yaml").read_text())
        # runtimes: ClusterTrainingRuntimes by name; ns_runtimes: TrainingRuntimes by (namespace, name)
        fake.trainer = {"runtimes": {"torch-distributed": stock}, "ns_runtimes": {}, "trainjobs": {}}
    return fake.trainer


def node_pod(runtime: dict, tj: dict, index: int) -> dict:
    """The pod template of node `index`: runtime -> runtimePatches -> trainer.* -> torch plugin -> JobSet labels."""
    name = tj["metadata"]["name"]
    rjob = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node")
    tmpl = copy.deepcopy(rjob["template"]["spec"]["template"])
    md, spec = tmpl.setdefault("metadata", {}), tmpl.setdefault("spec", {})
    for patch in tj["spec"].get("runtimePatches", []):
        for pj in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            if pj["name"] != "node":
                continue
            pt = pj.get("template", {}).get("spec", {}).get("template", {})
            for key in ("labels", "annotations"):
                md.setdefault(key, {}).update(pt.get("metadata", {}).get(key, {}))
            for key, value in pt.get("spec", {}).items():
                if key == "containers":
                    for cp in value:
                        c = next(c for c in spec["containers"] if c["name"] == cp["name"])
                        for ck, cv in cp.items():
                            if ck == "volumeMounts":
                                c[ck] = c.get(ck, []) + cv
                            elif ck != "name":
                                c[ck] = cv
                elif key == "volumes":
                    spec[key] = spec.get(key, []) + value
                else:
                    spec[key] = value
    tr = tj["spec"].get("trainer", {})
    node = next(c for c in spec["containers"] if c["name"] == "node")
    for key in ("image", "args", "command"):
        if key in tr:
            node[key] = tr[key]
    if "resourcesPerNode" in tr:
        node["resources"] = tr["resourcesPerNode"]
    nnodes = tr.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    node["env"] = (
        node.get("env", [])
        + tr.get("env", [])
        + [
            {"name": "PET_NNODES", "value": str(nnodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(tr.get("numProcPerNode", "auto"))},
            {"name": "PET_NODE_RANK", "value": str(index)},
            {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
            {"name": "PET_MASTER_PORT", "value": "29500"},
        ]
    )
    md.setdefault("labels", {}).update(
        {
            **rjob["template"].get("metadata", {}).get("labels", {}),
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "jobset.sigs.k8s.io/job-index": "0",
            "batch.kubernetes.io/job-completion-index": str(index),
        }
    )
    return tmpl


def _spawn(fake, ns: str, tj: dict, runtime: dict) -> None:
    name = tj["metadata"]["name"]
    n = tj["spec"].get("trainer", {}).get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    for i in range(n):
        tmpl = node_pod(runtime, tj, i)
        pod_name = f"{name}-node-0-{i}-{uuid.uuid4().hex[:5]}"
        containers = tmpl["spec"]["containers"]
        fake.pods[(ns, pod_name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": ns,
                "labels": tmpl["metadata"]["labels"],
                "annotations": tmpl["metadata"].get("annotations", {}),
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
            },
            "spec": {**tmpl["spec"], "nodeName": f"node-{i}"},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c.get("image", ""),
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": _now()}},
                    }
                    for c in containers
                ],
            },
        }
        fake.logs[(ns, pod_name)] = f"log of {pod_name}\nstep 1 loss 2.30\n"
    tj["status"] = {
        "jobsStatus": [{"name": "node", "active": n, "ready": n, "succeeded": 0, "failed": 0, "suspended": 0}]
    }


def dispatch(fake, method: str, path: str, body: dict) -> tuple[int, dict | str]:
    if not getattr(fake, "trainer_installed", True):
        return 404, _st(404, "NotFound", "the server could not find the requested resource")
    state = _state(fake)
    if path == BASE and method == "GET":
        res = [
            {
                "name": "trainjobs",
                "singularName": "trainjob",
                "namespaced": True,
                "kind": "TrainJob",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            },
            {
                "name": "clustertrainingruntimes",
                "singularName": "clustertrainingruntime",
                "namespaced": False,
                "kind": "ClusterTrainingRuntime",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            },
            {
                "name": "trainingruntimes",
                "singularName": "trainingruntime",
                "namespaced": True,
                "kind": "TrainingRuntime",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            },
        ]
        return 200, {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "trainer.kubeflow.org/v1alpha1",
            "resources": res,
        }
    m = RUNTIMES.match(path)
    if m:
        return _runtimes(state, method, m.group(1), body)
    m = NS_RUNTIMES.match(path)
    if m:
        if m.group(1) not in fake.namespaces:
            return 404, _st(404, "NotFound", f'namespaces "{m.group(1)}" not found')
        return _ns_runtimes(state, method, m.group(1), m.group(2), body)
    m = TRAINJOBS.match(path)
    if m:
        return _trainjobs(fake, state, method, m.group(1), m.group(2), body)
    return 404, _st(404, "NotFound", "the server could not find the requested resource")


def _invalid(kind: str, name: str, obj: dict) -> tuple[int, dict] | None:
    errors = cr_errors(obj, schema(kind))
    if errors:
        return 422, _st(422, "Invalid", f'{kind} "{name}" is invalid: {"; ".join(errors[:3])}')
    return None


def _runtimes(state: dict, method: str, name: str | None, body: dict) -> tuple[int, dict | str]:
    rts = state["runtimes"]
    if name is None and method == "POST":
        rname = body.get("metadata", {}).get("name", "")
        if rname in rts:
            return 409, _st(
                409, "AlreadyExists", f'clustertrainingruntimes.trainer.kubeflow.org "{rname}" already exists'
            )
        bad = _invalid("ClusterTrainingRuntime", rname, body)
        if bad:
            return bad
        obj = copy.deepcopy(body)
        obj["metadata"].update({"uid": str(uuid.uuid4()), "creationTimestamp": _now(), "resourceVersion": "1"})
        rts[rname] = obj
        return 201, obj
    if name is None and method == "GET":
        return 200, {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "ClusterTrainingRuntimeList",
            "metadata": {},
            "items": list(rts.values()),
        }
    if name not in rts:
        return 404, _st(404, "NotFound", f'clustertrainingruntimes.trainer.kubeflow.org "{name}" not found')
    if method == "GET":
        return 200, rts[name]
    if method == "PUT":
        if body.get("metadata", {}).get("resourceVersion") != rts[name]["metadata"]["resourceVersion"]:
            return 409, _st(409, "Conflict", "the object has been modified")
        bad = _invalid(
            "ClusterTrainingRuntime",
            name,
            {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}},
        )
        if bad:
            return bad
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(int(rts[name]["metadata"]["resourceVersion"]) + 1)
        rts[name] = obj
        return 200, obj
    if method == "DELETE":
        del rts[name]
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    return 405, _st(405, "MethodNotAllowed", f"{method} is not supported here")


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: mappings merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _ns_runtimes(state: dict, method: str, ns: str, name: str | None, body: dict) -> tuple[int, dict | str]:
    rts = state["ns_runtimes"]
    what = "trainingruntimes.trainer.kubeflow.org"
    if name is None and method == "GET":
        items = [r for (n, _), r in sorted(rts.items()) if n == ns]
        kind = "TrainingRuntimeList"
        return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": kind, "metadata": {}, "items": items}
    if name is None and method == "POST":
        rname = body.get("metadata", {}).get("name", "")
        if (ns, rname) in rts:
            return 409, _st(409, "AlreadyExists", f'{what} "{rname}" already exists')
        if body.get("metadata", {}).get("namespace", ns) != ns:
            return 400, _st(400, "BadRequest", "the namespace of the object does not match the request's")
        bad = _invalid("TrainingRuntime", rname, body)
        if bad:
            return bad
        obj = copy.deepcopy(body)
        meta = {"namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(), "resourceVersion": "1"}
        obj["metadata"].update(meta)
        rts[(ns, rname)] = obj
        return 201, obj
    if (ns, name) not in rts:
        return 404, _st(404, "NotFound", f'{what} "{name}" not found')
    old = rts[(ns, name)]
    if method == "GET":
        return 200, old
    if method in ("PUT", "PATCH"):
        if method == "PUT" and body.get("metadata", {}).get("resourceVersion") != old["metadata"]["resourceVersion"]:
            return 409, _st(409, "Conflict", "the object has been modified")
        obj = merge_patch(old, body) if method == "PATCH" else copy.deepcopy(body)
        server = ("namespace", "uid", "creationTimestamp", "resourceVersion")
        bad = _invalid(
            "TrainingRuntime", name, {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k not in server}}
        )
        if bad:
            return bad
        obj["metadata"].update({k: old["metadata"][k] for k in server[:3]})
        obj["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
        rts[(ns, name)] = obj
        if _dangling(state, ns, obj):  # the garbage collector deletes a dependent whose owner is gone
            del rts[(ns, name)]
        return 200, obj
    if method == "DELETE":
        del rts[(ns, name)]
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    return 405, _st(405, "MethodNotAllowed", f"{method} is not supported here")


def _dangling(state: dict, ns: str, obj: dict) -> bool:
    """Every owner gone: a namespaced owner must be in the same namespace and match by uid (the GC's rule)."""
    owners = obj["metadata"].get("ownerReferences") or []
    uids = {tj["metadata"]["uid"] for (n, _), tj in state["trainjobs"].items() if n == ns}
    return bool(owners) and not any(o.get("kind") == "TrainJob" and o.get("uid") in uids for o in owners)


def _collect(state: dict, ns: str) -> None:
    """The garbage collector's pass over the namespace's TrainingRuntimes after an owner was deleted."""
    for key in [k for k, r in state["ns_runtimes"].items() if k[0] == ns and _dangling(state, ns, r)]:
        del state["ns_runtimes"][key]


def _trainjobs(fake, state: dict, method: str, ns: str, name: str | None, body: dict) -> tuple[int, dict | str]:
    tjs = state["trainjobs"]
    if ns not in fake.namespaces:
        return 404, _st(404, "NotFound", f'namespaces "{ns}" not found')
    if name is None and method == "GET":
        items = [j for (n, _), j in sorted(tjs.items()) if n == ns]
        return 200, {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJobList",
            "metadata": {},
            "items": items,
        }
    if name is None and method == "POST":
        jname = body.get("metadata", {}).get("name", "")
        if (ns, jname) in tjs:
            return 409, _st(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{jname}" already exists')
        bad = _invalid("TrainJob", jname, body)
        if bad:
            return bad
        ref = body["spec"]["runtimeRef"]["name"]
        kind = body["spec"]["runtimeRef"].get("kind", "ClusterTrainingRuntime")
        found = state["ns_runtimes"].get((ns, ref)) if kind == "TrainingRuntime" else state["runtimes"].get(ref)
        if found is None:
            return 422, _st(422, "Invalid", f'TrainJob "{jname}" is invalid: spec.runtimeRef: {kind} {ref} not found')
        tj = copy.deepcopy(body)
        tj["metadata"].update(
            {"namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(), "resourceVersion": "1"}
        )
        tjs[(ns, jname)] = tj
        if tj["spec"].get("suspend"):
            tj["status"] = {
                "conditions": [
                    {
                        "type": "Suspended",
                        "status": "True",
                        "reason": "Suspended",
                        "message": "TrainJob is suspended",
                        "lastTransitionTime": _now(),
                    }
                ]
            }
        else:
            _spawn(fake, ns, tj, found)
        kueue = getattr(fake, "kueue", None)
        if kueue is not None:
            kueue.job_created(ns, tj, "trainer.kubeflow.org/trainjob")
        return 201, tj
    if (ns, name) not in tjs:
        return 404, _st(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
    if method == "GET":
        return 200, tjs[(ns, name)]
    if method == "DELETE":
        del tjs[(ns, name)]
        for key in [
            k
            for k, p in fake.pods.items()
            if k[0] == ns and p["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name
        ]:
            del fake.pods[key]
        _collect(state, ns)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    return 405, _st(405, "MethodNotAllowed", f"{method} is not supported here")
