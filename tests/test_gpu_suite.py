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

from trainer.bench import gpu_checks
from trainer.bench.gpu_suite import Part, execute

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
    start = gpu_checks._initial()
    one = gpu_checks.run_steps(cpu, torch.float32, (True,))
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
    log = tmp_path / "suite.log"
    # 15 s of every budget are kept for the report: 5 s for the parts here.
    start = time.monotonic()
    parts = [Part("sleep", [sleeper], 1), Part("later", [quick], 1)]
    execute(parts, budget_s=20, only={"sleep", "later"}, log_path=log)
    assert time.monotonic() - start < 30  # the sleeper was stopped at the deadline, not after 120 s
    assert parts[0].status == "timeout" and parts[0].note.startswith("stopped at the budget")
    assert parts[1].status == "skipped" and parts[1].note.startswith("budget")
    # A part of rounds stopped in round 2 keeps round 1's result; a part not asked for is skipped.
    parts = [Part("rounds", [quick, sleeper], 1), Part("unwanted", [quick], 1)]
    execute(parts, budget_s=20, only={"rounds"}, log_path=log)
    assert parts[0].status == "ok" and "1 of 2 rounds complete" in parts[0].note
    assert (parts[1].status, parts[1].note) == ("skipped", "not in --parts")
    assert "done" in log.read_text()


def test_a_check_that_crashes_is_a_failed_row_and_the_rest_still_run(monkeypatch) -> None:
    real = gpu_checks.run_steps

    def broken_bf16(*args, **kwargs):
        if kwargs.get("precision") == "bf16":
            raise RuntimeError("no bf16 kernel\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_checks, "run_steps", broken_bf16)
    rows = gpu_checks.checks(torch.device("cpu"))
    assert [r["ok"] for r in rows] == [True, True, True, False, False, True, True, True]
    assert rows[3]["error"] == "RuntimeError: no bf16 kernel" and rows[3]["check"].startswith("bf16")
    assert rows[2]["check"].startswith("loader normalization") and rows[2]["value"] == 0.0


def test_a_crashing_fp64_check_is_a_failed_row_too(monkeypatch) -> None:
    real = gpu_checks.run_steps

    def broken_fp64(device, dtype, pattern, **kwargs):
        if dtype == torch.float64 and kwargs.get("reuse", "none") == "none":
            raise RuntimeError("device lost")
        return real(device, dtype, pattern, **kwargs)

    monkeypatch.setattr(gpu_checks, "run_steps", broken_fp64)
    rows = gpu_checks.checks(torch.device("cpu"))
    assert [r["ok"] for r in rows] == [False, True, True, True, True, True, True, True]
    assert rows[0]["error"] == "RuntimeError: device lost" and rows[0]["check"].startswith("fp64 GNP steps")


def test_normalization_check_sees_one_ulp_and_a_wrong_layout(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert gpu_checks.normalization_diff(cpu) == 0.0
    real = gpu_checks.Normalizer
    made: list[int] = []

    def second_differs(mean, std, *, device, channels_last):
        made.append(1)
        norm = real(mean, std, device=device, channels_last=channels_last)
        if len(made) % 2 == 1:  # the CPU reference
            return norm
        return lambda images: torch.nextafter(norm(images), torch.tensor(float("inf")))  # one ulp up

    monkeypatch.setattr(gpu_checks, "Normalizer", second_differs)
    assert 0.0 < gpu_checks.normalization_diff(cpu) < 1e-5

    def second_nchw(mean, std, *, device, channels_last):
        made.append(1)
        return real(mean, std, device=device, channels_last=len(made) % 2 == 1)

    made.clear()
    monkeypatch.setattr(gpu_checks, "Normalizer", second_nchw)
    assert gpu_checks.normalization_diff(cpu) == float("inf")


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (
        ["--parts", "gnp-eager,nope"],
        ["--budget", "10"],
        ["--seeds", "0"],
        ["--compare-recipe", "no-such-recipe"],
        ["--compare-set", "loop.epochs=-1"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "trainer.bench.gpu_suite", "--out", str(tmp_path), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "gpu-suite:" in res.stderr
    for module in ("trainer.bench.gnp", "trainer.bench.e2e"):
        res = subprocess.run(
            [sys.executable, "-m", module, "--modes", "fast"], cwd=ROOT, capture_output=True, text=True
        )
        assert res.returncode == 2 and "--modes" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_smoke_suite_writes_the_full_report(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.bench.gpu_suite",
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(work),
            "--methods",
            "sgd,gnp-reuse4",
            "--seeds",
            "1",
            "--budget",
            "400",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["suite.json", "suite.log", "suite.md", "test_error.png"]
    report = json.loads((out / "suite.json").read_text())
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {
        "checks": "ok",
        "gnp-eager": "ok",
        "e2e-eager": "ok",
        "gnp-compile": "skipped",
        "e2e-compile": "skipped",
        "compare": "ok",
    }
    assert [c["ok"] for c in report["checks"]] == [True] * 8
    (step,) = report["step"]
    assert step["model"] == "small_cnn" and step["every4_x_sgd"] == pytest.approx(
        (3 * step["sgd_ms"] + step["gnp_ms"]) / 4 / step["sgd_ms"]
    )
    assert {(r["method"], r["mode"]) for r in report["e2e"]} == {("SGD", "eager"), ("GNP", "eager")}
    assert set(report["compare"]) == {"sgd", "gnp-reuse4"}
    md = (out / "suite.md").read_text()
    for heading in ("Correctness on the device", "Step time on synthetic data", "end to end", "Method comparison"):
        assert heading in md
