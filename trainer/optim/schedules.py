"""Schedules as pure functions of the step: learning rate, gradient-regularization warmup, hybrid GNP.

Pure functions of (step, epoch, settings) so that a resumed run recomputes exactly the values of an
uninterrupted one and every rank agrees without communication.
"""

from __future__ import annotations

import math
import random


def learning_rate(
    step: int,
    *,
    base_lr: float,
    kind: str,
    warmup_steps: int,
    total_steps: int,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """LR for optimizer step `step` (0-based; the first update uses lr(0)).

    Linear warmup lr = base_lr*step/W for step < W, then
      cosine:   0.5*base_lr*(1 + cos(pi*(step-W)/(T-W)))  (decays to 0 at T; the reference's optax schedule)
      constant: base_lr
      step:     base_lr * gamma**(number of milestones <= step)   (milestones in steps)
    With no warmup the first update uses base_lr, as the reference does.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
    if kind == "constant":
        return base_lr
    if kind == "step":
        return base_lr * gamma ** sum(1 for m in milestones if step >= m)
    raise ValueError(f"schedule.name: invalid value {kind!r}; expected one of 'cosine', 'constant', 'step'")


def gr_warmup(
    step: int, epoch: int, *, r: float, alpha: float, strategy: str, warmup_steps: int, warmup_epochs: float
) -> tuple[float, float]:
    """(r, alpha) at this step under the gradient-regularization warmup.

    r:      r ramps linearly from 0 over warmup_steps (alpha fixed, so lambda = alpha*r ramps too)
    lambda: alpha ramps linearly from 0 (r fixed)
    zero:   r = 0 (plain steps) while epoch < warmup_epochs, decided per epoch as in the reference
    none:   unchanged
    """
    if strategy == "none" or warmup_epochs <= 0:
        return r, alpha
    ramp = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if strategy == "r":
        return r * ramp, alpha
    if strategy == "lambda":
        return r, alpha * ramp
    if strategy == "zero":
        return (0.0, alpha) if epoch < warmup_epochs else (r, alpha)
    raise ValueError(f"gnp.warmup: invalid value {strategy!r}; expected one of 'none', 'r', 'lambda', 'zero'")


def is_gnp_step(step: int, *, seed: int, p: float, every: int) -> bool:
    """Whether step `step` is a two-pass GNP step under hybrid training.

    every > 1: deterministic, steps 0, k, 2k, ... are GNP steps. Otherwise a Bernoulli(p) draw from a
    generator seeded by (seed, step): every rank computes the same answer with no communication, and a
    resumed run draws the same sequence.
    """
    if every > 1:
        return step % every == 0
    if p >= 1.0:
        return True
    return random.Random(f"gnp-hybrid/{seed}/{step}").random() < p
