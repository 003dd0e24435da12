"""Build the run's optimizer from the ``optim`` and ``gnp`` sections of the configuration."""

from __future__ import annotations

import torch

from trainer.config import GNPConfig, OptimConfig
from trainer.optim.gnp import GNP

__all__ = ["SGDW", "build_optimizer"]


class SGDW(torch.optim.SGD):
    """``torch.optim.SGD`` whose ``weight_decay`` is decoupled: θ ← θ − lr·wd·θ, then the plain SGD step.

    torch's own SGD adds wd·θ to the gradient, so the decay would run through the momentum buffer; here it is
    applied to the weights directly, outside the momentum, as AdamW does (Loshchilov & Hutter, "Decoupled
    Weight Decay Regularization", ICLR 2019). Under GNP the decay therefore never enters g1, the perturbation
    or g2 either: those are gradients of the loss, and the decay is not part of it. The param_group keys are
    SGD's own (``weight_decay`` included), so state dicts keep their format.
    """

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decays = [g["weight_decay"] for g in self.param_groups]
        for group, wd in zip(self.param_groups, decays):
            params = [p for p in group["params"] if p.grad is not None]
            if wd != 0 and params:
                # θ_t·(1 − lr·wd): the decay uses the weights before this step's gradient update, like AdamW
                torch._foreach_mul_(params, 1.0 - group["lr"] * wd)
            group["weight_decay"] = 0.0  # SGD's coupled decay off for the gradient step below
        try:
            super().step()
        finally:
            for group, wd in zip(self.param_groups, decays):
                group["weight_decay"] = wd
        return loss


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
        base = SGDW(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
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
