"""VGG-16 / VGG-19, with and without BatchNorm, as in the GNP reference (``models/available_models/vgg.py``).

* five blocks of 3×3 convolutions (stride 1, same padding, **with bias**): ``[2, 2, 3, 3, 3]``
  (VGG-16) or ``[2, 2, 4, 4, 4]`` (VGG-19), widths ``64·2^i`` capped at 512; each conv is followed
  by BN-ReLU (``*_bn``) or ReLU alone; max-pool 2×2/2 after every block;
* head: flatten the final feature map, then 2 × (Linear 4096 → ReLU → Dropout 0.5) → Linear K.
  The flattened size follows ``image_size``: after five poolings the map is
  ``⌊image_size/32⌋`` pixels square, so 7·7·512 = 25,088 features at 224 px (the ImageNet head of
  the vggbn-imagenet recipe) and 1·1·512 = 512 at 32 px (the CIFAR head). The reference uses the
  same 4096-wide MLP at every size; so does this module.

Initialisation (``trainer.models.layers.init_reference_``): conv kernels kaiming-normal fan-out,
conv biases 0, BN γ = 1 / β = 0 (momentum 0.1 = Flax 0.9, eps 1e-5), **every** Linear — the
hidden 4096-wide ones included — ``U(−1/√out, 1/√out)`` with bias 0 (the reference's
``dense_layer_init_fn`` on all three Dense layers).

The layout is torchvision's ``vgg16``/``vgg16_bn``/``vgg19``/``vgg19_bn`` (which pools to 7×7
with ``AdaptiveAvgPool2d`` instead; no parameters), so at 224 px and 1000 classes the parameter
counts are identical: 138,357,544 / 138,365,992 / 143,667,240 / 143,678,248.

The model checks in ``forward`` that the final map has the side it was built for: the
flatten makes the head depend on the input size, and a silent mismatch would otherwise surface
as an opaque matmul shape error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import batch_norm as make_batch_norm
from .layers import init_reference_
from .registry import register_model

__all__ = ["VGG", "VGG16_BLOCKS", "VGG19_BLOCKS"]

VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG19_BLOCKS = (2, 2, 4, 4, 4)
_NUM_POOLS = 5


class VGG(nn.Module):
    """VGG with the reference's head and initialisation (see module docstring).

    Args:
        blocks: convolutions per block (five blocks).
        num_classes: classifier outputs.
        in_channels: input image channels.
        image_size: side of the (square) input images; fixes the size of the flattened features.
        batch_norm: BN after every convolution (the ``*_bn`` variants).
        base_width: width of the first block; block ``i`` has ``min(base_width·2^i, max_width)``.
        max_width: cap on the block width.
        hidden: width of the two hidden Linear layers.
        dropout: dropout probability after each hidden Linear layer.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        batch_norm: bool = False,
        base_width: int = 64,
        max_width: int = 512,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(blocks) != _NUM_POOLS:
            raise ValueError(f"model: VGG needs {_NUM_POOLS} blocks, got {len(blocks)}")
        if image_size < 2**_NUM_POOLS:
            raise ValueError(f"model: VGG needs image_size >= {2**_NUM_POOLS} (five 2× poolings), got {image_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model: dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i, depth in enumerate(blocks):
            width = min(base_width * 2**i, max_width)
            for _ in range(depth):
                layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=True))
                if batch_norm:
                    layers.append(make_batch_norm(width))
                layers.append(nn.ReLU(inplace=True))
                channels = width
            layers.append(nn.MaxPool2d(2, stride=2))
        self.features = nn.Sequential(*layers)
        # Five floor-mode 2× poolings (Flax "VALID" max_pool floors too).
        self.image_size = image_size
        self.final_side = image_size // 2**_NUM_POOLS
        self.classifier = nn.Sequential(
            nn.Linear(channels * self.final_side**2, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_reference_(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, C, H, W)`` of the built size."""
        x = self.features(x)
        if x.shape[-2:] != (self.final_side, self.final_side):
            raise ValueError(
                f"model: VGG was built for a {self.final_side}×{self.final_side} final feature map "
                f"(image_size {self.image_size}), got {tuple(x.shape[-2:])}; build it with the data's image_size"
            )
        return self.classifier(torch.flatten(x, 1))


def _build(
    blocks: tuple[int, ...], batch_norm: bool, num_classes: int, in_channels: int, image_size: int, dropout: float
) -> VGG:
    """Shared body of the registered paper variants."""
    return VGG(
        blocks,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        batch_norm=batch_norm,
        dropout=dropout,
    )


@register_model("vgg16")
def vgg16(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> VGG:
    """VGG-16 without BN: blocks [2, 2, 3, 3, 3]."""
    return _build(VGG16_BLOCKS, False, num_classes, in_channels, image_size, dropout)


@register_model("vgg16_bn")
def vgg16_bn(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> VGG:
    """VGG-16 with BN after every conv (the vggbn-imagenet recipe)."""
    return _build(VGG16_BLOCKS, True, num_classes, in_channels, image_size, dropout)


@register_model("vgg19")
def vgg19(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> VGG:
    """VGG-19 without BN: blocks [2, 2, 4, 4, 4]."""
    return _build(VGG19_BLOCKS, False, num_classes, in_channels, image_size, dropout)


@register_model("vgg19_bn")
def vgg19_bn(*, num_classes: int, in_channels: int = 3, image_size: int = 32, dropout: float = 0.5) -> VGG:
    """VGG-19 with BN after every conv."""
    return _build(VGG19_BLOCKS, True, num_classes, in_channels, image_size, dropout)


@register_model("vgg_debug")
def vgg_debug(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, batch_norm: bool = True, dropout: float = 0.5
) -> VGG:
    """Tiny VGG for CPU tests: one conv per block, widths 8/16/32/64/64, hidden width 32; same
    pooling, head structure (flatten, two hidden layers with dropout) and initialisation."""
    return VGG(
        (1, 1, 1, 1, 1),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        batch_norm=batch_norm,
        base_width=8,
        max_width=64,
        hidden=32,
        dropout=dropout,
    )
