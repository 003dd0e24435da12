"""Shared fixtures: a small real Fashion-MNIST conversion, subprocess helpers for the CLI and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.s3server import s3_env, s3_server  # noqa: F401  (fixtures for every test module)

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs pytest inside make: MAKELEVEL/MAKEFLAGS in the environment turn every `make -n` a test runs into
# a sub-make that prints "make[1]: Entering directory", and tests read those dry-run lines. Tests describe what a
# user's own `make` prints, so they run without the outer make's variables.
for _var in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"):
    os.environ.pop(_var, None)
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def cli_env(**extra: str) -> dict:
    """Environment for child processes: one thread each (2-core machines), this checkout's packages (trainer at
    the root, gnpk8s under k8s/) imported before an installed copy."""
    env = dict(os.environ)
    path = os.pathsep.join([str(ROOT), str(ROOT / "k8s")])
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})
    env.pop("GNP_TRACEBACK", None)
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd or ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """The command line `torchrun --standalone --nproc_per_node=N ARGS` (this interpreter's torchrun), for tests
    that run it to completion (run_torchrun) or start it in the background (subprocess.Popen)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run_torchrun(
    *args: str, nproc: int = 2, cwd: Path | None = None, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N ARGS` (gloo on CPU) in a child process."""
    return subprocess.run(
        torchrun_command(*args, nproc=nproc),
        cwd=cwd or ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """The first 500 train and 500 test images of the real Fashion-MNIST, converted to FFCV."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: `make setup` installs the dataset-fashion-mnist package")
    from trainer.data.convert import convert

    out = tmp_path_factory.mktemp("fmnist") / "ds"
    convert("fashion-mnist", str(FMNIST), str(out), limit=500)
    return out


@pytest.fixture(autouse=True)
def _close_leftover_checkpointers():
    """Close what a test left open: an open Checkpointer's upload thread would otherwise live on into later
    tests (CI counted 15 after test_checkpoint), some still retrying a failed upload and logging."""
    yield
    from trainer import checkpoint

    for ck in list(checkpoint._live):
        ck.close()
        if ck._thread is not None:
            ck._thread.join(timeout=30)
