"""trainer.optim.factory.build_optimizer: base optimizer, param groups and GNP settings from the config sections."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import GNPConfig, OptimConfig
from trainer.optim.factory import SGDW, build_optimizer
from trainer.optim.gnp import GNP


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[3].bias.requires_grad_(False)  # frozen: in no group, not under L2
    return model


def ids(params) -> list[int]:
    return [id(p) for p in params]


GNP_CFG = GNPConfig(
    r=0.03, alpha=0.6, norm_perturbations=True, sync_perturbations=True, eps=1e-9, reuse="looksam", reuse_weight=0.25
)


def check_gnp_settings(opt: GNP) -> None:
    assert isinstance(opt, GNP)
    assert (opt.norm_perturbations, opt.sync_perturbations, opt.eps) == (True, True, 1e-9)
    assert (opt.reuse, opt.reuse_weight) == ("looksam", 0.25)
    assert all(g["r"] == 0.03 and g["alpha"] == 0.6 for g in opt.param_groups)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_sgd_with_bn_and_biases_exempt_from_decay() -> None:
    model = make_model()
    conv, bn, _, lin = model
    cfg = OptimConfig(name="sgd", lr=0.3, momentum=0.7, nesterov=False, weight_decay=5e-4, no_weight_decay_on_bn=True)
    opt, l2 = build_optimizer(model, cfg, GNP_CFG)
    check_gnp_settings(opt)
    base = opt.base_optimizer
    assert type(base) is SGDW  # torch's SGD with its weight_decay decoupled (tests/test_weight_decay.py)
    decay, exempt = opt.param_groups
    # ndim > 1: the conv and linear weights; ndim <= 1: the conv bias and BN scale/shift; the frozen bias nowhere
    assert ids(decay["params"]) == ids([conv.weight, lin.weight]) and decay["weight_decay"] == 5e-4
    assert ids(exempt["params"]) == ids([conv.bias, bn.weight, bn.bias]) and exempt["weight_decay"] == 0.0
    for g in (decay, exempt):
        assert (g["lr"], g["momentum"], g["nesterov"]) == (0.3, 0.7, False)
    assert ids(l2) == ids([conv.weight, lin.weight]) and isinstance(l2, tuple)


def test_adamw_single_group() -> None:
    model = make_model()
    conv, bn, _, lin = model
    cfg = OptimConfig(name="adamw", lr=2e-3, betas=(0.8, 0.95), adam_eps=1e-6, weight_decay=0.05)
    opt, l2 = build_optimizer(model, cfg, GNP_CFG)
    check_gnp_settings(opt)
    assert type(opt.base_optimizer) is torch.optim.AdamW
    (group,) = opt.param_groups
    trainable = [conv.weight, conv.bias, bn.weight, bn.bias, lin.weight]
    assert ids(group["params"]) == ids(trainable)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-3, (0.8, 0.95), 1e-6, 0.05)
    assert ids(l2) == ids(trainable)


def test_empty_group_dropped() -> None:
    """Only 1-d parameters: the decay group would be empty and is left out (torch rejects empty groups)."""
    model = nn.BatchNorm1d(3)
    opt, l2 = build_optimizer(model, OptimConfig(no_weight_decay_on_bn=True, weight_decay=0.1), GNPConfig())
    (group,) = opt.param_groups
    assert ids(group["params"]) == ids([model.weight, model.bias]) and group["weight_decay"] == 0.0
    assert l2 == ()
    assert opt.reuse == "none" and opt.state_dict()["reuse"] == {"v": {}}
