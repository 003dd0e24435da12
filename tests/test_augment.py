"""Augmentations: batch-level mixing/cutout + soft targets, per-image AutoAugment/RandAugment, loader hook.

References are independent of trainer.data.augment: label mass and mixing weights are recovered
from the outputs, geometry from the pixels, single ops from torchvision's functional kernels or
numpy formulas, the loss from F.cross_entropy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvf

from trainer.data.augment import (
    AutoAugment,
    BatchAugment,
    FlipReflectCrop,
    RandAugment,
    apply_op,
    build_image_policy,
    paper_cifar10_policy,
    reference_cifar_policy,
    soft_target_cross_entropy,
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def batch(n: int = 8, k: int = 10, h: int = 32, w: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # offset keeps every pixel far from 0, so the zeros of a cutout are unambiguous
    return torch.randn(n, 3, h, w, generator=g) + 10.0, torch.randint(0, k, (n,), generator=g)


def uint8_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    # smooth content + noise: histograms and gradients like a photo, not flat noise
    return ((F.avg_pool2d(noise.float(), 5, 1, 2) + noise.float()) / 2).to(torch.uint8)


# ------------------------------------------------------------------------------------------
# batch level
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "cutout", "mixup", "mixcut", "cutmix"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_batch_shapes_dtypes_and_label_mass(kind: str, ls: float) -> None:
    x, y = batch(8, k=10)
    x = x.contiguous(memory_format=torch.channels_last)
    out, t = BatchAugment(kind, num_classes=10, label_smoothing=ls, seed=3)(x, y, step=5)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert t.shape == (8, 10) and t.dtype == torch.float32 and t.device == y.device
    assert torch.allclose(t.sum(1), torch.ones(8), atol=1e-6)
    assert (t >= ls / 10 - 1e-7).all()  # smoothing floor: ls / K on every class
    assert torch.equal(x, batch(8, k=10)[0])  # input untouched


def test_none_is_one_hot_and_smoothing_formula() -> None:
    x, y = batch(6, k=5)
    out, t = BatchAugment("none", num_classes=5)(x, y, 0)
    assert torch.equal(out, x) and torch.equal(t, F.one_hot(y, 5).float())
    _, ts = BatchAugment("none", num_classes=5, label_smoothing=0.2)(x, y, 0)
    assert torch.allclose(ts, 0.8 * F.one_hot(y, 5).float() + 0.2 / 5)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_soft_target_loss_equals_cross_entropy_with_label_smoothing(ls: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 7, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (16,), generator=g)
    _, t = BatchAugment("none", num_classes=7, label_smoothing=ls)(torch.zeros(16, 3, 4, 4), y, 0)
    ours = soft_target_cross_entropy(logits, t)
    ref = F.cross_entropy(logits, y, label_smoothing=ls)
    assert torch.allclose(ours, ref, atol=1e-6)
    (g1,) = torch.autograd.grad(ours, logits)
    (g2,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_mixup_is_one_folded_beta_lambda_with_reversed_batch() -> None:
    n = 10
    x, _ = batch(n)
    y = torch.arange(n)  # distinct classes: lam readable from targets
    aug = BatchAugment("mixup", num_classes=n, alpha=1.0, seed=0)
    lams = []
    for step in range(300):
        out, t = aug(x, y, step)
        lam = aug.draw(step, n, 32, 32).lam  # the exact (float64) lam of this step
        assert abs(float(t[0, 0]) - lam) < 1e-6  # ... is the one the targets carry
        # one lam for the batch, partner = reversed batch
        expected_t = lam * F.one_hot(y, n).float() + (1 - lam) * F.one_hot(y.flip(0), n).float()
        assert torch.allclose(t, expected_t, atol=1e-6)
        assert torch.equal(out, lam * x + (1 - lam) * x.flip(0))
        assert lam >= 0.5
        lams.append(lam)
    # Beta(1, 1) folded by max(lam, 1 - lam) is uniform on [0.5, 1]: mean 0.75, std 0.144
    assert abs(np.mean(lams) - 0.75) < 0.035
    assert min(lams) < 0.55 and max(lams) > 0.95


def zero_box(img: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the zeros of a C x H x W image, asserting they form one rectangle."""
    zero = (img == 0).all(0)
    assert ((img == 0).any(0) == zero).all(), "zeros must cover every channel"
    ys, xs = torch.nonzero(zero.any(1)).flatten(), torch.nonzero(zero.any(0)).flatten()
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    assert zero[y0:y1, x0:x1].all() and int(zero.sum()) == (y1 - y0) * (x1 - x0)
    return y0, y1, x0, x1


def test_cutout_one_clipped_square_same_for_every_image() -> None:
    x, y = batch(3, h=32, w=32)
    aug = BatchAugment("cutout", num_classes=10, cutout=16, seed=1)
    sides = set()
    for step in range(100):
        out, t = aug(x, y, step)
        assert torch.equal(t, F.one_hot(y, 10).float())
        boxes = {zero_box(img) for img in out}
        assert len(boxes) == 1  # the same place in every image
        y0, y1, x0, x1 = boxes.pop()
        keep = torch.ones(32, 32, dtype=torch.bool)
        keep[y0:y1, x0:x1] = False
        assert torch.equal(out[:, :, keep], x[:, :, keep])
        # reference geometry: [max(0, c - 8), min(32, c + 8)) for a centre c in 0..31
        for a, b in ((y0, y1), (x0, x1)):
            assert b - a == 16 or (a == 0 and 8 <= b <= 16) or (b == 32 and 16 <= a <= 24)
            sides.add(b - a)
    assert 16 in sides and min(sides) <= 10  # fully inside and clipped both occur


def test_mixcut_is_mixup_then_cutout_with_mixup_labels() -> None:
    n = 8
    x, _ = batch(n)
    y = torch.arange(n)
    aug = BatchAugment("mixcut", num_classes=n, seed=2)
    out, t = aug(x, y, 7)
    lam = aug.draw(7, n, 32, 32).lam
    assert lam >= 0.5
    assert torch.allclose(t, lam * F.one_hot(y, n).float() + (1 - lam) * F.one_hot(y.flip(0), n).float(), atol=1e-6)
    mixed = lam * x + (1 - lam) * x.flip(0)
    boxes = {zero_box(img) for img in out}
    assert len(boxes) == 1
    y0, y1, x0, x1 = boxes.pop()
    mixed[:, :, y0:y1, x0:x1] = 0
    assert torch.equal(out, mixed)


def test_cutmix_label_weight_is_pasted_pixel_fraction() -> None:
    n, h, w = 16, 24, 20
    # image j is the constant j + 1: every output pixel names the image it came from
    x = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    y = torch.arange(n)
    aug = BatchAugment("cutmix", num_classes=n, alpha=1.0, seed=4)
    fractions = []
    for step in range(20):
        out, t = aug(x, y, step)
        for i in range(n):
            src = out[i, 0].round().long() - 1
            others = src[src != i]
            frac = others.numel() / (h * w)
            expected = torch.zeros(n)
            expected[i] = 1 - frac
            if others.numel():
                assert (others == others[0]).all()  # one partner
                zero_box((out[i] == i + 1).float())  # the pasted pixels form one box
                expected[int(others[0])] = frac
            assert torch.allclose(t[i], expected, atol=1e-6)
            fractions.append(frac)
    assert len(set(fractions)) > 20  # per-sample lam, not one per batch
    _, ts = BatchAugment("cutmix", num_classes=n, label_smoothing=0.1, seed=4)(x, y, 0)
    assert torch.allclose(ts, 0.9 * aug(x, y, 0)[1] + 0.1 / n, atol=1e-6)


@pytest.mark.parametrize("kind", ["cutout", "mixup", "mixcut", "cutmix"])
def test_batch_determinism_under_seed_step_rank(kind: str) -> None:
    x, y = batch(8)

    def run(seed: int = 0, rank: int = 0, step: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        # a fresh object each time: what a resumed run or another process would build
        return BatchAugment(kind, num_classes=10, seed=seed, rank=rank)(x, y, step)

    a = run()
    assert all(torch.equal(u, v) for u, v in zip(a, run()))
    for other in (run(step=4), run(rank=1), run(seed=1)):
        assert not torch.equal(a[0], other[0])


def test_batch_augment_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_augment: unknown 'cutmixx'"):
        BatchAugment("cutmixx", num_classes=10)
    with pytest.raises(ValueError, match="mixup_alpha"):
        BatchAugment("mixup", num_classes=10, alpha=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        BatchAugment("none", num_classes=10, label_smoothing=1.0)
    with pytest.raises(ValueError, match="step"):
        BatchAugment("mixup", num_classes=10)(*batch(2), step=-1)
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\) and labels"):
        BatchAugment("mixup", num_classes=10)(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long), 0)


# ------------------------------------------------------------------------------------------
# single ops against torchvision / numpy
# ------------------------------------------------------------------------------------------

TV_OPS = [
    ("Invert", 0.0, lambda im: tvf.invert(im)),
    ("AutoContrast", 0.0, lambda im: tvf.autocontrast(im)),
    ("Equalize", 0.0, lambda im: tvf.equalize(im)),
    ("Posterize", 2, lambda im: tvf.posterize(im, 2)),
    ("Posterize", 0, lambda im: tvf.posterize(im, 0)),
    ("Solarize", 230, lambda im: tvf.solarize(im, 230)),
    ("Brightness", 1.72, lambda im: tvf.adjust_brightness(im, 1.72)),
    ("Color", 1.72, lambda im: tvf.adjust_saturation(im, 1.72)),
    ("Color", 0.28, lambda im: tvf.adjust_saturation(im, 0.28)),
    ("Contrast", 1.54, lambda im: tvf.adjust_contrast(im, 1.54)),
    ("Sharpness", 1.9, lambda im: tvf.adjust_sharpness(im, 1.9)),
    ("Sharpness", 0.1, lambda im: tvf.adjust_sharpness(im, 0.1)),
    ("Rotate", 27.0, lambda im: tvf.rotate(im, 27.0, fill=128)),
    ("Rotate", -6.0, lambda im: tvf.rotate(im, -6.0, fill=128)),
    ("TranslateX", 9, lambda im: tvf.affine(im, angle=0.0, translate=[9, 0], scale=1.0, shear=[0.0, 0.0], fill=128)),
    ("TranslateY", -5, lambda im: tvf.affine(im, angle=0.0, translate=[0, -5], scale=1.0, shear=[0.0, 0.0], fill=128)),
]


@pytest.mark.parametrize("name,value,ref", TV_OPS, ids=[f"{n}{v}" for n, v, _ in TV_OPS])
def test_op_matches_torchvision_functional(name, value, ref) -> None:
    imgs = uint8_images(4, 28, 36)
    out = apply_op(imgs, name, value)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape
    assert torch.equal(out, torch.stack([ref(im) for im in imgs]))


def test_shear_solarize_add_cutout_match_numpy_formulas() -> None:
    imgs = uint8_images(2, 20, 24)
    a = imgs.numpy().astype(np.int64)
    h, w = 20, 24
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for name, s in (("ShearX", 0.25), ("ShearX", -0.3), ("ShearY", 0.25)):
        # PIL/TF affine (1, s, 0, 0, 1, 0): output (x, y) samples input (x + s y, y); nearest, ties even
        sx = np.rint(xx + s * yy) if name == "ShearX" else xx.astype(float)
        sy = np.rint(yy + s * xx) if name == "ShearY" else yy.astype(float)
        ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
        ref = np.where(ok, a[:, :, sy.clip(0, h - 1).astype(int), sx.clip(0, w - 1).astype(int)], 128)
        np.testing.assert_array_equal(apply_op(imgs, name, s).numpy(), ref)
    ref = np.where(a < 128, np.minimum(a + 99, 255), a)
    np.testing.assert_array_equal(apply_op(imgs, "SolarizeAdd", 99).numpy(), ref)
    # Cutout half-side 6 centred at (2, 17): rows [0, 8), cols [11, 23)
    ref = a.copy()
    ref[:, :, 0:8, 11:23] = 128
    np.testing.assert_array_equal(apply_op(imgs, "Cutout", 6, center=(2, 17)).numpy(), ref)


# ------------------------------------------------------------------------------------------
# policies
# ------------------------------------------------------------------------------------------


def test_policy_tables() -> None:
    ref, paper = reference_cifar_policy(), paper_cifar10_policy()
    assert len(ref) == 95 and len(paper) == 25 and all(len(s) == 2 for s in ref + paper)
    # spot checks against google-research/sam autoaugment/policies.py and torchvision's table
    assert ref[0] == [("Invert", 0.1, 7), ("Contrast", 0.2, 6)]
    assert ref[61] == [("Cutout", 0.2, 4), ("Equalize", 0.1, 1)]
    assert ref[94] == [("Equalize", 0.6, 9), ("Equalize", 0.4, 4)]
    assert paper[24] == [("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)]
    # the paper's table starts with the reference's exp0_0
    assert [[op[:2] for op in s] for s in paper[:5]] == [[op[:2] for op in s] for s in ref[:5]]


def test_known_sub_policy_matches_torchvision_per_image_sign() -> None:
    """Equalize (p=1) then Rotate level 9 (p=1) = torchvision equalize + rotate(+-27 deg, fill 128)."""
    imgs = uint8_images(24)
    aa = AutoAugment([[("Equalize", 1.0, 0), ("Rotate", 1.0, 9)]], seed=5)
    out = aa(imgs, step=0)
    signs = []
    for im, o in zip(imgs, out):
        eq = tvf.equalize(im)
        plus, minus = tvf.rotate(eq, 27.0, fill=128), tvf.rotate(eq, -27.0, fill=128)
        assert torch.equal(o, plus) or torch.equal(o, minus)
        signs.append(torch.equal(o, plus))
    assert 0 < sum(signs) < len(signs)  # the sign is drawn per image


def test_op_probability_is_per_image() -> None:
    imgs = uint8_images(200)
    out = AutoAugment([[("Invert", 0.3, 0), ("Invert", 0.0, 0)]], seed=0)(imgs, 0)
    inverted = torch.tensor([torch.equal(o, 255 - i) for o, i in zip(out, imgs)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, imgs)])
    assert (inverted | kept).all()
    assert 0.18 < inverted.float().mean() < 0.42  # Binomial(200, 0.3): +-4 sigma


@pytest.mark.parametrize(
    "make",
    [
        lambda s, r: AutoAugment("reference", seed=s, rank=r),
        lambda s, r: AutoAugment("paper", seed=s, rank=r),
        lambda s, r: RandAugment(2, 9, seed=s, rank=r),
    ],
    ids=["autoaugment-reference", "autoaugment-paper", "randaugment"],
)
def test_policies_per_sample_valid_and_deterministic(make) -> None:
    src = uint8_images(1, seed=3)
    imgs = src.expand(64, -1, -1, -1).contiguous(memory_format=torch.channels_last)  # the loader's layout
    out = make(0, 0)(imgs, 11)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape and out.device == imgs.device
    assert len({o.numpy().tobytes() for o in out}) > 16  # each image draws its own ops
    assert torch.equal(out, make(0, 0)(imgs.contiguous(), 11))  # deterministic, layout-independent
    for other in (make(0, 0)(imgs, 12), make(0, 1)(imgs, 11), make(1, 0)(imgs, 11)):
        assert not torch.equal(out, other)
    assert torch.equal(imgs, src.expand(64, -1, -1, -1))  # input untouched


def test_reference_autoaugment_keeps_the_references_cifar_magnitudes() -> None:
    """translate_const=250 px (ImageNet's) on 32 px images: level-9 TranslateY greys the whole image."""
    imgs = uint8_images(512, seed=1)

    def grey(out: torch.Tensor) -> int:
        return int((out == 128).flatten(1).all(1).sum())

    assert grey(AutoAugment("reference", seed=0)(imgs, 0)) > 20  # ~13 % of sub-policies do it
    assert grey(AutoAugment("paper", seed=0)(imgs, 0)) == 0  # torchvision: at most 14 px


def test_flip_reflect_crop_outputs_are_flipped_reflect_padded_crops() -> None:
    src = uint8_images(1, 12, 12, seed=2)[0]
    a = src.permute(1, 2, 0).numpy()
    cands = []
    for img in (a, a[:, ::-1]):
        p = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
        cands += [p[ty : ty + 12, tx : tx + 12] for ty in range(9) for tx in range(9)]
    cands = np.stack(cands)
    out = FlipReflectCrop(4, 0.5, seed=1)(src.expand(64, -1, -1, -1), 0)
    used = set()
    for o in out.permute(0, 2, 3, 1).numpy():
        match = np.nonzero((cands == o).all(axis=(1, 2, 3)))[0]
        assert len(match), "not a flipped reflect-padded crop"
        used.add(int(match[0]))
    assert len(used) > 20 and min(used) < 81 <= max(used)
    # per-image cutout: a 5x5 square of the fill colour fully inside every image
    out = FlipReflectCrop(0, 0.0, 5, (1, 2, 3), seed=1)(src.expand(16, -1, -1, -1), 0)
    for o in out:
        is_fill = (o == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all(0)
        assert int(is_fill.sum()) >= 25 and torch.equal(o[:, ~is_fill], src[:, ~is_fill])


# ------------------------------------------------------------------------------------------
# the loader hook
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loader_runs_autoaugment_then_basic_reproducibly(fmnist_small: Path) -> None:
    from trainer.data.loaders import build_loaders

    kw = dict(
        batch_size=32, eval_batch_size=100, num_workers=1, seed=3, rank=0, world_size=1, device=torch.device("cpu")
    )
    plain = build_loaders(fmnist_small, augment="none", **kw)  # same order, no augmentation
    L = build_loaders(fmnist_small, augment="autoaugment", **kw)
    mean, std = torch.tensor(L.meta["mean"]).view(1, 3, 1, 1), torch.tensor(L.meta["std"]).view(1, 3, 1, 1)

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return torch.round(images * std + mean).to(torch.uint8)

    policy = build_image_policy("autoaugment", seed=3, rank=0, fill=[round(m) for m in L.meta["mean"]])
    for epoch in range(2):
        for b, ((src, src_labels), (images, labels)) in enumerate(zip(plain.train, L.train)):
            # policy then basic on the decoded uint8 batch, keyed by the global batch index
            expected = policy(pixels(src), epoch * len(L.train) + b)
            assert torch.equal(pixels(images), expected) and torch.equal(labels, src_labels)
            if b == 2:
                break
    for (src, _), (images, _) in zip(plain.val, L.val):  # validation: decode only
        assert torch.equal(images, src)

    R = build_loaders(fmnist_small, augment="randaugment", cutout=8, **kw)
    for b, (images, labels) in enumerate(R.train):
        assert images.shape == (32, 3, 28, 28) and torch.isfinite(images).all() and labels.shape == (32,)
        if b == 2:
            break
