"""The GPU suite's orchestration and the device checks' discrimination, on the CPU (CI has no GPU).

The suite's numbers only mean something on a GPU; here the tests check that every part runs, the
budget is enforced (a part past it is stopped, later parts are skipped, the report is still written),
and that the checks' limits separate right from wrong (fp32 vs fp64, reuse vs no reuse).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import gpu_checks
from trainer.gpu_suite import Part, execute

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_check_limits_separate_right_from_wrong() -> None:
    cpu = torch.device("cpu")
    exact = gpu_checks.run_steps(cpu, torch.float64, gpu_checks.FULL3)
    assert gpu_checks.rel_diff(gpu_checks.run_steps(cpu, torch.float64, gpu_checks.FULL3), exact) == 0.0
    # fp32 arithmetic of the same steps is far outside the device-vs-CPU limit of 1e-9 ...
    assert gpu_checks.rel_diff(gpu_checks.run_steps(cpu, torch.float32, gpu_checks.FULL3), exact) > 1e-7
    # ... and so is a different update rule (a plain last step, or reuse left out).
    assert gpu_checks.rel_diff(gpu_checks.run_steps(cpu, torch.float64, (True, True, False)), exact) > 1e-3
    reuse = gpu_checks.run_steps(cpu, torch.float64, gpu_checks.REUSE_PATTERN, reuse="looksam")
    assert gpu_checks.rel_diff(gpu_checks.run_steps(cpu, torch.float64, gpu_checks.REUSE_PATTERN), reuse) > 1e-3
    start = gpu_checks._initial(cpu)
    one = gpu_checks.run_steps(cpu, torch.float32, (True,))
    assert gpu_checks.cosine_of_updates(one, one, start) == pytest.approx(1.0)
    # The update of a step on different data points elsewhere: the cosine check can fail.
    other = gpu_checks.run_steps(cpu, torch.float32, (False, True))
    assert gpu_checks.cosine_of_updates(other, one, start) < 0.98
    # GNP's share (GNP - plain) in bf16 matches fp32's; a plain step in its place does not.
    plain = gpu_checks.run_steps(cpu, torch.float32, (False,))
    low = gpu_checks.run_steps(cpu, torch.float32, (True,), precision="bf16", channels_last=True)
    low_plain = gpu_checks.run_steps(cpu, torch.float32, (False,), precision="bf16", channels_last=True)
    ref = gpu_checks._shift(one, plain, start)
    assert gpu_checks.cosine_of_updates(gpu_checks._shift(low, low_plain, start), ref, start) >= 0.8
    # A penalty of the wrong sign (plain - GNP) points the other way.
    assert gpu_checks.cosine_of_updates(gpu_checks._shift(low_plain, low, start), ref, start) <= -0.8


def test_budget_stops_a_part_and_skips_the_rest(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    quick = [sys.executable, "-c", "print('done')"]
    parts = [Part("rounds", [quick, sleeper], 1), Part("sleep", [sleeper], 1), Part("later", [quick], 1),
             Part("unwanted", [quick], 1)]
    start = time.monotonic()
    # 15 s of the budget are kept for the report: 5 s for the parts.
    execute(parts, budget_s=20, only={"rounds", "sleep", "later"}, log_path=tmp_path / "suite.log")
    assert time.monotonic() - start < 40
    status = {p.name: (p.status, p.note) for p in parts}
    assert status["rounds"][0] == "ok" and "1 of 2 rounds complete" in status["rounds"][1]
    assert status["sleep"][0] == "skipped" or status["sleep"][0] == "timeout"
    assert status["later"][0] == "skipped" and status["later"][1].startswith("budget")
    assert status["unwanted"] == ("skipped", "not in --parts")
    assert "done" in (tmp_path / "suite.log").read_text()


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (["--parts", "gnp-eager,nope"], ["--budget", "10"], ["--seeds", "0"],
                 ["--compare-recipe", "no-such-recipe"], ["--compare-set", "loop.epochs=-1"]):
        res = subprocess.run([sys.executable, "-m", "trainer.gpu_suite", "--out", str(tmp_path), *args],
                             cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "gpu-suite:" in res.stderr
    for module in ("trainer.bench_gnp", "trainer.bench_e2e"):
        res = subprocess.run([sys.executable, "-m", module, "--modes", "fast"], cwd=ROOT, capture_output=True,
                             text=True)
        assert res.returncode == 2 and "--modes" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_smoke_suite_writes_the_full_report(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run([sys.executable, "-m", "trainer.gpu_suite", "--smoke", "--out", str(out), "--work", str(work),
                          "--methods", "sgd,gnp-reuse4", "--seeds", "1", "--budget", "400"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["suite.json", "suite.log", "suite.md", "test_error.png"]
    report = json.loads((out / "suite.json").read_text())
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {"checks": "ok", "gnp-eager": "ok", "e2e-eager": "ok", "gnp-compile": "skipped",
                      "e2e-compile": "skipped", "compare": "ok"}
    assert [c["ok"] for c in report["checks"]] == [True] * 7
    (step,) = report["step"]
    assert step["model"] == "small_cnn" and step["every4_x_sgd"] == pytest.approx(
        (3 * step["sgd_ms"] + step["gnp_ms"]) / 4 / step["sgd_ms"])
    assert {(r["method"], r["mode"]) for r in report["e2e"]} == {("SGD", "eager"), ("GNP", "eager")}
    assert set(report["compare"]) == {"sgd", "gnp-reuse4"}
    md = (out / "suite.md").read_text()
    for heading in ("Correctness on the device", "Step time on synthetic data", "end to end", "Method comparison"):
        assert heading in md
