"""Augmentations: batch-level mixing/cutout on the batch's device, per-image AutoAugment/RandAugment.

Two families, both plain torch, both deterministic: every random number of a call is drawn on the
host from ``numpy.random.default_rng([seed, rank, step, stream])``, so it is a function of
``(seed, rank, step)`` only (a resumed run repeats it, each rank draws its own). Nothing is ever read
back from the device: the draws go host -> device (pinned, non-blocking), so no call syncs the host
with the GPU. Results are the same on CPU and GPU up to float rounding.

Batch level (``BatchAugment``; normalized float images, returns soft targets):

* ``none``: images unchanged; targets = one-hot.
* ``cutout`` (the reference's ``cutout``): ONE square, the same for every image of the batch, set to
  0 (the images are normalized, so 0 is the dataset mean). Reference geometry: the centre
  ``(cy, cx)`` is uniform over all H x W pixels and the square covers rows
  ``[max(0, cy - L//2), min(H, cy + L//2))`` and the same columns, so it is clipped at the border
  (down to L/2 x L/2 in a corner) and its side is ``2 * (L // 2)`` (an odd L loses one pixel).
  The reference draws one square per host batch; here it is one per rank batch.
* ``mixup``: ``lam ~ Beta(alpha, alpha)``, ``lam = max(lam, 1 - lam)``, ONE lam per batch, partner =
  the reversed batch: ``x = lam * x + (1 - lam) * x.flip(0)``, ``y = lam * y + (1 - lam) * y.flip(0)``.
* ``mixcut`` (the reference's ``mixcut``): mixup, then cutout on the mixed images; the targets are
  the mixup targets (the cutout does not change them). This is NOT CutMix.
* ``cutmix`` (extension, Yun et al. 2019, per sample): ``lam_i ~ Beta(alpha, alpha)``, partner
  ``perm[i]`` of a random permutation, a box of side ``int(H * sqrt(1 - lam_i))`` x
  ``int(W * sqrt(1 - lam_i))`` around a uniform centre, clipped at the border, pasted from the
  partner; the label weight of the partner is the pasted pixel fraction after clipping.

Label smoothing is applied last: ``y = (1 - ls) * y + ls / K``. With
``soft_target_cross_entropy(logits, y)`` = ``-(y * log_softmax(logits)).sum(1).mean()`` this equals
``F.cross_entropy(logits, labels, label_smoothing=ls)`` for unmixed batches.

Per image (uint8 N x C x H x W batches on any device, before normalization; the loader runs them):

* ``AutoAugment(policy="reference")``: the reference's CIFAR policy. The reference
  (zhaoyang-0204/gnp, forked from google-research/sam) takes ``policy_cifar()`` from
  google-research/sam ``autoaugment/policies.py``: the 95 sub-policies ``exp0_0..exp0_3`` +
  ``exp1_0..exp1_6`` + ``exp2_0..exp2_7`` of the AutoAugment authors' CIFAR training code (the
  paper's appendix table of 25 is a subset mixed from 5 of these). The ops and the level -> argument
  mapping are the reference's ``autoaugment.py`` (a fork of tensorflow/tpu EfficientNet's, built for
  ImageNet) with its AutoAugment constants ``translate_const=250``, ``cutout_const=100`` and fill
  128: Rotate ``30 l/10`` degrees, ShearX/Y ``0.3 l/10``, TranslateX/Y ``250 l/10`` PIXELS,
  Color/Contrast/Brightness/Sharpness factor ``0.1 + 1.8 l/10``, Posterize ``int(4 l/10)`` bits
  kept, Solarize threshold ``int(256 l/10)``, Cutout half-side ``int(100 l/10)``; the geometric
  ops get a random sign. On 32 x 32 images these constants mean that a Translate of level >= 2
  turns the whole image grey (128), the table's Cutouts (levels 3-4, squares of side 60-80) grey
  all or nearly all of it, and Posterize keeps 1-2 bits: that is what the reference trained with,
  reproduced on purpose (``translate_const``/``cutout_const`` are arguments for other choices).
  ``policy="paper"`` is the paper's 25-sub-policy CIFAR-10 table with torchvision's magnitudes
  (``transforms.v2.AutoAugment``, ``AutoAugmentPolicy.CIFAR10``), but fill 128 and per-sample randomness.
* ``RandAugment(num_ops=2, magnitude=9)``: the reference's ImageNet "autoaugment": per layer one of
  16 ops uniformly (AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, Color, Contrast,
  Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Cutout, SolarizeAdd), always
  applied, at level ``magnitude`` with ``translate_const=100``, ``cutout_const=40``, fill 128
  (M = 9: +-27 degrees, shear +-0.27, +-90 px, 3 bits, threshold 230, +99 below 128, a 72 px square).
* ``FlipReflectCrop``: the ``basic`` augmentation in torch (flip, reflect-pad crop, optional
  per-image cutout), used after AutoAugment so the order is policy then basic as in the reference.

Every random choice (sub-policy, whether each op fires, sign, cutout centre) is drawn per image.
Op semantics are PIL's, as the reference's TF ops intend, and equal torchvision's
``transforms.v2.functional`` kernels bit for bit on CPU (Equalize is that kernel; the others are
vectorized over per-image magnitudes with torchvision's arithmetic). Deviations from the
reference's TF code: Contrast blends towards the image's mean grey level, as PIL does (the TF port
computes its "mean" as ``sum(histogram) / 256`` = pixel count / 256, i.e. 4 for every 32 x 32
image, which makes it a darkening op); grey levels, blends and the Sharpness filter round like
torchvision/PIL (TF truncates in places: at most 1 grey level apart); the geometric ops take the
nearest source pixel with ties to even (TF: away from zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BATCH_AUGMENTS = ("none", "cutout", "mixup", "mixcut", "cutmix")

# Independent random streams of one (seed, rank, step): the batch augmentation and each per-image
# stage draw from their own generator, so adding a stage never shifts another's numbers.
_STREAM_BATCH = 1
_STREAM_AUTOAUGMENT = 2
_STREAM_RANDAUGMENT = 3
_STREAM_FLIP_CROP = 4

FILL = 128  # the reference's `replace` value for pixels a geometric op or Cutout leaves empty


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: {value!r}; expected an integer >= {low}")
    return int(value)


def _host_rng(seed: int, rank: int, step: int, stream: int) -> np.random.Generator:
    """The generator of one (seed, rank, step, stream); SeedSequence hashes the four integers."""
    step = _check_int("step", step, 0)
    return np.random.default_rng([seed, rank, step, stream])


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """Host array -> tensor on ``device`` without a host/device sync (pinned, non-blocking)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------------
# Soft targets and the loss
# --------------------------------------------------------------------------------------------


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """float32 one-hot targets (N, K) on ``labels.device`` (scatter: no device-side checks, no sync)."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1).to(torch.int64), 1.0)


def smooth_targets(targets: Tensor, label_smoothing: float) -> Tensor:
    """``(1 - ls) * targets + ls / K`` (uniform over all K classes, the target included)."""
    if label_smoothing == 0.0:
        return targets
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch mean of ``-sum_k targets[:, k] * log_softmax(logits)[:, k]`` (log-softmax in float32)."""
    return -(targets * F.log_softmax(logits, dim=1, dtype=torch.float32)).sum(1).mean()


# --------------------------------------------------------------------------------------------
# Batch-level augmentation
# --------------------------------------------------------------------------------------------


@dataclass
class BatchDraw:
    """The random numbers of one ``BatchAugment`` call (host values; see ``BatchAugment.draw``)."""

    lam: Optional[float] = None  # mixup / mixcut weight of the image itself
    cutout_box: Optional[tuple[int, int, int, int]] = None  # (y0, y1, x0, x1), end exclusive
    perm: Optional[np.ndarray] = None  # cutmix partner of each image
    boxes: Optional[np.ndarray] = None  # cutmix (N, 4) y0, y1, x0, x1 per image
    lam_per_sample: Optional[np.ndarray] = None  # cutmix weight of the image itself, after clipping


class BatchAugment:
    """Batch-level augmentation + label smoothing: ``images, targets = aug(images, labels, step)``.

    ``images`` float (N, C, H, W) (normalized), ``labels`` int64 (N,), both on the same device;
    returns augmented images (same dtype/device/memory layout; the input itself for ``none``, else a
    new tensor: the input is never written) and float32 soft targets (N, K)
    whose rows sum to 1. The random numbers of ``step`` depend on ``(seed, rank, step)`` only.
    Semantics of each ``kind``: see the module docstring.
    """

    def __init__(
        self,
        kind: str,
        *,
        num_classes: int,
        cutout: int = 16,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        seed: int = 0,
        rank: int = 0,
    ):
        if kind not in BATCH_AUGMENTS:
            raise ValueError(f"batch_augment: unknown '{kind}'; allowed: {', '.join(BATCH_AUGMENTS)}")
        self.kind = kind
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.cutout = _check_int("batch_cutout", cutout, 0)
        alpha = float(alpha)
        if kind in ("mixup", "mixcut", "cutmix") and not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"mixup_alpha: {alpha}; expected a number > 0 for batch_augment '{kind}'")
        self.alpha = alpha
        ls = float(label_smoothing)
        if not 0.0 <= ls < 1.0:
            raise ValueError(f"label_smoothing: {ls}; expected 0 <= value < 1")
        self.label_smoothing = ls
        self.seed = _check_int("seed", seed, 0)
        self.rank = _check_int("rank", rank, 0)

    def draw(self, step: int, n: int, h: int, w: int) -> BatchDraw:
        """The random numbers that ``__call__`` uses for ``step`` on an N x H x W batch."""
        rng = _host_rng(self.seed, self.rank, step, _STREAM_BATCH)
        d = BatchDraw()
        if self.kind in ("mixup", "mixcut"):
            lam = float(rng.beta(self.alpha, self.alpha))
            d.lam = max(lam, 1.0 - lam)
        if self.kind in ("cutout", "mixcut"):
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            half = self.cutout // 2
            d.cutout_box = (max(0, cy - half), min(h, cy + half), max(0, cx - half), min(w, cx + half))
        if self.kind == "cutmix":
            lam = rng.beta(self.alpha, self.alpha, size=n)
            d.perm = rng.permutation(n)
            ratio = np.sqrt(1.0 - lam)
            ch, cw = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
            cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
            y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
            x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
            d.boxes = np.stack([y0, y1, x0, x1], 1)
            d.lam_per_sample = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        return d

    def __call__(self, images: Tensor, labels: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"BatchAugment: expected images (N, C, H, W) and labels (N,), got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        n, _, h, w = images.shape
        d = self.draw(step, n, h, w)
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        targets = one_hot(labels, self.num_classes)
        if d.lam is not None:
            lam = d.lam
            images = lam * images + (1.0 - lam) * images.flip(0)
            targets = lam * targets + (1.0 - lam) * targets.flip(0)
        if d.cutout_box is not None:
            y0, y1, x0, x1 = d.cutout_box
            mask = torch.zeros(1, 1, h, w, dtype=torch.bool, device=images.device)
            mask[..., y0:y1, x0:x1] = True
            images = images.masked_fill(mask, 0.0)
        if d.perm is not None:
            dev = images.device
            perm = _to_device(d.perm.astype(np.int64), dev)
            boxes = _to_device(d.boxes.astype(np.int64), dev)
            weight = _to_device(d.lam_per_sample.astype(np.float32), dev).view(-1, 1)
            rows = torch.arange(h, device=dev).view(1, h)
            cols = torch.arange(w, device=dev).view(1, w)
            in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])  # (N, H)
            in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])  # (N, W)
            mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (N, 1, H, W)
            images = torch.where(mask, images.index_select(0, perm), images)
            targets = weight * targets + (1.0 - weight) * targets.index_select(0, perm)
        if channels_last:  # masked_fill/where may return NCHW; the model expects the loader's layout
            images = images.contiguous(memory_format=torch.channels_last)
        return images, smooth_targets(targets, self.label_smoothing)


# --------------------------------------------------------------------------------------------
# Per-image ops on uint8 batches, vectorized over per-image magnitudes
# --------------------------------------------------------------------------------------------

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
)
_OP_ID = {name: i for i, name in enumerate(OPS)}
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
_BLENDS = {"Color", "Contrast", "Brightness", "Sharpness"}


def _tvf():  # torchvision is imported lazily: ~1 s of import time the loader-free paths don't need
    import torchvision.transforms.v2.functional as tvf

    return tvf


def _blend(image1: Tensor, image2: Tensor, ratio: Tensor, one_minus: Tensor) -> Tensor:
    """torchvision's ``_blend`` with per-image ratios: ``image1 * r + image2 * (1 - r)``, clamped, truncated."""
    # addcmul: one rounding for `+ image2 * (1 - r)`, like torchvision's add_(alpha=...), so the
    # truncation to uint8 agrees with it bit for bit.
    return torch.addcmul(image1 * ratio, image2, one_minus).clamp_(0, 255).to(torch.uint8)


def _grayscale(x: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` floored, float32 (N, 1, H, W) (torchvision/PIL "L")."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _warp(x: Tensor, mat: Tensor, fill: int) -> Tensor:
    """Nearest-neighbour warp: output pixel (col u, row v) takes the input pixel nearest to
    ``(m0 u + m1 v + m2, m3 u + m4 v + m5)`` (pixel-index coordinates, ties to even), ``fill``
    where that falls outside the image. ``mat`` is (N, 6) float32, one matrix per image."""
    n, c, h, w = x.shape
    dev = x.device
    u = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    v = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    m = mat.view(n, 6, 1, 1)
    sx = torch.round(m[:, 0] * u + m[:, 1] * v + m[:, 2])
    sy = torch.round(m[:, 3] * u + m[:, 4] * v + m[:, 5])
    valid = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).to(torch.int64).view(n, 1, h * w)
    out = x.reshape(n, c, h * w).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
    return out.masked_fill_(~valid.unsqueeze(1), fill)


def _affine_matrices(name: str, value: Tensor, h: int, w: int) -> Tensor:
    """(N, 6) source-coordinate matrices of the geometric ops (see ``apply_op``)."""
    zero, one = torch.zeros_like(value), torch.ones_like(value)
    if name == "Rotate":
        # Counter-clockwise on screen for value > 0 (torchvision's convention), about the centre
        # ((W-1)/2, (H-1)/2) of the pixel grid, as tfa.image.rotate does.
        t = value * (math.pi / 180.0)
        cos, sin = torch.cos(t), torch.sin(t)
        cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
        return torch.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy], 1)
    if name == "ShearX":  # PIL/TF transform (1, s, 0, 0, 1, 0): shear about the top-left pixel
        return torch.stack([one, value, zero, zero, one, zero], 1)
    if name == "ShearY":  # (1, 0, 0, s, 1, 0)
        return torch.stack([one, zero, zero, value, one, zero], 1)
    if name == "TranslateX":  # content moves right by value pixels
        return torch.stack([one, zero, -value, zero, one, zero], 1)
    if name == "TranslateY":  # content moves down by value pixels
        return torch.stack([one, zero, zero, zero, one, -value], 1)
    raise AssertionError(name)


def _apply_op(name: str, x: Tensor, p: Tensor, fill: int) -> Tensor:
    """Apply op ``name`` to the uint8 batch ``x`` (contiguous NCHW) with per-image parameters
    ``p`` (N, 4) float32 on x's device: column 0 the value, 1 = ``1 - value`` computed in float64,
    2-3 the Cutout centre (row, col)."""
    n, c, h, w = x.shape
    value = p[:, 0]
    if name == "Invert":
        return x.bitwise_not()
    if name == "AutoContrast":
        # Per image and channel, stretch [min, max] to [0, 255]; constant channels unchanged.
        # torchvision's arithmetic, with torch.where instead of its masked assignment (a sync on GPU).
        xf = x.to(torch.float32)
        lo, hi = xf.amin(dim=(-2, -1), keepdim=True), xf.amax(dim=(-2, -1), keepdim=True)
        flat = hi == lo
        inv_scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255))
        return xf.sub_(torch.where(flat, 0.0, lo)).div_(inv_scale).clamp_(0, 255).to(torch.uint8)
    if name == "Equalize":  # PIL's LUT per image and channel (torchvision's kernel: batched, sync-free)
        return _tvf().equalize(x)
    if name == "Posterize":  # keep the `value` high bits: x & (0xFF << (8 - bits))
        shift = (8 - value).to(torch.int32).view(n, 1, 1, 1)
        mask = torch.bitwise_left_shift(torch.full_like(shift, 0xFF), shift).bitwise_and_(0xFF)
        return x & mask.to(torch.uint8)
    if name == "Solarize":  # invert the pixels >= threshold (threshold 256: none)
        return torch.where(x >= value.view(n, 1, 1, 1), x.bitwise_not(), x)
    if name == "SolarizeAdd":  # add `value` to the pixels < 128, clipped
        added = (x.to(torch.int16) + value.to(torch.int16).view(n, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)
        return torch.where(x < 128, added, x)
    if name in _BLENDS:
        ratio, one_minus = p[:, 0].view(n, 1, 1, 1), p[:, 1].view(n, 1, 1, 1)
        if name == "Brightness":  # blend with black
            return x.mul(ratio).clamp_(0, 255).to(torch.uint8)
        if c != 3:  # PIL: Color/Contrast need RGB; grey images pass unchanged
            return x.clone()
        if name == "Color":  # blend with the image's grey version
            return _blend(x, _grayscale(x), ratio, one_minus)
        if name == "Contrast":  # blend with the mean grey level
            return _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), ratio, one_minus)
        # Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, /13), border pixels unchanged.
        if h <= 2 or w <= 2:
            return x.clone()
        # The integer 3x3 sum by shifted slices (exact in float32, and 5x faster than a grouped
        # conv2d on CPU); sum/13 is never within 0.038 of a .5 tie, so the rounding agrees with
        # torchvision's float conv.
        out = x.to(torch.float32)
        inner = out[..., 1:-1, 1:-1]
        total = inner * 4.0
        for dy in range(3):
            for dx in range(3):
                total += out[..., dy : h - 2 + dy, dx : w - 2 + dx]
        blurred = total.div_(13.0).round_()
        inner.addcmul_(blurred - inner, one_minus)
        return out.clamp_(0, 255).to(torch.uint8)
    if name == "Cutout":  # rows [max(0, cy - v), min(H, cy + v)), same for columns
        half = value.view(n, 1)
        rows = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h)
        cols = torch.arange(w, device=x.device, dtype=torch.float32).view(1, w)
        cy, cx = p[:, 2:3], p[:, 3:4]
        in_rows = (rows >= cy - half) & (rows < cy + half)
        in_cols = (cols >= cx - half) & (cols < cx + half)
        return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1), fill)
    return _warp(x, _affine_matrices(name, value, h, w), fill)


def apply_op(
    images: Tensor,
    name: str,
    value: Union[float, Sequence[float], Tensor] = 0.0,
    *,
    center: Optional[tuple[int, int]] = None,
    fill: int = FILL,
) -> Tensor:
    """Apply one op to every image of a uint8 (N, C, H, W) batch; returns a new uint8 batch.

    ``value`` (one number, or one per image) is the op's argument in its own units: Rotate degrees
    (counter-clockwise), ShearX/ShearY factor s (source x = x + s y, resp. y = y + s x, about the
    top-left pixel), TranslateX/TranslateY pixels (right/down), Posterize bits kept, Solarize
    threshold (pixels >= it are inverted), SolarizeAdd addend (to pixels < 128),
    Color/Contrast/Brightness/Sharpness factor (1 = identity), Cutout half-side (with ``center``
    (row, col)); AutoContrast, Equalize and Invert ignore it.
    """
    if name not in _OP_ID:
        raise ValueError(f"op: unknown '{name}'; allowed: {', '.join(OPS)}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"apply_op: expected a uint8 (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    vals = np.broadcast_to(np.asarray(value.cpu() if isinstance(value, Tensor) else value, np.float64), (n,))
    cy, cx = center if center is not None else (0, 0)
    p = np.stack([vals, 1.0 - vals, np.full(n, cy, np.float64), np.full(n, cx, np.float64)], 1)
    return _apply_op(name, images.contiguous(), _to_device(p.astype(np.float32), images.device), fill)


def _run_ops(x: Tensor, op_id: np.ndarray, params: np.ndarray, fill: int) -> Tensor:
    """One op per image (``op_id`` -1: none), in place on ``x`` (contiguous uint8 NCHW).

    Images are grouped by op on the host, so each op runs once, on its images only, whatever the
    size of the policy; every index and parameter is known on the host: no sync.
    """
    chosen = np.nonzero(op_id >= 0)[0]
    if len(chosen) == 0:
        return x
    order = chosen[np.argsort(op_id[chosen], kind="stable")]
    ids = op_id[order]
    index = _to_device(order.astype(np.int64), x.device)
    p = _to_device(params[order].astype(np.float32), x.device)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        sub = index[s:e]
        x.index_copy_(0, sub, _apply_op(OPS[ids[s]], x.index_select(0, sub), p[s:e], fill))
    return x


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------

# The reference's CIFAR policy: google-research/sam autoaugment/policies.py `policy_cifar()`, as
# used by zhaoyang-0204/gnp. One line per experiment (exp0_0 ... exp2_7), five sub-policies per
# line separated by "|", each two ops "Name probability level".
_REFERENCE_CIFAR = """
Invert .1 7 Contrast .2 6 | Rotate .7 2 TranslateX .3 9 | Sharpness .8 1 Sharpness .9 3 | ShearY .5 8 TranslateY .7 9 | AutoContrast .5 8 Equalize .9 2
Solarize .4 5 AutoContrast .9 3 | TranslateY .9 9 TranslateY .7 9 | AutoContrast .9 2 Solarize .8 3 | Equalize .8 8 Invert .1 3 | TranslateY .7 9 AutoContrast .9 1
Solarize .4 5 AutoContrast .0 2 | TranslateY .7 9 TranslateY .7 9 | AutoContrast .9 0 Solarize .4 3 | Equalize .7 5 Invert .1 3 | TranslateY .7 9 TranslateY .7 9
Solarize .4 5 AutoContrast .9 1 | TranslateY .8 9 TranslateY .9 9 | AutoContrast .8 0 TranslateY .7 9 | TranslateY .2 7 Color .9 6 | Equalize .7 6 Color .4 9
ShearY .2 7 Posterize .3 7 | Color .4 3 Brightness .6 7 | Sharpness .3 9 Brightness .7 9 | Equalize .6 5 Equalize .5 1 | Contrast .6 7 Sharpness .6 5
Brightness .3 7 AutoContrast .5 8 | AutoContrast .9 4 AutoContrast .5 6 | Solarize .3 5 Equalize .6 5 | TranslateY .2 4 Sharpness .3 3 | Brightness .0 8 Color .8 8
Solarize .2 6 Color .8 6 | Solarize .2 6 AutoContrast .8 1 | Solarize .4 1 Equalize .6 5 | Brightness .0 0 Solarize .5 2 | AutoContrast .9 5 Brightness .5 3
Contrast .7 5 Brightness .0 2 | Solarize .2 8 Solarize .1 5 | Contrast .5 1 TranslateY .2 9 | AutoContrast .6 5 TranslateY .0 9 | AutoContrast .9 4 Equalize .8 4
Brightness .0 7 Equalize .4 7 | Solarize .2 5 Equalize .7 5 | Equalize .6 8 Color .6 2 | Color .3 7 Color .2 4 | AutoContrast .5 2 Solarize .7 2
AutoContrast .2 0 Equalize .1 0 | ShearY .6 5 Equalize .6 5 | Brightness .9 3 AutoContrast .4 1 | Equalize .8 8 Equalize .7 7 | Equalize .7 7 Solarize .5 0
Equalize .8 4 TranslateY .8 9 | TranslateY .8 9 TranslateY .6 9 | TranslateY .9 0 TranslateY .5 9 | AutoContrast .5 3 Solarize .3 4 | Solarize .5 3 Equalize .4 4
Color .7 7 TranslateX .5 8 | Equalize .3 7 AutoContrast .4 8 | TranslateY .4 3 Sharpness .2 6 | Brightness .9 6 Color .2 8 | Solarize .5 2 Invert .0 3
AutoContrast .1 5 Brightness .0 0 | Cutout .2 4 Equalize .1 1 | Equalize .7 7 AutoContrast .6 4 | Color .1 8 ShearY .2 3 | ShearY .4 2 Rotate .7 0
ShearY .1 3 AutoContrast .9 5 | TranslateY .3 6 Cutout .3 3 | Equalize .5 0 Solarize .6 6 | AutoContrast .3 5 Rotate .2 7 | Equalize .8 2 Invert .4 0
Equalize .9 5 Color .7 0 | Equalize .1 1 ShearY .1 3 | AutoContrast .7 3 Equalize .7 0 | Brightness .5 1 Contrast .1 7 | Contrast .1 4 Solarize .6 5
Solarize .2 3 ShearX .0 0 | TranslateX .3 0 TranslateX .6 0 | Equalize .5 9 TranslateY .6 7 | ShearX .1 0 Sharpness .5 1 | Equalize .8 6 Invert .3 6
AutoContrast .3 9 Cutout .5 3 | ShearX .4 4 AutoContrast .9 2 | ShearX .0 3 Posterize .0 3 | Solarize .4 3 Color .2 4 | Equalize .1 4 Equalize .7 6
Equalize .3 8 AutoContrast .4 3 | Solarize .6 4 AutoContrast .7 6 | AutoContrast .2 9 Brightness .4 8 | Equalize .1 0 Equalize .0 6 | Equalize .8 4 Equalize .0 4
Equalize .5 5 AutoContrast .1 2 | Solarize .5 5 AutoContrast .9 5 | AutoContrast .6 1 AutoContrast .7 8 | Equalize .2 0 AutoContrast .1 2 | Equalize .6 9 Equalize .4 4
"""

# The paper's CIFAR-10 table (Cubuk et al. 2019, appendix; torchvision AutoAugmentPolicy.CIFAR10).
# Level "-" = the op takes no magnitude.
_PAPER_CIFAR10 = """
Invert .1 - Contrast .2 6 | Rotate .7 2 TranslateX .3 9 | Sharpness .8 1 Sharpness .9 3 | ShearY .5 8 TranslateY .7 9 | AutoContrast .5 - Equalize .9 -
ShearY .2 7 Posterize .3 7 | Color .4 3 Brightness .6 7 | Sharpness .3 9 Brightness .7 9 | Equalize .6 - Equalize .5 - | Contrast .6 7 Sharpness .6 5
Color .7 7 TranslateX .5 8 | Equalize .3 - AutoContrast .4 - | TranslateY .4 3 Sharpness .2 6 | Brightness .9 6 Color .2 8 | Solarize .5 2 Invert .0 -
Equalize .2 - AutoContrast .6 - | Equalize .2 - Equalize .6 - | Color .9 9 Equalize .6 - | AutoContrast .8 - Solarize .2 8 | Brightness .1 3 Color .7 0
Solarize .4 5 AutoContrast .9 - | TranslateY .9 9 TranslateY .7 9 | AutoContrast .9 - Solarize .8 3 | Equalize .8 - Invert .1 - | TranslateY .7 9 AutoContrast .9 -
"""

SubPolicy = Sequence[tuple[str, float, Optional[int]]]


def _parse_table(text: str) -> list[list[tuple[str, float, Optional[int]]]]:
    out = []
    for line in text.strip().splitlines():
        for sub in line.split("|"):
            f = sub.split()
            out.append(
                [(f[i], float(f[i + 1]), None if f[i + 2] == "-" else int(f[i + 2])) for i in range(0, len(f), 3)]
            )
    return out


def reference_cifar_policy() -> list[list[tuple[str, float, Optional[int]]]]:
    """The reference's 95 CIFAR sub-policies ``[(name, prob, level), (name, prob, level)]``."""
    return _parse_table(_REFERENCE_CIFAR)


def paper_cifar10_policy() -> list[list[tuple[str, float, Optional[int]]]]:
    """The paper's 25 CIFAR-10 sub-policies (torchvision's table)."""
    return _parse_table(_PAPER_CIFAR10)


def reference_level(name: str, level: float, *, translate_const: float, cutout_const: float) -> float:
    """The reference's level (0-10) -> unsigned argument of op ``name`` (its ``level_to_arg``)."""
    r = level / 10.0
    if name == "Rotate":
        return r * 30.0
    if name in ("ShearX", "ShearY"):
        return r * 0.3
    if name in ("TranslateX", "TranslateY"):
        return r * float(translate_const)
    if name in _BLENDS:
        return r * 1.8 + 0.1
    if name == "Posterize":
        return float(int(r * 4))
    if name == "Solarize":
        return float(int(r * 256))
    if name == "SolarizeAdd":
        return float(int(r * 110))
    if name == "Cutout":
        return float(int(r * cutout_const))
    return 0.0


def _paper_level(name: str, level: Optional[int], h: int, w: int) -> tuple[float, float]:
    """torchvision AutoAugment's (base, delta): the argument is base + sign * delta (sign = +-1 when signed)."""
    if level is None:
        return 0.0, 0.0
    if name in ("ShearX", "ShearY"):
        return 0.0, float(torch.linspace(0.0, 0.3, 10)[level])
    if name == "TranslateX":  # torchvision truncates the signed value: same magnitude both ways
        return 0.0, float(int(torch.linspace(0.0, 150.0 / 331.0 * w, 10)[level]))
    if name == "TranslateY":
        return 0.0, float(int(torch.linspace(0.0, 150.0 / 331.0 * h, 10)[level]))
    if name == "Rotate":
        return 0.0, float(torch.linspace(0.0, 30.0, 10)[level])
    if name in _BLENDS:
        return 1.0, float(torch.linspace(0.0, 0.9, 10)[level])
    if name == "Posterize":
        return float((8 - (torch.arange(10) / ((10 - 1) / 4))).round().int()[level]), 0.0
    if name == "Solarize":
        return 255.0 * float(torch.linspace(1.0, 0.0, 10)[level]), 0.0
    raise ValueError(f"op '{name}' is not part of torchvision's AutoAugment space")


class _Tables:
    """Per-(sub-policy, slot) arrays: op id, probability, base value, signed delta."""

    def __init__(self, rows: list[list[tuple[int, float, float, float]]]):
        a = np.asarray(rows, dtype=np.float64)  # (P, slots, 4)
        self.op = a[..., 0].astype(np.int64)
        self.prob, self.base, self.delta = a[..., 1], a[..., 2], a[..., 3]


def _op_params(
    rng: np.random.Generator, op_id: np.ndarray, base: np.ndarray, delta: np.ndarray, h: int, w: int
) -> np.ndarray:
    """(N, 4) parameters [value, 1 - value, cutout row, cutout col] with a random sign per image."""
    n = len(op_id)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    value = base + sign * delta
    cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
    return np.stack([value, 1.0 - value, cy, cx], 1)


class AutoAugment:
    """Per-image AutoAugment on uint8 (N, C, H, W) batches: ``out = aa(images, step)``.

    ``policy``: ``"reference"`` (the reference's 95 CIFAR sub-policies and its level mapping),
    ``"paper"`` (the paper's 25 CIFAR-10 sub-policies, torchvision's magnitudes), or an explicit
    list of sub-policies ``[(name, prob, level), ...]`` read with the reference's mapping. Each
    image picks its own sub-policy, applies each op with its probability, with its own sign.
    Randomness: a function of ``(seed, rank, step)``. Returns a new tensor, contiguous NCHW.
    """

    def __init__(
        self,
        policy: Union[str, Sequence[SubPolicy]] = "reference",
        *,
        seed: int = 0,
        rank: int = 0,
        translate_const: float = 250.0,
        cutout_const: float = 100.0,
        fill: int = FILL,
    ):
        self.seed = _check_int("seed", seed, 0)
        self.rank = _check_int("rank", rank, 0)
        self.fill = int(fill)
        if isinstance(policy, str):
            if policy not in ("reference", "paper"):
                raise ValueError(f"autoaugment policy: unknown '{policy}'; allowed: reference, paper")
            table = reference_cifar_policy() if policy == "reference" else paper_cifar10_policy()
        else:
            table = [list(sub) for sub in policy]
        if not table or len({len(sub) for sub in table}) != 1:
            raise ValueError("autoaugment policy: expected a non-empty list of sub-policies of equal length")
        for sub in table:
            for name, prob, _ in sub:
                if name not in _OP_ID:
                    raise ValueError(f"autoaugment policy: unknown op '{name}'; allowed: {', '.join(OPS)}")
                if not 0.0 <= prob <= 1.0:
                    raise ValueError(f"autoaugment policy: probability {prob} of '{name}' outside [0, 1]")
        self.policy = policy if isinstance(policy, str) else "custom"
        self.table = table
        self._consts = dict(translate_const=translate_const, cutout_const=cutout_const)
        self._cache: dict[tuple[int, int], _Tables] = {}

    def _tables(self, h: int, w: int) -> _Tables:
        if (h, w) not in self._cache:
            rows = []
            for sub in self.table:
                row = []
                for name, prob, level in sub:
                    if self.policy == "paper":
                        base, delta = _paper_level(name, level, h, w)
                    else:
                        v = reference_level(name, float(level or 0), **self._consts)
                        base, delta = (0.0, v) if name in _SIGNED else (v, 0.0)
                    row.append((_OP_ID[name], prob, base, delta))
                rows.append(row)
            self._cache[(h, w)] = _Tables(rows)
        return self._cache[(h, w)]

    def __call__(self, images: Tensor, step: int) -> Tensor:
        _check_uint8_batch(images)
        n, _, h, w = images.shape
        t = self._tables(h, w)
        rng = _host_rng(self.seed, self.rank, step, _STREAM_AUTOAUGMENT)
        k = rng.integers(0, len(self.table), size=n)
        x = images.contiguous().clone()
        for slot in range(t.op.shape[1]):
            fire = rng.random(n) < t.prob[k, slot]
            params = _op_params(rng, t.op[k, slot], t.base[k, slot], t.delta[k, slot], h, w)
            x = _run_ops(x, np.where(fire, t.op[k, slot], -1), params, self.fill)
        return x


class RandAugment:
    """The reference's RandAugment on uint8 (N, C, H, W) batches: ``out = ra(images, step)``.

    ``num_ops`` layers; each image draws, per layer, one of the 16 ``OPS`` uniformly and applies it
    at level ``magnitude`` (0-10 scale) with the reference's mapping (``translate_const=100``,
    ``cutout_const=40``), a random sign for the geometric ops. Randomness: ``(seed, rank, step)``.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9,
        *,
        seed: int = 0,
        rank: int = 0,
        translate_const: float = 100.0,
        cutout_const: float = 40.0,
        fill: int = FILL,
    ):
        self.num_ops = _check_int("num_ops", num_ops, 0)
        magnitude = float(magnitude)
        if not 0.0 <= magnitude <= 10.0:
            raise ValueError(f"randaugment magnitude: {magnitude}; expected 0..10")
        self.magnitude = magnitude
        self.seed = _check_int("seed", seed, 0)
        self.rank = _check_int("rank", rank, 0)
        self.fill = int(fill)
        values = np.array(
            [
                reference_level(name, magnitude, translate_const=translate_const, cutout_const=cutout_const)
                for name in OPS
            ]
        )
        signed = np.array([name in _SIGNED for name in OPS])
        self._base = np.where(signed, 0.0, values)
        self._delta = np.where(signed, values, 0.0)

    def __call__(self, images: Tensor, step: int) -> Tensor:
        _check_uint8_batch(images)
        n, _, h, w = images.shape
        rng = _host_rng(self.seed, self.rank, step, _STREAM_RANDAUGMENT)
        x = images.contiguous().clone()
        for _ in range(self.num_ops):
            op = rng.integers(0, len(OPS), size=n)
            params = _op_params(rng, op, self._base[op], self._delta[op], h, w)
            x = _run_ops(x, op, params, self.fill)
        return x


class FlipReflectCrop:
    """The ``basic`` augmentation in torch, per image: flip with ``flip_prob``, then a random H x W
    crop of the image reflect-padded by ``padding`` (offset uniform over the (2p+1)^2 positions;
    mirror without repeating the edge pixel), then, when ``cutout > 0``, a ``cutout`` square placed
    fully inside the image set to ``fill`` (the same semantics as the loader's numba
    ``RandomFlipCropCutout``, but reproducible under ``(seed, rank, step)``)."""

    def __init__(
        self,
        padding: int = 4,
        flip_prob: float = 0.5,
        cutout: int = 0,
        fill: Sequence[int] = (0, 0, 0),
        *,
        seed: int = 0,
        rank: int = 0,
    ):
        self.padding = _check_int("padding", padding, 0)
        self.flip_prob = float(flip_prob)
        self.cutout = _check_int("cutout", cutout, 0)
        self.fill = tuple(int(v) for v in fill)
        self.seed = _check_int("seed", seed, 0)
        self.rank = _check_int("rank", rank, 0)

    def __call__(self, images: Tensor, step: int) -> Tensor:
        _check_uint8_batch(images)
        n, c, h, w = images.shape
        pad, cut = self.padding, self.cutout
        if pad >= min(h, w) or cut > min(h, w):
            raise ValueError(f"FlipReflectCrop: padding {pad} / cutout {cut} too large for {h}x{w} images")
        rng = _host_rng(self.seed, self.rank, step, _STREAM_FLIP_CROP)
        flip = rng.random(n) < self.flip_prob
        dy, dx = rng.integers(-pad, pad + 1, size=n), rng.integers(-pad, pad + 1, size=n)
        cy, cx = rng.integers(0, h - cut + 1, size=n), rng.integers(0, w - cut + 1, size=n)

        def reflect(i: np.ndarray, size: int) -> np.ndarray:
            i = np.abs(i)
            return np.where(i >= size, 2 * size - 2 - i, i)

        rows = reflect(np.arange(h)[None, :] + dy[:, None], h)  # (N, H)
        cols = reflect(np.arange(w)[None, :] + dx[:, None], w)  # (N, W)
        cols = np.where(flip[:, None], w - 1 - cols, cols)
        index = _to_device((rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w), images.device)
        x = images.contiguous().reshape(n, c, h * w).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
        if cut:
            in_rows = (np.arange(h)[None, :] >= cy[:, None]) & (np.arange(h)[None, :] < cy[:, None] + cut)
            in_cols = (np.arange(w)[None, :] >= cx[:, None]) & (np.arange(w)[None, :] < cx[:, None] + cut)
            box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
            if len(self.fill) != c:
                raise ValueError(f"FlipReflectCrop: fill has {len(self.fill)} values for {c}-channel images")
            fill = _to_device(np.asarray(self.fill, dtype=np.uint8).reshape(1, c, 1, 1), x.device)
            x = torch.where(_to_device(box, x.device), fill, x)
        return x


class Compose:
    """Apply per-image stages in order: ``stage(images, step)``."""

    def __init__(self, *stages: Callable[[Tensor, int], Tensor]):
        self.stages = stages

    def __call__(self, images: Tensor, step: int) -> Tensor:
        for stage in self.stages:
            images = stage(images, step)
        return images


def _check_uint8_batch(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")


def build_image_policy(
    augment: str, *, seed: int, rank: int, cutout: int = 0, fill: Sequence[int] = (0, 0, 0), padding: int = 4
) -> Optional[Callable[[Tensor, int], Tensor]]:
    """The torch stage of the train pipeline for ``augment`` (None when the FFCV ops do it all).

    ``autoaugment``: AutoAugment (reference CIFAR policy), then flip + reflect-pad crop (+ per-image
    cutout). ``randaugment``: RandAugment(2, 9) after the FFCV random-resized crop and flip
    (+ per-image cutout last).
    """
    if augment == "autoaugment":
        return Compose(
            AutoAugment("reference", seed=seed, rank=rank),
            FlipReflectCrop(padding, 0.5, cutout, fill, seed=seed, rank=rank),
        )
    if augment == "randaugment":
        ra = RandAugment(2, 9, seed=seed, rank=rank)
        if cutout:
            return Compose(ra, FlipReflectCrop(0, 0.0, cutout, fill, seed=seed, rank=rank))
        return ra
    return None
