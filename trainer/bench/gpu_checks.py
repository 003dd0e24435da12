"""Correctness of GNP on the accelerator (``python -m trainer.bench.gpu_checks [--json FILE]``).

CI has no GPU: the CPU tests check GNP against the exact math in fp64 (tests/test_gnp*.py). These
checks carry that result to the device by comparing with a CPU fp64 run of the same steps, and cover
what only exists there:

* ``fp64``: three GNP steps of a conv + BatchNorm net on the device (and a reuse="looksam" sequence
  full, plain, plain, full) equal the same steps on the CPU: the device kernels and GNP's device code
  (foreach ops, perturbation, BatchNorm freezing, clipping) compute the same update. Limit: relative
  difference 1e-9 over parameters and BN running statistics.
* ``bf16`` (autocast + channels_last) and ``fp16`` (autocast + GradScaler): the first GNP update's
  direction agrees with fp32's (cosine >= 0.98), so does the part of it that GNP adds to the plain
  step (GNP update − plain update, cosine >= 0.8: one GNP step is only a few degrees from the plain
  one, so the first cosine alone cannot see GNP switched off), and every value stays finite.
* ``normalize``: the loaders' uint8 -> float conversion (``Normalizer``, channels_last, from a CPU
  batch as the FFCV pipeline's last CPU stage hands it over) gives on the device exactly the floats
  it gives on the CPU (max difference 0: one float32 subtraction and one multiplication, both
  correctly rounded everywhere).
* ``ddp``: the same fp64 steps through DistributedDataParallel on a one-rank process group (NCCL on
  CUDA, gloo on the CPU) equal the unwrapped model's (1e-12): the no_sync first pass, the reducer's
  buckets and the reuse mode's all-reduce run on that backend. One GPU cannot host two NCCL ranks
  (NCCL refuses two ranks on one device), so averaging across ranks is tested with gloo on the CPU
  (tests/test_gnp_dist.py, tests/test_gnp_reuse.py).

A check that raises on the device is reported as failed, with its error, and the others still run.
Exit status 0 when every check passes, 1 otherwise. On a machine without CUDA the same checks run
with the CPU as "device" (the comparisons are then trivially tight; that is the CI smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import socket
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data.loaders import Normalizer
from trainer.optim import GNP

FULL3 = (True, True, True)
REUSE_PATTERN = (True, False, False, True)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
        for _ in range(n)
    ]


def run_steps(
    device: torch.device,
    dtype: torch.dtype,
    pattern: tuple[bool, ...],
    *,
    reuse: str = "none",
    precision: str | None = None,
    channels_last: bool = False,
    ddp: bool = False,
) -> list[Tensor]:
    """Train ``_net`` for len(pattern) steps (True = GNP step, False = plain) from a fixed init;
    returns its parameters and BN running statistics as fp64 CPU tensors."""
    torch.manual_seed(0)
    model = _net().to(dtype=dtype)  # initialised on the CPU: identical on every device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    run_model: nn.Module = model
    if ddp:
        run_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt = GNP(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        r=0.1,
        alpha=0.8,
        reuse=reuse,
    )
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    for (x, y), full in zip(_batches(len(pattern)), pattern):
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        y = y.to(device)

        def loss_fn() -> Tensor:
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                logits = run_model(x)
            return F.cross_entropy(logits.float(), y)

        opt.train_step(loss_fn, model=run_model, gnp=full, scaler=scaler, clip_norm=5.0)
    out = [
        t.detach().to("cpu", torch.float64).clone()
        for t in [*model.parameters(), *model.buffers()]
        if t.is_floating_point()
    ]
    del run_model, opt, model
    gc.collect()
    return out


def rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """max over tensors of ||a - b|| / ||b|| (0 for two zero tensors)."""
    return max(float((x - y).norm() / y.norm()) if y.norm() > 0 else float((x - y).norm()) for x, y in zip(a, b))


def cosine_of_updates(a: list[Tensor], b: list[Tensor], start: list[Tensor]) -> float:
    """Cosine between the updates a - start and b - start over all parameters together (``run_steps``
    lists the parameters first; the BN running statistics after them are left out: their drift towards
    the batch statistics is alike for any update and would hide a wrong gradient)."""
    n = len(list(_net().parameters()))
    da = torch.cat([(x - s).flatten() for x, s in zip(a[:n], start[:n])])
    db = torch.cat([(y - s).flatten() for y, s in zip(b[:n], start[:n])])
    return float(da @ db / (da.norm() * db.norm()))


def _shift(a: list[Tensor], b: list[Tensor], start: list[Tensor]) -> list[Tensor]:
    """start + (a - b): the update difference of two runs, as a run that cosine_of_updates can compare."""
    return [x - y + z for x, y, z in zip(a, b, start)]


def _initial() -> list[Tensor]:
    """The parameters and BN statistics every run of ``run_steps`` starts from (fp64, CPU)."""
    torch.manual_seed(0)
    model = _net()
    return [t.detach().double().clone() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]


def normalization_diff(device: torch.device) -> float:
    """Largest |device - CPU| of the loaders' normalization of one random uint8 channels_last batch."""
    nhwc = torch.randint(0, 256, (16, 24, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = [120.5, 110.25, 99.0], [60.1, 58.7, 61.3]
    images = nhwc.permute(0, 3, 1, 2)  # FFCV's NHWC buffer viewed as NCHW
    on_cpu = Normalizer(mean, std, device=torch.device("cpu"), channels_last=True)(images)
    on_device = Normalizer(mean, std, device=device, channels_last=True)(images)
    if not on_device.is_contiguous(memory_format=torch.channels_last) or on_device.device.type != device.type:
        return math.inf
    return float((on_device.cpu() - on_cpu).abs().max())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checks(device: torch.device) -> list[dict]:
    """Run every check on ``device``; one row per check."""
    rows: list[dict] = []
    cpu = torch.device("cpu")

    def record(name: str, value: float, limit: float, kind: str) -> None:
        ok = math.isfinite(value) and (value <= limit if kind == "max" else value >= limit)
        rows.append({"check": name, "value": value, "limit": limit, "kind": kind, "ok": ok, "device": str(device)})
        print(
            f"  {name}: {value:.3e} ({'<=' if kind == 'max' else '>='} {limit:g}) {'ok' if ok else 'FAILED'}",
            flush=True,
        )

    def failed(name: str, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        rows.append({"check": name, "ok": False, "error": text, "device": str(device)})
        print(f"  {name}: FAILED ({text})", flush=True)

    def check(name: str, value: Callable[[], float], limit: float, kind: str) -> None:
        try:
            record(name, value(), limit, kind)
        except Exception as e:  # noqa: BLE001 — a crash on the device is a failed row; the rest still run
            failed(name, e)

    check(
        "fp64 GNP steps, device vs CPU",
        lambda: rel_diff(run_steps(device, torch.float64, FULL3), run_steps(cpu, torch.float64, FULL3)),
        1e-9,
        "max",
    )
    check(
        "fp64 GNP reuse steps, device vs CPU",
        lambda: rel_diff(
            run_steps(device, torch.float64, REUSE_PATTERN, reuse="looksam"),
            run_steps(cpu, torch.float64, REUSE_PATTERN, reuse="looksam"),
        ),
        1e-9,
        "max",
    )
    check("loader normalization, device vs CPU (max abs diff)", lambda: normalization_diff(device), 0.0, "max")

    start = _initial()
    fp32: list[Tensor] | None = None
    for precision in ("bf16", "fp16"):
        names = (f"{precision} GNP update vs fp32 (cosine)", f"{precision} GNP − plain update vs fp32 (cosine)")
        try:
            if fp32 is None:
                fp32, fp32_plain = run_steps(device, torch.float32, (True,)), run_steps(device, torch.float32, (False,))
            low = run_steps(device, torch.float32, (True,), precision=precision, channels_last=True)
            low_plain = run_steps(device, torch.float32, (False,), precision=precision, channels_last=True)
        except Exception as e:  # noqa: BLE001 — a crash on the device fails both checks; the rest still run
            for name in names:
                failed(name, e)
            continue
        finite = all(bool(torch.isfinite(t).all()) for t in [*low, *low_plain])
        record(names[0], cosine_of_updates(low, fp32, start) if finite else -1.0, 0.98, "min")
        # One GNP update is within a few degrees of the plain one, so the cosine above cannot tell a GNP
        # step from a plain step; the difference GNP - plain (the penalty's share) can.
        record(
            names[1],
            cosine_of_updates(_shift(low, low_plain, start), _shift(fp32, fp32_plain, start), start)
            if finite
            else -1.0,
            0.8,
            "min",
        )

    backend = "nccl" if device.type == "cuda" else "gloo"
    name = f"fp64 GNP reuse steps, DDP ({backend}, 1 rank) vs unwrapped"
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            device_id=device if device.type == "cuda" else None,
        )
    except Exception as e:  # noqa: BLE001 — no process group: this check fails, the report is still written
        failed(name, e)
        return rows
    try:
        plain = run_steps(device, torch.float64, REUSE_PATTERN, reuse="looksam")
        wrapped = run_steps(device, torch.float64, REUSE_PATTERN, reuse="looksam", ddp=True)
        record(name, rel_diff(wrapped, plain), 1e-12, "max")
    except Exception as e:  # noqa: BLE001
        failed(name, e)
    finally:
        gc.collect()
        dist.destroy_process_group()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench.gpu_checks", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    # An indexed device: DDP's device_ids and init_process_group's device_id want one.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA: smoke run)"
    print(f"gpu-checks on {name}, torch {torch.__version__}", flush=True)
    rows = checks(device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = [r["check"] for r in rows if r["ok"] is False]
    print(f"gpu-checks: {len(rows) - len(failed)} of {len(rows)} passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
