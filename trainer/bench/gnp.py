"""Benchmark: time of a GNP step vs an SGD step (``python -m trainer.bench.gnp``; ``make bench-gnp``).

Both columns run ``GNP.train_step`` on the same model, data and base optimizer (SGD, momentum 0.9,
Nesterov) with the reference's clip of 5.0: "SGD" is the plain one-pass step (``gnp=False``), "GNP"
the two-pass step (r=0.1, alpha=0.8). The ratio GNP/SGD has a floor of ~2.0 (two forward+backward
passes); the GPU target is <= 2.02.

Efficient GNP (the cost side; accuracy is measured by ``trainer compare``): "reuse" times a plain step of
a ``reuse="looksam"`` GNP whose v is stored (SGD + the correction g + α·‖g‖·v), and the table derives the
time per step relative to SGD of gnp-every4 (one full GNP step in 4: (3·SGD + GNP)/4) and gnp-reuse4
((3·reuse + full reuse step)/4; a full step of the reuse mode also stores v). A hybrid probability p
costs (1 − p)·SGD + p·GNP on average.

m-sharpness (``gnp.m``): "GNP m" times the GNP step with the batch cut into ``--m-splits`` sub-batches (default
4: m = batch/4), each perturbed on its own (``train_step(sub_batches=k)``: 2k smaller passes, one all-reduce);
"m/GNP" is its time relative to the one-perturbation GNP step (small batches use the device less well).

* CPU (always): a small CNN, 32 px, batch 32, fp32 (a smoke number; CPU ratios are not the target).
* CUDA (when available): WRN-28-10 (32 px, batch 256, 10 classes) and ResNet-50 (224 px, batch 256,
  1000 classes), bf16 autocast + channels_last, eager and ``torch.compile``.

Timing: warm-up steps (and compilation), then rounds of ``--*-steps`` steps with one device
synchronisation per round (no per-step sync), SGD and GNP rounds alternating; the best round of each
is reported (robust to load from other processes). Synthetic data, resident on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.optim import GNP


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 with pooling and a linear head (~0.3 M parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, 32),
            nn.MaxPool2d(2),
            block(32, 64),
            nn.MaxPool2d(2),
            block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    """A model from the trainer's registry; torchvision's ResNet-50 if the registry lacks it."""
    if name == "small_cnn":
        return SmallCNN(num_classes), "bench SmallCNN"
    try:
        from trainer.models import create_model

        return create_model(name, num_classes=num_classes, in_channels=3, image_size=image_size), "trainer.models"
    except (ImportError, ValueError) as e:
        if name != "resnet50":
            raise
        import torchvision

        return torchvision.models.resnet50(num_classes=num_classes), f"torchvision (registry: {e})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, steps: int, rounds: int
) -> dict[str, float]:
    """Best mean seconds per step of each function: rounds alternate between the functions, so a
    burst of load from other processes hits every function's rounds alike; the min discards it."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def bench_one(
    name: str,
    *,
    device: torch.device,
    batch: int,
    image_size: int,
    num_classes: int,
    amp: torch.dtype | None,
    channels_last: bool,
    compile_model: bool,
    steps: int,
    rounds: int,
    warmup: int,
    with_reuse: bool = False,
    m_splits: int = 4,
) -> dict:
    """Time plain and GNP train_steps of one configuration (and the reuse mode's steps if
    ``with_reuse``); returns a table row."""
    torch.manual_seed(0)
    model, source = build_model(name, num_classes, image_size)
    model = model.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    model.train()
    run_model: nn.Module = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def make_gnp(reuse: str) -> GNP:  # each its own base optimizer (momentum buffers) on the same parameters
        return GNP(
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True), r=0.1, alpha=0.8, reuse=reuse
        )

    opt = make_gnp("none")
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    def loss_fn(part: int | None = None) -> torch.Tensor:
        xs, ys = x, y
        if part is not None:  # sub-batch `part` of m_splits (gnp.m)
            m = batch // m_splits
            xs, ys = x[part * m : (part + 1) * m], y[part * m : (part + 1) * m]
        with autocast():
            logits = run_model(xs)
        return F.cross_entropy(logits.float(), ys)

    def sgd() -> object:
        return opt.train_step(loss_fn, model=run_model, gnp=False, clip_norm=5.0)

    def gnp() -> object:
        return opt.train_step(loss_fn, model=run_model, gnp=True, clip_norm=5.0)

    fns: dict[str, Callable[[], object]] = {"sgd": sgd, "gnp": gnp}
    if m_splits > 1:
        m_opt = make_gnp("none")
        fns["gnp_m"] = lambda: m_opt.train_step(loss_fn, model=run_model, gnp=True, clip_norm=5.0, sub_batches=m_splits)
    if with_reuse:
        reuse_opt = make_gnp("looksam")
        # reuse_full before reuse: v is stored before the first plain step (warm-up keeps this order).
        fns["reuse_full"] = lambda: reuse_opt.train_step(loss_fn, model=run_model, gnp=True, clip_norm=5.0)
        fns["reuse"] = lambda: reuse_opt.train_step(loss_fn, model=run_model, gnp=False, clip_norm=5.0)
    compile_start = time.perf_counter()
    for _ in range(warmup):  # includes compilation of both graph variants (BN frozen in pass 2)
        for fn in fns.values():
            fn()
    _sync(device)
    warm_s = time.perf_counter() - compile_start
    best = time_interleaved(fns, device, steps, rounds)
    t_sgd, t_gnp = best["sgd"], best["gnp"]
    extra = {}
    if with_reuse:
        extra = {
            "reuse_ms": best["reuse"] * 1e3,
            "reuse_full_ms": best["reuse_full"] * 1e3,
            "every4_x_sgd": (3 * t_sgd + t_gnp) / 4 / t_sgd,
            "reuse4_x_sgd": (3 * best["reuse"] + best["reuse_full"]) / 4 / t_sgd,
        }
    if m_splits > 1:
        extra.update({"m_splits": m_splits, "gnp_m_ms": best["gnp_m"] * 1e3, "m_x_gnp": best["gnp_m"] / t_gnp})
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "source": source,
        "params_M": params / 1e6,
        "batch": batch,
        "px": image_size,
        "precision": "bf16" if amp == torch.bfloat16 else "fp32",
        "mode": "compile" if compile_model else "eager",
        "sgd_ms": t_sgd * 1e3,
        "gnp_ms": t_gnp * 1e3,
        "ratio": t_gnp / t_sgd,
        "warmup_s": warm_s,
        **extra,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
    }


def parse_modes(text: str, prog: str) -> list[str] | None:
    """``--modes`` ("eager", "compile" or both, comma separated) as a list; None (after printing the
    one-line error for ``prog``) if invalid."""
    modes = [m for m in text.split(",") if m]
    if modes and all(m in ("eager", "compile") for m in modes):
        return modes
    print(f"{prog}: --modes {text!r}: expected eager, compile or eager,compile", file=sys.stderr)
    return None


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'model':<12} {'params':>7} {'batch':>5} {'px':>4} {'prec':>5} {'mode':>8} "
        f"{'SGD ms':>9} {'GNP ms':>9} {'GNP/SGD':>8} {'reuse ms':>9} {'every4':>7} {'reuse4':>7} "
        f"{'GNP m ms':>9} {'m/GNP':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        reuse = (
            f"{r['reuse_ms']:>9.2f} {r['every4_x_sgd']:>7.3f} {r['reuse4_x_sgd']:>7.3f}"
            if "reuse_ms" in r
            else f"{'-':>9} {'-':>7} {'-':>7}"
        )
        msharp = f"{r['gnp_m_ms']:>9.2f} {r['m_x_gnp']:>6.2f}" if "gnp_m_ms" in r else f"{'-':>9} {'-':>6}"
        print(
            f"{r['model']:<12} {r['params_M']:>6.1f}M {r['batch']:>5} {r['px']:>4} {r['precision']:>5} "
            f"{r['mode']:>8} {r['sgd_ms']:>9.2f} {r['gnp_ms']:>9.2f} {r['ratio']:>8.3f} {reuse} {msharp}"
        )
    print(
        "every4, reuse4: time per step relative to SGD of one full GNP step in 4 (plain / reuse-corrected "
        "steps between); GNP m: the GNP step with m = batch/m_splits (gnp.m), m/GNP its cost relative to GNP"
    )
    for r in rows:
        if r["source"] not in ("trainer.models", "bench SmallCNN"):
            print(f"note: {r['model']} from {r['source']}")


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the CPU row and (on CUDA) the GPU rows, print the table."""
    ap = argparse.ArgumentParser(prog="python -m trainer.bench.gnp", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-steps", type=int, default=3)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="wrn28_10,resnet50", help="CUDA models (comma separated)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: skip the torch.compile rows")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU row")
    ap.add_argument("--modes", default="eager,compile", help="CUDA: eager, compile or both (comma separated)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--m-splits", type=int, default=4, help="sub-batches of the gnp.m column (1 = skip it)")
    args = ap.parse_args(argv)
    modes = parse_modes(args.modes, "bench-gnp")
    if modes is None:
        return 2
    if args.m_splits < 1 or 32 % args.m_splits:
        print(f"bench-gnp: --m-splits {args.m_splits}: expected a divisor of the CPU batch 32", file=sys.stderr)
        return 2
    if args.no_compile:
        modes = [m for m in modes if m != "compile"]

    rows = []
    print(f"torch {torch.__version__}, python {platform.python_version()}, CPU threads {torch.get_num_threads()}")
    if not args.no_cpu:
        rows.append(
            bench_one(
                "small_cnn",
                device=torch.device("cpu"),
                batch=32,
                image_size=32,
                num_classes=10,
                amp=None,
                channels_last=False,
                compile_model=False,
                steps=args.cpu_steps,
                rounds=args.rounds,
                warmup=2,
                with_reuse=True,
                m_splits=args.m_splits,
            )
        )
        rows[-1]["model"] = "small_cnn"
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        print(f"GPU: {torch.cuda.get_device_name(device)}")
        configs = {"wrn28_10": (32, 10), "resnet50": (224, 1000)}
        for name in [m for m in args.models.split(",") if m]:
            size, classes = configs.get(name, (32, 10))
            for mode in modes:
                rows.append(
                    bench_one(
                        name,
                        device=device,
                        batch=256,
                        image_size=size,
                        num_classes=classes,
                        amp=torch.bfloat16,
                        channels_last=True,
                        compile_model=mode == "compile",
                        steps=args.gpu_steps,
                        rounds=args.rounds,
                        warmup=3,
                        with_reuse=True,
                        m_splits=args.m_splits,
                    )
                )
                print(f"  {name} {mode}: GNP/SGD {rows[-1]['ratio']:.3f}", flush=True)
                torch.cuda.empty_cache()
    else:
        print("no CUDA device: GPU rows (WRN-28-10, ResNet-50; bf16, channels_last, eager/compile) skipped")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
