"""`make bench-e2e` runs: the real training loop (memory loader, Prometheus on, a mid-run checkpoint) and the
synthetic step, on the CPU with demo_cnn; the table's ratio is recomputed from its parts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env


@pytest.mark.slow
def test_bench_e2e_cpu_table(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "-m", "trainer.bench.e2e", "--steps", "24", "--json", str(out)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["model"], r["method"]) for r in rows] == [("demo_cnn", "SGD"), ("demo_cnn", "GNP")]
    for r in rows:
        assert r["step_images_per_s"] > 0 and r["e2e_images_per_s"] > 0
        assert r["fraction"] == pytest.approx(r["e2e_images_per_s"] / r["step_images_per_s"])
        assert f"{r['fraction']:.1%}" in res.stdout
        # 24 steps, windows of 3, the first two untimed: 6 windows, and the rate is their images / their time
        assert r["windows"] == 6 and r["timed_s"] > 0
        assert r["e2e_images_per_s"] == pytest.approx(6 * 3 * r["batch"] / r["timed_s"])
        assert r["median_window_images_per_s"] > 0
    # GNP's two passes make both its step and its loop slower than SGD's (a sanity check that can fail).
    assert rows[1]["step_images_per_s"] < rows[0]["step_images_per_s"]
