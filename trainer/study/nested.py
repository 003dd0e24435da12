"""Nested-grid study: `python -m trainer nested --setting clean|noisy` — does an interior alpha beat alpha = 1?

The paper's claim is that GNP with an interior alpha (between the plain gradient and SAM) generalizes better
than alpha = 1, which is SAM. This study asks exactly that, with SAM inside the same grid and the same budget:

1. **Selection** on held-out training images (`data.holdout`, the test split is never read), `--select-seeds`
   seeds per point (3): one grid r x alpha, alpha in ALPHAS (alpha = 1 is SAM), in the recipes' normalised mix;
   SGD over its learning rate (the recipe's times LR_FACTORS). Each family's point is the lowest MEAN held-out
   error over the seeds (`compare.select_best`). The r and lr ranges grow while a family's best point sits at
   an end of its range (one more value beyond it per round, at most MAX_EXTENSIONS rounds), so the selected
   points are interior or the report says they are not.
2. **The question, written down before the final stage** (OUT/nested-<setting>/primary.json): the best alpha < 1
   against the best alpha = 1, an equivalence test with a MARGIN-point margin (two one-sided tests on the paired
   per-seed test-error differences); every other comparison (each against the tuned SGD and against SGD with
   twice the epochs — the same number of gradient evaluations as a two-pass method — and the superiority
   reading of the primary pair) is a paired t test with Holm's correction.
3. **Final**, on the test set, `--seeds` seeds (5), paired by seed: the two selected points, the tuned SGD and
   the compute-matched SGD -> OUT/nested-<setting>/results.json, plus analysis.json / analysis.md.

Every stage resumes like `compare` (run the same command again); the CPU hours may be spread over days and
machines: `--keep-to DIR` copies each finished run's small files (config.yaml, metrics.jsonl, measure.json; no
checkpoints) and the written-down question into DIR/nested-select-<setting>/ and DIR/nested-<setting>/, and
`--resume-from DIR` copies them back before the study runs, so a run finished anywhere is never trained again
(`make keep-nested` and `make compare-nested-cpu` do both with tests/data/results).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from trainer import config
from trainer.config import ConfigError
from trainer.study import compare as cmp
from trainer.study import stats
from trainer.study.tuned import SETTINGS, Setting

ALPHAS = (0.25, 0.5, 0.8, 1.0)
# Start of the r range per setting: the earlier tuned study selected r at the low end on clean data and at
# the high end under label noise, so each range is centred where that search ended.
R_START = {"clean": (0.0125, 0.025, 0.05, 0.1, 0.2), "noisy": (0.1, 0.2, 0.4, 0.8, 1.6)}
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MAX_EXTENSIONS = 3
HOLDOUT = 0.2
MARGIN = 0.3  # percentage points of test error: about the paper's reported SAM -> GNP gain
TEST_ALPHA = 0.05
FAMILIES = ("gnp", "sam", "sgd")


def _point(r: float, alpha: float) -> tuple[str, tuple[tuple[str, object], ...]]:
    family = "sam" if alpha == 1.0 else "gnp"
    return f"{family}-r{r:g}-a{alpha:g}", (("gnp.norm_perturbations", True), ("gnp.r", r), ("gnp.alpha", alpha))


def _sgd(lr: float) -> tuple[str, tuple[tuple[str, object], ...]]:
    return f"sgd-lr{lr:g}", (("gnp.alpha", 0.0), ("optim.lr", lr))


def selection_grid(rs, lrs) -> tuple[dict, dict[str, list[str]]]:
    """The selection's methods (name -> overrides) and families (gnp: alpha < 1, sam: alpha = 1, sgd)."""
    methods: dict[str, tuple] = {}
    families: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for r in rs:
        for alpha in ALPHAS:
            name, over = _point(r, alpha)
            methods[name] = over
            families["sam" if alpha == 1.0 else "gnp"].append(name)
    for lr in lrs:
        name, over = _sgd(lr)
        methods[name] = over
        families["sgd"].append(name)
    return methods, families


def extended(values: tuple[float, ...], best: float, factor: float = 2.0) -> tuple[float, ...]:
    """`values` with one more value beyond `best` when it sits at an end (geometric steps), else unchanged."""
    if best == min(values):
        return (min(values) / factor, *values)
    if best == max(values):
        return (*values, max(values) * factor)
    return values


def _value(methods: dict, name: str, key: str) -> float:
    return dict(methods[name])[key]


def select(setting: Setting, name: str, args, log) -> dict:
    """Run the selection, growing the r and lr ranges while a family's best point is at an end."""
    rs = R_START[name] if name in R_START else R_START["clean"]
    lrs = tuple(round(config.load(setting.recipe, list(setting.sets)).optim.lr * f, 10) for f in LR_FACTORS)
    out = Path(args.out_root) / f"nested-select-{name}"
    for round_ in range(MAX_EXTENSIONS + 1):
        methods, families = selection_grid(rs, lrs)
        results = cmp.compare(
            recipe=setting.recipe,
            methods=methods,
            seeds=args.select_seeds,
            out=out,
            sets=[*setting.sets, f"data.holdout={HOLDOUT}"],
            nproc=args.nproc,
            baseline=families["sam"][0],
            grids=families,
            log=log,
        )
        chosen = results["selected"]
        new_rs = rs
        for family in ("gnp", "sam"):
            new_rs = extended(new_rs, _value(methods, chosen[family]["method"], "gnp.r"))
        new_lrs = extended(lrs, _value(methods, chosen["sgd"]["method"], "optim.lr"))
        if (new_rs, new_lrs) == (rs, lrs) or round_ == MAX_EXTENSIONS:
            break  # interior, or out of rounds: `at_edge` below says which
        log(f"selection round {round_ + 1}: a best point sits at an end of its range; r {new_rs}, lr {new_lrs}")
        rs, lrs = new_rs, new_lrs
    results["ranges"] = {"r": list(rs), "lr": list(lrs), "alpha": list(ALPHAS)}
    results["at_edge"] = {
        f: (_value(methods, chosen[f]["method"], key) in (min(vals), max(vals)))
        for f, key, vals in (("gnp", "gnp.r", rs), ("sam", "gnp.r", rs), ("sgd", "optim.lr", lrs))
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_selection(results, out / "selection.png", f"{name} setting")
    return results


def grid_means(selection: dict) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per curve of the selection figure ("alpha=A" for each alpha, "sgd"): (r or lr, mean held-out error,
    its standard error over the seeds, seeds), in increasing r or lr."""
    curves: dict[str, list[tuple[float, float, float, int]]] = {}
    for method, over in selection["methods"].items():
        runs = selection["runs"].get(method) or []
        if not runs:
            continue
        over = dict(tuple(o) for o in over)
        errors = [float(r["test_error"]) for r in runs]
        mean = statistics.fmean(errors)
        se = statistics.stdev(errors) / math.sqrt(len(errors)) if len(errors) > 1 else 0.0
        if over.get("gnp.alpha") == 0.0:
            key, x = "sgd", over["optim.lr"]
        else:
            key, x = f"alpha={over['gnp.alpha']:g}", over["gnp.r"]
        curves.setdefault(key, []).append((float(x), mean, se, len(errors)))
    return {k: sorted(v) for k, v in curves.items()}


def plot_selection(selection: dict, path: Path, title: str) -> None:
    """The selection grid at a glance: held-out error against r, one line per alpha (alpha = 1 is SAM), and
    against SGD's learning rate; mean +- 1 standard error over the seeds, the selected points circled."""
    from matplotlib.figure import Figure

    curves = grid_means(selection)
    chosen = {selection["selected"][f]["method"] for f in FAMILIES if f in selection["selected"]}
    fig = Figure(figsize=(13, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (key, points) in enumerate(curves.items()):
        ax = axes[1] if key == "sgd" else axes[0]
        xs, means, ses, _ = zip(*points)
        label = "alpha=1 (SAM)" if key == "alpha=1" else key
        ax.errorbar(xs, means, yerr=ses, color=f"C{i % 10}", marker="o", ms=4, capsize=3, label=label)
    for method in chosen:
        over = dict(tuple(o) for o in selection["methods"][method])
        ax, x = (axes[1], over["optim.lr"]) if over.get("gnp.alpha") == 0.0 else (axes[0], over["gnp.r"])
        ax.plot([x], [selection["summary"][method]["test_error"]["mean"]], "o", ms=14, mfc="none", mec="black")
    axes[0].set_xlabel("r (perturbation radius)")
    axes[1].set_xlabel("SGD learning rate")
    for ax, keys in ((axes[0], [k for k in curves if k != "sgd"]), (axes[1], ["sgd"])):
        ticks = sorted({x for k in keys for x, *_ in curves.get(k, [])})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])  # the grid's own values, not powers of ten
        ax.minorticks_off()
        ax.set_ylabel("held-out error, top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"nested selection, {title}: mean ± 1 SE over seeds; circles: the selected points", fontsize=11)
    fig.savefig(path, dpi=100)


KEPT_FILES = ("config.yaml", "metrics.jsonl", "measure.json")  # what `compare` reads of a finished run
KEPT_STAGE_FILES = ("primary.json",)  # the question, written down before the final stage
# What each stage reports; kept (--keep-to always replaces them) but never copied back: the study rewrites them.
REPORT_FILES = ("results.json", "results.md", "test_error.png", "selection.png", "analysis.json", "analysis.md")


def _finished(run: Path) -> bool:
    return (run / "measure.json").is_file() and any(r.get("kind") == "done" for r in cmp._records(run))


def copy_finished(src_root: Path, dst_root: Path, setting: str, reports: bool = False) -> int:
    """Copy each finished run of `setting`'s two stages (KEPT_FILES) from src_root to dst_root where dst_root has
    no finished run of that method and seed, and the stage files dst_root lacks; with `reports` (--keep-to) also
    each stage's REPORT_FILES that src_root has, replacing older ones. How many runs were copied."""
    copied = 0
    for stage in (f"nested-select-{setting}", f"nested-{setting}"):
        src, dst = src_root / stage, dst_root / stage
        for run in sorted(p.parent for p in src.glob("*/seed*/metrics.jsonl")):
            target = dst / run.relative_to(src)
            if not _finished(run) or _finished(target):
                continue
            target.mkdir(parents=True, exist_ok=True)
            for name in KEPT_FILES:
                shutil.copy2(run / name, target / name)
            copied += 1
        for name in KEPT_STAGE_FILES:
            if (src / name).is_file() and not (dst / name).is_file():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / name, dst / name)
        for name in REPORT_FILES if reports else ():
            if (src / name).is_file():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / name, dst / name)
    return copied


def final_methods(selection: dict, epochs: int) -> dict[str, tuple]:
    """The final stage's four methods from the selection: best alpha < 1, best alpha = 1, tuned SGD, and tuned
    SGD over twice the epochs (as many gradient evaluations as a two-pass method)."""
    methods = {k: tuple(tuple(o) for o in v) for k, v in selection["methods"].items()}
    chosen = {f: selection["selected"][f]["method"] for f in FAMILIES}
    sgd = chosen["sgd"]
    return {
        chosen["gnp"]: methods[chosen["gnp"]],
        chosen["sam"]: methods[chosen["sam"]],
        sgd: methods[sgd],
        f"{sgd}-2x": methods[sgd] + (("loop.epochs", 2 * epochs),),
    }


def preregister(out: Path, methods: dict) -> dict:
    """Write the primary question before the final stage runs; refuse a folder that recorded another one."""
    gnp, sam, sgd, sgd2 = list(methods)
    plan = {
        "primary": {
            "question": "is the best alpha < 1 equivalent to the best alpha = 1 (SAM) within the margin?",
            "a": gnp,
            "b": sam,
            "test": "two one-sided paired t tests (TOST) on test error a - b over seeds",
            "margin_points": MARGIN,
            "alpha": TEST_ALPHA,
        },
        "secondary": {
            "test": "two-sided paired t tests, Holm-corrected as one family",
            "pairs": [[gnp, sam], [gnp, sgd], [gnp, sgd2], [sam, sgd], [sam, sgd2]],
        },
    }
    path = out / "primary.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved[k] for k in plan} != plan:
            raise ConfigError(f"{path}: records another question ({saved['primary']['a']} vs "
                              f"{saved['primary']['b']}); the selection changed — use another --out-root")  # fmt: skip
        return saved
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**plan, "written_unix": time.time()}, indent=1))
    return plan


def analyse(final: dict, plan: dict) -> dict:
    """The primary TOST and the Holm-corrected secondary tests on the paired per-seed test errors."""

    def diffs(a: str, b: str) -> list[float]:
        eb = {r["seed"]: r["test_error"] for r in final["runs"][b]}
        return [r["test_error"] - eb[r["seed"]] for r in final["runs"][a] if r["seed"] in eb]

    p = plan["primary"]
    primary = stats.tost(diffs(p["a"], p["b"]), p["margin_points"], p["alpha"])
    tests = {f"{a} vs {b}": stats.paired_t(diffs(a, b)) for a, b in plan["secondary"]["pairs"]}
    adjusted = stats.holm({k: t["p"] for k, t in tests.items()})
    for k, t in tests.items():
        t["p_holm"] = adjusted[k]
    return {"primary": {**p, **primary}, "secondary": tests}


def reading(primary: dict) -> str:
    lo, hi = primary["ci"]
    if primary["equivalent"]:
        return (f"equivalent within ±{primary['margin_points']} points: the {primary['ci_level']:.0%} interval "
                f"[{lo:+.2f}, {hi:+.2f}] lies inside the margin (TOST p = {primary['p']:.3f})")  # fmt: skip
    if lo > 0 or hi < 0:
        better = primary["b"] if lo > 0 else primary["a"]
        return (f"not equivalent; {better} has the lower error in the {primary['ci_level']:.0%} interval "
                f"[{lo:+.2f}, {hi:+.2f}], which excludes 0 (the Holm-corrected test below is the claim)")  # fmt: skip
    return (f"no difference shown and equivalence not shown: the {primary['ci_level']:.0%} interval "
            f"[{lo:+.2f}, {hi:+.2f}] reaches outside the ±{primary['margin_points']}-point margin "
            f"(TOST p = {primary['p']:.3f})")  # fmt: skip


def report(analysis: dict) -> str:
    p = analysis["primary"]
    lines = [
        f"Primary (written down before the final stage): {p['a']} − {p['b']}, mean {p['mean']:+.2f} points "
        f"(SE {p['se']:.2f}, {p['df'] + 1} seeds): {reading(p)}.",
        "",
        "| comparison | Δ test error (points) | SE | t | p | p (Holm) | reading |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in analysis["secondary"].items():
        shown = "difference shown" if t["p_holm"] < TEST_ALPHA else "no difference shown"
        lines.append(f"| {name} | {t['mean']:+.2f} | {t['se']:.2f} | {t['t']:+.2f} | {t['p']:.3f} | "
                     f"{t['p_holm']:.3f} | {shown} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", required=True, choices=sorted(SETTINGS), help="which CPU setting to study")
    p.add_argument("--seeds", type=_at_least(2), default=5, help="seeds per method in the final stage (default 5)")
    p.add_argument("--select-seeds", type=_at_least(1), default=3, help="seeds per selection point (default 3)")
    p.add_argument("--out-root", default="runs", help="parent of nested-select-<setting>/ and nested-<setting>/")
    p.add_argument("--nproc", type=_at_least(1), default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--resume-from", default="", metavar="DIR", help="first copy finished runs kept in DIR (--keep-to)")
    p.add_argument("--keep-to", default="", metavar="DIR", help="copy finished runs' small files to DIR, then stop")


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}; expected an integer >= {low}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, cmp.stop_on_sigterm)
    setting = SETTINGS[args.setting]

    def log(m: str) -> None:
        print(m, flush=True)

    if args.keep_to:
        kept = copy_finished(Path(args.out_root), Path(args.keep_to), args.setting, reports=True)
        log(f"kept {kept} finished runs in {args.keep_to}")
        return 0
    if args.resume_from:
        copied = copy_finished(Path(args.resume_from), Path(args.out_root), args.setting)
        log(f"resumed {copied} finished runs from {args.resume_from}")
    try:
        selection = select(setting, args.setting, args, log)
        epochs = config.load(setting.recipe, list(setting.sets)).loop.epochs
        methods = final_methods(selection, epochs)
        out = Path(args.out_root) / f"nested-{args.setting}"
        plan = preregister(out, methods)
        final = cmp.compare(
            recipe=setting.recipe,
            methods=methods,
            seeds=args.seeds,
            out=out,
            sets=list(setting.sets),
            nproc=args.nproc,
            baseline=list(methods)[1],
            log=log,
        )
    except cmp.TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code if 0 < e.code < 256 else 1
    analysis = analyse(final, plan)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=1))
    text = report(analysis)
    (out / "analysis.md").write_text(text)
    log(text)
    return 0
