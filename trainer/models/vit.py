"""Vision Transformers ViT-Ti / S / B / L as in the GNP reference (``models/available_models/vit_model.py``,
after google-research/vision_transformer).

=======  ======  =====  =====  ======  =====================================
name     hidden  MLP    heads  layers  parameters (1000 classes, patch 16, 224 px)
=======  ======  =====  =====  ======  =====================================
vit_ti   192     768    3      12      5,717,416
vit_s    384     1536   6      12      22,050,664
vit_b    768     3072   12     12      86,567,656
vit_l    1024    4096   16     24      304,326,632
=======  ======  =====  =====  ======  =====================================

These are timm's published ``vit_{tiny,small,base,large}_patch16_224`` counts (same layout:
patch conv with bias, class token, learned position embedding, qkv/out/MLP Linear layers with
bias, two LayerNorms per block plus a final one, Linear head, no pre-logits layer).

* patch embedding: conv ``patch×patch``/``patch`` (with bias) to ``hidden`` channels, flattened to
  ``(image_size/patch)²`` tokens; ``patch=None`` picks 4 below 128 px (CIFAR: 8×8 = 64 tokens) and
  16 from 128 px (ImageNet, 224 px: 196 tokens), as the reference picks by dataset;
* a class token (init 0) is prepended, a learned position embedding (init N(0, 0.02)) added,
  then dropout;
* pre-LN encoder blocks: ``x + Dropout(Attn(LN(x)))`` then ``x + MLP(LN(x))`` with
  ``MLP = Linear → GELU → Dropout → Linear → Dropout``; attention weights get attention dropout;
  LayerNorm eps 1e-6 (Flax default); GELU is the tanh approximation (Flax ``nn.gelu`` default);
* final LayerNorm, class token → Linear head, **initialised to zero** (weight and bias), so the
  initial logits are 0 and, at the first step, only the head receives a non-zero gradient.

Other initialisation (Flax defaults of the reference): patch conv LeCun-normal (truncated normal,
fan-in) with bias 0; q, k, v and output projections Xavier-uniform each as a ``hidden×hidden``
matrix, biases 0; MLP Xavier-uniform, biases N(0, 1e-6); LayerNorm γ = 1, β = 0.

``dropout`` and ``attention_dropout`` default to the reference's 0.1. With dropout > 0 GNP's two
passes must see the same masks; the optimizer restores the RNG state between them (attention
dropout included: it is drawn from the same generator by ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = ["VisionTransformer", "EncoderBlock", "Attention", "resolve_patch"]

LN_EPS = 1e-6
# From this image size on, the default patch is 16 (ImageNet); below it, 4 (CIFAR).
PATCH16_MIN_SIZE = 128
# variance_scaling(..., "truncated_normal"): the std of a standard normal truncated to [-2, 2].
_TRUNC_STD = 0.87962566103423978


def resolve_patch(patch: int | None, image_size: int) -> int:
    """The patch size: ``patch`` if given (must divide ``image_size``), else 4 below 128 px, 16 from 128 px."""
    if patch is None:
        patch = 4 if image_size < PATCH16_MIN_SIZE else 16
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"model: patch must be a positive integer or None, got {patch!r}")
    if image_size % patch:
        raise ValueError(f"model: patch {patch} must divide image_size {image_size}")
    return patch


def _check_rate(name: str, value: float) -> float:
    """Validate a dropout probability."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"model: {name} must be in [0, 1), got {value!r}")
    return float(value)


class Attention(nn.Module):
    """Multi-head self-attention with packed q/k/v projection and attention-weight dropout."""

    def __init__(self, hidden: int, heads: int, attention_dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model: hidden size {hidden} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens of ``x`` ``(N, T, hidden)``."""
        n, t, d = x.shape
        # (N, T, 3, heads, head_dim) → 3 × (N, heads, T, head_dim)
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # scale 1/√head_dim, as Flax
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + Drop(Attn(LN(x)))``, then ``x + MLP(LN(x))``."""

    def __init__(self, hidden: int, mlp: int, heads: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.attn = Attention(hidden, heads, attention_dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(mlp, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens ``(N, T, hidden)``."""
        x = x + self.drop1(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token and a zero-initialised linear head (see module docstring).

    Args:
        hidden: token width.
        mlp: hidden width of the MLPs.
        heads: attention heads.
        layers: encoder blocks.
        num_classes: classifier outputs.
        in_channels: input image channels.
        image_size: side of the (square) input images; fixes the number of position embeddings.
        patch: patch side (``None``: 4 below 128 px, 16 otherwise).
        dropout: dropout after the position embedding, the attention output and in the MLPs.
        attention_dropout: dropout on the attention weights.
    """

    def __init__(
        self,
        *,
        hidden: int,
        mlp: int,
        heads: int,
        layers: int,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        patch: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dropout = _check_rate("dropout", dropout)
        attention_dropout = _check_rate("attention_dropout", attention_dropout)
        self.patch = resolve_patch(patch, image_size)
        self.image_size = image_size
        num_tokens = (image_size // self.patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden, self.patch, stride=self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, hidden))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(EncoderBlock(hidden, mlp, heads, dropout, attention_dropout) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.head = nn.Linear(hidden, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise all parameters as the reference (Flax defaults; see module docstring)."""
        fan_in = self.patch_embed.in_channels * self.patch**2
        std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
        nn.init.trunc_normal_(self.patch_embed.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            hidden = block.attn.proj.in_features
            # Flax initialises q, k and v as separate hidden×hidden kernels: Xavier on each third,
            # not on the packed (3·hidden)×hidden matrix (whose bound would be smaller).
            for part in block.attn.qkv.weight.split(hidden, dim=0):
                nn.init.xavier_uniform_(part)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for layer in (block.mlp[0], block.mlp[3]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``(N, C, image_size, image_size)``."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"model: ViT was built for {self.image_size}×{self.image_size} images, got "
                f"{tuple(x.shape[-2:])}; build it with the data's image_size"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, hidden)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])


_VARIANTS: dict[str, tuple[int, int, int, int]] = {
    # name: (hidden, mlp, heads, layers)
    "vit_ti": (192, 768, 3, 12),
    "vit_s": (384, 1536, 6, 12),
    "vit_b": (768, 3072, 12, 12),
    "vit_l": (1024, 4096, 16, 24),
    "vit_debug": (32, 64, 2, 2),
}


def _build(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    patch: int | None,
    dropout: float,
    attention_dropout: float,
) -> VisionTransformer:
    """Shared body of the registered builders."""
    hidden, mlp, heads, layers = _VARIANTS[name]
    return VisionTransformer(
        hidden=hidden,
        mlp=mlp,
        heads=heads,
        layers=layers,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        patch=patch,
        dropout=dropout,
        attention_dropout=attention_dropout,
    )


@register_model("vit_ti")
def vit_ti(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
) -> VisionTransformer:
    """ViT-Ti: hidden 192, MLP 768, 3 heads, 12 layers (reference ``ViT_TI16``)."""
    return _build("vit_ti", num_classes, in_channels, image_size, patch, dropout, attention_dropout)


@register_model("vit_s")
def vit_s(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
) -> VisionTransformer:
    """ViT-S: hidden 384, MLP 1536, 6 heads, 12 layers (reference ``ViT_S16``, the ViT recipes)."""
    return _build("vit_s", num_classes, in_channels, image_size, patch, dropout, attention_dropout)


@register_model("vit_b")
def vit_b(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
) -> VisionTransformer:
    """ViT-B: hidden 768, MLP 3072, 12 heads, 12 layers (reference ``ViT_B16``)."""
    return _build("vit_b", num_classes, in_channels, image_size, patch, dropout, attention_dropout)


@register_model("vit_l")
def vit_l(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
) -> VisionTransformer:
    """ViT-L: hidden 1024, MLP 4096, 16 heads, 24 layers (reference ``ViT_L16``)."""
    return _build("vit_l", num_classes, in_channels, image_size, patch, dropout, attention_dropout)


@register_model("vit_debug")
def vit_debug(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
) -> VisionTransformer:
    """Tiny ViT for CPU tests: hidden 32, MLP 64, 2 heads, 2 layers; same patching, tokens,
    dropout and initialisation as the paper variants."""
    return _build("vit_debug", num_classes, in_channels, image_size, patch, dropout, attention_dropout)
