"""Kubeflow Trainer v2: every job spec as a TrainJob (API=trainjob) with its own namespaced TrainingRuntime.

The CRDs and the stock runtime in tests/data/crds are unchanged copies from kubeflow/trainer tag v2.3.0:
manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml, manifests/base/crds/
trainer.kubeflow.org_trainingruntimes.yaml, manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml
(the stock runtime's kind only) and manifests/base/runtimes/torch_distributed.yaml (saved as
trainer-v2.3.0_runtime_torch-distributed.yaml). Objects are validated with jsonschema in strict mode (unknown
fields rejected, like `kubectl --validate=strict`).

The pod a TrainJob runs is computed by tests/support/kube_fake_trainer.py (runtime template, then
runtimePatches, then trainer.*, then the torch plugin's PET_* and JobSet's labels) and compared field by field
with the PyTorchJob's pod template: the two kinds must run the same container on the same pod.
"""

from __future__ import annotations

import copy

import pytest

from gnpk8s import pytorchjob, trainjob
from gnpk8s.cli import main
from gnpk8s.manifests import render
from gnpk8s.spec import check_name, load_job
from tests.support.kube_fake import FakeKube
from tests.support.kube_fake_kueue import FakeKueue
from tests.support.kube_fake_trainer import node_pod, schema
from tests.support.prom import cr_errors
from tests.test_k8s import JOB_PARAMS, JOBS, ROOT, TEST_IMAGE, _cli
from trainer.exits import EXIT_CRASH, EXIT_RETRY_CRASH, EXIT_RETRYABLE, EXIT_USER, is_retried

STOCK_RUNTIME = "trainer-v2.3.0_runtime_torch-distributed.yaml"


@pytest.fixture(autouse=True)
def _image_env(monkeypatch):
    monkeypatch.setenv("GNP_IMAGE", TEST_IMAGE)


def _spec(name: str, **kw):
    kw.setdefault("namespace", "gnp")
    overrides = ["api=trainjob", *kw.pop("spec", [])]
    return load_job(name, spec_overrides=overrides, **kw)


def _pytorch_pod(spec) -> dict:
    pj = pytorchjob.build(spec)
    return pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------------
# Rendering and strict validation


@pytest.mark.parametrize("name", JOB_PARAMS)
def test_trainjob_and_runtime_validate_strictly(name):
    spec = _spec(name)
    assert spec.api == "trainjob"
    import yaml

    docs = [d for d in yaml.safe_load_all(render(spec, "all")) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[:2] == ["TrainingRuntime", "TrainJob"] and "ClusterTrainingRuntime" not in kinds
    rt, tj = docs[0], docs[1]
    assert cr_errors(rt, schema("TrainingRuntime")) == []
    assert cr_errors(tj, schema("TrainJob")) == []
    assert tj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": rt["metadata"]["name"],
    }
    assert tj["metadata"]["name"] == name and tj["metadata"]["namespace"] == "gnp"
    assert rt["metadata"]["namespace"] == "gnp"  # namespaced: in the job's namespace
    node = rt["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    # the CRD's own CEL rule on the name (x-kubernetes-validations, not checked by jsonschema), and the pods'
    # hostnames <job>-node-0-<i> (a DNS label: 63 characters at most)
    assert check_name(name) and len(f"{name}-node-0-{spec.nodes - 1}") <= 63
    # Trainer's torch plugin webhook refuses these in trainer.env (pkg/constants TorchRunReservedEnvNames)
    names = [e["name"] for e in tj["spec"]["trainer"]["env"]]
    assert not set(names) & {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert len(names) == len(set(names))
    # --part runtime alone is the same runtime
    assert yaml.safe_load(render(spec, "runtime")) == rt


def test_schemas_reject_what_the_api_server_rejects():
    """The strict schemas can fail: unknown fields, wrong types, a forbidden patch field."""
    tj = render(_spec("resnet-cifar"), "job")
    import yaml

    good = yaml.safe_load(tj)
    bad = copy.deepcopy(good)
    bad["spec"]["trainer"]["numProcPerNode"] = "2"  # an integer in v2.3
    assert cr_errors(bad, schema("TrainJob"))
    bad = copy.deepcopy(good)
    pod = bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod["template"]["spec"]["template"]["spec"]["priorityClassName"] = "high"  # not patchable by a TrainJob
    assert any("priorityClassName" in e for e in cr_errors(bad, schema("TrainJob")))
    bad = copy.deepcopy(good)
    bad["spec"]["elasticPolicy"] = {"minNodes": 1}  # removed in v2.2
    assert cr_errors(bad, schema("TrainJob"))
    stock = yaml.safe_load((ROOT / "tests" / "data" / "crds" / STOCK_RUNTIME).read_text())
    assert cr_errors(stock, schema("ClusterTrainingRuntime")) == []  # the schema reads the stock runtime
    rt = yaml.safe_load(render(_spec("resnet-cifar"), "runtime"))
    bad = copy.deepcopy(rt)
    bad["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rule"] = []
    assert cr_errors(bad, schema("TrainingRuntime"))  # a typo in the runtime is caught too


@pytest.mark.parametrize("name", JOBS)
def test_trainjob_pod_is_the_pytorchjob_pod(name):
    """Point by point: image, args, env, resources, volumes, security, labels, placement are the same."""
    spec = _spec(name)
    tj, rt = trainjob.build(spec), trainjob.runtime(spec)
    ref = _pytorch_pod(spec)
    rc = ref["spec"]["containers"][0]
    for index in range(spec.nodes):
        pod = node_pod(rt, tj, index)
        c = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
        for key in ("image", "args", "resources", "securityContext", "volumeMounts", "imagePullPolicy"):
            assert c[key] == rc[key], key
        env, ref_env = _env(c), _env(rc)
        assert {k: v for k, v in env.items() if k in ref_env} == ref_env  # every PyTorchJob variable, same value
        assert env["PET_RDZV_BACKEND"] == "c10d" and env["PET_MAX_RESTARTS"] == str(spec.max_restarts)
        assert env["PET_RDZV_ENDPOINT"] == f"{env['PET_MASTER_ADDR']}:{env['PET_MASTER_PORT']}"  # node 0
        assert env["PET_NNODES"] == str(spec.nodes) and env["PET_NODE_RANK"] == str(index)
        metrics = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert metrics == {p["name"]: p["containerPort"] for p in rc["ports"] if p["name"].startswith("metrics-")}
        for key in (
            "securityContext",
            "volumes",
            "automountServiceAccountToken",
            "nodeSelector",
            "tolerations",
            "serviceAccountName",
            "priorityClassName",
            "schedulerName",
            "imagePullSecrets",
        ):
            assert pod["spec"].get(key) == ref["spec"].get(key), key
        assert ref["metadata"]["labels"].items() <= pod["metadata"]["labels"].items()
        assert pod["metadata"]["annotations"] == ref["metadata"]["annotations"]
        assert pod["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


def test_pod_selectors_and_monitoring_labels():
    """The PodMonitor selects pods with training.kubeflow.org/job-name; the dashboard's job variable is the
    metrics' job_name label, which the trainer takes from GNP_JOB_NAME. node 0 is found by JobSet's labels."""
    import yaml

    pm = yaml.safe_load((ROOT / "k8s" / "monitoring" / "podmonitor.yaml").read_text())
    spec = _spec("vit-cifar-heavy")
    pods = [node_pod(trainjob.runtime(spec), trainjob.build(spec), i) for i in range(spec.nodes)]
    for expr in pm["spec"]["selector"].get("matchExpressions", []):
        assert expr["operator"] == "Exists" and all(expr["key"] in p["metadata"]["labels"] for p in pods)
    for k, v in pm["spec"]["selector"].get("matchLabels", {}).items():
        assert all(p["metadata"]["labels"].get(k) == v for p in pods)
    scraped = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    for p in pods:
        names = {port["name"] for port in p["spec"]["containers"][0]["ports"]}
        assert {f"metrics-{r}" for r in range(spec.nproc)} <= names & scraped
        assert _env(p["spec"]["containers"][0])["GNP_JOB_NAME"] == spec.name

    def matches(sel: str, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in (t.split("=") for t in sel.split(",")))

    assert [matches(trainjob.rank0_selector(spec.name), p["metadata"]["labels"]) for p in pods] == [True] + [False] * (
        spec.nodes - 1
    )
    assert all(matches(trainjob.pod_selector(spec.name), p["metadata"]["labels"]) for p in pods)


# ---------------------------------------------------------------------------------------------------
# Exit statuses: Job podFailurePolicy + JobSet failurePolicy, evaluated with Kubernetes' rules


def _job_outcome(policy: dict, status: int, disrupted: bool = False) -> str:
    """Kubernetes' podFailurePolicy (first matching rule; exit 0 never matches onExitCodes), then backoffLimit 0."""
    for rule in policy["rules"]:
        if "onPodConditions" in rule:
            if disrupted and any(c["type"] == "DisruptionTarget" for c in rule["onPodConditions"]):
                return {"Ignore": "pod-recreated", "FailJob": "PodFailurePolicy"}.get(rule["action"], "counted")
            continue
        oc = rule["onExitCodes"]
        hit = status != 0 and ((status in oc["values"]) == (oc["operator"] == "In"))
        if hit:
            return {"FailJob": "PodFailurePolicy", "Ignore": "pod-recreated", "Count": "counted"}[rule["action"]]
    return "BackoffLimitExceeded"  # counted against backoffLimit 0


def _jobset_outcome(fp: dict, reason: str) -> str:
    for rule in fp["rules"]:
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return rule["action"]
    return "RestartJobSet"  # JobSet's default: restart, counted against maxRestarts


@pytest.fixture(scope="module")
def runtime_backoff_5() -> dict:
    return trainjob.runtime(_spec("resnet-cifar", spec=["backoff_limit=5"], image=TEST_IMAGE))


@pytest.mark.parametrize("status", list(range(1, 256)))
def test_exit_statuses_map_onto_v2_policies(status, runtime_backoff_5):
    rt = runtime_backoff_5
    js = rt["spec"]["template"]["spec"]
    job = js["replicatedJobs"][0]["template"]["spec"]
    assert job["backoffLimit"] == 0 and js["failurePolicy"]["maxRestarts"] == 5
    reason = _job_outcome(job["podFailurePolicy"], status)
    action = _jobset_outcome(js["failurePolicy"], reason)
    assert action == ("RestartJobSet" if is_retried(status) else "FailJobSet"), (status, reason)
    if status in (EXIT_CRASH, EXIT_USER):
        assert action == "FailJobSet"
    if status in (EXIT_RETRYABLE, EXIT_RETRY_CRASH, 143):
        assert action == "RestartJobSet"


def test_disruption_recreates_the_pod_without_counting():
    rt = trainjob.runtime(_spec("resnet-cifar"))
    policy = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]
    assert _job_outcome(policy, 143, disrupted=True) == "pod-recreated"


# ---------------------------------------------------------------------------------------------------
# Spec keys that map differently


def test_elastic_spec_renders_fixed_size_with_one_notice(capsys):
    spec = _spec("vggbn-imagenet")
    assert spec.elastic
    tj = trainjob.build(spec)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: vggbn-imagenet: Trainer v2 has no ElasticPolicy")
    assert tj["spec"]["trainer"]["numNodes"] == spec.nodes
    assert trainjob.runtime(spec)["spec"]["mlPolicy"]["numNodes"] == spec.nodes
    assert trainjob.notice(_spec("resnet-cifar")) is None


def test_queue_gang_deadline_ttl_identity():
    spec = _spec(
        "resnet-imagenet",
        spec=[
            "queue=team-a",
            "workload_priority=low",
            "gang=true",
            "gang_queue=q1",
            "scheduler_name=volcano",
            "active_deadline_seconds=3600",
            "ttl_seconds_after_finished=60",
            "s3_auth=identity",
            "service_account=trainer-sa",
        ],
    )
    tj, rt = trainjob.build(spec), trainjob.runtime(spec)
    assert tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert tj["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "low"
    assert tj["spec"]["suspend"] is True and tj["spec"]["activeDeadlineSeconds"] == 3600
    assert tj["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "q1"}
    assert rt["spec"]["podGroupPolicy"] == {"volcano": {}}
    assert rt["spec"]["template"]["spec"]["ttlSecondsAfterFinished"] == 60
    pod = node_pod(rt, tj, 0)
    assert pod["spec"]["serviceAccountName"] == "trainer-sa" and pod["spec"]["schedulerName"] == "volcano"
    assert not any(k.startswith("AWS_ACCESS") for k in _env(pod["spec"]["containers"][0]))
    assert cr_errors(tj, schema("TrainJob")) == [] and cr_errors(rt, schema("TrainingRuntime")) == []
    plain = trainjob.runtime(_spec("resnet-cifar", spec=["gang=true"]))
    assert plain["spec"]["podGroupPolicy"] == {"coscheduling": {}}


def test_cli_api_key_and_part_runtime():
    p = _cli("render", "resnet-cifar", "--spec", "api=trainjob", "--part", "runtime")
    assert p.returncode == 0 and "kind: TrainingRuntime" in p.stdout and "ClusterTrainingRuntime" not in p.stdout
    p = _cli("render", "resnet-cifar", "--part", "runtime")
    assert p.returncode == 2 and p.stderr.startswith("error: --part runtime") and p.stderr.count("\n") == 1
    p = _cli("render", "resnet-cifar", "--spec", "api=trainjobs")
    assert p.returncode == 2 and "api: expected one of pytorchjob, trainjob" in p.stderr
    assert load_job("resnet-cifar").api == "pytorchjob"  # the default is unchanged


# ---------------------------------------------------------------------------------------------------
# submit / status / logs / delete against the fake API server


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    with FakeKube() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", namespace="gnp")))
        yield server


@pytest.mark.parametrize("name", JOB_PARAMS)
def test_submit_status_logs_delete_trainjob(name, fake, capsys):
    assert main(["submit", name, "--spec", "api=trainjob"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"submitted trainjob gnp/{name}" in out and f"make logs JOB={name} API=trainjob" in out
    stored = fake.trainer["trainjobs"][("gnp", name)]
    spec = _spec(name)
    assert stored["spec"] == trainjob.build(spec)["spec"]  # exactly what render prints
    rt = fake.trainer["ns_runtimes"][("gnp", trainjob.runtime_name(spec))]
    assert rt["spec"] == trainjob.runtime(spec)["spec"]
    # created before the TrainJob, then owned by it (uid), so the garbage collector deletes it with the job
    assert rt["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "name": name,
            "uid": stored["metadata"]["uid"],
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]
    verbs = [(m, p.split("?")[0].rsplit("/", 2)[-2:]) for m, p in fake.requests if m in ("POST", "PATCH")]
    assert verbs == [
        ("POST", ["gnp", "trainingruntimes"]),
        ("POST", ["gnp", "trainjobs"]),
        ("PATCH", ["trainingruntimes", trainjob.runtime_name(spec)]),
    ]
    pods = sorted(k[1] for k, p in fake.pods.items() if p["metadata"]["labels"].get(trainjob.JOBSET_NAME_LABEL) == name)
    assert len(pods) == spec.nodes

    assert main(["status", name, "--api", "trainjob"]) == 0
    out = capsys.readouterr().out
    assert f"trainjob gnp/{name}: Running" in out and f"job node: active {spec.nodes}" in out
    assert all(p in out for p in pods)

    assert main(["logs", name, "--api", "trainjob"]) == 0
    node0 = next(p for p in pods if p.startswith(f"{name}-node-0-0-"))
    assert capsys.readouterr().out == f"log of {node0}\nstep 1 loss 2.30\n"
    assert any(r[1].startswith(f"/api/v1/namespaces/gnp/pods/{node0}/log?container=node") for r in fake.requests)

    assert main(["delete", name, "--api", "trainjob"]) == 0
    assert ("gnp", name) not in fake.trainer["trainjobs"] and not fake.pods
    assert not fake.trainer["ns_runtimes"]
    assert "torch-distributed" in fake.trainer["runtimes"]  # a runtime it did not make stays
    assert main(["delete", name, "--api", "trainjob"]) == 2
    assert f"trainjob {name!r} not found in namespace 'gnp'" in capsys.readouterr().err


def test_make_passes_api_to_every_command():
    """API= reaches render/submit as the spec key and status/logs/delete as --api (make -n: nothing runs)."""
    import subprocess

    for target in ("render", "submit", "status", "logs", "delete"):
        p = subprocess.run(
            ["make", "-n", target, "JOB=resnet-cifar", "API=trainjob"], cwd=ROOT, capture_output=True, text=True
        )
        line = next(x for x in p.stdout.splitlines() if "k8s/render.py" in x)
        want = "--spec api=trainjob" if target in ("render", "submit") else "--api trainjob"
        assert want in line, line
        p = subprocess.run(["make", "-n", target, "JOB=resnet-cifar"], cwd=ROOT, capture_output=True, text=True)
        assert "api" not in next(x for x in p.stdout.splitlines() if "k8s/render.py" in x)


def test_trainjob_cluster_errors_exit_2(fake, capsys):
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob"]) == 0
    runtime = ("gnp", trainjob.runtime_name(_spec("resnet-cifar")))
    version = fake.trainer["ns_runtimes"][runtime]["metadata"]["resourceVersion"]
    capsys.readouterr()
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob"]) == 2
    err = capsys.readouterr().err
    assert "trainjob 'resnet-cifar' already exists" in err and "NAME=resnet-cifar-2" in err
    assert fake.trainer["ns_runtimes"][runtime]["metadata"]["resourceVersion"] == version  # left alone
    # a runtime left over from an earlier job of the same name (its owner reference never patched) is
    # replaced, not an error
    del fake.trainer["trainjobs"][("gnp", "resnet-cifar")]
    del fake.trainer["ns_runtimes"][runtime]["metadata"]["ownerReferences"]
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob", "--spec", "nodes=2"]) == 0
    assert fake.trainer["ns_runtimes"][runtime]["spec"]["mlPolicy"]["numNodes"] == 2
    capsys.readouterr()
    # a runtime of that name that belongs to something else is never overwritten
    del fake.trainer["trainjobs"][("gnp", "resnet-cifar")]
    fake.trainer["ns_runtimes"][runtime]["metadata"]["labels"]["app.kubernetes.io/instance"] = "other"
    assert main(["submit", "resnet-cifar", "--spec", "api=trainjob"]) == 2
    assert "does not belong to job 'resnet-cifar' (app.kubernetes.io/instance: 'other')" in capsys.readouterr().err
    assert fake.trainer["ns_runtimes"][runtime]["spec"]["mlPolicy"]["numNodes"] == 2
    # queued: created suspended, no pods, status says Suspended (Kueue made its Workload, as it does by default)
    fake.kueue = FakeKueue(local_queues={"gnp": ["q"]})
    assert main(["submit", "fashion-mnist-demo", "--spec", "api=trainjob", "--spec", "queue=q"]) == 0
    assert main(["status", "fashion-mnist-demo", "--api", "trainjob"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist-demo: Suspended" in out and "pods:\n  (none)" in out
    assert main(["logs", "fashion-mnist-demo", "--api", "trainjob", "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: trainjob 'fashion-mnist-demo': no node-0 log after 0 s")
    fake.trainer_installed = False
    assert main(["submit", "wideresnet-cifar", "--spec", "api=trainjob"]) == 2
    err = capsys.readouterr().err
    assert "Kubeflow Trainer v2 CRDs" in err and "kubeflow/trainer.git" in err and err.count("\n") == 1
    assert main(["status", "resnet-cifar", "--api", "trainjob"]) == 2
