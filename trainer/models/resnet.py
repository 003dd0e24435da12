"""ResNet-18/34/50/101/152/200 as in the GNP reference (``models/available_models/resnet.py``).

Layout (post-activation ResNet v1, stride on the 3×3 conv like torchvision's "v1.5"):

* stem ``"cifar"``: conv3×3 (16 ch, stride 1, no bias) → BN.
* stem ``"imagenet"``: conv7×7/2 (64 ch, no bias) → BN → maxpool 3/2.
  Neither stem has a ReLU: the reference applies BN without ReLU there (torchvision has one;
  the parameter count is the same).
* four stages of widths ``64·2^i`` (×4 output channels for bottlenecks) with
  ``[2,2,2,2]``, ``[3,4,6,3]``, ``[3,4,6,3]``, ``[3,4,23,3]``, ``[3,8,36,3]``, ``[3,24,36,3]`` blocks;
  stride 2 in the first block of stages 2–4.
* a block gets a projection shortcut (conv1×1 with the block's stride + BN) whenever its input
  and output shapes differ, otherwise the identity. With the CIFAR stem this includes the very
  first basic block (16 → 64 channels), which the ImageNet stem (64 → 64) does not need; the
  first bottleneck always projects (→ 256) and, after the CIFAR stem, its conv1 and projection
  see 16 input channels instead of 64. For the reference's datasets (32 px CIFAR, 224 px
  ImageNet) ``stem=None`` picks the same stem as the reference's class-count rule.
* global mean pool → Linear.

Basic blocks (ResNet-18/34) use convolutions **with bias** (Flax's default, which the reference
kept), including the projection conv; bottleneck blocks and both stems have no bias. The bias
in front of a train-mode BN is redundant — BN subtracts the batch mean, so its gradient is zero
up to rounding — but it is kept for parameter-count parity; ``conv_bias=False`` removes it.

Initialisation (reference ``util.py``): conv kernels ``kaiming_normal_(mode="fan_out")``
(``variance_scaling(2.0, "fan_out", "normal")``), conv biases 0, BN γ = 1, β = 0, BN momentum
0.1 (Flax 0.9) and eps 1e-5; the final Linear weight ``U(−1/√K, 1/√K)`` with ``K = num_classes``
(the reference's ``dense_layer_init_fn`` scales by the *output* width) and bias 0.

Deviations from the reference, on purpose:

* The stem is an explicit option ``stem: "cifar" | "imagenet" | None``. The reference chooses it
  from ``num_classes`` (10/100 → CIFAR, 1000 → ImageNet, and *no stem at all* for any other
  value). ``None`` here chooses by ``image_size``: below 128 px the CIFAR stem, otherwise the
  ImageNet stem; so a 200-class 64 px dataset still gets a stem.
* PyTorch pads symmetrically (conv7×7/2 pad 3, maxpool pad 1) where Flax's ``"SAME"`` pads
  (2, 3) and (0, 1) on even inputs; the sampling grid shifts by one pixel, nothing else changes.

``batch_norm`` and ``init_reference_`` (``trainer.models.layers``) are the conventions every family
of the zoo shares.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .layers import batch_norm, init_reference_
from .registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]

Stem = Literal["cifar", "imagenet"]
_STEMS = ("cifar", "imagenet")
# Inputs at least this large get the ImageNet stem when ``stem=None``.
IMAGENET_STEM_MIN_SIZE = 128


def _projection(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Module:
    """Shortcut of a block: identity when shapes match, else conv1×1 (stride) + BN."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
        batch_norm(out_channels),
    )


class BasicBlock(nn.Module):
    """conv3×3(stride)-BN-ReLU-conv3×3-BN, plus shortcut, then ReLU (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = batch_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.bn2 = batch_norm(width)
        self.shortcut = _projection(in_channels, width, stride, bias)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1×1-BN-ReLU-conv3×3(stride)-BN-ReLU-conv1×1(4×)-BN, plus shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, bias: bool) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=bias)
        self.bn1 = batch_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = batch_norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=bias)
        self.bn3 = batch_norm(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride, bias)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


def resolve_stem(stem: str | None, image_size: int) -> Stem:
    """The stem to use: ``stem`` if given, else ``"cifar"`` below 128 px and ``"imagenet"`` above."""
    if stem is None:
        return "cifar" if image_size < IMAGENET_STEM_MIN_SIZE else "imagenet"
    if stem not in _STEMS:
        raise ValueError(f"model: stem must be one of {', '.join(_STEMS)} or None, got {stem!r}")
    return stem  # type: ignore[return-value]


class ResNet(nn.Module):
    """ResNet v1 with the reference's stems, blocks and initialisation (see module docstring).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        num_classes: classifier outputs.
        in_channels: input image channels.
        stem: ``"cifar"`` or ``"imagenet"``.
        base_width: width of the first stage (64 in every paper variant); stage ``i`` has
            ``base_width·2^i``.
        conv_bias: whether the block convolutions (and projections) carry a bias.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        num_classes: int,
        in_channels: int = 3,
        stem: Stem = "cifar",
        base_width: int = 64,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            stem_channels = 16
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False),
                batch_norm(stem_channels),
            )
        else:
            stem_channels = base_width
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False),
                batch_norm(stem_channels),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages: list[nn.Module] = []
        channels = stem_channels
        for i, depth in enumerate(layers):
            width = base_width * 2**i
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, width, stride, conv_bias))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_reference_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _build(
    block: type[BasicBlock] | type[Bottleneck],
    layers: list[int],
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    stem: str | None,
    conv_bias: bool | None,
    base_width: int = 64,
) -> ResNet:
    """Shared body of the registered builders; ``conv_bias=None`` means the reference's choice."""
    if conv_bias is None:
        conv_bias = block is BasicBlock
    return ResNet(
        block,
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=resolve_stem(stem, image_size),
        base_width=base_width,
        conv_bias=conv_bias,
    )


@register_model("resnet18")
def resnet18(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    conv_bias: bool | None = None,
) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2], conv bias on (reference)."""
    return _build(
        BasicBlock,
        [2, 2, 2, 2],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=conv_bias,
    )


@register_model("resnet34")
def resnet34(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    conv_bias: bool | None = None,
) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3], conv bias on (reference)."""
    return _build(
        BasicBlock,
        [3, 4, 6, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=conv_bias,
    )


@register_model("resnet50")
def resnet50(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    conv_bias: bool | None = None,
) -> ResNet:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3], no conv bias."""
    return _build(
        Bottleneck,
        [3, 4, 6, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=conv_bias,
    )


@register_model("resnet101")
def resnet101(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    conv_bias: bool | None = None,
) -> ResNet:
    """ResNet-101: bottleneck blocks [3, 4, 23, 3], no conv bias."""
    return _build(
        Bottleneck,
        [3, 4, 23, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=conv_bias,
    )


@register_model("resnet152")
def resnet152(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    conv_bias: bool | None = None,
) -> ResNet:
    """ResNet-152: bottleneck blocks [3, 8, 36, 3], no conv bias."""
    return _build(
        Bottleneck,
        [3, 8, 36, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=conv_bias,
    )


@register_model("resnet200")
def resnet200(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    conv_bias: bool | None = None,
) -> ResNet:
    """ResNet-200: bottleneck blocks [3, 24, 36, 3], no conv bias."""
    return _build(
        Bottleneck,
        [3, 24, 36, 3],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=conv_bias,
    )


@register_model("resnet_debug")
def resnet_debug(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str | None = None,
    block: Literal["basic", "bottleneck"] = "bottleneck",
) -> ResNet:
    """Tiny ResNet for CPU tests: one block per stage, stage widths 8/16/32/64.

    ``block="bottleneck"`` (default, the ResNet-50 recipes' block) or ``"basic"`` (with conv bias,
    like ResNet-18/34). Same stems, shortcuts and initialisation as the paper variants.
    """
    blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
    if block not in blocks:
        raise ValueError(f"model: block must be one of basic, bottleneck, got {block!r}")
    return _build(
        blocks[block],
        [1, 1, 1, 1],
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        stem=stem,
        conv_bias=None,
        base_width=8,
    )
