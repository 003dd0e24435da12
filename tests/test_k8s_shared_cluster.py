"""What a shared GPU cluster needs from every rendered job (k8s/gnpk8s), each checked against a rule written
out here from its public source, not against the renderer's own constants:

- the Kubernetes `restricted` Pod Security Standard, rule by rule (kubernetes.io/docs/concepts/security/
  pod-security-standards, "Baseline" and "Restricted" tables), on every pod of every job, including what the
  training operator v1.9.0 injects into a pod (its pkg/controller.v1/pytorch/initcontainer.go: an
  `init-pytorch` container in every Worker pod of a job that has a Master); a failure names the rule;
- Kueue (kueue.sigs.k8s.io/docs/tasks/run/kubeflow/pytorchjobs: the queue label on the PyTorchJob itself, the
  job created suspended), gang scheduling (runPolicy.schedulingPolicy of the v1.9 CRD), priority classes,
  scheduler name and service account, all strict-valid against the CRD the tests carry;
- S3 credentials from a Secret or from the pod's identity; `make submit` refuses a job whose Secret is
  missing before anything is created; the QoS class computed by the kubelet's rule;
- an image must be named (IMAGE=, the spec, or GNP_IMAGE): nothing is invented;
- the smaller defects of issue 15: max_restarts for fixed-size jobs, recipe paths as label values, the
  convert Job's tolerations and S3 env, fsGroupChangePolicy, the dataset claim's access mode;
- the manifest layer's seam for a second job kind.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gnpk8s import cli, convert, kinds, manifests, pytorchjob, spec
from tests.support.kube_fake import FakeKube
from tests.support.prom import cr_errors, crd_schema

ROOT = Path(__file__).resolve().parents[1]
PYTORCHJOB_CRD = ROOT / "tests" / "data" / "crds" / "kubeflow.org_pytorchjobs.yaml"
IMAGE = "registry.test/gnp/gnp-trainer:test"


@pytest.fixture(autouse=True)
def _no_image_from_the_environment(monkeypatch):
    monkeypatch.delenv("GNP_IMAGE", raising=False)


def _jobs() -> list[str]:
    from trainer.config import list_recipes

    recipes = list_recipes()
    return [n for n in spec.list_jobs() if spec.load_spec(n)[1].get("recipe") in recipes]


JOBS = _jobs()


def _load(name: str, *overrides: str, **kw) -> spec.JobSpec:
    return spec.load_job(name, spec_overrides=list(overrides), image=kw.pop("image", IMAGE), **kw)


# ---------------------------------------------------------------------------------------------------
# The `restricted` Pod Security Standard, one function per rule (kubernetes.io/docs/concepts/security/
# pod-security-standards; "restricted" includes every "baseline" rule).

BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def _containers(pod: dict) -> list[dict]:
    return pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])


def _sc(c: dict) -> dict:
    return c.get("securityContext") or {}


def _rule_host_namespaces(pod):
    return [f"{k} is true" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]


def _rule_host_process(pod):
    scs = [pod.get("securityContext") or {}] + [_sc(c) for c in _containers(pod)]
    return ["hostProcess" for s in scs if (s.get("windowsOptions") or {}).get("hostProcess")]


def _rule_privileged(pod):
    return [f"container {c['name']} is privileged" for c in _containers(pod) if _sc(c).get("privileged")]


def _rule_capabilities_baseline(pod):
    out = []
    for c in _containers(pod):
        extra = set((_sc(c).get("capabilities") or {}).get("add") or []) - BASELINE_CAPS
        if extra:
            out.append(f"container {c['name']} adds {sorted(extra)}")
    return out


def _rule_hostpath(pod):
    return [f"volume {v['name']} is hostPath" for v in pod.get("volumes", []) if "hostPath" in v]


def _rule_host_ports(pod):
    return [
        f"container {c['name']} hostPort {p['hostPort']}"
        for c in _containers(pod)
        for p in c.get("ports", [])
        if p.get("hostPort")
    ]


def _rule_apparmor(pod):
    scs = [pod.get("securityContext") or {}] + [_sc(c) for c in _containers(pod)]
    return ["appArmorProfile Unconfined" for s in scs if (s.get("appArmorProfile") or {}).get("type") == "Unconfined"]


def _rule_selinux(pod):
    out = []
    for s in [pod.get("securityContext") or {}] + [_sc(c) for c in _containers(pod)]:
        opts = s.get("seLinuxOptions") or {}
        if opts.get("type") not in (
            None,
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ):
            out.append(f"seLinuxOptions.type {opts['type']}")
        if opts.get("user") or opts.get("role"):
            out.append("seLinuxOptions user/role set")
    return out


def _rule_proc_mount(pod):
    return [
        f"container {c['name']} procMount" for c in _containers(pod) if _sc(c).get("procMount", "Default") != "Default"
    ]


def _rule_sysctls(pod):
    sysctls = (pod.get("securityContext") or {}).get("sysctls") or []
    return [f"sysctl {s['name']}" for s in sysctls if s["name"] not in SAFE_SYSCTLS]


def _rule_volume_types(pod):
    out = []
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']} of type {sorted(kinds - RESTRICTED_VOLUMES)}")
    return out


def _rule_privilege_escalation(pod):
    return [
        f"container {c['name']} does not set allowPrivilegeEscalation: false"
        for c in _containers(pod)
        if _sc(c).get("allowPrivilegeEscalation") is not False
    ]


def _rule_non_root(pod):
    pod_level = (pod.get("securityContext") or {}).get("runAsNonRoot")
    out = []
    for c in _containers(pod):
        mine = _sc(c).get("runAsNonRoot")
        if mine is False or (mine is None and pod_level is not True):
            out.append(f"container {c['name']} may run as root (runAsNonRoot not true)")
    return out


def _rule_non_root_user(pod):
    scs = [pod.get("securityContext") or {}] + [_sc(c) for c in _containers(pod)]
    return ["runAsUser is 0" for s in scs if s.get("runAsUser") == 0]


def _rule_seccomp(pod):
    pod_type = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    out = []
    if pod_type == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    for c in _containers(pod):
        mine = (_sc(c).get("seccompProfile") or {}).get("type")
        eff = mine or pod_type
        if eff not in ("RuntimeDefault", "Localhost"):
            out.append(f"container {c['name']} seccompProfile {eff!r}")
    return out


def _rule_capabilities_restricted(pod):
    out = []
    for c in _containers(pod):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"container {c['name']} does not drop ALL capabilities")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"container {c['name']} adds capabilities")
    return out


RESTRICTED_RULES = {
    "HostProcess": _rule_host_process,
    "Host Namespaces": _rule_host_namespaces,
    "Privileged Containers": _rule_privileged,
    "Capabilities (baseline)": _rule_capabilities_baseline,
    "HostPath Volumes": _rule_hostpath,
    "Host Ports": _rule_host_ports,
    "AppArmor": _rule_apparmor,
    "SELinux": _rule_selinux,
    "/proc Mount Type": _rule_proc_mount,
    "Sysctls": _rule_sysctls,
    "Volume Types": _rule_volume_types,
    "Privilege Escalation": _rule_privilege_escalation,
    "Running as Non-root": _rule_non_root,
    "Running as Non-root user": _rule_non_root_user,
    "Seccomp": _rule_seccomp,
    "Capabilities": _rule_capabilities_restricted,
}


def restricted_violations(pod: dict) -> list[str]:
    return [f"{rule}: {msg}" for rule, check in RESTRICTED_RULES.items() for msg in check(pod)]


def operator_injected(pj: dict, rtype: str, pod: dict) -> dict:
    """The pod the training operator v1.9.0 creates from a replica template: setInitContainer
    (pkg/controller.v1/pytorch/initcontainer.go) adds, only to Worker pods and only when the job has a
    Master replica, the init container of its default template: image alpine:3.10 (the operator's
    --pytorch-init-container-image), IfNotPresent, cpu 50m/100m and memory 10Mi/20Mi, a shell loop on
    `nslookup <job>-master-0`, and no securityContext. Stated from the source at that tag."""
    out = copy.deepcopy(pod)
    if rtype == "Worker" and "Master" in pj["spec"]["pytorchReplicaSpecs"]:
        master = f"{pj['metadata']['name']}-master-0"
        out.setdefault("initContainers", []).append(
            {
                "name": "init-pytorch",
                "image": "alpine:3.10",
                "imagePullPolicy": "IfNotPresent",
                "resources": {
                    "limits": {"cpu": "100m", "memory": "20Mi"},
                    "requests": {"cpu": "50m", "memory": "10Mi"},
                },
                "command": [
                    "sh",
                    "-c",
                    f"err=1;for i in $(seq 100); do if nslookup {master}; then err=0 && break; fi;"
                    f"echo waiting for master; sleep 2; done; exit $err",
                ],
            }
        )
    return out


def _all_pods(name: str) -> list[tuple[str, dict]]:
    s = _load(name)
    pj = pytorchjob.build(s)
    pods = [
        (f"{name} {rtype}", operator_injected(pj, rtype, rs["template"]["spec"]))
        for rtype, rs in pj["spec"]["pytorchReplicaSpecs"].items()
    ]
    cj = convert.build(s)
    if cj is not None:
        pods.append((f"{name} convert", cj["spec"]["template"]["spec"]))
    return pods


@pytest.mark.parametrize("name", JOBS)
def test_every_pod_meets_the_restricted_pod_security_standard(name):
    for where, pod in _all_pods(name):
        assert restricted_violations(pod) == [], where
        assert "initContainers" not in pod, f"{where}: the operator would inject an init container"


def test_the_restricted_checks_fail_where_they_should():
    pod = _all_pods("wideresnet-ss-cifar")[0][1]
    bad = {
        "Host Namespaces": lambda p: p.update(hostNetwork=True),
        "Privileged Containers": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "HostPath Volumes": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "Host Ports": lambda p: p["containers"][0]["ports"][0].update(hostPort=23456),
        "Volume Types": lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
        "Privilege Escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "Running as Non-root": lambda p: (
            p["securityContext"].pop("runAsNonRoot"),
            p["containers"][0]["securityContext"].pop("runAsNonRoot"),
        ),
        "Running as Non-root user": lambda p: p["securityContext"].update(runAsUser=0),
        "Seccomp": lambda p: p["containers"][0]["securityContext"]["seccompProfile"].update(type="Unconfined"),
        "Capabilities": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        "Sysctls": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    }
    for rule, mutate in bad.items():
        broken = copy.deepcopy(pod)
        mutate(broken)
        found = restricted_violations(broken)
        assert any(v.startswith(rule + ":") for v in found), (rule, found)  # the rule is named
    # The former layout (Master + Workers) gets the operator's init container, which the profile refuses.
    pj = pytorchjob.build(_load("wideresnet-ss-cifar"))
    workers = pj["spec"]["pytorchReplicaSpecs"]["Worker"]
    pj["spec"]["pytorchReplicaSpecs"] = {"Master": {**copy.deepcopy(workers), "replicas": 1}, "Worker": workers}
    injected = operator_injected(pj, "Worker", workers["template"]["spec"])
    found = restricted_violations(injected)
    assert "Privilege Escalation: container init-pytorch does not set allowPrivilegeEscalation: false" in found
    assert "Capabilities: container init-pytorch does not drop ALL capabilities" in found
    assert restricted_violations(operator_injected(pj, "Master", workers["template"]["spec"])) == []


def _qos(pod: dict) -> str:
    """The kubelet's QoS class (kubernetes.io/docs/concepts/workloads/pods/pod-qos): Guaranteed when every
    container has CPU and memory limits equal to its requests, BestEffort when none has any, else Burstable."""
    res = [c.get("resources") or {} for c in pod["containers"] + pod.get("initContainers", [])]
    if all(not r.get("requests") and not r.get("limits") for r in res):
        return "BestEffort"
    for r in res:
        lim, req = r.get("limits") or {}, r.get("requests") or {}
        for k in ("cpu", "memory"):
            if k not in lim or req.get(k, lim[k]) != lim[k]:
                return "Burstable"
    return "Guaranteed"


def test_guaranteed_qos_where_the_spec_asks_for_it():
    pod = lambda s: pytorchjob.build(s)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]  # noqa: E731
    assert _qos(pod(_load("resnet-imagenet"))) == "Guaranteed"  # resources.guaranteed: true
    assert _qos(pod(_load("resnet-cifar"))) == "Burstable"
    assert _qos(pod(_load("resnet-cifar", "resources.guaranteed=true"))) == "Guaranteed"


# ---------------------------------------------------------------------------------------------------
# Queues, gangs, priorities, identity


@pytest.fixture(scope="module")
def schema() -> dict:
    return crd_schema(PYTORCHJOB_CRD, "x/v1", strict=True)


def test_kueue_gang_priority_scheduler_and_service_account(schema):
    s = _load(
        "resnet-imagenet",
        "queue=team-a",
        "workload_priority=research-high",
        "priority_class=gpu-high",
        "scheduler_name=volcano",
        "gang=true",
        "gang_queue=research",
        "service_account=gnp-trainer",
    )
    pj = pytorchjob.build(s)
    assert cr_errors(pj, schema) == []
    labels = pj["metadata"]["labels"]
    # Kueue reads these on the job object itself, not on its pod templates
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/priority-class"] == "research-high"
    rp = pj["spec"]["runPolicy"]
    assert rp["suspend"] is True  # Kueue admits the job by un-suspending it
    pods = sum(rs["replicas"] for rs in pj["spec"]["pytorchReplicaSpecs"].values())
    assert rp["schedulingPolicy"] == {"minAvailable": pods, "queue": "research", "priorityClass": "gpu-high"}
    for rs in pj["spec"]["pytorchReplicaSpecs"].values():
        pod = rs["template"]["spec"]
        assert pod["priorityClassName"] == "gpu-high" and pod["schedulerName"] == "volcano"
        assert pod["serviceAccountName"] == "gnp-trainer"
        assert "kueue.x-k8s.io/queue-name" not in rs["template"]["metadata"]["labels"]
    # without a queue nothing is suspended (no Kueue would ever start it)
    plain = pytorchjob.build(_load("resnet-imagenet"))
    assert "suspend" not in plain["spec"]["runPolicy"] and "schedulingPolicy" not in plain["spec"]["runPolicy"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


def _env(pod: dict) -> list[dict]:
    return [e for c in pod["containers"] for e in c.get("env", [])]


def test_s3_from_the_pods_identity_renders_no_secret():
    s = _load("pyramidnet-sd-cifar", "s3_auth=identity", "service_account=gnp-s3-reader")
    pj = pytorchjob.build(s)
    pod = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["serviceAccountName"] == "gnp-s3-reader"
    assert not [e for e in _env(pod) if "valueFrom" in e or e["name"].startswith("AWS_ACCESS")]
    cj = convert.build(s)
    assert cj is None or not [e for e in _env(cj["spec"]["template"]["spec"]) if "valueFrom" in e]
    with pytest.raises(spec.UserError, match="s3_auth: identity needs service_account"):
        _load("pyramidnet-sd-cifar", "s3_auth=identity")
    with pytest.raises(spec.UserError, match=r"s3_auth: expected one of secret, identity"):
        _load("pyramidnet-sd-cifar", "s3_auth=irsa")


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    def make(**kw):
        server = FakeKube(**kw).__enter__()
        servers.append(server)
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / f"kc{len(servers)}", namespace="gnp")))
        return server

    servers: list = []
    yield make
    for s in servers:
        s.__exit__(None, None, None)


def test_submit_refuses_a_missing_secret_before_creating_anything(kube, capsys):
    fake = kube(secrets=())
    assert cli.main(["submit", "resnet-imagenet", "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Secret 'gnp-s3'") and "does not exist in namespace 'gnp'" in err
    assert err.count("\n") == 1 and not fake.jobs
    assert not [r for r in fake.requests if r[0] == "POST"]
    # identity needs no Secret; a job without S3 needs none either
    assert cli.main(["submit", "resnet-imagenet", "--image", IMAGE, "--spec", "s3_auth=identity", "--spec",
                     "service_account=sa"]) == 0  # fmt: skip
    assert cli.main(["submit", "fashion-mnist-demo", "--image", IMAGE]) == 0
    assert set(fake.jobs) == {("gnp", "resnet-imagenet"), ("gnp", "fashion-mnist-demo")}
    # with the Secret present the same submit goes through
    ok = kube()
    capsys.readouterr()
    assert cli.main(["submit", "resnet-imagenet", "--image", IMAGE]) == 0
    assert ("gnp", "resnet-imagenet") in ok.jobs


# ---------------------------------------------------------------------------------------------------
# The image


def _render_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "GNP_IMAGE"}
    return subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "render.py"), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=ROOT,
        timeout=120,
    )


def test_an_image_must_be_named():
    for part in ("job", "convert", "all"):
        p = _render_cli("render", "fashion-mnist-demo", "--part", part)
        assert p.returncode == 2 and p.stdout == "", p.stderr
        assert p.stderr.startswith("error: no container image") and p.stderr.count("\n") == 1
        assert "IMAGE=" in p.stderr and "GNP_IMAGE" in p.stderr and "image:" in p.stderr
    # the monitoring part runs no image
    assert _render_cli("render", "fashion-mnist-demo", "--part", "monitoring").returncode == 0
    # each way of naming it, in order: --image, the spec's image, GNP_IMAGE
    img = lambda p: yaml.safe_load(p.stdout)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][  # noqa: E731
        "containers"
    ][0]["image"]
    env = {"GNP_IMAGE": "reg.test/a:1"}
    assert img(_render_cli("render", "fashion-mnist-demo", env=env)) == "reg.test/a:1"
    assert img(_render_cli("render", "fashion-mnist-demo", "--spec", "image=reg.test/b:2", env=env)) == "reg.test/b:2"
    assert img(_render_cli("render", "fashion-mnist-demo", "--image", "reg.test/c:3", env=env)) == "reg.test/c:3"
    assert "image" not in spec.load_spec("fashion-mnist-demo")[1]  # _defaults.yaml names no registry


def test_make_image_and_make_submit_use_the_same_name():
    clean = {k: v for k, v in os.environ.items() if k not in ("GNP_IMAGE", "IMAGE", "MAKEFLAGS")}
    p = subprocess.run(["make", "-s", "image"], capture_output=True, text=True, cwd=ROOT, env=clean, timeout=60)
    # one line of ours (make adds its own "*** Error 2" after it)
    assert p.returncode == 2 and p.stderr.splitlines()[0].startswith("make image: no image named: IMAGE="), p.stderr
    env = {**clean, "GNP_IMAGE": "reg.test/gnp/gnp-trainer:7"}
    for target in ("image", "submit JOB=resnet-cifar", "render JOB=resnet-cifar"):
        p = subprocess.run(["make", "-n", *target.split()], capture_output=True, text=True, cwd=ROOT, env=env)
        assert p.returncode == 0 and "reg.test/gnp/gnp-trainer:7" in p.stdout, (target, p.stdout, p.stderr)
    p = subprocess.run(["make", "-n", "render", "JOB=x", "SPEC=nodes=2 gang=true"], capture_output=True, text=True,
                       cwd=ROOT, env=env)  # fmt: skip
    assert "--spec nodes=2 --spec gang=true" in p.stdout


# ---------------------------------------------------------------------------------------------------
# The smaller defects


def test_max_restarts_reaches_torchrun_in_fixed_size_jobs():
    for name in ("wideresnet-ss-cifar", "fashion-mnist-demo"):
        pj = pytorchjob.build(_load(name, "max_restarts=7"))
        # the operator sets PET_MAX_RESTARTS only from elasticPolicy (envvar_elastic.go at v1.9.0)
        assert pj["spec"]["elasticPolicy"]["maxRestarts"] == 7, name


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # k8s.io/apimachinery validation


def test_a_recipe_path_renders_a_valid_label_value(schema):
    pj = pytorchjob.build(_load("resnet-cifar", "recipe=trainer/recipes/resnet-cifar.yaml"))
    value = pj["metadata"]["labels"]["gnp.training/recipe"]
    assert value == "resnet-cifar" and LABEL_VALUE.match(value) and len(value) <= 63
    assert "--recipe" in (
        args := pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    )
    assert args[args.index("--recipe") + 1] == "trainer/recipes/resnet-cifar.yaml"  # the pod still gets the path
    for text in ("a/b/c" * 30 + ".yaml", "-x_y.", "weird name!"):
        v = spec.label_value(text)
        assert LABEL_VALUE.match(v) and len(v) <= 63, (text, v)


def test_convert_jobs_stay_off_gpu_nodes_and_get_s3_env_only_when_they_use_s3():
    for name in JOBS:
        s = _load(name)
        cj = convert.build(s)
        if cj is None:
            continue
        pod = cj["spec"]["template"]["spec"]
        assert "tolerations" not in pod and "nodeSelector" not in pod, name
        aws = [e for e in _env(pod) if e["name"].startswith("AWS_")]
        uses_s3 = bool(s.dataset.s3 or s.convert.source_s3)
        assert bool(aws) == uses_s3, name
    # the demo checkpoints to S3 but converts from the image to its PVC: no credentials for the convert Job
    demo = _load("fashion-mnist-demo", "checkpoint.uri=s3://ckpt-bucket/demo")
    assert demo.uses_s3 and not [e for e in _env(convert.build(demo)["spec"]["template"]["spec"])
                                 if e["name"].startswith("AWS_")]  # fmt: skip


def test_fs_group_change_policy_on_every_pod():
    for name in JOBS:
        for where, pod in _all_pods(name):
            assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", where


def test_the_dataset_claim_is_written_by_convert_and_read_only_in_training():
    for name in JOBS:
        s = _load(name)
        if not (s.dataset.pvc and s.convert):
            continue
        text = spec.spec_path(name).read_text()
        # a ReadOnlyMany claim cannot be written: no spec whose convert Job writes its claim may say it is one
        assert not re.search(r"(on|lives on) a ReadOnlyMany", text), name
        cpod = convert.build(s)["spec"]["template"]["spec"]
        assert not next(v for v in cpod["volumes"] if v["name"] == "data")["persistentVolumeClaim"].get("readOnly")
        tpod = pytorchjob.build(s)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        assert next(v for v in tpod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["readOnly"] is True


# ---------------------------------------------------------------------------------------------------
# Loader, help text, the job-kind seam


def test_a_spec_with_a_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("recipe: resnet-cifar\nnodes: 1\nnodes: 2\n")
    p = _render_cli("render", str(path), "--image", IMAGE)
    assert p.returncode == 2 and "duplicate key 'nodes'" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_help_and_specs_say_which_losses_continue():
    text = " ".join(_render_cli("--help").stdout.split())
    assert "Losing worker-0, which hosts the c10d rendezvous" in text and "restarts from its last checkpoint" in text
    assert "losing any Worker but worker-0 leaves the other pods training" in text
    for name in ("vggbn-imagenet", "pyramidnet-sd-cifar"):
        comment = " ".join(spec.spec_path(name).read_text().split())
        assert "worker-0" in comment and "restarts" in comment, name


def test_a_second_job_kind_plugs_into_render(monkeypatch):
    s = _load("fashion-mnist-demo")

    class Kind:
        @staticmethod
        def build(sp):
            return {"apiVersion": "example.test/v1", "kind": "TestJob", "metadata": {"name": sp.name}}

    monkeypatch.setitem(kinds.KINDS, "testjob", Kind)
    docs = list(yaml.safe_load_all(manifests.render(s, "job", kind="testjob")))
    assert docs == [{"apiVersion": "example.test/v1", "kind": "TestJob", "metadata": {"name": "fashion-mnist-demo"}}]
    with pytest.raises(spec.UserError, match="unknown job kind 'nope'"):
        manifests.render(s, "job", kind="nope")
