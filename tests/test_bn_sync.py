"""loop.sync_bn_buffers: under DDP (2 real ranks, torchrun + gloo) the BatchNorm running buffers are averaged over
the ranks before every evaluation and every checkpoint (on by default), or left per rank when off.

tests/support/dist_scripts/bn_sync_checks.py trains the debug-cpu recipe for one epoch on each rank and gathers
the ranks' buffers itself (all_gather in fp64): the evaluated and saved buffers are compared with that mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from trainer.config import LoopConfig

pytestmark = [pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "support" / "dist_scripts" / "bn_sync_checks.py"
TIMEOUT_S = 300
TOL = 1e-6  # relative: the mean is taken in fp64 and stored back in fp32


def run(tmp_path: Path, sync: bool) -> list[dict]:
    out = tmp_path / ("on" if sync else "off")
    out.mkdir()
    proc = run_torchrun(str(SCRIPT), str(out), str(out / "run"), str(sync).lower(), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]


def test_default_is_on() -> None:
    assert LoopConfig().sync_bn_buffers is True


def test_evaluated_and_saved_buffers_are_the_mean_of_the_ranks(tmp_path: Path) -> None:
    ranks = run(tmp_path, sync=True)
    for rec in ranks:
        first = rec["sync"][0]
        assert first["buffers"] > 0
        assert first["ranks_spread"] > 1e-4  # the ranks' buffers really differed before averaging
        assert all(s["after_vs_mean"] < TOL for s in rec["sync"])
        assert rec["eval"] and all(e["ranks_spread"] == 0 and e["vs_last_mean"] < TOL for e in rec["eval"])
    assert ranks[0]["saved_vs_sync_mean"] < TOL


def test_off_keeps_each_ranks_buffers(tmp_path: Path) -> None:
    ranks = run(tmp_path, sync=False)
    for rec in ranks:
        assert rec["sync"] == []
        assert all(e["ranks_spread"] > 1e-4 for e in rec["eval"])  # each rank evaluated its own buffers
    assert ranks[0]["saved_vs_rank0"] == 0  # the checkpoint holds rank 0's
    assert ranks[0]["saved_vs_mean"] > 1e-4
