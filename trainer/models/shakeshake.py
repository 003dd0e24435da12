"""WideResNet-26 2×96d with Shake-Shake regularisation, as in the GNP reference
(``models/available_models/wrn_shakeshake.py``, itself from google-research's Flax CIFAR models).

* stem: conv3×3, 16 channels, no bias → BN (no ReLU);
* three groups of ``n = (depth − 2) / 6`` blocks (4 for depth 26), widths ``w, 2w, 4w``
  (96/192/384), stride 1, 2, 2 in the first block of each group;
* block: ``x → ReLU`` feeds two branches ``conv3×3(stride) → BN → ReLU → conv3×3 → BN``, mixed by
  Shake-Shake (``trainer.models.layers.shake_shake``), plus the shortcut of the raw ``x``;
* shortcut: identity when the shape is unchanged; otherwise two paths — one on ``x``, one on ``x``
  shifted by one pixel up and left (zero in the last row/column) — each subsampled by the stride
  (the reference's 1×1 average pool) and projected by a 1×1 conv (no bias) to half the output
  channels, concatenated, BN (no ReLU). This includes the first block (16 → 96 at stride 1);
* final ReLU, global average pool, Linear. No final BN (the branches end in BN).

Shake-Shake (per-sample gates): training forward ``g·a + (1−g)·b`` with ``g ~ U(0,1)``, backward
with an independent ``h ~ U(0,1)``; evaluation ``0.5·(a + b)``. Every ``ShakeShakeBlock`` has a
``true_gradient: bool`` attribute (default False), read at forward time: True makes the backward
use the forward gate, i.e. the exact gradient of the sampled network. The GNP optimizer
(``trainer.optim.gnp``) sets it on every module that has it: True for pass 1, False for pass 2
and plain steps, as the reference does for models whose name contains "Shake".

Initialisation: ``trainer.models.layers.init_reference_`` (kaiming-normal fan-out convs,
``U(−1/√K, 1/√K)`` classifier, BN momentum 0.1 = Flax 0.9, eps 1e-5).
Parameters on 10 classes: 26,192,922 (Gastaldi 2017 reports 26.2 M for 26 2×96d).

Deviation: the reference takes the identity shortcut whenever the channel count is unchanged,
even with a stride; here a strided block always projects (never happens in this layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import batch_norm, init_reference_, shake_shake
from .registry import register_model

__all__ = ["WideResNetShakeShake", "ShakeShakeBlock", "ShiftedProjection"]


class ShiftedProjection(nn.Module):
    """Shake-Shake's projection shortcut: two 1×1 convs (one on the input shifted by one pixel)
    to ``out_channels / 2`` each, concatenated, then BN.

    The shift makes the two halves sample the complementary pixel of each 2×2 cell when the
    stride is 2, so the shortcut does not discard three quarters of the input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"model: Shake-Shake projection needs an even channel count, got {out_channels}")
        self.stride = stride
        self.conv_a = nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)
        self.conv_b = nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)
        self.bn = batch_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the shortcut."""
        s = self.stride
        # y[i, j] = x[i+1, j+1], zero in the last row and column (reference: pad (0, 1), drop first).
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        # A 1×1 average pool with stride s is subsampling; it yields ceil(H/s) rows like the
        # strided 3×3 "same" convs of the branches.
        a = self.conv_a(x[:, :, ::s, ::s])
        b = self.conv_b(shifted[:, :, ::s, ::s])
        return self.bn(torch.cat([a, b], dim=1))


def _branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN (the input ReLU is applied by the block)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        batch_norm(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        batch_norm(out_channels),
    )


class ShakeShakeBlock(nn.Module):
    """Two residual branches mixed by Shake-Shake, plus a shortcut (see module docstring).

    Attributes:
        true_gradient: when True (GNP pass 1) the backward uses the forward's gates; when False
            (default) an independent per-sample gate. Read at forward time.
    """

    true_gradient: bool

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.true_gradient = False
        self.branch_a = _branch(in_channels, out_channels, stride)
        self.branch_b = _branch(in_channels, out_channels, stride)
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ShiftedProjection(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        h = F.relu(x)  # not in place: the shortcut needs the raw x
        mixed = shake_shake(
            self.branch_a(h), self.branch_b(h), training=self.training, true_gradient=self.true_gradient
        )
        return self.shortcut(x) + mixed


class WideResNetShakeShake(nn.Module):
    """WRN-``depth`` 2×``width``d with Shake-Shake blocks.

    Args:
        depth: ``6n + 2`` (26 for the paper variant: 4 blocks per group).
        width: channels of the first group; the others have 2× and 4×.
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, depth: int, width: int, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model: Shake-Shake WRN depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_group = (depth - 2) // 6
        stem_channels = 16
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False), batch_norm(stem_channels)
        )
        groups: list[nn.Module] = []
        channels = stem_channels
        for group_width, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            blocks: list[nn.Module] = []
            for i in range(blocks_per_group):
                blocks.append(ShakeShakeBlock(channels, group_width, stride if i == 0 else 1))
                channels = group_width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_reference_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.relu(self.groups(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("wrn26_2x96_shakeshake")
def wrn26_2x96_shakeshake(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNetShakeShake:
    """WRN-26 2×96d Shake-Shake (the wideresnet-ss-cifar recipe): 4 blocks per group, 96/192/384
    channels. ``image_size`` is not needed (global pooling)."""
    return WideResNetShakeShake(26, 96, num_classes=num_classes, in_channels=in_channels)


@register_model("shakeshake_debug")
def shakeshake_debug(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNetShakeShake:
    """Tiny WRN-8 2×32d Shake-Shake for CPU tests: 1 block per group, 32/64/128 channels, so every
    block uses the shifted projection shortcut (16 → 32 at stride 1, then stride 2 twice)."""
    return WideResNetShakeShake(8, 32, num_classes=num_classes, in_channels=in_channels)
