"""The loop's throughput windows tile its wall time: logging and per-step work (checkpoints) count.

bench-e2e and `trainer compare` turn these windows into images/s and training time, so time spent
outside the optimizer step, such as writing the log record itself, must land in some window.
"""

from __future__ import annotations

import time

import torch

from trainer.dist import DistEnv
from trainer.loop import LoopState, LossSpec, StepPolicy, TrainContext, train_epoch
from trainer.optim.gnp import GNP

LOG_S = 0.2


class SlowSink:
    """Records the train records; each log takes LOG_S seconds (a slow disk or metrics endpoint)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, kind: str, record: dict) -> None:
        self.records.append(record)
        time.sleep(LOG_S)

    def progress(self, done: int, total: int, epoch: int) -> None:
        pass


def _policy(total_steps: int) -> StepPolicy:
    """Constant lr 0.1, GNP r=0.1 alpha=0.5 on every step."""
    return StepPolicy(
        base_lr=0.1,
        lr_kind="constant",
        lr_warmup_steps=0,
        total_steps=total_steps,
        lr_milestones=(),
        lr_gamma=0.1,
        r=0.1,
        alpha=0.5,
        gr_strategy="none",
        gr_warmup_steps=0,
        gr_warmup_epochs=0.0,
        hybrid_p=1.0,
        gnp_every=1,
        seed=0,
    )


def test_windows_cover_logging_and_after_step_time() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(10)]
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5)
    policy = _policy(total_steps=10)
    sink, state = SlowSink(), LoopState()
    start = time.perf_counter()
    ctx = TrainContext(
        model=model,
        opt=opt,
        env=DistEnv(0, 0, 1, torch.device("cpu")),
        policy=policy,
        loss_spec=LossSpec(),
        sink=sink,
        amp_dtype=None,
        scaler=None,
        clip_norm=0.0,
        max_steps=0,
        log_every=2,
    )
    train_epoch(ctx, loader, state, after_step=lambda: time.sleep(0.05) if state.step == 5 else None)
    wall = time.perf_counter() - start
    windows = [r["window_s"] for r in sink.records]
    assert len(windows) == 5 and sum(r["window_images"] for r in sink.records) == 80
    # Every window after the first holds the previous record's LOG_S of logging ...
    assert all(w >= LOG_S for w in windows[1:])
    # ... the third also the 0.05 s after step 5 ...
    assert windows[2] >= LOG_S + 0.05
    # ... and together they are the epoch's wall time, less only the last record's logging.
    assert wall - LOG_S - 0.05 <= sum(windows) <= wall - LOG_S + 1e-3
    for r in sink.records:
        assert r["images_per_s"] == r["window_images"] / r["window_s"]


def test_windows_count_the_steps_the_grad_scaler_skipped() -> None:
    """Batches holding an inf make every gradient non-finite, so GradScaler skips exactly those steps; each
    record counts the skips of its own window (summed on the device, read once per log step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    poisoned = {1, 4, 5}
    loader = []
    for i in range(10):
        x = torch.randn(8, 4)
        if i in poisoned:
            x[0, 0] = float("inf")
        loader.append((x, torch.randint(0, 3, (8,))))
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5)
    policy = _policy(total_steps=10)
    records: list[dict] = []

    class Sink:
        def log(self, kind: str, record: dict) -> None:
            records.append(record)

        def progress(self, done: int, total: int, epoch: int) -> None:
            pass

    before = [p.detach().clone() for p in model.parameters()]
    ctx = TrainContext(
        model=model,
        opt=opt,
        env=DistEnv(0, 0, 1, torch.device("cpu")),
        policy=policy,
        loss_spec=LossSpec(),
        sink=Sink(),
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4),
        log_every=2,
    )
    train_epoch(ctx, loader, LoopState())
    assert [r["window_skipped_steps"] for r in records] == [1, 0, 2, 0, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the skipped steps left no NaN behind
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_records_have_no_skip_count_without_a_scaler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5)
    policy = _policy(total_steps=2)
    sink = SlowSink()
    ctx = TrainContext(
        model=model,
        opt=opt,
        env=DistEnv(0, 0, 1, torch.device("cpu")),
        policy=policy,
        loss_spec=LossSpec(),
        sink=sink,
        log_every=1,
    )
    train_epoch(ctx, loader, LoopState())
    assert len(sink.records) == 2 and all("window_skipped_steps" not in r for r in sink.records)
