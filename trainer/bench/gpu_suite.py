"""Everything a lent GPU should measure, in one budgeted command: ``python -m trainer.bench.gpu_suite --out DIR``.

GPU time comes in short leases (about 15 minutes, including the machine's start), so the suite runs its
parts in priority order, each as a subprocess with a share of a wall-clock budget, skips what no longer
fits, and always writes its report. Parts:

1. ``checks``       trainer.bench.gpu_checks: GNP on the device equals the CPU fp64 steps; bf16/fp16 sanity; DDP
                    on a one-rank NCCL group.
2. ``gnp-eager``    trainer.bench.gnp, eager: SGD vs GNP step (WRN-28-10, ResNet-50; bf16, channels_last)
                    and the efficient variants' cost (every-4, reuse-4).
3. ``e2e-eager``    trainer.bench.e2e, eager: the real loop (device-resident data, metrics, checkpoint)
                    as a fraction of that step.
4. ``gnp-compile``  as 2 with torch.compile.
5. ``e2e-compile``  as 3 with torch.compile.
6. ``compare``      trainer compare on Fashion-MNIST (--compare-recipe, default fashion-mnist-compare-gpu;
                    sgd, sam, gnp, gnp-every4, gnp-reuse4), one seed more per round while the budget lasts
                    (a round cut short leaves the earlier rounds' results).

Writes into --out (at most 4 files, so the whole report fits what a device lease returns): suite.md (the
tables), suite.json (every row), suite.log (every part's output) and test_error.png (compare).
Parts' working files go to --work (default runs/gpu-suite). Exit status 0 when no part failed (skipped
for budget is not a failure), 1 otherwise, 2 for bad arguments.

``--smoke`` runs the same parts with CPU-sized settings (a few steps, 256 images): the CI test of the
orchestration; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PARTS = ("checks", "gnp-eager", "e2e-eager", "gnp-compile", "e2e-compile", "compare")
COMPARE_METHODS = "sgd,sam,gnp,gnp-every4,gnp-reuse4"
REPORT_RESERVE_S = 15.0  # kept back from the budget for the report itself


@dataclass
class Part:
    name: str
    commands: list[list[str]]  # run in order; compare has one per seed round
    min_s: float  # not started with less budget left than this
    json_files: list[Path] = field(default_factory=list)
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    note: str = ""


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def plan(
    *,
    work: Path,
    smoke: bool,
    fmnist: str,
    seeds: int,
    methods: str,
    recipe: str = "fashion-mnist-compare-gpu",
    compare_sets: tuple[str, ...] = (),
) -> list[Part]:
    """The parts, in priority order, with their commands (CPU-sized when ``smoke``)."""
    gnp_cmd = (
        ["-m", "trainer.bench.gnp", "--no-cpu"]
        if not smoke
        else ["-m", "trainer.bench.gnp", "--cpu-steps", "1", "--rounds", "1"]
    )
    e2e_cmd = ["-m", "trainer.bench.e2e"] + (["--steps", "8"] if smoke else [])
    parts = [
        Part(
            "checks",
            [_py("-m", "trainer.bench.gpu_checks", "--json", str(work / "checks.json"))],
            20,
            [work / "checks.json"],
        )
    ]
    for mode in ("eager", "compile"):
        if smoke and mode == "compile":
            # torch.compile of the CPU model takes minutes on 2 cores; the eager smoke covers the plumbing.
            parts.append(Part(f"gnp-{mode}", [], 0, status="skipped", note="smoke: no compile on the CPU"))
            parts.append(Part(f"e2e-{mode}", [], 0, status="skipped", note="smoke: no compile on the CPU"))
            continue
        parts.append(
            Part(
                f"gnp-{mode}",
                [_py(*gnp_cmd, "--modes", mode, "--json", str(work / f"gnp-{mode}.json"))],
                60 if mode == "eager" else 150,
                [work / f"gnp-{mode}.json"],
            )
        )
        parts.append(
            Part(
                f"e2e-{mode}",
                [_py(*e2e_cmd, "--modes", mode, "--json", str(work / f"e2e-{mode}.json"))],
                90 if mode == "eager" else 200,
                [work / f"e2e-{mode}.json"],
            )
        )
    compare = [
        "-m",
        "trainer",
        "compare",
        "--recipe",
        recipe,
        "--methods",
        methods,
        "--out",
        str(work / "compare"),
        "--set",
        f"data.path=fashion-mnist:{fmnist}",
        *[a for kv in compare_sets for a in ("--set", kv)],
    ]
    if smoke:
        compare += [
            "--set",
            "data.limit=256",
            "--set",
            "loop.epochs=1",
            "--set",
            "model.name=demo_cnn",
            "--set",
            "loop.precision=fp32",
            "--set",
            "loop.batch_size=64",
            "--measure-batches",
            "1",
        ]
    rounds = [_py(*compare, "--seeds", str(k)) for k in range(1, seeds + 1)]
    part = Part("compare", rounds, 60, [work / "compare" / "results.json"])
    if not all((Path(fmnist) / f).is_file() for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")):
        part.status, part.note = "skipped", f"no Fashion-MNIST idx files in {fmnist} (--fmnist)"
    parts.append(part)
    return parts


def _run(cmd: list[str], timeout_s: float, log) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output to ``log``; on timeout SIGTERM the group (the trainer
    and compare stop cleanly on it), then SIGKILL. Returns (exit status or None on timeout, seconds)."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        code: int | None = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, time.monotonic() - start


def execute(parts: list[Part], *, budget_s: float, only: set[str], log_path: Path) -> None:
    """Run the parts in order within ``budget_s`` seconds of wall time (statuses are set in place)."""
    deadline = time.monotonic() + budget_s - REPORT_RESERVE_S
    with open(log_path, "a") as log:
        for part in parts:
            if part.status == "skipped":
                continue
            if part.name not in only:
                part.status, part.note = "skipped", "not in --parts"
                continue
            for i, cmd in enumerate(part.commands):
                left = deadline - time.monotonic()
                if left < part.min_s:
                    if i == 0:
                        part.status, part.note = "skipped", f"budget: {left:.0f} s left, needs {part.min_s:.0f} s"
                    else:
                        part.note = f"{i} of {len(part.commands)} rounds (budget)"
                    break
                print(
                    f"[gpu-suite] {part.name}{f' round {i + 1}' if len(part.commands) > 1 else ''}: "
                    f"{left:.0f} s of budget left",
                    flush=True,
                )
                log.write(f"\n===== {part.name} =====\n")
                code, seconds = _run(cmd, left, log)
                part.seconds += seconds
                if code is None:
                    part.status = "timeout" if i == 0 else "ok"
                    part.note = f"stopped at the budget after {seconds:.0f} s" + (
                        f"; {i} of {len(part.commands)} rounds complete" if i else ""
                    )
                    break
                if code != 0:
                    part.status, part.note = "failed", f"exit status {code} (see suite.log)"
                    break
                part.status = "ok"
            print(f"[gpu-suite] {part.name}: {part.status} {part.note}".rstrip(), flush=True)


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)",
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        try:  # a tuple in recent torch, an int in older ones; never let the report's header stop the suite
            nccl = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as e:  # noqa: BLE001
            env["nccl"] = f"unknown ({type(e).__name__})"
        env["gpu_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    missing = []
    for module in ("yaml", "prometheus_client", "matplotlib", "numpy"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    env["missing_modules"] = missing
    return env


def _rows(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for p in paths:
        if p.is_file():
            data = json.loads(p.read_text())
            rows.extend(data if isinstance(data, list) else [data])
    return rows


def report(parts: list[Part], env: dict, out: Path, work: Path) -> str:
    """suite.md and suite.json in ``out``; returns the markdown."""
    by_name = {p.name: p for p in parts}
    lines = [
        f"# GPU suite: {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}), "
        f"Python {env['python']}, {env['cpus']} CPUs"
        + (f"; missing modules: {', '.join(env['missing_modules'])}" if env["missing_modules"] else ""),
        "",
        "| part | status | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.note} |" for p in parts]
    checks = _rows(by_name["checks"].json_files)
    if checks:
        lines += ["", "## Correctness on the device", "", "| check | value | limit | result |", "|---|---|---|---|"]
        for r in checks:
            if "error" in r:
                lines.append(f"| {r['check']} | – | – | FAILED: {r['error'].replace('|', '/')} |")
            else:
                sign = "≤" if r["kind"] == "max" else "≥"
                lines.append(
                    f"| {r['check']} | {r['value']:.3g} | {sign} {r['limit']:g} | {'ok' if r['ok'] else 'FAILED'} |"
                )
    step = _rows(by_name["gnp-eager"].json_files + by_name["gnp-compile"].json_files)
    if step:
        lines += [
            "",
            "## Step time on synthetic data (trainer.bench.gnp; target GNP/SGD ≤ 2.02)",
            "",
            "| model | batch | px | precision | mode | SGD ms | GNP ms | GNP/SGD | SGD img/s | GNP img/s | "
            "reuse ms | every-4 × SGD | reuse-4 × SGD |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in step:
            reuse = (
                f"{r['reuse_ms']:.2f} | {r['every4_x_sgd']:.3f} | {r['reuse4_x_sgd']:.3f}"
                if "reuse_ms" in r
                else "– | – | –"
            )
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['px']} | {r['precision']} | {r['mode']} | "
                f"{r['sgd_ms']:.2f} | {r['gnp_ms']:.2f} | {r['ratio']:.3f} | "
                f"{r['batch'] * 1000 / r['sgd_ms']:.0f} | {r['batch'] * 1000 / r['gnp_ms']:.0f} | {reuse} |"
            )
    e2e = _rows(by_name["e2e-eager"].json_files + by_name["e2e-compile"].json_files)
    if e2e:
        lines += [
            "",
            "## The real loop end to end vs the step (trainer.bench.e2e; target GNP ≥ 95 %)",
            "",
            "| model | mode | method | batch | px | step img/s | e2e img/s | e2e / step | median window img/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['mode']} | {r['method']} | {r['batch']} | {r['px']} | "
            f"{r['step_images_per_s']:.0f} | {r['e2e_images_per_s']:.0f} | {r['fraction']:.1%} | "
            f"{r['median_window_images_per_s']:.0f} |"
            for r in e2e
        ]
        lines += [
            "",
            "e2e: all images / all time of the timed windows, logging and a checkpoint included; the "
            "median window leaves them out.",
        ]
    results_md = work / "compare" / "results.md"
    if by_name["compare"].status == "ok" and results_md.is_file():
        lines += ["", "## Method comparison (trainer compare)", "", results_md.read_text().strip()]
        png = work / "compare" / "test_error.png"
        if png.is_file():
            shutil.copyfile(png, out / "test_error.png")
    text = "\n".join(lines) + "\n"
    (out / "suite.md").write_text(text)
    compare = work / "compare" / "results.json"
    (out / "suite.json").write_text(
        json.dumps(
            {
                "environment": env,
                "parts": [
                    {k: v for k, v in vars(p).items() if k not in ("commands", "json_files")}
                    | {"commands": [" ".join(c) for c in p.commands]}
                    for p in parts
                ],
                "checks": checks,
                "step": step,
                "e2e": e2e,
                "compare": json.loads(compare.read_text())["summary"]
                if by_name["compare"].status == "ok" and compare.is_file()
                else None,
            },
            indent=1,
        )
    )
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench.gpu_suite", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="report folder (suite.md, suite.json, suite.log, test_error.png)")
    ap.add_argument("--work", default="runs/gpu-suite", help="working folder of the parts (default runs/gpu-suite)")
    ap.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for everything (default 540)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument(
        "--fmnist",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the Fashion-MNIST idx .gz files (compare part)",
    )
    ap.add_argument("--seeds", type=int, default=3, help="compare: at most this many seeds (default 3)")
    ap.add_argument("--methods", default=COMPARE_METHODS, help=f"compare: methods (default {COMPARE_METHODS})")
    ap.add_argument(
        "--compare-recipe",
        default="fashion-mnist-compare-gpu",
        help="compare: a Fashion-MNIST memory-loader recipe (default fashion-mnist-compare-gpu; "
        "fashion-mnist-noisy-cpu is the label-noise benchmark)",
    )
    ap.add_argument(
        "--compare-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="compare: override for every run (repeatable), e.g. model.name=wrn16_4",
    )
    ap.add_argument("--smoke", action="store_true", help="CPU-sized settings: tests the orchestration only")
    args = ap.parse_args(argv)
    only = {p for p in args.parts.split(",") if p}
    if not only or not only <= set(PARTS):
        print(
            f"gpu-suite: --parts {args.parts!r}: expected a comma-separated subset of {','.join(PARTS)}",
            file=sys.stderr,
        )
        return 2
    if not args.budget > REPORT_RESERVE_S or args.seeds < 1:
        print(f"gpu-suite: --budget must exceed {REPORT_RESERVE_S:.0f} s and --seeds be >= 1", file=sys.stderr)
        return 2
    if "compare" in only:  # a bad recipe or override: one line and exit 2 now, not a failed part minutes later
        from trainer.config import ConfigError, load

        try:
            load(args.compare_recipe, [f"data.path=fashion-mnist:{args.fmnist}", *args.compare_set])
        except ConfigError as e:
            print(f"gpu-suite: --compare-recipe/--compare-set: {e}", file=sys.stderr)
            return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"[gpu-suite] {env['device']}, torch {env['torch']}, budget {args.budget:.0f} s", flush=True)
    parts = plan(
        work=work,
        smoke=args.smoke,
        fmnist=args.fmnist,
        seeds=args.seeds,
        methods=args.methods,
        recipe=args.compare_recipe,
        compare_sets=tuple(args.compare_set),
    )
    for part in parts:  # stale results of an earlier suite run must not be reported as this run's
        for f in part.json_files:
            if part.name != "compare":
                f.unlink(missing_ok=True)
    try:
        execute(parts, budget_s=args.budget, only=only, log_path=out / "suite.log")
    finally:
        print(report(parts, env, out, work), flush=True)
    return 1 if any(p.status in ("failed", "timeout") for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
