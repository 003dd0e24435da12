"""The nested-grid study (trainer/study/nested.py): SAM inside the GNP grid, ranges that grow until the
selection is interior, the question written down before the final stage, and the tests it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import FMNIST, ROOT
from trainer import config
from trainer.config import ConfigError
from trainer.study import compare, nested, stats


def test_sam_is_the_alpha_one_column_of_the_same_grid():
    methods, families = nested.selection_grid((0.05, 0.1), (0.1,))
    assert families["sam"] == ["sam-r0.05-a1", "sam-r0.1-a1"]
    assert families["gnp"] == [f"gnp-r{r}-a{a}" for r in (0.05, 0.1) for a in (0.25, 0.5, 0.8)]
    assert dict(methods["sam-r0.1-a1"]) == {"gnp.norm_perturbations": True, "gnp.r": 0.1, "gnp.alpha": 1.0}
    assert dict(methods["sgd-lr0.1"]) == {"gnp.alpha": 0.0, "optim.lr": 0.1}
    # same budget: every r has every alpha, SAM included
    assert len(families["gnp"]) + len(families["sam"]) == 2 * len(nested.ALPHAS)


def test_ranges_grow_only_past_an_end():
    assert nested.extended((0.1, 0.2, 0.4), 0.1) == (0.05, 0.1, 0.2, 0.4)
    assert nested.extended((0.1, 0.2, 0.4), 0.4) == (0.1, 0.2, 0.4, 0.8)
    assert nested.extended((0.1, 0.2, 0.4), 0.2) == (0.1, 0.2, 0.4)


def _selection() -> dict:
    methods, _ = nested.selection_grid((0.05, 0.1), (0.1, 0.2))
    return {
        "methods": {k: [list(o) for o in v] for k, v in methods.items()},
        "selected": {
            "gnp": {"method": "gnp-r0.1-a0.5"},
            "sam": {"method": "sam-r0.05-a1"},
            "sgd": {"method": "sgd-lr0.2"},
        },
    }


def test_final_methods_and_the_written_question(tmp_path):
    methods = nested.final_methods(_selection(), epochs=10)
    assert list(methods) == ["gnp-r0.1-a0.5", "sam-r0.05-a1", "sgd-lr0.2", "sgd-lr0.2-2x"]
    assert dict(methods["sgd-lr0.2-2x"]) == {"gnp.alpha": 0.0, "optim.lr": 0.2, "loop.epochs": 20}
    plan = nested.preregister(tmp_path, methods)
    saved = json.loads((tmp_path / "primary.json").read_text())
    assert saved["primary"]["a"] == "gnp-r0.1-a0.5" and saved["primary"]["b"] == "sam-r0.05-a1"
    assert saved["primary"]["margin_points"] == nested.MARGIN and "written_unix" in saved
    assert nested.preregister(tmp_path, methods)["primary"] == plan["primary"]  # a rerun keeps it
    other = dict(methods)
    other = {"gnp-r0.05-a0.8": other.pop("gnp-r0.1-a0.5"), **other}
    with pytest.raises(ConfigError, match="records another question"):
        nested.preregister(tmp_path, other)


def test_analysis_is_tost_plus_holm_on_the_paired_seeds(tmp_path):
    methods = nested.final_methods(_selection(), epochs=10)
    plan = nested.preregister(tmp_path, methods)
    errors = {
        "gnp-r0.1-a0.5": [10.0, 10.2, 9.9, 10.1, 10.0],
        "sam-r0.05-a1": [10.1, 10.1, 10.0, 10.0, 10.2],
        "sgd-lr0.2": [11.0, 11.5, 10.9, 11.2, 11.1],
        "sgd-lr0.2-2x": [10.5, 10.9, 10.4, 10.8, 10.6],
    }
    final = {"runs": {m: [{"seed": s, "test_error": e} for s, e in enumerate(v)] for m, v in errors.items()}}
    a = nested.analyse(final, plan)
    d = [x - y for x, y in zip(errors["gnp-r0.1-a0.5"], errors["sam-r0.05-a1"])]
    assert a["primary"]["p"] == pytest.approx(stats.tost(d, nested.MARGIN)["p"]) and a["primary"]["equivalent"]
    raw = {k: t["p"] for k, t in a["secondary"].items()}
    assert len(raw) == 5 and {k: t["p_holm"] for k, t in a["secondary"].items()} == stats.holm(raw)
    text = nested.report(a)
    assert "equivalent within ±0.3 points" in text and "indistinguishable" not in text


@pytest.mark.slow
def test_nested_runs_selection_question_and_final_on_real_data(tmp_path, monkeypatch, capsys):
    """Both stages end to end on 500 real training images, a 2 x 2 grid and a 2-point SGD grid, 1 epoch."""
    tiny = nested.Setting(
        "debug-cpu",
        ("data.loader=memory", f"data.path=fashion-mnist:{FMNIST}", "data.limit=500", "data.augment=none",
         "loop.epochs=1"),
    )  # fmt: skip
    monkeypatch.setattr(nested, "SETTINGS", {"tiny": tiny})
    monkeypatch.setattr(nested, "R_START", {"tiny": (0.05, 0.1)})
    monkeypatch.setattr(nested, "ALPHAS", (0.5, 1.0))
    monkeypatch.setattr(nested, "LR_FACTORS", (1.0, 2.0))
    monkeypatch.setattr(nested, "MAX_EXTENSIONS", 0)
    monkeypatch.setattr(nested.signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    parser = argparse.ArgumentParser()
    nested.add_arguments(parser)
    args = parser.parse_args(["--setting", "tiny", "--seeds", "2", "--select-seeds", "1", "--out-root", str(tmp_path)])
    assert nested.run(args) == 0, capsys.readouterr().err[-3000:]
    sel = json.loads((tmp_path / "nested-select-tiny" / "results.json").read_text())
    assert sel["evaluated_on"].startswith("held-out") and len(sel["runs"]) == 6
    best_sam = min(("sam-r0.05-a1", "sam-r0.1-a1"), key=lambda m: sel["runs"][m][0]["test_error"])
    assert sel["selected"]["sam"]["method"] == best_sam and set(sel["at_edge"]) == {"gnp", "sam", "sgd"}
    final = json.loads((tmp_path / "nested-tiny" / "results.json").read_text())
    assert final["evaluated_on"] == "test" and final["seeds"] == [0, 1]
    sgd = sel["selected"]["sgd"]["method"]
    assert list(final["methods"]) == [sel["selected"]["gnp"]["method"], best_sam, sgd, f"{sgd}-2x"]
    cfg = yaml.safe_load((tmp_path / "nested-tiny" / f"{sgd}-2x" / "seed1" / "config.yaml").read_text())
    assert cfg["loop"]["epochs"] == 2 and cfg["gnp"]["alpha"] == 0 and cfg["data"]["holdout"] == 0
    analysis = json.loads((tmp_path / "nested-tiny" / "analysis.json").read_text())
    assert analysis["primary"]["b"] == best_sam and len(analysis["secondary"]) == 5
    assert (tmp_path / "nested-tiny" / "analysis.md").read_text().startswith("Primary (written down")
    assert (tmp_path / "nested-select-tiny" / "selection.png").is_file()


def _run(root: Path, stage: str, method: str, seed: int, done: bool) -> Path:
    """A run folder as `compare` leaves it: config, metrics (a `done` record once finished), measurements and
    checkpoints (which are not kept)."""
    run = root / stage / method / f"seed{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_8.pt").write_bytes(b"\0" * 1000)
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    records = [{"kind": "train", "step": 8}] + ([{"kind": "done", "epochs": 2, "steps": 8}] if done else [])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (run / "measure.json").write_text("{}")
    return run


def test_finished_runs_are_kept_and_resumed_without_checkpoints(tmp_path):
    """--keep-to copies what `compare` needs of each finished run (not its checkpoints, not unfinished runs) and
    the written-down question; --resume-from copies them back, so they are not trained again, and never
    replaces a run finished where it is copied to."""
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    _run(runs, "nested-select-clean", "sam-r0.1-a1", 0, done=True)
    _run(runs, "nested-select-clean", "sam-r0.1-a1", 1, done=False)  # interrupted: resumes from its checkpoint
    _run(runs, "nested-clean", "sgd-lr0.1", 0, done=True)
    _run(runs, "nested-select-noisy", "sgd-lr0.1", 0, done=True)  # another setting: not this one's
    (runs / "nested-clean" / "primary.json").write_text('{"primary": {}}')
    assert nested.copy_finished(runs, kept, "clean") == 2
    files = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert files == [
        "nested-clean/primary.json",
        *(f"nested-clean/sgd-lr0.1/seed0/{f}" for f in ("config.yaml", "measure.json", "metrics.jsonl")),
        *(f"nested-select-clean/sam-r0.1-a1/seed0/{f}" for f in ("config.yaml", "measure.json", "metrics.jsonl")),
    ]
    assert nested.copy_finished(runs, kept, "clean") == 0  # already kept
    # a fresh machine: the kept runs come back as finished runs that `compare` skips
    fresh = tmp_path / "fresh"
    assert nested.copy_finished(kept, fresh, "clean") == 2
    assert compare.is_done(fresh / "nested-select-clean" / "sam-r0.1-a1" / "seed0", 2)
    assert (fresh / "nested-clean" / "primary.json").read_text() == '{"primary": {}}'
    # a run finished here is never replaced by a kept copy
    (runs / "nested-clean" / "sgd-lr0.1" / "seed0" / "measure.json").write_text('{"here": 1}')
    assert nested.copy_finished(kept, runs, "clean") == 0
    assert (runs / "nested-clean" / "sgd-lr0.1" / "seed0" / "measure.json").read_text() == '{"here": 1}'


def test_keep_to_also_keeps_the_reports_and_replaces_older_ones(tmp_path):
    """The stage reports (results, figures, analysis) go with the kept runs, each newer copy replacing the older,
    and are never copied back: the study rewrites them from the runs."""
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    _run(runs, "nested-clean", "sgd-lr0.1", 0, done=True)
    (runs / "nested-clean" / "results.json").write_text('{"partial": true}')
    (runs / "nested-clean" / "analysis.md").write_text("Primary ...")
    assert nested.copy_finished(runs, kept, "clean") == 1
    assert not (kept / "nested-clean" / "results.json").exists()  # only --keep-to takes the reports
    nested.copy_finished(runs, kept, "clean", reports=True)
    assert (kept / "nested-clean" / "results.json").read_text() == '{"partial": true}'
    (runs / "nested-clean" / "results.json").write_text('{"partial": false}')
    nested.copy_finished(runs, kept, "clean", reports=True)
    assert (kept / "nested-clean" / "results.json").read_text() == '{"partial": false}'
    assert (kept / "nested-clean" / "analysis.md").read_text() == "Primary ..."
    fresh = tmp_path / "fresh"
    nested.copy_finished(kept, fresh, "clean")
    assert sorted(p.name for p in (fresh / "nested-clean").iterdir()) == ["sgd-lr0.1"]


def test_selection_figure_shows_each_alpha_and_sgd_with_mean_and_se(tmp_path):
    methods, families = nested.selection_grid((0.05, 0.1), (0.1, 0.2))
    errors = {m: [10.0 + i, 10.5 + i, 11.5 + i] for i, m in enumerate(methods)}
    selection = {
        "methods": {k: [list(o) for o in v] for k, v in methods.items()},
        "runs": {m: [{"seed": s, "test_error": e} for s, e in enumerate(v)] for m, v in errors.items()},
    }
    selection["summary"] = {m: {"test_error": {"mean": sum(v) / 3}} for m, v in errors.items()}
    selection["selected"] = compare.select_best(selection["runs"], families)
    curves = nested.grid_means(selection)
    assert sorted(curves) == ["alpha=0.25", "alpha=0.5", "alpha=0.8", "alpha=1", "sgd"]
    # sample SD of (0, 0.5, 1.5) + c is 0.7638; SE = SD / sqrt(3)
    i = list(methods).index("gnp-r0.1-a0.8")
    assert curves["alpha=0.8"][1] == (0.1, pytest.approx(i + 32 / 3), pytest.approx(0.763763 / 3**0.5, abs=1e-6), 3)
    assert [x for x, *_ in curves["sgd"]] == [0.1, 0.2] and [x for x, *_ in curves["alpha=1"]] == [0.05, 0.1]
    nested.plot_selection(selection, tmp_path / "selection.png", "test")
    assert (tmp_path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


RESULTS = ROOT / "tests" / "data" / "results"
STUDY_GUIDE = ROOT / "trainer" / "study" / "README.md"


def _start_unix(run: Path) -> float:
    """A lower bound of when a kept run's training began, from its metrics alone (they survive --keep-to and
    --resume-from, unlike file times): a checkpoint record reports the wall-clock time of an upload that finished
    before the record was written at `time` seconds of the run's clock, so the clock started no earlier than
    last_success_unix - time (exact to milliseconds for the final, synchronous checkpoint). Only the first start's
    records count: a resumed run's clock restarts."""
    bounds = []
    for n, line in enumerate((run / "metrics.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        if rec.get("kind") == "start" and n > 0:
            break
        if rec.get("kind") == "checkpoint" and rec.get("last_success_unix", 0) > 0:
            bounds.append(rec["last_success_unix"] - rec["time"])
    assert bounds, f"{run}: no finished checkpoint upload before the first restart"
    return max(bounds)


def _check_runs_are_the_kept_runs(stage: Path, data: dict) -> None:
    """Every method ran every seed, and each quoted error is its kept run's own final evaluation."""
    for method, runs in data["runs"].items():
        assert [r["seed"] for r in runs] == data["seeds"], (stage.name, method)
        for r in runs:
            metrics = (stage / method / f"seed{r['seed']}" / "metrics.jsonl").read_text().splitlines()
            done = [json.loads(x) for x in metrics if '"kind": "done"' in x]
            assert r["test_error"] == pytest.approx(100 * (1 - done[-1]["top1"]), abs=1e-6), (stage.name, method)


@pytest.mark.parametrize("setting", sorted(nested.SETTINGS))
def test_committed_nested_results_are_what_the_command_runs(setting, tmp_path):
    """tests/data/results/nested-select-<setting>/ and nested-<setting>/ (what `make keep-nested` keeps) are the
    study's own output, recomputed here from the kept per-seed runs: the grid, the selection, the question written
    down before any final run started, the final methods, the TOST and Holm tests, and the study guide quotes them."""
    s = nested.SETTINGS[setting]
    sel = json.loads((RESULTS / f"nested-select-{setting}" / "results.json").read_text())
    assert (sel["recipe"], sel["sets"]) == (s.recipe, [*s.sets, f"data.holdout={nested.HOLDOUT}"])
    assert sel["evaluated_on"].startswith("held-out") and sel["ranges"]["alpha"] == list(nested.ALPHAS)
    assert set(nested.R_START[setting]) <= set(sel["ranges"]["r"])
    methods, families = nested.selection_grid(sel["ranges"]["r"], sel["ranges"]["lr"])
    assert sel["methods"] == {k: [list(o) for o in v] for k, v in methods.items()}
    _check_runs_are_the_kept_runs(RESULTS / f"nested-select-{setting}", sel)
    chosen = compare.select_best(sel["runs"], families)
    assert {f: c["method"] for f, c in chosen.items()} == {f: c["method"] for f, c in sel["selected"].items()}
    for family, key, values in (("gnp", "gnp.r", sel["ranges"]["r"]), ("sam", "gnp.r", sel["ranges"]["r"]),
                                ("sgd", "optim.lr", sel["ranges"]["lr"])):  # fmt: skip
        value = dict(methods[chosen[family]["method"]])[key]
        assert sel["at_edge"][family] == (value in (min(values), max(values))), family
    assert not any(sel["at_edge"].values()), "the study guide says every selected point is interior"
    final_dir = RESULTS / f"nested-{setting}"
    final = json.loads((final_dir / "results.json").read_text())
    assert (final["recipe"], final["sets"], final["evaluated_on"]) == (s.recipe, list(s.sets), "test")
    epochs = config.load(s.recipe, list(s.sets)).loop.epochs
    final_methods = nested.final_methods(sel, epochs)
    assert final["methods"] == {k: [list(o) for o in v] for k, v in final_methods.items()}
    assert len(final["seeds"]) >= 5
    _check_runs_are_the_kept_runs(final_dir, final)
    plan = json.loads((final_dir / "primary.json").read_text())
    assert (plan["primary"]["a"], plan["primary"]["b"]) == (sel["selected"]["gnp"]["method"],
                                                            sel["selected"]["sam"]["method"])  # fmt: skip
    expected = nested.preregister(tmp_path, final_methods)  # the whole question: margin, level, the Holm family
    assert {k: plan[k] for k in ("primary", "secondary")} == {k: expected[k] for k in ("primary", "secondary")}
    started = min(_start_unix(final_dir / m / f"seed{seed}") for m in final["methods"] for seed in final["seeds"])
    assert plan["written_unix"] < started, "the question must be written down before the final stage starts"
    analysis = nested.analyse(final, plan)
    kept = json.loads((final_dir / "analysis.json").read_text())
    assert kept["primary"]["p"] == pytest.approx(analysis["primary"]["p"], abs=1e-12)
    assert {k: t["p_holm"] for k, t in kept["secondary"].items()} == pytest.approx(
        {k: t["p_holm"] for k, t in analysis["secondary"].items()}, abs=1e-12
    )
    text = nested.report(analysis)
    assert (final_dir / "analysis.md").read_text() == text
    guide = " ".join(STUDY_GUIDE.read_text().split())  # the guide may wrap the long primary line
    for line in text.splitlines():
        assert " ".join(line.split()) in guide, f"{STUDY_GUIDE}: quote the analysis of nested-{setting}: {line!r}"
