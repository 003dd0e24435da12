"""Issue 26, the Kubernetes half: a job a platform team admits.

- API=trainjob: a namespaced TrainingRuntime (no ClusterTrainingRuntime anywhere), owned by its TrainJob;
- Kueue: the queue label on every object that runs pods, the LocalQueue chosen or refused, and submit's check
  that Kueue made a Workload for the job (the PyTorchJob integration is off in Kueue's default configuration);
- the crash budget: GNP_CRASH_RESTARTS in every pod, and exit 3 (EXIT_CRASH_LOOP) permanent in both APIs;
- deadlines sized per recipe; namespaced RBAC; monitoring a tenant may apply; storage (PVC, ephemeral-storage,
  gpu_product).

Cluster behaviour comes from the fake API server (tests/support/kube_fake*.py: Kubernetes, Trainer v2, Kueue);
everything else is checked on the rendered objects and the committed example files.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
import yaml

from gnpk8s import convert, errors, pod, pytorchjob, trainjob
from gnpk8s.cli import main
from gnpk8s.manifests import render
from gnpk8s.spec import SPEC_DOC, load_job
from tests.support.kube_fake import FakeKube
from tests.support.kube_fake_kueue import FakeKueue
from tests.support.kube_fake_trainer import node_pod, schema
from tests.support.prom import cr_errors, crd_schema
from tests.test_k8s import JOBS, PODMONITOR_CRD, ROOT, TEST_IMAGE
from tests.test_trainjob import _job_outcome, _jobset_outcome

EXAMPLES = ROOT / "k8s" / "examples"
QUEUE = "kueue.x-k8s.io/queue-name"
MAX_EXEC = "kueue.x-k8s.io/max-exec-time-seconds"
ALL_FRAMEWORKS = ("batch/job", "kubeflow.org/pytorchjob", "trainer.kubeflow.org/trainjob")


@pytest.fixture(autouse=True)
def _image_env(monkeypatch):
    monkeypatch.setenv("GNP_IMAGE", TEST_IMAGE)


def _spec(name: str, *overrides: str, api: str = "pytorchjob"):
    return load_job(name, spec_overrides=[f"api={api}", *overrides], namespace="gnp")


def _serve(tmp_path, monkeypatch, **kw) -> FakeKube:
    server = FakeKube(**kw).__enter__()
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", namespace="gnp")))
    return server


@pytest.fixture()
def serve(tmp_path, monkeypatch):
    servers: list[FakeKube] = []

    def start(**kw) -> FakeKube:
        servers.append(_serve(tmp_path, monkeypatch, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.__exit__(None, None, None)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# The namespaced TrainingRuntime and its owner


def test_no_cluster_training_runtime_is_rendered_or_shipped():
    for name in JOBS:
        text = render(_spec(name, api="trainjob"), "all")
        assert "ClusterTrainingRuntime" not in text, name
    for path in [*EXAMPLES.glob("*.yaml"), *(ROOT / "k8s" / "jobs").glob("*.yaml")]:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]  # the objects, not their comments
        assert "clustertrainingruntime" not in yaml.safe_dump(docs).lower(), path


def test_a_failed_trainjob_create_leaves_no_runtime(serve, capsys):
    fake = serve()
    fake.faults[("POST", "trainjobs")] = (422, 'admission webhook "validate.trainjob" denied the request')
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob"]) == 2
    assert "denied the request" in _one_line_error(capsys)
    posted = [p for m, p in fake.requests if m == "POST"]
    assert [p.rsplit("/", 1)[-1] for p in posted] == ["trainingruntimes", "trainjobs"]  # it was created first
    assert fake.trainer["ns_runtimes"] == {} and fake.trainer["trainjobs"] == {}
    assert [m for m, p in fake.requests if "trainingruntimes/gnp-resnet-cifar" in p][-1] == "DELETE"


def test_the_runtime_goes_with_its_trainjob_and_with_make_delete(serve, capsys):
    fake = serve()
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob"]) == 0
    assert ("gnp", "gnp-resnet-cifar") in fake.trainer["ns_runtimes"]
    # kubectl delete trainjob (not make delete): the garbage collector follows the ownerReference
    req = urllib.request.Request(f"{fake.url}/apis/trainer.kubeflow.org/v1alpha1/namespaces/gnp/trainjobs/resnet-cifar")
    req.method = "DELETE"
    urllib.request.urlopen(req).read()
    assert fake.trainer["ns_runtimes"] == {}
    # the owner reference could not be patched (RBAC without patch): a warning, and make delete still removes it
    fake.faults[("PATCH", "trainingruntimes")] = (403, "cannot patch resource trainingruntimes")
    capsys.readouterr()
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob"]) == 0
    err = capsys.readouterr().err
    assert "warning: trainingruntime 'gnp-resnet-cifar' not owned by its TrainJob" in err
    assert "ownerReferences" not in fake.trainer["ns_runtimes"][("gnp", "gnp-resnet-cifar")]["metadata"]
    assert main(["delete", "resnet-cifar", "--api", "trainjob"]) == 0
    assert fake.trainer["ns_runtimes"] == {} and fake.trainer["trainjobs"] == {}


# ---------------------------------------------------------------------------------------------------
# Kueue


def test_queue_labels_on_every_object_that_runs_pods():
    for api in ("pytorchjob", "trainjob"):
        spec = _spec("resnet-imagenet", "queue=team-a", "max_exec_seconds=36000", api=api)
        docs = [d for d in yaml.safe_load_all(render(spec, "all")) if d]
        runs_pods = [d for d in docs if d["kind"] in ("PyTorchJob", "TrainJob", "Job")]
        assert sorted(d["kind"] for d in runs_pods) == sorted(
            ["Job", "PyTorchJob" if api == "pytorchjob" else "TrainJob"]
        )
        for d in runs_pods:
            assert d["metadata"]["labels"][QUEUE] == "team-a", d["kind"]
        job = next(d for d in runs_pods if d["kind"] != "Job")
        assert job["metadata"]["labels"][MAX_EXEC] == "36000"  # the training's cap, not the conversion's
        assert MAX_EXEC not in next(d for d in runs_pods if d["kind"] == "Job")["metadata"]["labels"]
    plain = render(_spec("resnet-imagenet"), "all")
    assert QUEUE not in plain and MAX_EXEC not in plain
    p = main(["render", "resnet-cifar", "--spec", "max_exec_seconds=0"])
    assert p == 2


def test_pytorchjob_that_kueue_does_not_manage_stops_with_the_fix(serve, capsys):
    fake = serve(kueue=FakeKueue())  # Kueue's default frameworks: no kubeflow.org/pytorchjob
    t0 = time.monotonic()
    assert main(["submit", "resnet-cifar", "--spec", "queue=team-a", "--queue-wait", "0.5"]) == 2
    assert time.monotonic() - t0 >= 0.5  # it waited for the Workload
    line = _one_line_error(capsys)
    assert "pytorchjob gnp/resnet-cifar is suspended but Kueue made no Workload for it within 0.5 s" in line
    assert "add `kubeflow.org/pytorchjob` to integrations.frameworks in Kueue's Configuration" in line
    assert "or submit with API=trainjob" in line
    job = fake.jobs[("gnp", "resnet-cifar")]
    assert job["spec"]["runPolicy"]["suspend"] is True and job["metadata"]["labels"][QUEUE] == "team-a"
    assert not fake.pods  # suspended: never started
    assert any("/kueue.x-k8s.io/v1beta1/namespaces/gnp/workloads" in p for _, p in fake.requests)


def test_pytorchjob_managed_by_kueue_waits_for_its_workload(serve, capsys):
    fake = serve(kueue=FakeKueue(frameworks=ALL_FRAMEWORKS, workload_delay_s=1.2))
    t0 = time.monotonic()
    assert main(["submit", "resnet-cifar", "--spec", "queue=team-a", "--queue-wait", "10"]) == 0
    assert 1.2 <= time.monotonic() - t0 < 8  # polled until it appeared, not to the end of the wait
    err = capsys.readouterr().err
    assert re.search(r"queued: Kueue Workload pytorchjob-resnet-cifar-\w+ in LocalQueue team-a", err)
    listed = [p for _, p in fake.requests if p.endswith("/workloads")]
    assert len(listed) >= 2


@pytest.mark.parametrize("frameworks, ok", [(("trainer.kubeflow.org/trainjob",), True), ((), False)])
def test_trainjob_workload_present_or_integration_off(serve, capsys, frameworks, ok):
    fake = serve(kueue=FakeKueue(frameworks=frameworks))
    rc = main(["submit", "resnet-cifar", "--spec", "api=trainjob", "--spec", "queue=team-a", "--queue-wait", "0.3"])
    tj = fake.trainer["trainjobs"][("gnp", "resnet-cifar")]
    assert tj["spec"]["suspend"] is True and not fake.pods
    if ok:
        assert rc == 0
        (_, _, wl), *_ = fake.kueue.workloads
        assert wl["metadata"]["ownerReferences"][0]["uid"] == tj["metadata"]["uid"]
    else:
        assert rc == 2
        line = _one_line_error(capsys)
        assert "add `trainer.kubeflow.org/trainjob` to integrations.frameworks" in line
        assert "submit with API=trainjob" not in line and "API=trainjob and submit again" in line


@pytest.mark.parametrize("queues", [[], ["team-a"], ["team-a", "team-b"]])
def test_without_a_queue_the_namespaces_local_queues_decide(serve, capsys, queues):
    fake = serve(kueue=FakeKueue(local_queues={"gnp": queues, "other": ["x"]}, frameworks=ALL_FRAMEWORKS))
    rc = main(["submit", "resnet-cifar", "--queue-wait", "2"])
    if len(queues) == 2:
        assert rc == 2
        line = _one_line_error(capsys)
        assert "namespace 'gnp' has 2 Kueue LocalQueues (team-a, team-b)" in line and 'SPEC="queue=NAME"' in line
        assert not fake.jobs  # nothing created
        return
    assert rc == 0
    job = fake.jobs[("gnp", "resnet-cifar")]
    if queues:
        assert job["metadata"]["labels"][QUEUE] == "team-a" and job["spec"]["runPolicy"]["suspend"] is True
        assert "queue: team-a (the only Kueue LocalQueue in namespace 'gnp')" in capsys.readouterr().err
    else:
        assert QUEUE not in job["metadata"]["labels"] and "suspend" not in job["spec"]["runPolicy"]
        assert len(fake.pods) == 1  # runs unqueued


def test_kueue_not_installed(serve, capsys):
    fake = serve()  # no kueue.x-k8s.io API: 404
    assert main(["submit", "resnet-cifar"]) == 0  # unqueued
    assert QUEUE not in fake.jobs[("gnp", "resnet-cifar")]["metadata"]["labels"]
    assert main(["submit", "wideresnet-cifar", "--spec", "queue=team-a"]) == 2
    assert "queue 'team-a' is set but Kueue is not installed" in _one_line_error(capsys)
    assert ("gnp", "wideresnet-cifar") not in fake.jobs


def test_a_queue_that_does_not_exist_is_refused(serve, capsys):
    fake = serve(kueue=FakeKueue(local_queues={"gnp": ["team-a", "team-b"]}))
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob", "--spec", "queue=team-c"]) == 2
    line = _one_line_error(capsys)
    assert "queue 'team-c': no such Kueue LocalQueue in namespace 'gnp'; allowed: team-a, team-b" in line
    assert fake.trainer["ns_runtimes"] == {} and fake.trainer["trainjobs"] == {}


# ---------------------------------------------------------------------------------------------------
# The crash budget (trainer: run.crash_restarts, EXIT_CRASH_LOOP = 3)


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("name", JOBS)
def test_crash_budget_env_and_exit_3_is_permanent_in_both_apis(name):
    from trainer.exits import is_retried

    spec = _spec(name)
    pj = pytorchjob.build(spec)
    worker = pj["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    assert _env(worker["template"]["spec"]["containers"][0])["GNP_CRASH_RESTARTS"] == "3"
    # the v1.9 operator: IsRetryableExitCode(c) = c >= 128, so 3 fails the job
    assert not is_retried(3) and 3 < errors.FIRST_RETRIED
    tspec = _spec(name, api="trainjob")
    tj, rt = trainjob.build(tspec), trainjob.runtime(tspec)
    assert (
        _env(next(c for c in node_pod(rt, tj, 0)["spec"]["containers"] if c["name"] == "node"))["GNP_CRASH_RESTARTS"]
        == "3"
    )
    js = rt["spec"]["template"]["spec"]
    reason = _job_outcome(js["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"], 3)
    assert (reason, _jobset_outcome(js["failurePolicy"], reason)) == ("PodFailurePolicy", "FailJobSet")


def test_crash_restarts_key(capsys):
    assert (
        _env(
            pytorchjob.build(_spec("resnet-cifar", "crash_restarts=0"))["spec"]["pytorchReplicaSpecs"]["Worker"][
                "template"
            ]["spec"]["containers"][0]
        )["GNP_CRASH_RESTARTS"]
        == "0"
    )
    assert main(["render", "resnet-cifar", "--spec", "crash_restarts=-1"]) == 2
    assert "crash_restarts: expected an integer >= 0, got -1" in _one_line_error(capsys)
    assert main(["render", "resnet-cifar", "--spec", "crash_restarts=many"]) == 2
    assert "crash_restarts: expected int" in _one_line_error(capsys)
    defaults = yaml.safe_load((ROOT / "k8s" / "jobs" / "_defaults.yaml").read_text())
    assert defaults["crash_restarts"] == 3
    assert "crash_restarts" in SPEC_DOC and "GNP_CRASH_RESTARTS" in SPEC_DOC


# ---------------------------------------------------------------------------------------------------
# Deadlines


@pytest.mark.parametrize("name", JOBS)
def test_deadline_is_sized_to_the_recipe_and_explained(name):
    text = (ROOT / "k8s" / "jobs" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("active_deadline_seconds:"))
    comment = []
    for x in reversed(lines[:i]):
        if not x.startswith("#"):
            break
        comment.insert(0, x)
    why = " ".join(x.lstrip("#").strip() for x in comment)
    assert why.startswith("deadline:") and "epoch" in why and re.search(r"x[0-9.]+", why), why
    secs = yaml.safe_load(text)["active_deadline_seconds"]
    assert 0 < secs < 14 * 86400
    hours = re.findall(r"= ([0-9.]+) h", why)
    if hours:  # the stated total is the value
        assert abs(float(hours[-1]) * 3600 - secs) <= 0.05 * secs, (hours, secs)
    spec = _spec(name)
    assert pytorchjob.build(spec)["spec"]["runPolicy"]["activeDeadlineSeconds"] == secs
    assert trainjob.build(_spec(name, api="trainjob"))["spec"]["activeDeadlineSeconds"] == secs


# ---------------------------------------------------------------------------------------------------
# RBAC: namespaced only, and enough for what the tool does


def _role() -> tuple[list[dict], list[dict]]:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "rbac.yaml").read_text()) if d]
    return docs, next(d for d in docs if d["kind"] == "Role")["rules"]


def _allowed(rules: list[dict], group: str, resource: str, verb: str, name: str | None) -> bool:
    for r in rules:
        if group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]:
            if "resourceNames" not in r or (name is not None and name in r["resourceNames"]):
                return True
    return False


def test_rbac_example_is_namespaced_and_minimal():
    docs, rules = _role()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding"}  # no ClusterRole(Binding)
    assert all("namespace" not in d["metadata"] for d in docs)  # applied in the team's namespace
    text = yaml.safe_dump(rules)
    assert "clustertrainingruntimes" not in text and "*" not in text
    need = [
        ("kubeflow.org", "pytorchjobs", ("create", "get", "list", "delete")),
        ("trainer.kubeflow.org", "trainjobs", ("create", "get", "list", "delete")),
        ("trainer.kubeflow.org", "trainingruntimes", ("create", "get", "update", "patch", "delete")),
        ("batch", "jobs", ("create", "get", "list", "delete")),
        ("", "pods/log", ("get",)),
        ("", "pods", ("get", "list")),
        ("", "events", ("get", "list")),
        ("kueue.x-k8s.io", "workloads", ("get", "list")),
        ("kueue.x-k8s.io", "localqueues", ("get", "list")),
        ("visibility.kueue.x-k8s.io", "localqueues/pendingworkloads", ("get",)),  # make status's queue position
    ]
    for group, resource, verbs in need:
        for verb in verbs:
            assert _allowed(rules, group, resource, verb, None), (group, resource, verb)
    secret_rules = [r for r in rules if "secrets" in r["resources"]]
    assert secret_rules and all(r["verbs"] == ["get"] and r.get("resourceNames") for r in secret_rules)
    assert "gnp-s3" in secret_rules[0]["resourceNames"]  # the specs' s3_secret
    assert not _allowed(rules, "", "secrets", "get", "someone-elses-secret")
    assert not any(
        v in r["verbs"] for r in rules if {"pods", "events"} & set(r["resources"]) for v in ("create", "delete")
    )


_PATH = re.compile(r"^/apis?/(?:([^/]+)/)?v[^/]+/namespaces/[^/]+/([^/]+)(?:/([^/]+))?(?:/([^/]+))?$")


def test_rbac_example_grants_every_call_the_tool_makes(serve, capsys):
    """Submit/status/logs/delete of both kinds with a queue, against the fake server; every namespaced request it
    recorded must be allowed by the Role (discovery is allowed to every authenticated user)."""
    fake = serve(kueue=FakeKueue(frameworks=ALL_FRAMEWORKS))
    for api in ("pytorchjob", "trainjob"):
        assert main(["submit", "resnet-cifar", "--spec", f"api={api}", "--spec", "queue=team-a"]) == 0
        assert main(["status", "resnet-cifar", "--api", api]) == 0
        main(["logs", "resnet-cifar", "--api", api, "--wait", "0"])
        assert main(["delete", "resnet-cifar", "--api", api]) == 0
    fake.kueue.local_queues = {}  # unqueued jobs run at once: logs and status read their pods' logs
    for api in ("pytorchjob", "trainjob"):
        assert main(["submit", "fashion-mnist-demo", "--spec", f"api={api}"]) == 0
        assert main(["status", "fashion-mnist-demo", "--api", api]) == 0
        assert main(["logs", "fashion-mnist-demo", "--api", api, "--wait", "0"]) == 0
        assert main(["logs", "fashion-mnist-demo", "--api", api, "--wait", "0", "--previous"]) == 2
        assert main(["delete", "fashion-mnist-demo", "--api", api]) == 0
    _, rules = _role()
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    checked = set()
    for method, path in fake.requests:
        m = _PATH.match(path.split("?")[0])
        if not m:
            assert "/namespaces/" not in path, path
            continue
        group, resource, name, sub = m.group(1) or "", m.group(2), m.group(3), m.group(4)
        verb = verbs.get(method) or ("get" if name else "list")
        full = f"{resource}/{sub}" if sub else resource
        assert _allowed(rules, group.rsplit("/", 1)[0] if group else "", full, verb, name), (method, path)
        checked.add((full, verb))
    assert {
        ("trainingruntimes", "patch"),
        ("workloads", "list"),
        ("localqueues", "list"),
        ("localqueues/pendingworkloads", "get"),
        ("pods/log", "get"),
    } <= checked


# ---------------------------------------------------------------------------------------------------
# Monitoring a tenant may apply


def test_podmonitor_selects_the_jobs_own_namespace():
    pm_schema = crd_schema(PODMONITOR_CRD, "monitoring.coreos.com/v1")
    spec = load_job("resnet-cifar", namespace="team-a")
    docs = [d for d in yaml.safe_load_all(render(spec, "monitoring")) if d]
    pm = next(d for d in docs if d["kind"] == "PodMonitor")
    assert cr_errors(pm, pm_schema) == []
    assert pm["metadata"]["namespace"] == "team-a"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    # without a namespace: none named, so the monitor's own namespace (prometheus-operator's default); never any
    committed = yaml.safe_load((ROOT / "k8s" / "monitoring" / "podmonitor.yaml").read_text())
    assert "namespaceSelector" not in committed["spec"] and cr_errors(committed, pm_schema) == []
    assert "any: true" not in render(load_job("resnet-cifar"), "monitoring")


def test_alertmanagerconfig_example_routes_every_project_alert():
    """No AlertmanagerConfig CRD copy is kept (prometheus-operator v0.93.1 has it as monitoring.coreos.com/v1alpha1):
    the structure is checked here, the schema is not."""
    amc = yaml.safe_load((EXAMPLES / "alertmanagerconfig.yaml").read_text())
    assert (amc["apiVersion"], amc["kind"]) == ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig")
    assert "namespace" not in amc["metadata"]  # the tenant applies it in its namespace
    route, receivers = amc["spec"]["route"], amc["spec"]["receivers"]
    assert route["receiver"] in {r["name"] for r in receivers}
    (matcher,) = route["matchers"]
    assert matcher["name"] == "alertname" and matcher["matchType"] == "=~"
    rules = yaml.safe_load((ROOT / "k8s" / "monitoring" / "prometheusrule.yaml").read_text())
    alerts = [r["alert"] for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and all(re.fullmatch(matcher["value"], a) for a in alerts)
    assert not re.fullmatch(matcher["value"], "KubePodCrashLooping")  # only the project's alerts
    text = (EXAMPLES / "alertmanagerconfig.yaml").read_text()
    assert text.count("REPLACE_ME") >= 2
    receiver = receivers[0]
    assert receiver["webhookConfigs"][0]["url"].startswith("https://REPLACE_ME")


# ---------------------------------------------------------------------------------------------------
# Storage


def test_imagenet_pvc_example_fits_the_specs():
    pvc = yaml.safe_load((EXAMPLES / "imagenet-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    size = pod.quantity_bytes(pvc["spec"]["resources"]["requests"]["storage"])
    assert size >= 280 * 2**30  # raw ~140 GiB + FFCV ~140 GiB (the file's size assumption)
    for name in ("resnet-imagenet", "vggbn-imagenet"):
        spec = _spec(name)
        assert spec.dataset.pvc == pvc["metadata"]["name"] and spec.convert.source.startswith("/data/raw/")


def _disk_empty_dirs(pod_spec: dict) -> int:
    return sum(
        pod.quantity_bytes(v["emptyDir"]["sizeLimit"])
        for v in pod_spec.get("volumes", [])
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )


@pytest.mark.parametrize("name", JOBS)
def test_ephemeral_storage_covers_the_scratch_volumes(name):
    spec = _spec(name)
    pods = [pytorchjob.build(spec)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]]
    tspec = _spec(name, api="trainjob")
    pods.append(node_pod(trainjob.runtime(tspec), trainjob.build(tspec), 0)["spec"])
    cj = convert.build(spec)
    if cj:
        pods.append(cj["spec"]["template"]["spec"])
    for p in pods:
        (c,) = p["containers"]
        res = c["resources"]
        assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"]
        assert pod.quantity_bytes(res["requests"]["ephemeral-storage"]) >= _disk_empty_dirs(p) + 2**30
        for v in p["volumes"]:
            if "emptyDir" in v:
                assert v["emptyDir"].get("sizeLimit"), v  # every scratch volume is bounded


def test_gpu_product_is_a_spec_key(capsys):
    for name in ("resnet-imagenet", "vggbn-imagenet"):
        assert "nvidia.com/gpu.product" not in yaml.safe_dump(pytorchjob.build(_spec(name)))
    spec = _spec("resnet-imagenet", "gpu_product=NVIDIA-H100-80GB-HBM3")
    tmpl = pytorchjob.build(spec)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert tmpl["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "nodeSelector" not in convert.build(spec)["spec"]["template"]["spec"]  # CPU conversion
    tspec = _spec("resnet-imagenet", "gpu_product=NVIDIA-H100-80GB-HBM3", api="trainjob")
    assert (
        node_pod(trainjob.runtime(tspec), trainjob.build(tspec), 0)["spec"]["nodeSelector"]
        == tmpl["spec"]["nodeSelector"]
    )
    assert cr_errors(trainjob.build(tspec), schema("TrainJob")) == []
    assert main(["render", "resnet-imagenet", "--spec", "gpu_product=A100 80GB"]) == 2
    assert "gpu_product: 'A100 80GB' is not a label value" in _one_line_error(capsys)
    assert "gpu_product" in SPEC_DOC


def test_trainjob_runtime_of_every_job_validates_with_storage_and_queue_keys():
    for name in JOBS:
        spec = _spec(name, "queue=q", "max_exec_seconds=600", "gpu_product=NVIDIA-A100-SXM4-80GB", api="trainjob")
        assert cr_errors(trainjob.runtime(spec), schema("TrainingRuntime")) == []
        assert cr_errors(trainjob.build(spec), schema("TrainJob")) == []
    assert json.dumps(trainjob.runtime(spec)).count("ephemeral-storage") == 0  # resources live in the TrainJob
