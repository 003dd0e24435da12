"""The light client: make jobs/render/submit/status/logs/delete run from a laptop with only the kubernetes client
and PyYAML (the Makefile's .venv-k8s), no torch, no numpy, no FFCV.

- test_k8s_code_imports_no_trainer_or_torch (fast): the shared venv's python (no user site, this checkout on
  PYTHONPATH, nothing else of the environment) with a meta-path finder that refuses torch, torchvision, ffcv
  and numpy: every job renders in both APIs, and importing the k8s package imports only trainer.exits (the exit
  statuses' one source); render imports trainer.config later, on purpose: it checks the pod's arguments with
  the trainer's own loader, which needs only PyYAML.
- test_a_fresh_venv_with_only_the_client_renders_and_submits (slow): a real fresh venv, made as the Makefile
  makes .venv-k8s (python3 -m venv + pip install kubernetes==37.0.1 pyyaml==6.0.4, then pip install --no-deps
  -e . for gnpk8s; about 20 s here from the package index), renders every job with the installed package and
  submits one to the fake API server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import cli_env
from tests.support.kube_fake import FakeKube
from tests.test_k8s import JOBS, ROOT, TEST_IMAGE

BLOCKED = ("torch", "torchvision", "ffcv", "numpy")

# Run as `python -s -c DRIVER` (PYTHONPATH: this checkout, see _env): refuses the heavy packages, renders every
# job given in argv[1] (JSON) in both APIs through the CLI, and reports what was imported.
DRIVER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[2].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import gnpk8s.cli, gnpk8s.cluster, gnpk8s.kueue, gnpk8s.manifests  # noqa: E401
    at_import = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED | {"trainer"})
    rcs = {}
    for job in json.loads(sys.argv[1]):
        for api in ("pytorchjob", "trainjob"):
            rcs[f"{job}/{api}"] = gnpk8s.cli.main(["render", job, "--spec", f"api={api}", "--part", "all"])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"at_import": at_import, "rcs": rcs, "heavy": heavy}), file=sys.stderr)
    """
)


def _drive(python: str, jobs: list[str], env: dict, *flags: str) -> dict:
    p = subprocess.run(
        [python, *flags, "-c", DRIVER, json.dumps(jobs), ",".join(BLOCKED)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stderr.strip().splitlines()[-1])


def _env(checkout: bool = True, **extra: str) -> dict:
    """A bare environment; with `checkout`, this checkout's trainer and gnpk8s first on the path (cli_env), else
    only what the interpreter has installed."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    path = {"PYTHONPATH": cli_env()["PYTHONPATH"]} if checkout else {}
    return {**keep, **path, "GNP_IMAGE": TEST_IMAGE, **extra}


def test_k8s_code_imports_no_trainer_or_torch():
    out = _drive(sys.executable, JOBS, _env(), "-s")
    # no torch, numpy, ffcv when the k8s package is imported; of trainer/ only the plain-Python exit statuses
    assert out["at_import"] == ["trainer", "trainer.exits"]
    assert out["heavy"] == []  # and rendering every job in both APIs needed none of the heavy packages
    assert out["rcs"] == {f"{j}/{a}": 0 for j in JOBS for a in ("pytorchjob", "trainjob")}


def test_the_blocker_can_fail():
    """The same driver with the trainer's model code imported must see the blocked packages refused."""
    p = subprocess.run(
        [sys.executable, "-s", "-c", DRIVER.replace("import gnpk8s.cli,", "import trainer.models, gnpk8s.cli,"), "[]"]
        + [",".join(BLOCKED)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert p.returncode != 0 and "blocked: " in p.stderr


def test_make_uses_the_light_venv():
    """The k8s targets run .venv-k8s's python and depend on it, not on `setup` (torch, apt)."""
    text = (ROOT / "Makefile").read_text()
    assert re.search(
        r"^\$\(K8S_PY\):\n\tpython3 -m venv \$\(K8S_VENV\)\n\t.*pip install .*kubernetes==37\.0\.1", text, re.M
    )
    for target in ("jobs", "render", "submit", "status", "logs", "delete"):
        assert re.search(rf"^{target}: \$\(K8S_PY\)$", text, re.M), target
        p = subprocess.run(["make", "-n", target, "JOB=resnet-cifar"], cwd=ROOT, capture_output=True, text=True)
        line = next(x for x in p.stdout.splitlines() if "k8s/render.py" in x)
        assert line.startswith(".venv-k8s/bin/python k8s/render.py"), line
        assert "docker/setup.sh" not in p.stdout


@pytest.mark.slow
def test_a_fresh_venv_with_only_the_client_renders_and_submits(tmp_path):
    venv = tmp_path / "venv-k8s"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "kubernetes==37.0.1", "pyyaml==6.0.4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if pip.returncode != 0 and re.search(r"No matching distribution|Could not find a version|connection", pip.stderr):
        pytest.skip(f"no package index reachable: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stderr
    # as the Makefile's rule: the project itself without its dependencies (gnpk8s, trainer's config loader)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    python = str(venv / "bin" / "python")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "numpy", "ffcv", "torchvision"}  # really only the client
    out = _drive(python, JOBS, _env(checkout=False), "-s")  # gnpk8s as installed
    assert out["rcs"] == {f"{j}/{a}": 0 for j in JOBS for a in ("pytorchjob", "trainjob")}
    with FakeKube() as fake:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="gnp")
        env = _env(checkout=False, KUBECONFIG=str(kubeconfig))
        for cmd in (
            ["submit", "resnet-cifar", "--spec", "api=trainjob"],
            ["status", "resnet-cifar", "--api", "trainjob"],
        ):
            p = subprocess.run(
                [python, "k8s/render.py", *cmd], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
            )
            assert p.returncode == 0, p.stderr
        assert ("gnp", "resnet-cifar") in fake.trainer["trainjobs"]
        assert "trainjob gnp/resnet-cifar: Running" in p.stdout
