"""Additive PyramidNet (bottleneck) and its ShakeDrop variant, as in the GNP reference
(``models/available_models/pyramidnet.py`` and ``pyramidnet_shakedrop.py``).

Layout (Han, Kim & Kim 2017, "Deep Pyramidal Residual Networks"):

* stem: conv3×3, 16 channels, no bias; **no BN** for the plain variants, **+ BN** (no ReLU) for
  the ShakeDrop variants (as in the reference);
* ``n = (depth − 2) / 9`` bottleneck blocks per group, three groups, ``L = 3n`` blocks; stride 1,
  2, 2 in the first block of each group;
* block ``k = 1..L`` has bottleneck width ``D_k = ⌊16 + k·α/L⌋`` and outputs ``4·D_k`` channels:
  ``BN → conv1×1 → BN → ReLU → conv3×3(stride) → BN → ReLU → conv1×1(4·D_k) → BN``
  (no conv bias), plus the shortcut;
* shortcut: 2×2/2 average pool when the block strides, then zero-padding of the new channels
  (appended after the existing ones); no parameters;
* final BN → ReLU → global average pool (the reference's 8×8 pool at 32 px) → Linear.

Width rounding. The PyramidNet paper defines ``D_k = ⌊16 + k·α/L⌋`` (floor of the accumulated
width), and its published parameter counts follow that rule; this is the default
(``rounding="floor"``), computed in exact rational arithmetic. (Accumulating ``α/L`` in floating
point and flooring, as a literal transcription would, loses a channel wherever ``k·α/L`` is an
integer — e.g. the last block of PyramidNet-164 α=48 gets 63 instead of 16 + 48 = 64.) The GNP
reference, like the authors' public Torch and PyTorch code, rounds to the nearest integer
instead (``int(round(·))``): ``rounding="round"`` builds exactly that network. The two differ by
one channel in many blocks (0.6–2 % of the parameters); no half-integer case occurs in the four
paper variants, so Python's round-half-to-even and Torch's ``floor(x + 0.5)`` agree.

Parameters (CIFAR-10, i.e. 10 classes; ``floor`` / ``round``; published figure):

=====================  ===========  ===========  =========
PyramidNet-164 α=48     1,683,970    1,715,410    1.7 M
PyramidNet-164 α=270   27,215,989   27,215,989   27.0 M
PyramidNet-200 α=240   26,616,968   26,752,670   26.6 M
PyramidNet-272 α=200   26,049,530   26,210,810   26.0 M
=====================  ===========  ===========  =========

(α = 270 gives integer widths, so both rules agree; the published 27.0 M is 0.8 % below the
count of the described layout. The ShakeDrop variants add the stem BN: +32.)

ShakeDrop (Yamada et al. 2018) on every block's residual branch before the addition, with keep
probability ``p_l = 1 − (l/L)·0.5`` for block ``l = 1..L`` (``final_drop`` = 0.5 is the drop
probability of the last block): training draws per sample ``b ~ Bernoulli(p_l)``,
``α ~ U(−1, 1)``, ``β ~ U(0, 1)``; forward coefficient 1 if ``b`` else α, backward coefficient 1
if ``b`` else β; evaluation scales by ``p_l``. Every ``ShakeDropBlock`` has a ``true_gradient``
attribute like Shake-Shake's (``trainer.models.shakeshake``): True → the backward uses the
forward's coefficient (GNP pass 1). The reference's ShakeDrop model cannot be constructed (it
passes ``prob=`` to a block whose field is ``mask_prob``); this one is built and tested.

Initialisation: ``trainer.models.layers.init_reference_``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import batch_norm, init_reference_, shake_drop
from .registry import register_model

__all__ = ["PyramidNet", "PyramidBottleneck", "ShakeDropBlock", "pyramid_widths", "pool_pad"]

Rounding = Literal["floor", "round"]
_ROUNDINGS = ("floor", "round")
EXPANSION = 4


def pyramid_widths(depth: int, alpha: int, rounding: str = "floor", base: int = 16) -> list[int]:
    """Bottleneck widths ``D_1..D_L`` of an additive PyramidNet of ``depth = 9n + 2`` layers.

    ``D_k = base + k·alpha/L`` with ``L = 3n``, floored (``"floor"``, the paper's rule) or rounded
    half up (``"round"``, the GNP reference's code). Exact rational arithmetic, so no block loses
    a channel to floating-point error.
    """
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"model: PyramidNet (bottleneck) depth must be 9n+2 with n >= 1, got {depth}")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"model: rounding must be one of {', '.join(_ROUNDINGS)}, got {rounding!r}")
    if alpha < 0:
        raise ValueError(f"model: PyramidNet alpha must be >= 0, got {alpha}")
    total = 3 * ((depth - 2) // 9)
    widths = []
    for k in range(1, total + 1):
        width = Fraction(base) + Fraction(alpha * k, total)
        widths.append(int(width) if rounding == "floor" else int(width + Fraction(1, 2)))
    return widths


def pool_pad(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """PyramidNet's parameter-free shortcut: average-pool by ``stride`` (kernel = stride) when
    ``stride > 1``, then zero-pad to ``out_channels`` (new channels appended after the old ones).

    Unlike WideResNet's ``pool_pad_shortcut`` it pools whenever the block strides, even if the
    channel count is unchanged (consecutive rounded widths can be equal). ``ceil_mode`` matches
    the strided conv on odd sizes, where the reference would fail.
    """
    if stride > 1:
        x = F.avg_pool2d(x, kernel_size=stride, stride=stride, ceil_mode=True)
    extra = out_channels - x.shape[1]
    if extra < 0:
        raise ValueError(f"model: zero-pad shortcut cannot shrink {x.shape[1]} to {out_channels} channels")
    return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x


class PyramidBottleneck(nn.Module):
    """BN-conv1×1-BN-ReLU-conv3×3(stride)-BN-ReLU-conv1×1(4×)-BN plus the pool-pad shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.out_channels = width * EXPANSION
        self.stride = stride
        self.residual = nn.Sequential(
            batch_norm(in_channels),
            nn.Conv2d(in_channels, width, 1, bias=False),
            batch_norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            batch_norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, self.out_channels, 1, bias=False),
            batch_norm(self.out_channels),
        )

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch (overridden by ShakeDrop)."""
        return self.residual(x)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        return self.branch(x) + pool_pad(x, self.out_channels, self.stride)


class ShakeDropBlock(PyramidBottleneck):
    """Pyramid bottleneck whose residual branch goes through ShakeDrop (see module docstring).

    Attributes:
        keep_prob: ``p_l``, the probability that the branch is kept unperturbed in training and
            its scale at evaluation.
        true_gradient: when True (GNP pass 1) the backward uses the forward's coefficient; when
            False (default) the independent β. Read at forward time.
    """

    true_gradient: bool

    def __init__(self, in_channels: int, width: int, stride: int, keep_prob: float) -> None:
        super().__init__(in_channels, width, stride)
        self.keep_prob = keep_prob
        self.true_gradient = False

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch, scaled by ShakeDrop."""
        return shake_drop(self.residual(x), self.keep_prob, training=self.training, true_gradient=self.true_gradient)

    def extra_repr(self) -> str:
        """Show the keep probability in ``print(model)``."""
        return f"keep_prob={self.keep_prob:.4f}"


class PyramidNet(nn.Module):
    """Additive bottleneck PyramidNet, optionally with ShakeDrop (see module docstring).

    Args:
        depth: ``9n + 2`` (164, 200, 272, ...).
        alpha: total widening ``α``; the last block's bottleneck width is about ``16 + α``.
        num_classes: classifier outputs.
        in_channels: input image channels.
        shakedrop: ShakeDrop on every residual branch, and BN after the stem conv.
        final_drop: drop probability ``1 − p_L`` of the last block (0.5 in the reference); block
            ``l`` keeps its branch with ``p_l = 1 − (l/L)·final_drop``.
        rounding: ``"floor"`` (paper) or ``"round"`` (GNP reference code) for the widths.
    """

    def __init__(
        self,
        depth: int,
        alpha: int,
        *,
        num_classes: int,
        in_channels: int = 3,
        shakedrop: bool = False,
        final_drop: float = 0.5,
        rounding: str = "floor",
    ) -> None:
        super().__init__()
        if not 0.0 <= final_drop <= 1.0:
            raise ValueError(f"model: final_drop must be in [0, 1], got {final_drop!r}")
        widths = pyramid_widths(depth, alpha, rounding)
        total = len(widths)
        per_group = total // 3
        stem: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)]
        if shakedrop:
            stem.append(batch_norm(16))
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        channels = 16
        for k, width in enumerate(widths, start=1):
            stride = 2 if k > per_group and (k - 1) % per_group == 0 else 1
            if shakedrop:
                keep_prob = 1.0 - (k / total) * final_drop
                blocks.append(ShakeDropBlock(channels, width, stride, keep_prob))
            else:
                blocks.append(PyramidBottleneck(channels, width, stride))
            channels = width * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.final_bn = batch_norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_reference_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.relu(self.final_bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _build(
    depth: int, alpha: int, shakedrop: bool, num_classes: int, in_channels: int, rounding: str, final_drop: float = 0.5
) -> PyramidNet:
    """Shared body of the registered builders (``image_size`` is irrelevant: global pooling)."""
    return PyramidNet(
        depth,
        alpha,
        num_classes=num_classes,
        in_channels=in_channels,
        shakedrop=shakedrop,
        final_drop=final_drop,
        rounding=rounding,
    )


@register_model("pyramidnet164_48")
def pyramidnet164_48(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, rounding: Rounding = "floor"
) -> PyramidNet:
    """PyramidNet-164 (bottleneck), α = 48: 18 blocks per group, widths 16 → 64."""
    return _build(164, 48, False, num_classes, in_channels, rounding)


@register_model("pyramidnet164_270")
def pyramidnet164_270(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, rounding: Rounding = "floor"
) -> PyramidNet:
    """PyramidNet-164 (bottleneck), α = 270: 18 blocks per group, widths 21 → 286."""
    return _build(164, 270, False, num_classes, in_channels, rounding)


@register_model("pyramidnet200_240")
def pyramidnet200_240(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, rounding: Rounding = "floor"
) -> PyramidNet:
    """PyramidNet-200 (bottleneck), α = 240: 22 blocks per group, widths 19 → 256."""
    return _build(200, 240, False, num_classes, in_channels, rounding)


@register_model("pyramidnet272_200")
def pyramidnet272_200(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, rounding: Rounding = "floor"
) -> PyramidNet:
    """PyramidNet-272 (bottleneck), α = 200: 30 blocks per group, widths 18 → 216."""
    return _build(272, 200, False, num_classes, in_channels, rounding)


@register_model("pyramidnet164_48_shakedrop")
def pyramidnet164_48_shakedrop(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    rounding: Rounding = "floor",
    final_drop: float = 0.5,
) -> PyramidNet:
    """PyramidNet-164 α = 48 with ShakeDrop and stem BN."""
    return _build(164, 48, True, num_classes, in_channels, rounding, final_drop)


@register_model("pyramidnet272_200_shakedrop")
def pyramidnet272_200_shakedrop(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    rounding: Rounding = "floor",
    final_drop: float = 0.5,
) -> PyramidNet:
    """PyramidNet-272 α = 200 with ShakeDrop and stem BN (the pyramidnet-sd-cifar recipe)."""
    return _build(272, 200, True, num_classes, in_channels, rounding, final_drop)


@register_model("pyramidnet_debug")
def pyramidnet_debug(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    shakedrop: bool = True,
    rounding: Rounding = "floor",
    final_drop: float = 0.5,
) -> PyramidNet:
    """Tiny PyramidNet-11 α = 12 for CPU tests: one block per group, widths 20/24/28 (outputs
    80/96/112). ShakeDrop on by default, like the pyramidnet-sd-cifar recipe's model."""
    return _build(11, 12, shakedrop, num_classes, in_channels, rounding, final_drop)
