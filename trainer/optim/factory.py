"""Build the run's optimizer from the ``optim`` and ``gnp`` sections of the configuration."""

from __future__ import annotations

import torch

from trainer.config import GNPConfig, OptimConfig
from trainer.optim.gnp import GNP

__all__ = ["build_optimizer"]


def build_optimizer(
    model: torch.nn.Module, optim_cfg: OptimConfig, gnp_cfg: GNPConfig
) -> tuple[GNP, tuple[torch.nn.Parameter, ...]]:
    """GNP around the configured base optimizer; also returns the parameters under the L2 term.

    Trainable parameters only. With ``no_weight_decay_on_bn`` every parameter with ndim <= 1 (biases,
    normalisation scales and shifts) gets its own group with weight_decay 0 and is left out of the L2
    parameters; empty groups are dropped.
    """
    o, g = optim_cfg, gnp_cfg
    params = [p for p in model.parameters() if p.requires_grad]
    if o.no_weight_decay_on_bn:
        decay = [p for p in params if p.ndim > 1]
        groups = [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        decay, groups = params, [{"params": params, "weight_decay": o.weight_decay}]
    groups = [gr for gr in groups if gr["params"]]
    if o.name == "sgd":
        base = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    else:
        base = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.adam_eps)
    opt = GNP(
        base,
        r=g.r,
        alpha=g.alpha,
        norm_perturbations=g.norm_perturbations,
        sync_perturbations=g.sync_perturbations,
        eps=g.eps,
        reuse=g.reuse,
        reuse_weight=g.reuse_weight,
    )
    return opt, tuple(decay)
