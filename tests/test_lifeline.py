"""Ranks die with a SIGKILLed bare torchrun (trainer/lifeline.py).

torchrun starts every rank in a session of its own, so `kill -9` of torchrun's process group left both ranks
training to the end, beside whatever rerun replaced them. With PR_SET_PDEATHSIG they die with the agent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, torchrun_command
from tests.test_ownership import train_args

pytestmark = [pytest.mark.dist]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running the trainer (a zombie's cmdline is empty; a reused pid runs other code)."""
    out = []
    for pid in pids:
        try:
            if "trainer" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                out.append(pid)
        except OSError:
            pass
    return out


def test_ranks_die_with_a_sigkilled_bare_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    argv = train_args(run_dir, "loop.epochs=200")
    agent = subprocess.Popen(
        torchrun_command("-m", "trainer", *argv),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the one `kill -9 -PGID` ends
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and agent.poll() is None:
            if metrics.is_file() and '"kind": "train"' in metrics.read_text():
                break
            time.sleep(0.2)
        ranks = _alive(_children(agent.pid))
        assert len(ranks) == 2, f"expected two training ranks under torchrun {agent.pid}, found {ranks}"
        assert all(os.getpgid(r) != agent.pid for r in ranks)  # each rank in a group of its own
        os.killpg(agent.pid, signal.SIGKILL)
        t0 = time.monotonic()
        agent.wait()
        while _alive(ranks) and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        gone_s = time.monotonic() - t0
        assert _alive(ranks) == [], f"ranks {ranks} outlived the SIGKILLed torchrun by 10 s"
        print(f"ranks gone {gone_s:.3f} s after kill -9 of torchrun's process group")
        assert gone_s < 5
    finally:
        for pid in _alive(ranks):
            os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
