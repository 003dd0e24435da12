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
    """Records the train records; each log takes `delay` seconds (a slow disk or metrics endpoint)."""

    def __init__(self, delay: float = LOG_S) -> None:
        self.records: list[dict] = []
        self.delay = delay

    def log(self, kind: str, record: dict) -> None:
        self.records.append(record)
        time.sleep(self.delay)

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


def _train(loader: list, sink: SlowSink, *, log_every: int, scaler=None, after_step=None, state=None):
    """One epoch of GNP (r=0.1, alpha=0.5, SGD lr 0.1) on a 4 -> 3 linear model over `loader`: (the model, the
    epoch's wall time)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ctx = TrainContext(
        model=model,
        opt=GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.5),
        env=DistEnv(0, 0, 1, torch.device("cpu")),
        policy=_policy(total_steps=len(loader)),
        loss_spec=LossSpec(),
        sink=sink,
        scaler=scaler,
        log_every=log_every,
    )
    start = time.perf_counter()
    train_epoch(ctx, loader, state or LoopState(), after_step=after_step)
    return model, time.perf_counter() - start


def _batches(n: int, poisoned: tuple[int, ...] = ()) -> list:
    """n batches of 8; those in `poisoned` hold an inf, which makes every gradient of that step non-finite."""
    torch.manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(8, 4)
        if i in poisoned:
            x[0, 0] = float("inf")
        out.append((x, torch.randint(0, 3, (8,))))
    return out


def test_windows_cover_logging_and_after_step_time() -> None:
    sink, state = SlowSink(), LoopState()
    _, wall = _train(
        _batches(10),
        sink,
        log_every=2,
        state=state,
        after_step=lambda: time.sleep(0.05) if state.step == 5 else None,
    )
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
    """GradScaler skips exactly the poisoned steps; each record counts the skips of its own window (summed on
    the device, read once per log step), and the skipped steps leave no NaN in the weights."""
    sink = SlowSink(delay=0)
    torch.manual_seed(0)
    untrained = torch.nn.Linear(4, 3)
    model, _ = _train(_batches(10, poisoned=(1, 4, 5)), sink, log_every=2, scaler=torch.amp.GradScaler("cpu", 2.0**4))
    assert [r["window_skipped_steps"] for r in sink.records] == [1, 0, 2, 0, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(untrained.parameters(), model.parameters()))


def test_records_have_no_skip_count_without_a_scaler() -> None:
    sink = SlowSink(delay=0)
    _train(_batches(2), sink, log_every=1)
    assert len(sink.records) == 2 and all("window_skipped_steps" not in r for r in sink.records)
