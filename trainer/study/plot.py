"""Compare runs on one figure: `python -m trainer plot RUN_DIR [RUN_DIR ...] --out FILE.png`.

Reads each run directory's metrics.jsonl (written by rank 0, see trainer.metrics) and draws, against the
epoch, six panels with the runs overlaid (legend = run directory name): training loss at theta (solid) and
at theta + eps (dashed), validation loss, validation top-1 error, gradient norms (||g1|| solid, the combined
gradient dashed), sharpness L(theta + eps) - L(theta), and the learning rate. Plain-SGD runs simply have no
perturbed-loss, ||g1|| or sharpness curve. Headless: matplotlib's Agg canvas, no display needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, oldest first.

    A resumed run appends to the same metrics.jsonl and replays the steps after its checkpoint; the last
    record of each step (each evaluated epoch) wins, so the curves show what the finished run did. The
    evaluation of a run stopped mid-epoch by loop.max_steps is not an epoch's and is left out.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(
            f"plot: {run_dir!r} has no metrics.jsonl; expected a run directory written by `python -m trainer train`"
        )
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything earlier is real corruption.
            if n == lines[-1][0]:
                break
            raise ValueError(f"plot: {path}: line {n} is not JSON; expected one JSON record per line") from None
        if rec.get("kind") == "train":
            train[int(rec["step"])] = rec
        elif rec.get("kind") == "eval" and not rec.get("partial"):  # partial: a loop.max_steps stop
            evals[int(rec["epoch"])] = rec
    if not train and not evals:
        raise ValueError(f"plot: {path} holds no train or eval records; expected metrics of a started run")
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def _series(records: list[dict], key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _labels(run_dirs: list[str]) -> list[str]:
    """Run directory names, or the paths as given where names repeat (runs/a/seed0 vs runs/b/seed0)."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def plot_runs(run_dirs: list[str], out: str) -> None:
    """Draw the runs' curves into the PNG (or any matplotlib format, by extension) `out`."""
    if not run_dirs:
        raise ValueError("plot: no run directories given; expected at least one RUN_DIR")
    runs = [load_run(d) for d in run_dirs]  # validate every run before drawing anything
    try:
        from matplotlib.figure import Figure  # lazy: training (and the image) never needs matplotlib
    except ModuleNotFoundError:
        raise ValueError(
            "plot: matplotlib is not installed; install the dev extras (pip install -e '.[dev]', as `make setup` does)"
        ) from None

    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = fig.subplots(2, 3)
    panels = [
        (axes[0, 0], "training loss: L(θ) solid, L(θ+ε) dashed", "cross-entropy"),
        (axes[0, 1], "validation loss", "cross-entropy"),
        (axes[0, 2], "validation top-1 error", "error"),
        (axes[1, 0], "gradient norm: ‖g1‖ solid, combined dashed", "norm"),
        (axes[1, 1], "sharpness L(θ+ε) − L(θ)", "loss difference"),
        (axes[1, 2], "learning rate", "lr"),
    ]
    for ax, title, ylabel in panels:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for i, (label, (train, evals)) in enumerate(zip(_labels(run_dirs), runs)):
        color = f"C{i % 10}"
        ax = axes[0, 0]
        ax.plot(*_series(train, "loss"), color=color, lw=1, label=label)
        ax.plot(*_series(train, "loss_perturbed"), color=color, lw=1, ls="--")
        axes[0, 1].plot(*_series(evals, "eval_loss"), color=color, marker="o", ms=3, label=label)
        axes[0, 2].plot(*_series(evals, "top1_error"), color=color, marker="o", ms=3, label=label)
        axes[1, 0].plot(*_series(train, "g1_norm"), color=color, lw=1, label=label)
        axes[1, 0].plot(*_series(train, "grad_norm"), color=color, lw=1, ls="--")
        axes[1, 1].plot(*_series(train, "sharpness"), color=color, lw=1, label=label)
        axes[1, 2].plot(*_series(train, "lr"), color=color, lw=1, label=label)
    axes[0, 0].legend(fontsize=9)
    fig.suptitle("GNP runs: " + ", ".join(_labels(run_dirs)), fontsize=11)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `plot` subcommand's arguments."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="image to write (format by extension)")


def run(args: argparse.Namespace) -> int:
    """`python -m trainer plot`: draw and report the file."""
    plot_runs(args.run_dirs, args.out)
    print(f"wrote {args.out}")
    return 0
