"""Compare methods over seeds on one recipe: `python -m trainer compare --recipe R --methods sgd,sam,gnp --seeds 3`.

Every method x seed is a separate training run of the same recipe with an identical budget (same epochs,
batch size, LR schedule, data order and initialization for a given seed: seeds pair the methods), launched
one after another as `python -m trainer train` (or under torchrun with --nproc > 1) into
OUT/<method>/seed<k>/. After training, each run's final weights are measured the same way
(`trainer.loop.measure_sharpness`: train loss, ||g1|| and sharpness at the recipe's r on the same training
batches, so plain SGD gets the numbers too). Then OUT/results.json, OUT/results.md and OUT/test_error.png
(test error against epoch and against training time, mean line and a +-1 std band per method).

Resuming: run the same command again. Finished runs (a `done` record and measure.json) are kept; an
interrupted run resumes from its latest checkpoint (the trainer's own resume); new methods or seeds are
added. The comparison's recipe and overrides are saved in OUT/compare.yaml and must not change.

"Identical budget" means identical epochs: SAM and GNP take two passes per step and cost about twice the
time of SGD; the table's time column shows it, and the efficient variants (every-k, hybrid p, reuse) are
the way to buy the gain for less.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.config import MAX_SEED, ConfigError
from trainer.validate import int_arg

# CLI ranges (argparse refuses others in one line, before anything is written): a process count beyond
# any node's GPUs or CPUs, or thousands of seeds per method, is a typo, not a plan.
MAX_NPROC = 1024
MAX_CLI_SEEDS = 1000


@dataclass(frozen=True)
class Method:
    """A named way to train the recipe: config overrides applied on top of it."""

    description: str
    overrides: tuple[tuple[str, object], ...] = ()


METHODS: dict[str, Method] = {
    "sgd": Method("the base optimizer alone (alpha = 0: one pass per step)", (("gnp.alpha", 0.0),)),
    "sam": Method("SAM: the gradient at theta + r*g1/||g1|| alone (alpha = 1)", (("gnp.alpha", 1.0),)),
    "gnp": Method("GNP with the recipe's r and alpha, two passes every step"),
    "gnp-every2": Method("GNP step every 2nd step, plain steps between", (("gnp.every", 2),)),
    "gnp-every4": Method("GNP step every 4th step, plain steps between", (("gnp.every", 4),)),
    "gnp-p0.5": Method("GNP step with probability 0.5 (hybrid), plain otherwise", (("gnp.hybrid_p", 0.5),)),
    "gnp-p0.25": Method("GNP step with probability 0.25 (hybrid), plain otherwise", (("gnp.hybrid_p", 0.25),)),
    "gnp-reuse4": Method(
        "GNP step every 4th step; plain steps between add the last full step's orthogonal part "
        "of g2 (LookSAM-style reuse)",
        (("gnp.every", 4), ("gnp.reuse", "looksam")),
    ),
}


def list_methods() -> dict[str, str]:
    return {name: m.description for name, m in METHODS.items()}


def resolve_methods(
    names: str, defines: list[str], grids: list[str] | tuple[str, ...] = ()
) -> dict[str, tuple[tuple[str, object], ...]]:
    """Method name -> overrides, from `--methods a,b` (built-in names or names given by --define), the
    `--define NAME:section.key=value` options (repeatable; several for one NAME accumulate) and the
    `--grid NAME:section.key=v1,v2,...` options (repeatable; several keys for one NAME span their product): each
    grid point is a method of its own, NAME's overrides plus the point's, named NAME-<key>v1[-<key2>w1...]
    (the key's last part), and replaces NAME in --methods (or is added after them when NAME is not listed)."""
    custom: dict[str, list[tuple[str, object]]] = {}
    for d in defines:
        name, sep, assignment = d.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq or not name or "." not in key:
            raise ConfigError(f"--define: {d!r}; expected NAME:section.key=value")
        custom.setdefault(name.strip(), []).append((key.strip(), yaml.safe_load(value)))
    out: dict[str, tuple[tuple[str, object], ...]] = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in custom:
            out[name] = tuple(custom[name])
        elif name in METHODS:
            out[name] = METHODS[name].overrides
        else:
            raise ConfigError(
                f"--methods: unknown method {name!r}; expected one of {', '.join(METHODS)} or a "
                f"name given with --define NAME:section.key=value"
            )
    for name, points in grid_points(grids).items():
        if name in custom:
            base = tuple(custom[name])
        elif name in METHODS:
            base = METHODS[name].overrides
        else:
            raise ConfigError(
                f"--grid: unknown method {name!r}; expected one of {', '.join(METHODS)} or a --define name"
            )
        expanded = {label: base + point for label, point in points}
        if name in out:  # the grid points take NAME's place in the order of --methods
            out = {k2: v2 for k, v in out.items() for k2, v2 in (expanded.items() if k == name else [(k, v)])}
        else:
            out.update(expanded)
    if not out:
        raise ConfigError("--methods: empty; expected a comma-separated list such as sgd,sam,gnp")
    for name in out:
        if "/" in name or name.startswith("."):
            raise ConfigError(f"--methods: {name!r} cannot name a folder; use letters, digits, '-', '_', '.'")
    return out


def grid_points(grids: list[str] | tuple[str, ...]) -> dict[str, list[tuple[str, tuple[tuple[str, object], ...]]]]:
    """NAME -> [(method name, overrides of the point)] for every point of NAME's grid (the product of its keys)."""
    axes: dict[str, list[tuple[str, list[object]]]] = {}
    for g in grids:
        name, sep, assignment = g.partition(":")
        key, eq, values = assignment.partition("=")
        parsed = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
        if not sep or not eq or not name.strip() or "." not in key or not parsed:
            raise ConfigError(f"--grid: {g!r}; expected NAME:section.key=v1,v2,...")
        axes.setdefault(name.strip(), []).append((key.strip(), parsed))
    out: dict[str, list[tuple[str, tuple[tuple[str, object], ...]]]] = {}
    for name, keys in axes.items():
        points: list[tuple[str, tuple[tuple[str, object], ...]]] = [(name, ())]
        for key, values in keys:
            short = key.rsplit(".", 1)[-1]
            points = [(f"{label}-{short}{v}", over + ((key, v),)) for label, over in points for v in values]
        out[name] = points
    return out


def grid_families(grids: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """NAME -> the method names of its grid's points: what `select_best` chooses among."""
    return {name: [label for label, _ in points] for name, points in grid_points(grids).items()}


def _sets(overrides: tuple[tuple[str, object], ...] | list[tuple[str, object]]) -> list[str]:
    return [a for key, value in overrides for a in ("--set", f"{key}={json.dumps(value)}")]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return out


def is_done(run_dir: Path, epochs: int) -> bool:
    """Whether the run trained all `epochs` (a run stopped by loop.max_steps also ends with a `done` record)."""
    return any(r.get("kind") == "done" and r.get("epochs") == epochs for r in _records(run_dir))


def run_summary(run_dir: Path) -> dict:
    """Final test error, its curve, and training wall time (eval and startup excluded) of a finished run."""
    from trainer.study.plot import load_run

    train, evals = load_run(str(run_dir))
    done = [r for r in _records(run_dir) if r.get("kind") == "done"][-1]  # the finishing one
    train_s = sum(r.get("window_s", 0.0) for r in train)
    epochs = max(1, int(done["epochs"]))
    return {
        "test_error": 100 * evals[-1]["top1_error"],
        "curve": [[e["epoch"], 100 * e["top1_error"]] for e in evals],
        "time_curve": _time_curve(train, evals),
        "train_s": train_s,
        "s_per_epoch": train_s / epochs,
        "epochs": epochs,
        "steps": done["steps"],
        "gnp_steps": done["gnp_steps"],
        "train_loss_logged": train[-1]["loss"] if train else None,
    }


def _time_curve(train: list[dict], evals: list[dict]) -> list[list[float]]:
    """(cumulative training seconds at the end of epoch e, test error %) for each evaluated epoch e."""
    out = []
    for e in evals:
        spent = sum(r.get("window_s", 0.0) for r in train if r["epoch"] <= e["epoch"] + 1e-9)
        out.append([spent, 100 * e["top1_error"]])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0  # sample std
    return mean, std


def gnp_gain_is_real(sgd: dict, gnp: dict) -> bool:
    """Whether GNP's mean test error beats SGD's by more than two standard errors of the difference: below
    that, a "share of GNP's gain" divides seed noise by seed noise. Needs two seeds of each (one seed has
    no measured noise)."""
    if min(len(sgd["seeds"]), len(gnp["seeds"])) < 2:
        return False
    gap = sgd["test_error"]["mean"] - gnp["test_error"]["mean"]
    se = math.sqrt(
        sgd["test_error"]["std"] ** 2 / len(sgd["seeds"]) + gnp["test_error"]["std"] ** 2 / len(gnp["seeds"])
    )
    return gap > max(2 * se, 1e-9)


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (standard tables; e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, section 1.3.6.7.2). Above 30 the Cornish-Fisher expansion below is within
# 1e-4 of the exact value.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` >= 1 degrees of freedom (half-width factor of a 95 % interval)."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_differences(runs: dict[str, list[dict]], baseline: str) -> dict[str, dict]:
    """Per method other than `baseline`: the test-error difference method − baseline (percentage points) over
    the seeds both ran (a seed fixes initialization and data order for every method, so seeds pair the runs).

    mean d̄, its standard error s_d/√n, the paired t = d̄/SE and the 95 % interval d̄ ± t_{0.975, n−1}·SE; with
    one pair only the difference itself (no SE, t or interval). `contains_zero` says whether the interval
    contains 0: then the data do not show a difference either way."""
    if baseline not in runs:
        raise ConfigError(f"--baseline: {baseline!r} is not one of the compared methods ({', '.join(runs)})")
    base = {r["seed"]: float(r["test_error"]) for r in runs[baseline]}
    out: dict[str, dict] = {}
    for method, rs in runs.items():
        if method == baseline:
            continue
        pairs = [(r["seed"], float(r["test_error"]) - base[r["seed"]]) for r in rs if r["seed"] in base]
        if not pairs:
            continue
        d = [x for _, x in pairs]
        n = len(d)
        mean, std = _mean_std(d)
        row: dict = {"seeds": [s for s, _ in pairs], "n": n, "mean": mean}
        if n > 1:
            se = std / math.sqrt(n)
            half = t_quantile_975(n - 1) * se
            row.update(
                se=se,
                t=mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0,
                ci95=[mean - half, mean + half],
                contains_zero=mean - half <= 0 <= mean + half,
            )
        out[method] = row
    return out


def error_name(evaluated_on: str) -> str:
    """What tables and figures call the error: results.json's `evaluated_on` is "test" or names held-out images."""
    return "test error" if evaluated_on == "test" else "held-out error"


def paired_table(paired: dict[str, dict], baseline: str, metric: str = "test error") -> str:
    """Markdown: one row per method, its paired difference to `baseline` in `metric` (negative = fewer errors)."""
    lines = [
        f"| vs {baseline} | pairs | Δ {metric} (points) | SE | paired t | 95 % interval | reading |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in paired.items():
        if "ci95" not in row:
            lines.append(f"| {method} | {row['n']} | {row['mean']:+.2f} | – | – | – | one pair: no interval |")
            continue
        lo, hi = row["ci95"]
        if row["contains_zero"]:
            reading = "no difference shown (interval contains 0)"
        else:
            reading = f"{'lower' if row['mean'] < 0 else 'higher'} error than {baseline}"
        lines.append(
            f"| {method} | {row['n']} | {row['mean']:+.2f} | {row['se']:.2f} | {row['t']:+.1f} | "
            f"[{lo:+.2f}, {hi:+.2f}] | {reading} |"
        )
    return "\n".join(lines) + "\n"


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: mean and sample std over seeds of every reported quantity."""
    out: dict[str, dict] = {}
    for method, rs in runs.items():
        if not rs:
            continue
        row: dict = {"seeds": [r["seed"] for r in rs]}
        for key in ("test_error", "train_loss", "g1_norm", "sharpness", "s_per_epoch"):
            row[key] = dict(zip(("mean", "std"), _mean_std([float(r[key]) for r in rs])))
        out[method] = row
    sgd, gnp = out.get("sgd"), out.get("gnp")
    for row in out.values():
        if sgd:
            row["time_vs_sgd"] = row["s_per_epoch"]["mean"] / sgd["s_per_epoch"]["mean"]
        if sgd and gnp and gnp_gain_is_real(sgd, gnp):
            # Share of GNP's improvement over SGD this method keeps (the efficiency target: >= 80 % at
            # <= 1.25x SGD time); undefined when GNP does not clearly improve on SGD.
            row["gain_vs_gnp"] = (
                (sgd["test_error"]["mean"] - row["test_error"]["mean"])
                / (sgd["test_error"]["mean"] - gnp["test_error"]["mean"])
            ) + 0.0
    return out


def select_best(runs: dict[str, list[dict]], grids: dict[str, list[str]]) -> dict[str, dict]:
    """Per grid NAME: the point (method) with the lowest mean error over the seeds it ran, the first listed on a
    tie — the selection rule of a tuning comparison, written down so the choice is the data's, not the reader's."""
    out: dict[str, dict] = {}
    for name, points in grids.items():
        scored = [(_mean_std([float(r["test_error"]) for r in runs[p]])[0], p) for p in points if runs.get(p)]
        if scored:
            error, method = min(scored, key=lambda x: x[0])  # min keeps the first of equal errors
            out[name] = {"method": method, "error": error, "seeds": len(runs[method]), "points": len(scored)}
    return out


def selection_lines(selected: dict[str, dict], metric: str) -> str:
    """Markdown: one line per grid, the point select_best chose."""
    return "".join(
        f"- lowest {metric} in grid `{name}` ({s['points']} points): **{s['method']}** "
        f"({s['error']:.2f} %, {s['seeds']} seed{'s' if s['seeds'] > 1 else ''})\n"
        for name, s in selected.items()
    )


def markdown_table(agg: dict[str, dict], title: str, metric: str = "test error") -> str:
    def pm(cell: dict, digits: int) -> str:
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"

    lines = [
        f"**{title}**",
        "",
        f"| method | seeds | {metric} % | train loss | ‖g1‖ | sharpness | s / epoch | time × SGD | "
        "share of GNP's gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in agg.items():
        ratio = f"{row['time_vs_sgd']:.2f}" if "time_vs_sgd" in row else "–"
        gain = f"{100 * row['gain_vs_gnp']:.0f} %" if "gain_vs_gnp" in row else "–"  # – : no clear GNP gain
        lines.append(
            f"| {method} | {len(row['seeds'])} | {pm(row['test_error'], 2)} | {pm(row['train_loss'], 4)} | "
            f"{pm(row['g1_norm'], 3)} | {pm(row['sharpness'], 4)} | {pm(row['s_per_epoch'], 1)} | {ratio} | "
            f"{gain} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], out: Path, title: str, metric: str = "test error") -> None:
    """`metric` (test or held-out error) against epoch and against training time: per method the mean over
    seeds and a +-1 std band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (method, rs) in enumerate(runs.items()):
        if not rs:
            continue
        color = f"C{i % 10}"
        for ax, key in zip(axes, ("curve", "time_curve")):
            n = min(len(r[key]) for r in rs)  # epochs every seed has evaluated
            xs = [_mean_std([r[key][j][0] for r in rs])[0] for j in range(n)]
            stats = [_mean_std([r[key][j][1] for r in rs]) for j in range(n)]
            mean = [m for m, _ in stats]
            ax.plot(xs, mean, color=color, marker="o", ms=3, label=f"{method} ({len(rs)} seeds)")
            ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.2)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training time (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel(f"{metric}, top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title + " — mean ± 1 std over seeds", fontsize=11)
    fig.savefig(out, dpi=100)


def _check_spec(out: Path, spec: dict) -> None:
    """The comparison's identity (recipe and common overrides) is fixed once its folder exists."""
    path = out / "compare.yaml"
    if path.is_file():
        saved = yaml.safe_load(path.read_text()) or {}
        for key in ("recipe", "sets"):
            if saved.get(key) != spec[key]:
                raise ConfigError(
                    f"--out: {str(out)!r} holds a comparison with {key} {saved.get(key)!r}, not "
                    f"{spec[key]!r}; use another --out"
                )
        methods = {**saved.get("methods", {}), **spec["methods"]}
        for name, overrides in saved.get("methods", {}).items():
            if name in spec["methods"] and spec["methods"][name] != overrides:
                raise ConfigError(
                    f"--methods: {name!r} had overrides {overrides} in {path}, now "
                    f"{spec['methods'][name]}; use another name or --out"
                )
        spec = {**spec, "methods": methods}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".compare.yaml.tmp"
    tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
    os.replace(tmp, path)


def _train_command(nproc: int) -> list[str]:
    if nproc <= 1:
        return [sys.executable, "-m", "trainer", "train"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "trainer",
        "train",
    ]


class TrainingFailed(RuntimeError):
    """A run of the comparison exited non-zero; `code` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _check_compare(
    recipe: str,
    methods: dict[str, tuple[tuple[str, object], ...]],
    seeds: int,
    sets: list[str],
    measure_batches: int,
    baseline: str,
    log,
):
    """Validate the comparison before anything runs; returns the recipe's config (with `sets`), the baseline and
    each method's epochs."""
    from trainer import config

    baseline = baseline or ("sgd" if "sgd" in methods else next(iter(methods)))
    if baseline not in methods:
        raise ConfigError(f"--baseline: {baseline!r} is not one of --methods ({', '.join(methods)})")

    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds}; expected an integer >= 1")
    if measure_batches < 1:
        raise ConfigError(f"--measure-batches: {measure_batches}; expected an integer >= 1")
    base = config.load(recipe, sets)  # validates recipe and overrides before anything runs
    if base.loop.seed + seeds - 1 > MAX_SEED:  # the last run's seed must be valid too, checked before the first
        raise ConfigError(f"--seeds: {seeds} from loop.seed {base.loop.seed}; expected seeds up to {MAX_SEED}")
    # Validates every method's overrides now; a method may train longer than the recipe (a compute-matched SGD).
    epochs_of = {
        name: config.load(recipe, [*sets, *[f"{k}={json.dumps(v)}" for k, v in overrides]]).loop.epochs
        for name, overrides in methods.items()
    }
    if "gnp" in methods and not 0 < base.gnp.alpha < 1:
        log(f"note: the recipe's gnp.alpha is {base.gnp.alpha}; method 'gnp' is then not between SGD and SAM")
    return base, baseline, epochs_of


def _measured(run_dir: Path, measure_batches: int, r: float) -> dict:
    """The run's end-of-training measurements (loss, |g1|, sharpness), computed once into measure.json."""
    measured = run_dir / "measure.json"
    if not measured.is_file():
        from trainer.train import measure_run

        result = measure_run(str(run_dir), batches=measure_batches, r=r)
        tmp = run_dir / ".measure.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, measured)
    return json.loads(measured.read_text())


def _run_summary_of(method: str, seed: int, run_dir: Path, m: dict) -> dict:
    """One run's entry of results.json: its training summary and its measurements."""
    return {
        "method": method,
        "seed": seed,
        "run_dir": str(run_dir),
        **run_summary(run_dir),
        "train_loss": m["loss"],
        "g1_norm": m["g1_norm"],
        "sharpness": m["sharpness"],
        "measured_on": {"batches": m["batches"], "images": m["images"], "r": m["r"]},
    }


def _write_results(out: Path, results: dict, runs: dict[str, list[dict]], title: str, metric: str, log) -> str:
    """results.json, results.md and the figure; returns the markdown tables."""
    baseline = results["paired"]["baseline"]
    table = markdown_table(results["summary"], title, metric) + "\n"
    table += paired_table(results["paired"]["differences"], baseline, metric)
    if "selected" in results:
        table += "\n" + selection_lines(results["selected"], metric)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    plot(runs, out / "test_error.png", title, metric)
    log(table)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'test_error.png'}")
    return table


def compare(
    *,
    recipe: str,
    methods: dict[str, tuple[tuple[str, object], ...]],
    seeds: int,
    out: Path,
    sets: list[str],
    nproc: int = 1,
    measure_batches: int = 8,
    baseline: str = "",
    grids: dict[str, list[str]] | None = None,
    log=print,
) -> dict:
    """Train (or resume) every method x seed, measure, aggregate; returns the results written to results.json.

    `baseline` (default: sgd when compared, else the first method) is the method the paired differences are
    taken against. `grids` (grid NAME -> its points' method names, from --grid) adds, per grid, the point with
    the lowest mean error. With `data.holdout` > 0 every run evaluates on held-out training images, never on
    the test split: the tables, figure and results.json then say "held-out error" (the JSON key stays
    `test_error`, `evaluated_on` names the split)."""
    base, baseline, epochs_of = _check_compare(recipe, methods, seeds, sets, measure_batches, baseline, log)
    spec = {"recipe": recipe, "sets": list(sets), "methods": {k: [list(o) for o in v] for k, v in methods.items()}}
    _check_spec(out, spec)
    seed_values = [base.loop.seed + i for i in range(seeds)]
    evaluated_on = f"held-out training images (data.holdout={base.data.holdout})" if base.data.holdout else "test"
    metric = error_name(evaluated_on)
    total, index = len(methods) * seeds, 0
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    # Seeds outermost: an interrupted comparison has balanced results, and load drift hits every method alike.
    for seed in seed_values:
        for method, overrides in methods.items():
            index += 1
            run_dir = out / method / f"seed{seed}"
            tag = f"[{index}/{total}] {method} seed {seed}"
            if not is_done(run_dir, epochs_of[method]):
                log(f"{tag}: training ({'resuming' if (run_dir / 'metrics.jsonl').exists() else 'new'}) -> {run_dir}")
                _train(recipe, sets, overrides, seed, run_dir, nproc)
            summary = _run_summary_of(method, seed, run_dir, _measured(run_dir, measure_batches, base.gnp.r))
            runs[method].append(summary)
            log(
                f"{tag}: {metric} {summary['test_error']:.2f} %, {summary['s_per_epoch']:.1f} s/epoch, "
                f"sharpness {summary['sharpness']:.4f}"
            )
    results = {
        "recipe": recipe,
        "sets": list(sets),
        "methods": spec["methods"],
        "seeds": seed_values,
        "epochs": base.loop.epochs,
        "model": base.model.name,
        "nproc": nproc,
        "evaluated_on": evaluated_on,
        "summary": aggregate(runs),
        "paired": {"baseline": baseline, "differences": paired_differences(runs, baseline)},
        "runs": runs,
    }
    if grids:
        results["selected"] = select_best(runs, grids)
    title = f"{recipe}: {', '.join(methods)} × {seeds} seeds ({base.loop.epochs} epochs, {base.model.name})"
    _write_results(out, results, runs, title, metric, log)
    return results


def _train(recipe: str, sets: list[str], overrides, seed: int, run_dir: Path, nproc: int) -> None:
    cmd = [
        *_train_command(nproc),
        "--recipe",
        recipe,
        *[a for s in sets for a in ("--set", s)],
        *_sets(overrides),
        "--set",
        f"loop.seed={seed}",
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "metrics.progress=lines",
    ]
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"
    started = time.time()
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        log_file.flush()
        code = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        raise TrainingFailed(
            f"compare: run {run_dir} exited {code} after {time.time() - started:.0f} s "
            f"({tail[0][:300]}); full log {log_path}",
            code,
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe name (see `recipes`) or path to a YAML file")
    p.add_argument(
        "--methods",
        default="sgd,sam,gnp",
        help=f"comma-separated methods (default sgd,sam,gnp); built in: {', '.join(METHODS)}",
    )
    p.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME:SECTION.KEY=VALUE",
        help="define (or extend) a method NAME by one override, e.g. gnp-r0.2:gnp.r=0.2 (repeatable)",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME:SECTION.KEY=V1,V2,...",
        help="replace method NAME by one method per value, e.g. sam:gnp.r=0.05,0.1,0.2 (repeatable; several keys "
        "of one NAME span their product)",
    )
    p.add_argument(
        "--seeds", type=int_arg(1, MAX_CLI_SEEDS), default=3, help="seeds per method: the recipe's loop.seed + 0..N-1"
    )
    p.add_argument(
        "--baseline",
        default="",
        help="method the paired differences (mean, SE, paired t, 95 %% interval over seeds) are taken against "
        "(default sgd if compared, else the first method)",
    )
    p.add_argument("--out", default=None, help="comparison folder (default runs/compare-<recipe>)")
    p.add_argument("--nproc", type=int_arg(1, MAX_NPROC), default=1, help="processes per run (torchrun when > 1)")
    p.add_argument(
        "--measure-batches",
        type=int_arg(1, 1_000_000),
        default=8,
        help="training batches the final train loss, ||g1|| and sharpness are averaged over",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override for every run (repeatable)",
    )


def stop_on_sigterm(signum, frame) -> None:
    # subprocess.run kills its child when interrupted by an exception; SIGTERM's default would leave the
    # training run orphaned and still holding the CPUs/GPU. Its checkpoints make the next invocation resume.
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    methods = resolve_methods(args.methods, args.define, args.grid)
    out = Path(args.out or f"runs/compare-{Path(args.recipe).stem}")
    try:
        compare(
            recipe=args.recipe,
            methods=methods,
            seeds=args.seeds,
            out=out,
            sets=args.overrides,
            nproc=args.nproc,
            measure_batches=args.measure_batches,
            baseline=args.baseline,
            grids=grid_families(args.grid),
            log=lambda m: print(m, flush=True),
        )
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code if 0 < e.code < 256 else 1
    return 0


def paired_report(results_json: str, baseline: str) -> str:
    """The paired-difference table of an existing results.json (its per-seed runs), against `baseline`."""
    data = json.loads(Path(results_json).read_text())
    metric = error_name(data.get("evaluated_on", "test"))  # results written before the field: the test split
    return paired_table(paired_differences(data["runs"], baseline), baseline, metric)


if __name__ == "__main__":  # python -m trainer.study.compare RESULTS.json BASELINE: the paired table of old results
    if len(sys.argv) != 3:
        print("usage: python -m trainer.study.compare RESULTS.json BASELINE", file=sys.stderr)
        sys.exit(2)
    try:
        print(paired_report(sys.argv[1], sys.argv[2]), end="")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {sys.argv[1]}: {e}", file=sys.stderr)
        sys.exit(2)
