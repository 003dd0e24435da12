"""`python -m trainer compare`: the measurement against a hand computation, the statistics against Python's
statistics module, and real comparisons on Fashion-MNIST (training runs, resume of a partial comparison,
bad input exiting 2)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.func import functional_call

from tests.conftest import run_cli
from trainer.config import ConfigError
from trainer.loop import measure_sharpness
from trainer.study.compare import METHODS, aggregate, markdown_table, resolve_methods

# The document that holds every comparison table (was README.md).
STUDY_GUIDE = "trainer/study/README.md"


def test_measure_sharpness_matches_a_functional_computation():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).double()
    model(torch.randn(16, 3, 8, 8, dtype=torch.float64))  # non-trivial BN running statistics
    batches = [(torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (8,))) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = 0.05
    got = measure_sharpness(model, batches, r=r)
    assert model.training, "the caller's mode is restored"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights restored exactly"

    # Independent: functional calls on explicit parameter dicts, eval-mode BN, the formula by hand.
    model.eval()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    rows = []
    for x, y in batches:
        params = {n: t.clone().requires_grad_() for n, t in theta.items()}
        value = loss(params, x, y)
        grads = torch.autograd.grad(value, list(params.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        shifted = {n: theta[n] + r * g / norm for n, g in zip(params, grads)}
        rows.append((value.item(), norm.item(), loss(shifted, x, y).item() - value.item()))
    for i, key in enumerate(("loss", "g1_norm", "sharpness")):
        assert got[key] == pytest.approx(sum(row[i] for row in rows) / 3, rel=1e-9, abs=1e-12), key
    assert got["sharpness"] > 0 and got["batches"] == 3 and got["images"] == 24


def test_aggregate_statistics_and_gain_share():
    def run(method, seed, err, t):
        return {
            "method": method,
            "seed": seed,
            "test_error": err,
            "train_loss": 0.1 * seed,
            "g1_norm": 1.0 + seed,
            "sharpness": 0.01 * err,
            "s_per_epoch": t,
        }

    runs = {
        "sgd": [run("sgd", 0, 12.0, 2.0), run("sgd", 1, 12.5, 2.2), run("sgd", 2, 13.0, 1.8)],
        "gnp": [run("gnp", 0, 9.0, 4.1), run("gnp", 1, 9.6, 3.9), run("gnp", 2, 10.2, 4.0)],
        "gnp-every4": [run("gnp-every4", 0, 9.8, 2.5), run("gnp-every4", 1, 10.1, 2.4)],
    }
    agg = aggregate(runs)
    for method, rs in runs.items():
        errs = [r["test_error"] for r in rs]
        assert agg[method]["test_error"]["mean"] == pytest.approx(statistics.mean(errs))
        assert agg[method]["test_error"]["std"] == pytest.approx(statistics.stdev(errs))  # sample std (n - 1)
        assert agg[method]["seeds"] == [r["seed"] for r in rs]
    sgd_err, gnp_err = statistics.mean([12.0, 12.5, 13.0]), statistics.mean([9.0, 9.6, 10.2])
    assert agg["gnp-every4"]["gain_vs_gnp"] == pytest.approx((sgd_err - 9.95) / (sgd_err - gnp_err))
    assert agg["gnp"]["gain_vs_gnp"] == pytest.approx(1.0) and agg["sgd"]["gain_vs_gnp"] == 0.0
    assert agg["gnp"]["time_vs_sgd"] == pytest.approx(4.0 / 2.0)
    table = markdown_table(agg, "t")
    assert table.count("\n| ") == 4 and "| gnp-every4 | 2 | 9.95 ± 0.21 |" in table
    # No share when GNP's gain is within two standard errors (here gap 0.4, se sqrt(0.25/3 + 0.36/3) = 0.45).
    noisy = aggregate(
        {"sgd": runs["sgd"], "gnp": [run("gnp", s, e + 2.5, 4.0) for s, e in enumerate([9.0, 9.6, 10.2])]}
    )
    assert "gain_vs_gnp" not in noisy["gnp"] and "gain_vs_gnp" not in noisy["sgd"]
    # No gain to share when GNP is not better than SGD.
    worse = aggregate({"sgd": runs["gnp"], "gnp": runs["sgd"]})
    assert "gain_vs_gnp" not in worse["sgd"] and "–" in markdown_table(worse, "t")
    # One seed has no measured noise: no share, however large the gap.
    single = aggregate({"sgd": runs["sgd"][:1], "gnp": runs["gnp"][:1]})
    assert "gain_vs_gnp" not in single["gnp"]


def test_resolve_methods_builtin_defined_and_errors():
    got = resolve_methods("sgd,sam,mine", ["mine:gnp.r=0.2", "mine:gnp.every=3"])
    assert got == {
        "sgd": METHODS["sgd"].overrides,
        "sam": METHODS["sam"].overrides,
        "mine": (("gnp.r", 0.2), ("gnp.every", 3)),
    }
    for names, defines, match in [
        ("sgd,nope", [], "unknown method 'nope'"),
        (",", [], "empty"),
        ("x", ["x=gnp.r=1"], "NAME:section.key=value"),
        ("a/b", ["a/b:gnp.r=1"], "folder"),
    ]:
        with pytest.raises(ConfigError, match=match):
            resolve_methods(names, defines)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_builtin_method_is_a_valid_config(name):
    from trainer import config

    cfg = config.load("fashion-mnist-demo", [f"{k}={json.dumps(v)}" for k, v in METHODS[name].overrides])
    assert cfg.gnp.r > 0  # measurement needs r even where the method never perturbs


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_compare_runs_methods_and_resumes_a_partial_comparison(fmnist_small, tmp_path):
    out = tmp_path / "cmp"
    common = [
        "--recipe",
        "debug-cpu",
        "--out",
        str(out),
        "--measure-batches",
        "2",
        "--set",
        f"data.path={fmnist_small}",
        "--set",
        "data.augment=none",
        "--set",
        "loop.epochs=2",
        "--set",
        "checkpoint.every_steps=5",
    ]
    # 1) a first, smaller comparison
    res = run_cli("compare", *common, "--methods", "sgd", "--seeds", "1", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # 2) a run interrupted after 5 steps (what a killed comparison leaves): same config, max_steps is resumable
    partial = out / "gnp" / "seed1"
    res = run_cli(
        "train",
        "--recipe",
        "debug-cpu",
        "--set",
        f"data.path={fmnist_small}",
        "--set",
        "data.augment=none",
        "--set",
        "loop.epochs=2",
        "--set",
        "checkpoint.every_steps=5",
        "--set",
        "loop.seed=1",
        "--set",
        f"run.dir={partial}",
        "--set",
        "loop.max_steps=5",
        "--set",
        "metrics.progress=lines",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # 3) the full comparison: keeps sgd/seed0, resumes gnp/seed1, trains the rest
    res = run_cli("compare", *common, "--methods", "sgd,gnp", "--seeds", "2", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    starts = {
        (m, s): [r for r in _jsonl(out / m / f"seed{s}" / "metrics.jsonl") if r["kind"] == "start"]
        for m in ("sgd", "gnp")
        for s in (0, 1)
    }
    assert len(starts["sgd", 0]) == 1, "a finished run is not trained again"
    assert [s["resumed_from_step"] for s in starts["gnp", 1]] == [None, 5], "the partial run resumed"
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and set(results["summary"]) == {"sgd", "gnp"}
    spe = 500 // 32
    for method, rs in results["runs"].items():
        assert [r["seed"] for r in rs] == [0, 1]
        for r in rs:
            assert r["steps"] == 2 * spe and r["gnp_steps"] == (2 * spe if method == "gnp" else 0)
            assert len(r["curve"]) == 2 and 0 < r["test_error"] < 100 and r["s_per_epoch"] > 0
            assert r["curve"][-1][1] == r["test_error"]
            assert math.isfinite(r["sharpness"]) and r["g1_norm"] > 0
            cfg = yaml.safe_load((out / method / f"seed{r['seed']}" / "config.yaml").read_text())
            assert cfg["gnp"]["alpha"] == (0.0 if method == "sgd" else 0.8) and cfg["loop"]["seed"] == r["seed"]
    md = (out / "results.md").read_text()
    assert "| sgd | 2 |" in md and "| gnp | 2 |" in md
    assert (out / "test_error.png").stat().st_size > 10_000
    # 4) the same folder with other common overrides is refused, one line, exit 2
    res = run_cli("compare", *common, "--methods", "sgd", "--seeds", "1", "--set", "optim.lr=0.3")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--out" in res.stderr


def test_compare_bad_input_exits_2_with_one_line(tmp_path):
    for args, match in [
        (["--methods", "sgd,bogus"], "bogus"),
        (["--seeds", "0"], "--seeds"),
        (["--set", "gnp.r=-1"], "gnp.r"),
        # CLI integers out of range: one line from argparse (no usage block), nothing written (issue 27)
        (["--nproc", "0"], "argument --nproc: invalid value 0; expected an integer in 1..1024"),
        (["--nproc", "two"], "argument --nproc: invalid value 'two'"),
        (["--seeds", "1001"], "argument --seeds: invalid value 1001; expected an integer in 1..1000"),
        (["--measure-batches", "-1"], "argument --measure-batches"),
        (["--seeds", "2", "--set", "loop.seed=4294967295"], "--seeds: 2 from loop.seed 4294967295"),
    ]:
        res = run_cli("compare", "--recipe", "debug-cpu", "--out", str(tmp_path / "c"), *args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and match in res.stderr, res.stderr
        assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "c").exists()


def test_tuned_cli_integers_are_checked_in_one_line(tmp_path):
    for args, match in [
        (["--nproc", "0"], "argument --nproc"),
        (["--select-seeds", "0"], "argument --select-seeds"),
        (["--seeds", "99999999999999999999"], "argument --seeds"),
    ]:
        res = run_cli("tuned", "--setting", "clean", "--out-root", str(tmp_path / "t"), *args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and match in res.stderr, res.stderr
        assert res.stderr.startswith("error: ") and not (tmp_path / "t").exists()


def test_sigterm_stops_the_comparison_and_its_training_run(fmnist_small, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, cli_env

    out = tmp_path / "cmp"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer",
            "compare",
            "--recipe",
            "debug-cpu",
            "--out",
            str(out),
            "--methods",
            "gnp",
            "--seeds",
            "1",
            "--set",
            f"data.path={fmnist_small}",
            "--set",
            "loop.epochs=50",
        ],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "gnp" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:  # the training child is running
        time.sleep(0.2)
    assert metrics.exists(), proc.communicate(timeout=30)
    child = int(
        subprocess.run(["pgrep", "-f", f"run.dir={out}/gnp/seed0"], capture_output=True, text=True).stdout.split()[0]
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the training child outlived the comparison")


def test_readme_tables_and_figures_match_the_result_files():
    """The comparison guide's tables (trainer/study/README.md) quote tests/data/results/<dir>/results.json: every
    method, its seed count and its test error mean ± std (2 decimals); the JSON's mean and std are those of its own
    per-seed runs; every figure and folder the guide links there exists, and every result folder is shown."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = root / "tests" / "data" / "results"
    lines = (root / STUDY_GUIDE).read_text().splitlines()
    linked = set(re.findall(r"tests/data/results/([\w./-]+)", "\n".join(lines)))
    assert linked and all((results / link).exists() for link in linked), sorted(linked)
    folders = {p.parent.name for p in results.glob("*/results.json")}
    shown = set()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("| method |"):
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        # the table's folder: named in its caption line above or its figure/caption below
        near = "\n".join(lines[max(0, start - 3) : i + 3])
        found = set(re.findall(r"tests/data/results/([\w-]+)/", near))
        assert len(found) == 1, f"{STUDY_GUIDE} line {start + 1}: a table names one result folder, not {sorted(found)}"
        (folder,) = found
        shown.add(folder)
        data = json.loads((results / folder / "results.json").read_text())
        header = [c.strip() for c in lines[start].strip("|").split("|")]
        # a selection comparison (data.holdout) evaluated on held-out training images: its table must say so
        metric = "test error %" if data.get("evaluated_on", "test") == "test" else "held-out error %"
        assert metric in header, f"{STUDY_GUIDE} line {start + 1}: {folder} is evaluated on {data.get('evaluated_on')}"
        col = header.index(metric)
        rows = {}
        for row in lines[start + 2 : i]:
            cells = [c.strip().replace("**", "") for c in row.strip("|").split("|")]
            rows[cells[0]] = (int(cells[1]), cells[col])
        assert set(rows) == set(data["summary"]), folder
        for method, (seeds, quoted) in rows.items():
            errors = [r["test_error"] for r in data["runs"][method]]
            summary = data["summary"][method]["test_error"]
            assert seeds == len(errors) == len(data["summary"][method]["seeds"]), (folder, method)
            assert summary["mean"] == pytest.approx(statistics.mean(errors), abs=1e-9), (folder, method)
            std = statistics.stdev(errors) if len(errors) > 1 else 0.0  # one seed (a selection table): no spread
            assert summary["std"] == pytest.approx(std, abs=1e-9), (folder, method)
            assert quoted == f"{summary['mean']:.2f} ± {summary['std']:.2f}", (folder, method)
    assert shown == folders


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t, by Simpson's rule on the density (independent of compare's table)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    n = 20000
    h = x / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 60, 200])
def test_t_quantile_975(df):
    from trainer.study.compare import t_quantile_975

    assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_paired_differences_by_hand():
    from trainer.study.compare import paired_differences, paired_table, t_quantile_975

    def runs(errors):
        return [{"seed": s, "test_error": e} for s, e in enumerate(errors)]

    data = {"sgd": runs([10.0, 11.0, 12.0, 13.0]), "gnp": runs([9.0, 10.2, 11.0, 12.2]), "sam": runs([10.5, 10.0])}
    got = paired_differences(data, "sgd")
    d = [-1.0, -0.8, -1.0, -0.8]
    se = statistics.stdev(d) / 2
    g = got["gnp"]
    assert g["n"] == 4 and g["seeds"] == [0, 1, 2, 3]
    assert g["mean"] == pytest.approx(statistics.mean(d)) and g["se"] == pytest.approx(se)
    assert g["t"] == pytest.approx(statistics.mean(d) / se)
    half = t_quantile_975(3) * se
    assert g["ci95"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half])
    assert g["contains_zero"] is False  # [-1.08, -0.72]: fewer errors than sgd
    s = got["sam"]  # paired on the seeds both ran (0, 1): d = +0.5, -1.0
    assert s["n"] == 2 and s["mean"] == pytest.approx(-0.25) and s["contains_zero"] is True
    table = paired_table(got, "sgd")
    assert "| gnp | 4 | -0.90 |" in table and "lower error than sgd" in table
    assert "| sam | 2 |" in table and "no difference shown (interval contains 0)" in table
    with pytest.raises(ConfigError, match="--baseline"):
        paired_differences(data, "adam")


def test_readme_uses_no_win_word_where_the_interval_contains_zero():
    """Every paired table in the comparison guide equals the one computed from its folder's per-seed results, and the
    prose next to a table says "beats"/"wins" only of a method whose interval excludes 0."""
    import re
    from pathlib import Path

    from trainer.study.compare import paired_report

    root = Path(__file__).resolve().parents[1]
    lines = (root / STUDY_GUIDE).read_text().splitlines()
    seen = 0
    for i, line in enumerate(lines):
        m = re.match(r"\| vs (\S+) \|", line)
        if not m:
            continue
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        above = "\n".join(lines[:i])  # the table's folder: the nearest one named above it
        folder = re.findall(r"tests/data/results/([\w-]+)/", above)[-1]
        expected = paired_report(str(root / "tests" / "data" / "results" / folder / "results.json"), m.group(1))
        assert "\n".join(lines[i:end]) + "\n" == expected, folder
        seen += 1
    assert seen >= 4
    # and a non-significant difference is "no difference shown", never a claim of sameness
    assert not re.search(
        r"\b(beats?|outperforms?|indistinguishable)\b",
        (root / STUDY_GUIDE).read_text() + (root / "README.md").read_text(),
        re.IGNORECASE,
    )


def test_grid_expands_into_methods():
    got = resolve_methods(
        "sgd,gnp,sam",
        ["mine:gnp.alpha=0.5"],
        ["gnp:gnp.r=0.05,0.1", "gnp:gnp.alpha=0.5,1.0", "sam:gnp.r=0.02,0.2", "mine:gnp.r=0.3"],
    )
    assert list(got) == [
        "sgd",
        "gnp-r0.05-alpha0.5",
        "gnp-r0.05-alpha1.0",
        "gnp-r0.1-alpha0.5",
        "gnp-r0.1-alpha1.0",
        "sam-r0.02",
        "sam-r0.2",
        "mine-r0.3",
    ]
    assert got["gnp-r0.1-alpha1.0"] == (("gnp.r", 0.1), ("gnp.alpha", 1.0))
    assert got["sam-r0.2"] == (("gnp.alpha", 1.0), ("gnp.r", 0.2))  # SAM's own override first
    assert got["mine-r0.3"] == (("gnp.alpha", 0.5), ("gnp.r", 0.3))
    for bad in (["gnp:gnp.r="], ["gnp:r=0.1"], ["nope:gnp.r=0.1"], ["gnp-r0.1"]):
        with pytest.raises(ConfigError, match="--grid"):
            resolve_methods("sgd", [], bad)


def test_selection_picks_the_lowest_mean_error_per_grid_and_names_the_split(tmp_path):
    from trainer.study.compare import paired_report, select_best, selection_lines

    def runs(errors):
        return [{"seed": s, "test_error": e} for s, e in enumerate(errors)]

    data = {
        "sam-r0.05": runs([20.0, 22.0]),  # mean 21.0
        "sam-r0.1": runs([19.0, 20.0]),  # mean 19.5: the lowest of its grid
        "sam-r0.2": runs([19.5]),  # one seed, 19.5: ties the mean above, listed later -> not chosen
        "gnp-r0.1-alpha0.5": runs([30.0, 30.0]),
        "gnp-r0.1-alpha0.8": runs([]),  # not run yet: not a candidate
        "gnp-r0.2-alpha0.5": runs([29.0, 31.5]),  # mean 30.25
    }
    grids = {"sam": ["sam-r0.05", "sam-r0.1", "sam-r0.2"], "gnp": [m for m in data if m.startswith("gnp")]}
    got = select_best(data, grids)
    assert got["sam"] == {"method": "sam-r0.1", "error": 19.5, "seeds": 2, "points": 3}
    assert got["gnp"] == {"method": "gnp-r0.1-alpha0.5", "error": 30.0, "seeds": 2, "points": 2}
    text = selection_lines(got, "held-out error")
    assert "lowest held-out error in grid `sam` (3 points): **sam-r0.1** (19.50 %, 2 seeds)" in text
    assert markdown_table(aggregate({"a": []}), "t", "held-out error").count("held-out error %") == 1
    # the paired table of saved results names the split they were evaluated on
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": data, "evaluated_on": "held-out training images (data.holdout=0.2)"}))
    assert "Δ held-out error (points)" in paired_report(str(path), "sam-r0.05")
    path.write_text(json.dumps({"runs": data}))  # results written before the field existed: the test split
    assert "Δ test error (points)" in paired_report(str(path), "sam-r0.05")


def test_run_hands_each_grid_family_to_compare(monkeypatch, tmp_path):
    """`compare --grid` wiring: the CLI passes each grid NAME with the method names of its points, so the
    results record one selection per grid (select_best itself is tested by hand above)."""
    import argparse

    from trainer.study import compare as cmp

    parser = argparse.ArgumentParser()
    cmp.add_arguments(parser)
    args = parser.parse_args(
        ["--recipe", "debug-cpu", "--methods", "sgd,sam,gnp", "--out", str(tmp_path / "c")]
        + ["--grid", "sam:gnp.r=0.05,0.1", "--grid", "gnp:gnp.r=0.1,0.2", "--grid", "gnp:gnp.alpha=0.5,0.8"]
    )
    seen = {}
    monkeypatch.setattr(cmp, "compare", lambda **kw: seen.update(kw))
    monkeypatch.setattr(cmp.signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    assert cmp.run(args) == 0
    assert seen["grids"] == {
        "sam": ["sam-r0.05", "sam-r0.1"],
        "gnp": ["gnp-r0.1-alpha0.5", "gnp-r0.1-alpha0.8", "gnp-r0.2-alpha0.5", "gnp-r0.2-alpha0.8"],
    }
    assert list(seen["methods"]) == ["sgd", *seen["grids"]["sam"], *seen["grids"]["gnp"]]
