"""Conventions and building blocks shared by the families of the model zoo.

* ``batch_norm`` / ``BN_MOMENTUM`` / ``BN_EPS``: every BatchNorm of the zoo uses the reference's
  Flax settings (momentum 0.9 = PyTorch ``momentum=0.1``, eps 1e-5).
* ``init_reference_``: the reference's initialisation of conv, BN and Linear layers
  (``models/available_models/util.py``). ViT has its own rules (``trainer.models.vit``).
* ``ForwardBackwardScale`` / ``scale_with_backward``: multiply by one coefficient in the forward
  and by another in the backward. Shake-Shake and ShakeDrop are both built on it.
* ``shake_shake`` and ``shake_drop``: the two stochastic mixing rules, with the reference's
  ``true_gradient`` switch (backward coefficient = forward coefficient).

Randomness and GNP. GNP runs two forward/backward passes per step on the same batch and restores
the torch RNG state in between, so both passes must draw the *same* forward gates (reference: the
same ``shake`` key in both passes). The gates are therefore drawn in the forward only, from the
default generator of the input's device, and the backward gate is drawn there too, **whether or
not it is used**: the number of values drawn must not depend on ``true_gradient``, or pass 1 (true
gradient) and pass 2 (independent backward gate) would consume different amounts of the stream
and later modules (dropout, the next block) would see different random numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BN_MOMENTUM",
    "BN_EPS",
    "batch_norm",
    "init_reference_",
    "ForwardBackwardScale",
    "scale_with_backward",
    "shake_shake",
    "shake_drop",
]

# PyTorch's momentum is the weight of the *new* batch statistic: 0.1 here = Flax momentum 0.9.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with the reference's momentum and epsilon."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def init_reference_(model: nn.Module) -> None:
    """Initialise ``model`` in place as the reference does.

    Conv kernels ``kaiming_normal_(fan_out)`` (std ``√(2/(out·kh·kw))``), conv biases 0; BN γ = 1,
    β = 0; every Linear weight ``U(−1/√out_features, 1/√out_features)`` and bias 0, which for the
    classifier is ``U(−1/√num_classes, 1/√num_classes)``. Families whose reference uses another
    rule for hidden Linear layers must re-initialise those after calling this.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ForwardBackwardScale(torch.autograd.Function):
    """``y = x · forward_coef``, but ``∂L/∂x = ∂L/∂y · backward_coef``.

    The coefficients are constants (no gradient) broadcastable to ``x``, typically one value per
    sample of shape ``(N, 1, 1, 1)``. This is the reference's
    ``x·c_b + stop_gradient(x·c_f − x·c_b)`` without the extra tensors.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward_coef: Tensor, backward_coef: Tensor) -> Tensor:
        """Scale ``x`` by ``forward_coef`` and keep ``backward_coef`` for the backward."""
        ctx.save_for_backward(backward_coef)
        return x * forward_coef

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        """Scale the incoming gradient by ``backward_coef``; the coefficients get no gradient."""
        (backward_coef,) = ctx.saved_tensors
        return grad_output * backward_coef, None, None


def scale_with_backward(x: Tensor, forward_coef: Tensor, backward_coef: Tensor) -> Tensor:
    """``x · forward_coef`` in the forward, gradient scaled by ``backward_coef`` (see
    ``ForwardBackwardScale``). The coefficients are cast to ``x``'s dtype so that bf16/fp16
    activations stay in their dtype."""
    forward_coef = forward_coef.to(x.dtype)
    backward_coef = backward_coef.to(x.dtype)
    return ForwardBackwardScale.apply(x, forward_coef, backward_coef)


def _per_sample_uniform(x: Tensor, low: float, high: float) -> Tensor:
    """One ``U(low, high)`` value per sample, shape ``(N, 1, …, 1)`` broadcastable to ``x``.

    Drawn in float32 whatever ``x``'s dtype, so the random stream does not depend on AMP.
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return torch.rand(shape, device=x.device, dtype=torch.float32) * (high - low) + low


def shake_shake(a: Tensor, b: Tensor, *, training: bool, true_gradient: bool = False) -> Tensor:
    """Shake-Shake mix of two residual branches (Gastaldi 2017, "Shake-Shake-Image").

    Training: per-sample gate ``g ~ U(0, 1)`` in the forward, ``a·g + b·(1 − g)``; the backward
    sends ``h·∂L/∂y`` to ``a`` and ``(1 − h)·∂L/∂y`` to ``b`` with an independent per-sample
    ``h ~ U(0, 1)``, or with ``h = g`` when ``true_gradient`` (the plain gradient of the gated
    forward; the GNP reference uses it in pass 1). Both gates are always drawn (module docstring).
    Evaluation: ``0.5·(a + b)``, the expected forward.

    Written as ``b + S(a − b)`` with ``S`` scaling by ``g`` forward and ``h`` backward, which has
    exactly these gradients: ``∂y/∂a = h``, ``∂y/∂b = 1 − h``.
    """
    if not training:
        return 0.5 * (a + b)
    gate_forward = _per_sample_uniform(a, 0.0, 1.0)
    gate_backward = _per_sample_uniform(a, 0.0, 1.0)
    if true_gradient:
        gate_backward = gate_forward
    return b + scale_with_backward(a - b, gate_forward, gate_backward)


def shake_drop(
    x: Tensor,
    keep_prob: float,
    *,
    training: bool,
    true_gradient: bool = False,
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    beta_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """ShakeDrop on a residual branch ``x`` (Yamada et al. 2018), as the reference applies it.

    Training, per sample: ``b ~ Bernoulli(keep_prob)``, ``α ~ U(alpha_range)``,
    ``β ~ U(beta_range)``. Forward coefficient ``b + α − b·α`` (1 when kept, α when not);
    backward coefficient ``b + β − b·β`` (1 or β), or the forward coefficient when
    ``true_gradient``. All three are always drawn (module docstring).
    Evaluation: ``x`` times the expected forward coefficient ``p + E[α]·(1 − p)``, which is ``p``
    for the default ``α ~ U(−1, 1)``.
    """
    alpha_mean = 0.5 * (alpha_range[0] + alpha_range[1])
    if not training:
        return x * (keep_prob + alpha_mean - keep_prob * alpha_mean)
    keep = _per_sample_uniform(x, 0.0, 1.0) < keep_prob
    alpha = _per_sample_uniform(x, *alpha_range)
    beta = _per_sample_uniform(x, *beta_range)
    # where() rather than the reference's b + α − b·α: exactly 1 for kept samples (1 + α − α need not be).
    one = torch.ones((), device=x.device)
    forward_coef = torch.where(keep, one, alpha)
    backward_coef = forward_coef if true_gradient else torch.where(keep, one, beta)
    return scale_with_backward(x, forward_coef, backward_coef)
