"""LR, gradient-regularization warmup and hybrid schedules against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import config
from trainer.loop import StepPolicy
from trainer.optim.schedules import gr_warmup, is_gnp_step, learning_rate


def test_cosine_with_warmup_closed_form():
    kw = dict(base_lr=0.4, kind="cosine", warmup_steps=10, total_steps=110)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(0.2)
    assert learning_rate(10, **kw) == pytest.approx(0.4)
    assert learning_rate(60, **kw) == pytest.approx(0.2)  # halfway through the decay: cos(pi/2) = 0
    assert learning_rate(35, **kw) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(110, **kw) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_first_update_uses_base_lr():
    assert learning_rate(0, base_lr=0.1, kind="cosine", warmup_steps=0, total_steps=100) == 0.1
    assert learning_rate(0, base_lr=0.1, kind="constant", warmup_steps=0, total_steps=100) == 0.1


def test_step_schedule():
    kw = dict(base_lr=1.0, kind="step", warmup_steps=0, total_steps=100, milestones=(10, 20), gamma=0.5)
    assert [learning_rate(s, **kw) for s in (0, 9, 10, 19, 20, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_unknown_schedule_is_an_error_not_constant():  # the reference silently falls back to constant
    with pytest.raises(ValueError, match="schedule.name"):
        learning_rate(0, base_lr=1.0, kind="cosin", warmup_steps=0, total_steps=10)


def test_gr_warmup_strategies():
    kw = dict(r=0.1, alpha=0.8, warmup_steps=100, warmup_epochs=2)
    assert gr_warmup(25, 0, strategy="r", **kw) == pytest.approx((0.025, 0.8))
    assert gr_warmup(25, 0, strategy="lambda", **kw) == pytest.approx((0.1, 0.2))
    assert gr_warmup(150, 1, strategy="r", **kw) == pytest.approx((0.1, 0.8))
    assert gr_warmup(99, 1, strategy="zero", **kw) == (0.0, 0.8)  # per epoch: still in the warmup
    assert gr_warmup(100, 2, strategy="zero", **kw) == (0.1, 0.8)
    assert gr_warmup(0, 0, strategy="none", **kw) == (0.1, 0.8)
    with pytest.raises(ValueError, match="gnp.warmup"):
        gr_warmup(0, 0, strategy="ramp", **kw)


def test_hybrid_every_k_is_deterministic():
    assert [is_gnp_step(s, seed=0, p=1.0, every=3) for s in range(7)] == [True, False, False, True, False, False, True]


def test_hybrid_probability_is_p_and_reproducible():
    draws = [is_gnp_step(s, seed=7, p=0.3, every=1) for s in range(20000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.015  # binomial sd ~0.0032: 4.6 sigma
    # every rank and a resumed run compute the same sequence from (seed, step) alone
    assert draws[1000:1100] == [is_gnp_step(s, seed=7, p=0.3, every=1) for s in range(1000, 1100)]
    assert draws != [is_gnp_step(s, seed=8, p=0.3, every=1) for s in range(20000)]
    assert all(is_gnp_step(s, seed=1, p=1.0, every=1) for s in range(100))


def _applied(policy, step: int, epoch: int) -> tuple[float, float, float, bool]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    gnp = policy.apply(opt, step, epoch)
    g = opt.param_groups[0]
    return g["lr"], g["r"], g["alpha"], gnp


def test_step_policy_from_config_turns_epochs_into_steps():
    """10 steps per epoch: 1 warmup epoch = 10 steps, 4 epochs = 40 steps, milestone 2.5 = step 25."""
    sch = config.ScheduleConfig(name="cosine", warmup_epochs=1.0)
    gnp = config.GNPConfig(r=0.2, alpha=0.6, warmup="r", warmup_epochs=2.0, every=3)
    lp = config.LoopConfig(epochs=4, seed=5)
    policy = StepPolicy.from_config(sch, gnp, lp, config.OptimConfig(lr=0.4), steps_per_epoch=10)
    lr, r, alpha, _ = _applied(policy, 5, 0)
    assert lr == pytest.approx(0.2) and r == pytest.approx(0.2 * 5 / 20) and alpha == 0.6
    assert _applied(policy, 25, 2)[0] == pytest.approx(0.2 * (1 + math.cos(math.pi / 2)))  # halfway: 0.2
    assert _applied(policy, 40, 4)[0] == pytest.approx(0.0, abs=1e-12)
    assert _applied(policy, 30, 3)[1] == 0.2  # the r warmup ended at step 20
    assert [_applied(policy, s, 3)[3] for s in range(30, 34)] == [True, False, False, True]  # every 3rd step

    step = StepPolicy.from_config(
        config.ScheduleConfig(name="step", milestones=(2.5,), gamma=0.5),
        config.GNPConfig(),
        config.LoopConfig(epochs=4),
        config.OptimConfig(lr=1.0),
        steps_per_epoch=10,
    )
    assert [_applied(step, s, 0)[0] for s in (0, 24, 25, 39)] == [1.0, 1.0, 0.5, 0.5]
