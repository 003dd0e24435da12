"""optim.weight_decay is decoupled for SGD as for AdamW: θ ← θ − lr·wd·θ outside the momentum and outside GNP's
g1/perturbation/g2, checked against updates written out by hand in fp64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import GNPConfig, OptimConfig
from trainer.optim.factory import SGDW, build_optimizer

LR, WD, MU = 0.1, 0.05, 0.9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_weight_decay_is_decoupled_from_momentum(nesterov: bool) -> None:
    """Three plain steps (r = 0) against the hand-written decoupled-decay momentum SGD."""
    model = _model()
    x, y = _data()
    cfg = OptimConfig(name="sgd", lr=LR, momentum=MU, nesterov=nesterov, weight_decay=WD)
    opt, _ = build_optimizer(model, cfg, GNPConfig(r=0.0, alpha=0.0))
    assert isinstance(opt.base_optimizer, SGDW)
    theta = [p.detach().clone() for p in model.parameters()]
    buf = [torch.zeros_like(t) for t in theta]
    ref = _model()
    for step in range(3):
        with torch.no_grad():
            for q, t in zip(ref.parameters(), theta):
                q.copy_(t)
        grads = torch.autograd.grad(_loss(ref, x, y), list(ref.parameters()))
        for i, g in enumerate(grads):
            # the momentum sees the loss gradient only; the decay acts on the weights directly
            buf[i] = g.clone() if step == 0 else MU * buf[i] + g
            d = g + MU * buf[i] if nesterov else buf[i]
            theta[i] = theta[i] - LR * WD * theta[i] - LR * d
        opt.train_step(lambda: _loss(model, x, y), model=model)
    for p, t in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-14)
    # the group keeps SGD's key and value: checkpoints keep their format
    assert all(g["weight_decay"] == WD for g in opt.param_groups)


def test_torch_sgd_weight_decay_would_differ() -> None:
    """The check above has teeth: torch's coupled SGD decay (through the momentum) gives other weights."""
    torch.manual_seed(0)
    a, b = _model(), _model()
    x, y = _data()
    opts = [
        SGDW(a.parameters(), lr=LR, momentum=MU, weight_decay=WD),
        torch.optim.SGD(b.parameters(), lr=LR, momentum=MU, weight_decay=WD),
    ]
    for _ in range(3):
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert diff > 1e-6


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gnp_step_decay_stays_out_of_g1_and_the_perturbation(name: str) -> None:
    """One GNP step with and without weight decay: the weights differ by exactly lr·wd·θ, so the decay did not
    change g1, the perturbation, g2 or (first step) the optimizer's moments."""
    x, y = _data()
    out = []
    for wd in (0.0, WD):
        model = _model()
        theta = [p.detach().clone() for p in model.parameters()]
        cfg = OptimConfig(name=name, lr=LR, momentum=MU, weight_decay=wd)
        opt, _ = build_optimizer(model, cfg, GNPConfig(r=0.05, alpha=0.8, norm_perturbations=True))
        info = opt.train_step(lambda m=model: _loss(m, x, y), model=model, clip_norm=0.0)
        assert info.gnp
        out.append([p.detach().clone() for p in model.parameters()])
    for plain, decayed, t in zip(out[0], out[1], theta):
        torch.testing.assert_close(decayed, plain - LR * WD * t, rtol=0, atol=1e-14)
