"""WideResNet-16-4 / 28-10 / 40-10 as in the GNP reference (``models/available_models/wrn.py``,
itself the google-research/sam model).

* stem: conv3×3, 16 channels, no bias, no BN (the first block normalises its input);
* three groups of ``n = (depth − 4) / 6`` pre-activation blocks, widths ``16k, 32k, 64k``, stride
  1, 2, 2 in the first block of each group. Block: BN-ReLU → conv3×3(stride) → BN-ReLU →
  [dropout] → conv3×3, plus the shortcut;
* shortcut: identity when the channel count is unchanged, otherwise **average-pool with kernel
  and stride = the block's stride, then zero-pad the new channels** (no 1×1 conv, so no
  parameters); see ``pool_pad_shortcut``;
* the first block of the first group takes its shortcut *after* its BN-ReLU (the reference's
  ``activation_before_residual``); every other block takes the raw input;
* final BN-ReLU, global average pool, Linear.

No conv has a bias. Initialisation and BN settings: ``trainer.models.layers.init_reference_``
(kaiming-normal fan-out convs, ``U(−1/√K, 1/√K)`` classifier, BN momentum 0.1 = Flax 0.9, eps 1e-5).

Not carried over: the reference's ``use_additional_skip_connections_in_wrn`` flag (default off,
AutoAugment's extra group-level skips). Added: ``dropout`` (0 in the reference), placed between
the two convolutions as in the WRN paper. With dropout > 0, GNP's two passes must see the same
mask; that is the training loop's RNG policy, not the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import batch_norm, init_reference_
from .registry import register_model

__all__ = ["WideResNet", "WideBlock", "pool_pad_shortcut"]


def pool_pad_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """Parameter-free shortcut: ``x`` unchanged when it already has ``out_channels``; otherwise
    average-pooled by ``stride`` (kernel = stride) and zero-padded to ``out_channels`` channels.

    The new channels are appended after the existing ones (zeros at indices
    ``C_in .. out_channels − 1``), as ``jnp.pad(..., (0, channels_to_add))`` does in the reference.
    ``ceil_mode`` makes odd sizes match the strided conv's output (7 → 4), where the reference
    would fail; on even sizes it is the plain ``stride × stride`` mean.
    """
    in_channels = x.shape[1]
    if in_channels == out_channels:
        return x
    if out_channels < in_channels:
        raise ValueError(f"model: zero-pad shortcut cannot shrink {in_channels} to {out_channels} channels")
    if stride > 1:
        x = F.avg_pool2d(x, kernel_size=stride, stride=stride, ceil_mode=True)
    # F.pad's tuple runs from the last dim backwards: (W_left, W_right, H_top, H_bottom, C_front, C_back).
    return F.pad(x, (0, 0, 0, 0, 0, out_channels - in_channels))


class WideBlock(nn.Module):
    """Pre-activation wide basic block with the zero-pad shortcut (see module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        activate_before_residual: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.activate_before_residual = activate_before_residual
        self.bn1 = batch_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = batch_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        activated = self.relu(self.bn1(x))
        residual = activated if self.activate_before_residual else x
        y = self.conv1(activated)
        y = self.conv2(self.dropout(self.relu(self.bn2(y))))
        return y + pool_pad_shortcut(residual, self.out_channels, self.stride)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` with the reference's zero-pad shortcuts.

    Args:
        depth: total depth ``6n + 4`` (16, 28, 40, ...; 10 for the debug variant).
        widen: width multiplier ``k``; group widths are ``16k, 32k, 64k``.
        num_classes: classifier outputs.
        in_channels: input image channels.
        dropout: dropout probability between the two convs of every block.
    """

    def __init__(self, depth: int, widen: int, *, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model: WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model: dropout must be in [0, 1), got {dropout!r}")
        blocks_per_group = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        channels = 16
        for g, (width, stride) in enumerate(((16 * widen, 1), (32 * widen, 2), (64 * widen, 2))):
            blocks: list[nn.Module] = []
            for i in range(blocks_per_group):
                blocks.append(
                    WideBlock(
                        channels,
                        width,
                        stride if i == 0 else 1,
                        activate_before_residual=(g == 0 and i == 0),
                        dropout=dropout,
                    )
                )
                channels = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.final_bn = batch_norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_reference_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.groups(self.stem(x))
        x = self.relu(self.final_bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _build(depth: int, widen: int, num_classes: int, in_channels: int, dropout: float) -> WideResNet:
    """Shared body of the registered builders (``image_size`` is irrelevant: global pooling)."""
    return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


@register_model("wrn16_4")
def wrn16_4(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> WideResNet:
    """WideResNet-16-4: 2 blocks per group, widths 64/128/256."""
    return _build(16, 4, num_classes, in_channels, dropout)


@register_model("wrn28_10")
def wrn28_10(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> WideResNet:
    """WideResNet-28-10: 4 blocks per group, widths 160/320/640 (the wideresnet-cifar recipe)."""
    return _build(28, 10, num_classes, in_channels, dropout)


@register_model("wrn40_10")
def wrn40_10(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> WideResNet:
    """WideResNet-40-10: 6 blocks per group, widths 160/320/640."""
    return _build(40, 10, num_classes, in_channels, dropout)


@register_model("wrn_debug")
def wrn_debug(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> WideResNet:
    """Tiny WRN-10-2 for CPU tests: 1 block per group, widths 32/64/128, so every group's first
    block uses the zero-pad shortcut (stride 1 in group 1, stride 2 in groups 2 and 3)."""
    return _build(10, 2, num_classes, in_channels, dropout)
