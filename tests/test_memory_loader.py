"""Device-resident loaders (trainer.data.memory) on the real Fashion-MNIST.

References are independent of trainer.data: the IDX files are parsed here with gzip + numpy, the
normalization, the reflect-padded crops and the statistics are numpy, the distributed order is
torch's own DistributedSampler. The tie to the FFCV path compares with what `trainer convert`
writes and what the FFCV loader yields for the same data (skipped where FFCV is not installed).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from tests.conftest import FMNIST
from trainer.data.memory import build_memory_loaders

SOURCE = f"fashion-mnist:{FMNIST}"
CPU = torch.device("cpu")

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def read_idx_gz(path: Path) -> np.ndarray:
    """IDX: 2 zero bytes, type 0x08 (uint8), ndim, ndim big-endian uint32 sizes, then the bytes."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def raw() -> dict:
    """The real Fashion-MNIST arrays, read without trainer code."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: `make setup` installs the dataset-fashion-mnist package")
    return {
        "train_x": read_idx_gz(FMNIST / "train-images-idx3-ubyte.gz"),
        "train_y": read_idx_gz(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64),
        "val_x": read_idx_gz(FMNIST / "t10k-images-idx3-ubyte.gz"),
        "val_y": read_idx_gz(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    }


def gray_stats(images: np.ndarray) -> tuple[float, float]:
    """Population mean and std of every pixel (float64)."""
    px = images.astype(np.float64)
    return float(px.mean()), float(px.std())


def normalized(gray: np.ndarray, mean: float, std: float) -> np.ndarray:
    """N x 28 x 28 uint8 -> N x 3 x 28 x 28 float, gray replicated to 3 channels."""
    x = (gray.astype(np.float64) - mean) / std
    return np.repeat(x[:, None], 3, axis=1)


def build(**kw) -> object:
    args = dict(batch_size=100, eval_batch_size=None, seed=0, rank=0, world_size=1, device=CPU)
    args.update(kw)
    return build_memory_loaders(args.pop("source", SOURCE), **args)


def pixels(images: torch.Tensor, mean: float, std: float) -> np.ndarray:
    """Normalized batch -> uint8 N x H x W x 3, checking the values sit on the uint8 grid."""
    x = images.double().permute(0, 2, 3, 1).numpy() * std + mean
    r = np.rint(x)
    assert np.abs(x - r).max() < 1e-3 and r.min() >= 0 and r.max() <= 255
    return r.astype(np.uint8)


def reflect_crops(img: np.ndarray, pad: int) -> np.ndarray:
    """Every (flip, dy, dx) crop of the reflect-padded image: (2 * (2p+1)^2, H, W), index flip*81 + ..."""
    h, w = img.shape
    padded = np.pad(img, pad, mode="reflect")  # numpy "reflect" = mirror without the edge pixel
    out = []
    for flip in (False, True):
        src = padded[:, ::-1] if flip else padded
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                out.append(src[dy : dy + h, dx : dx + w])
    return np.stack(out)


# ------------------------------------------------------------------------------------------
# order and coverage
# ------------------------------------------------------------------------------------------


def test_one_epoch_reads_every_train_image_once(raw) -> None:
    """One rank: the epoch is numpy's permutation of (seed + epoch); labels histogram = the source's."""
    L = build(batch_size=1000, augment="none", seed=5)
    n = len(raw["train_y"])
    assert L.meta["train_size"] == n and L.steps_per_epoch == len(L.train) == n // 1000
    L.train.set_epoch(2)
    labels = torch.cat([y for _, y in L.train]).numpy()
    order = np.random.default_rng(5 + 2).permutation(n)  # the FFCV loader's single-process order
    assert np.array_equal(L.train.epoch_order(2), order)
    assert np.array_equal(labels, raw["train_y"][order])
    assert np.array_equal(np.bincount(labels, minlength=10), np.bincount(raw["train_y"], minlength=10))


def test_two_ranks_shard_like_distributed_sampler(raw) -> None:
    """W = 2 simulated in one process, N odd: DistributedSampler's shards, one padded duplicate."""
    n, seed, epoch, bs = 10001, 7, 3, 1000
    ranks = [
        build(limit=n, batch_size=bs, augment="none", seed=seed, rank=r, world_size=2, drop_last=False)
        for r in range(2)
    ]
    labels = raw["train_y"][:n]
    got, orders = [], []
    for r, L in enumerate(ranks):
        sampler = DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
        expected = np.asarray(list(sampler))
        assert np.array_equal(L.train.epoch_order(epoch), expected)
        assert len(L.train) == math.ceil(math.ceil(n / 2) / bs) == 6  # same on both ranks
        L.train.set_epoch(epoch)
        y = torch.cat([b[1] for b in L.train]).numpy()
        assert np.array_equal(y, labels[expected])
        got.append(y)
        orders.append(expected)
    # Union = every index; P - N = 1 index (the permutation's first) appears on both ranks.
    union = np.concatenate(orders)
    assert set(union.tolist()) == set(range(n)) and len(union) == n + 1
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    first = int(torch.randperm(n, generator=g)[0])
    hist = np.bincount(np.concatenate(got), minlength=10)
    assert np.array_equal(hist, np.bincount(labels, minlength=10) + np.bincount([labels[first]], minlength=10))
    # drop_last (default): floor(ceil(N / W) / bs) full batches on every rank
    dl = build(limit=n, batch_size=bs, augment="none", seed=seed, rank=1, world_size=2)
    sizes = [x.shape[0] for x, _ in dl.train]
    assert sizes == [bs] * (math.ceil(n / 2) // bs)


def test_eval_covers_every_image_once_on_two_ranks(raw) -> None:
    """Rank r reads val images r, r+2, ... in order, exactly normalized; together: each image once."""
    mean, std = gray_stats(raw["train_x"])
    seen, labels = 0, []
    for r in range(2):
        L = build(batch_size=100, eval_batch_size=999, augment="none", rank=r, world_size=2)
        assert L.val.num_samples == 5000 and len(L.val) == math.ceil(5000 / 999)
        x = torch.cat([b[0] for b in L.val]).numpy()
        y = torch.cat([b[1] for b in L.val]).numpy()
        np.testing.assert_allclose(x, normalized(raw["val_x"][r::2], mean, std), rtol=0, atol=2e-5)
        assert np.array_equal(y, raw["val_y"][r::2]) and np.array_equal(L.val.indices, np.arange(r, 10000, 2))
        seen += len(y)
        labels.append(y)
    assert seen == 10000
    assert np.array_equal(np.bincount(np.concatenate(labels), minlength=10), np.bincount(raw["val_y"], minlength=10))


# ------------------------------------------------------------------------------------------
# batch contents
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
def test_unaugmented_batch_equals_numpy(raw, channels_last: bool) -> None:
    """augment=none: (raw[order] - mean) / std with mean/std of the limited train split (numpy)."""
    n, bs = 2000, 256
    L = build(limit=n, batch_size=bs, augment="none", seed=1, channels_last=channels_last)
    mean, std = gray_stats(raw["train_x"][:n])
    np.testing.assert_allclose(L.meta["mean"], [mean] * 3, rtol=1e-12)
    np.testing.assert_allclose(L.meta["std"], [std] * 3, rtol=1e-12)
    order = L.train.epoch_order(0)
    for i, (x, y) in enumerate(L.train):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (bs, 3, 28, 28)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt)
        idx = order[i * bs : (i + 1) * bs]
        np.testing.assert_allclose(x.numpy(), normalized(raw["train_x"][idx], mean, std), rtol=0, atol=2e-5)
        assert np.array_equal(y.numpy(), raw["train_y"][idx])
        if i == 2:
            break


def test_basic_is_flip_and_reflect_crop(raw) -> None:
    """Brute force: each augmented image is one of the 162 flip/reflect-pad-4 crops of its source."""
    L = build(limit=1000, batch_size=200, augment="basic", seed=2)
    mean, std = L.meta["mean"][0], L.meta["std"][0]
    x, _ = next(iter(L.train))
    px = pixels(x, mean, std)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 0] == px[..., 2]).all()
    order, draws = L.train.epoch_order(0), L.train.epoch_draws(0).numpy()
    identity = 4 * 9 + 4  # no flip, dy = dx = 0
    only_flipped = only_plain = at_identity = 0
    offsets = set()
    for k in range(60):
        cands = reflect_crops(raw["train_x"][order[k]], 4)
        match = np.nonzero((cands == px[k, ..., 0]).all(axis=(1, 2)))[0]
        assert len(match), f"image {k} is not a (flipped) reflect-padded crop of its source"
        flip, dy, dx = draws[0, k], draws[1, k], draws[2, k]
        # The documented draws are the ones applied (candidate index: flip*81 + (dy+4)*9 + (dx+4)).
        assert flip * 81 + (dy + 4) * 9 + (dx + 4) in match
        only_flipped += bool((match >= 81).all())
        only_plain += bool((match < 81).all())
        at_identity += identity in match
        if len(match) == 1:
            offsets.add(int(match[0]) % 81)
    # Not an identity in disguise: both flip states occur and the offsets vary.
    assert only_flipped >= 10 and only_plain >= 10 and at_identity <= 10 and len(offsets) >= 15


@pytest.mark.parametrize("augment", ["basic", "none"])
def test_cutout_is_a_mean_square_inside_the_crop(raw, augment: str) -> None:
    """cutout 10: a 10x10 square of round(mean) fully inside; elsewhere a reflect crop (basic) or
    the source image itself (none)."""
    L = build(limit=500, batch_size=100, augment=augment, cutout=10, seed=4)
    mean, std = L.meta["mean"][0], L.meta["std"][0]
    fill = round(gray_stats(raw["train_x"][:500])[0])
    x, _ = next(iter(L.train))
    px = pixels(x, mean, std)[..., 0]
    order = L.train.epoch_order(0)
    for k in range(25):
        out = px[k]
        is_fill = (out == fill).astype(np.int64)
        c = np.pad(is_fill.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        windows = c[10:, 10:] - c[:-10, 10:] - c[10:, :-10] + c[:-10, :-10]  # fill pixels per 10x10 window
        cands = reflect_crops(raw["train_x"][order[k]], 4)
        if augment == "none":
            cands = cands[4 * 9 + 4 : 4 * 9 + 5]  # only the unflipped, unshifted image
        found = False
        for y, x0 in zip(*np.nonzero(windows == 100)):
            keep = np.ones_like(out, dtype=bool)
            keep[y : y + 10, x0 : x0 + 10] = False
            if (cands[:, keep] == out[keep]).all(axis=1).any():
                found = True
                break
        assert found, f"image {k}: no fill square with a reflect crop around it"


def test_autoaugment_is_the_ffcv_loaders_torch_stage(raw) -> None:
    """augment=autoaugment feeds the stored images to the same policy, keyed by the global batch index."""
    from trainer.data.augment import build_image_policy

    L = build(limit=300, batch_size=64, augment="autoaugment", seed=3)
    mean, std = L.meta["mean"][0], L.meta["std"][0]
    policy = build_image_policy("autoaugment", seed=3, rank=0, fill=[round(mean)] * 3, padding=4)
    L.train.set_epoch(1)
    order = L.train.epoch_order(1)
    it = iter(L.train)
    for i in range(2):
        x, _ = next(it)
        src = torch.from_numpy(np.repeat(raw["train_x"][order[i * 64 : (i + 1) * 64], None], 3, axis=1).copy())
        ref = policy(src, 1 * len(L.train) + i).double().numpy()
        np.testing.assert_allclose(x.numpy(), (ref - mean) / std, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------
# reproducibility
# ------------------------------------------------------------------------------------------


def test_same_seed_and_epoch_replay_exactly() -> None:
    """Two builds, same (seed, epoch): bitwise equal batches; another epoch: another order."""
    a = build(limit=3000, batch_size=500, augment="basic", cutout=8, seed=9)
    b = build(limit=3000, batch_size=500, augment="basic", cutout=8, seed=9)
    first = [(x.clone(), y.clone()) for x, y in a.train]  # epoch 0
    assert a.train.epoch == 1
    second = [(x.clone(), y.clone()) for x, y in a.train]  # iterating again: epoch 1
    b.train.set_epoch(1)
    for (x1, y1), (x2, y2) in zip(second, b.train):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    b.train.set_epoch(0)  # a resume replays epoch 0
    for (x1, y1), (x2, y2) in zip(first, b.train):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not np.array_equal(a.train.epoch_order(0), a.train.epoch_order(1))
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    with pytest.raises(ValueError, match="epoch"):
        a.train.set_epoch(-1)


# ------------------------------------------------------------------------------------------
# the tie to the FFCV path
# ------------------------------------------------------------------------------------------


def test_meta_and_batches_match_convert_and_ffcv(request: pytest.FixtureRequest) -> None:
    """limit=500: the same mean/std (bit for bit) and sizes as convert's meta.json, and, without
    augmentation, the same batches as the FFCV loader for the same seed."""
    pytest.importorskip("ffcv")  # before the fixture: converting needs FFCV (absent on the GPU image)
    from trainer.data.loaders import build_loaders

    fmnist_small: Path = request.getfixturevalue("fmnist_small")  # convert(..., limit=500)
    meta = json.loads((fmnist_small / "meta.json").read_text())
    L = build(limit=500, batch_size=100, augment="none", seed=11, channels_last=False)
    for key in ("mean", "std", "train_size", "val_size", "num_classes", "classes", "image_size", "channels"):
        assert L.meta[key] == meta[key], key
    F = build_loaders(
        fmnist_small,
        batch_size=100,
        eval_batch_size=None,
        num_workers=1,
        seed=11,
        rank=0,
        world_size=1,
        device=CPU,
        augment="none",
    )
    F.train.set_epoch(1)
    L.train.set_epoch(1)
    assert np.array_equal(F.train.epoch_order(1), L.train.epoch_order(1))
    for (fx, fy), (mx, my) in zip(F.train, L.train):
        assert torch.equal(fx, mx) and torch.equal(fy, my)
    assert len(F.val) == len(L.val)
    for (fx, fy), (mx, my) in zip(F.val, L.val):
        assert torch.equal(fx, mx) and torch.equal(fy, my)


# ------------------------------------------------------------------------------------------
# synthetic source and errors
# ------------------------------------------------------------------------------------------


def test_synthetic_source() -> None:
    """synthetic:HxW:CLASSES:N: shapes, label range, a fixed dataset, uniform-pixel statistics."""
    L = build(source="synthetic:20x24:7:3000", batch_size=64, eval_batch_size=50, seed=1, rank=1, world_size=3)
    m = L.meta
    assert (m["num_classes"], m["train_size"], m["val_size"], m["image_size"]) == (7, 3000, 300, [20, 24])
    x, y = next(iter(L.train))
    assert x.shape == (64, 3, 20, 24) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.min() >= 0 and y.max() < 7
    assert len(L.train) == 1000 // 64 and L.val.num_samples == 100
    # Uniform 0..255 pixels: mean 127.5, std sqrt((256^2 - 1) / 12) = 73.9; 1.44M pixels per channel.
    np.testing.assert_allclose(m["mean"], [127.5] * 3, atol=0.5)
    np.testing.assert_allclose(m["std"], [math.sqrt((256**2 - 1) / 12)] * 3, atol=0.5)
    # The data do not depend on the run's seed; the val shards of 3 ranks cover it once.
    other = [build(source="synthetic:20x24:7:3000", eval_batch_size=50, seed=5, rank=r, world_size=3) for r in range(3)]
    val = [torch.cat([b[0] for b in o.val]) for o in other]
    assert torch.equal(val[1], torch.cat([b[0] for b in L.val]))
    assert sum(v.shape[0] for v in val) == 300


def test_rgb_statistics_are_per_channel() -> None:
    """3-channel data: meta mean/std = numpy's per-channel population statistics of the train pixels."""
    L = build(source="synthetic:8x10:3:500", batch_size=100, augment="none", drop_last=False)
    mean, std = np.asarray(L.meta["mean"]), np.asarray(L.meta["std"])
    # Recover the stored uint8 pixels of one full epoch (every train image once) from the batches.
    x = torch.cat([b[0] for b in L.train]).double().permute(0, 2, 3, 1).numpy() * std + mean
    px = np.rint(x).reshape(-1, 3)
    assert px.shape[0] == 500 * 80 and np.abs(x.reshape(-1, 3) - px).max() < 1e-3
    np.testing.assert_allclose(mean, px.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, px.std(axis=0), rtol=1e-12)
    assert len(set(np.round(mean, 6))) == 3  # three different channels, not one value repeated


@pytest.mark.parametrize(
    "source",
    [
        "",
        "/usr/share/datasets/fashion-mnist",
        "fashion-mnist",
        "fashion-mnist:",
        "mnist:/data",
        "imagefolder:/data/imagenet",
        "synthetic:32:10:100",
        "synthetic:32x32:10",
        "synthetic:axb:10:100",
        "synthetic:32x32:0:100",
        "synthetic:0x32:10:100",
        "synthetic:32x32:10:100:5",
    ],
)
def test_bad_sources_raise_one_line(source: str) -> None:
    with pytest.raises(ValueError) as e:
        build(source=source)
    msg = str(e.value)
    assert "data.path" in msg and "synthetic:HxW:CLASSES:N" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(augment="imagenet"), "augment"),
        (dict(batch_size=3001), "batch_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(cutout=29), "cutout"),
        (dict(limit=0), "limit"),
        (dict(batch_size=0), "batch_size"),
        (dict(label_noise=1.0), "label_noise"),
        (dict(label_noise=-0.1), "label_noise"),
        (dict(source="synthetic:8x8:1:20", augment="none", batch_size=4, label_noise=0.5), "label_noise"),
        (dict(source="synthetic:4x4:2:10"), "augment"),
        (dict(source=f"cifar10:{FMNIST}"), "cifar"),
    ],
)
def test_bad_arguments_raise(kw: dict, key: str) -> None:
    kw.setdefault("source", "synthetic:28x28:10:3000")
    with pytest.raises(ValueError, match=key):
        build(**kw)


def test_label_noise_is_symmetric_fixed_and_train_only() -> None:
    clean = build(limit=3000, augment="none")
    noisy = build(limit=3000, augment="none", label_noise=0.3)
    other_seed = build(limit=3000, augment="none", label_noise=0.3, seed=7)
    y0, y1 = clean.train._labels, noisy.train._labels
    changed = y0 != y1
    assert int(changed.sum()) == 900 == noisy.meta["noisy_labels"] and noisy.meta["label_noise"] == 0.3
    assert torch.equal(other_seed.train._labels, y1)  # part of the dataset: the same for every run seed
    assert torch.equal(noisy.val._labels, clean.val._labels)  # evaluation on clean labels
    assert "label_noise" not in clean.meta
    # Symmetric: every wrong class is about equally likely (900 draws over 9 offsets: ~100 each).
    offsets = torch.bincount((y1[changed] - y0[changed]) % 10, minlength=10)
    assert offsets[0] == 0 and int(offsets[1:].min()) > 60 and int(offsets[1:].max()) < 140
    # The noisy labels are what the training batches carry.
    seen = torch.cat([y for _, y in noisy.train])
    assert torch.equal(seen, y1[torch.from_numpy(noisy.train.epoch_order(0)[: len(seen)])])


def test_build_data_takes_the_data_section_and_the_run_facts(raw):
    """build_data(DataConfig, LoaderFacts) picks the memory loader and hands on every setting: limit, label
    noise, the rank's shard, both batch sizes and the memory format."""
    from trainer.config import DataConfig
    from trainer.data import LoaderFacts, build_data

    cfg = DataConfig(loader="memory", path=SOURCE, limit=300, label_noise=0.2, augment="none")
    facts = LoaderFacts(batch_size=32, eval_batch_size=50, seed=3, rank=1, world_size=2, device=CPU, channels_last=True)
    L = build_data(cfg, facts)
    assert L.meta["loader"] == "memory" and L.meta["train_size"] == 300 and L.meta["label_noise"] == 0.2
    assert len(L.train) == L.steps_per_epoch == 150 // 32  # rank 1 of 2 holds 150 of the 300; drop_last
    L.train.set_epoch(0)
    images, _ = next(iter(L.train))
    assert images.shape == (32, 3, 28, 28) and images.is_contiguous(memory_format=torch.channels_last)
    val_labels = torch.cat([y for _, y in L.val])
    assert [len(y) for _, y in L.val] == [50, 50, 50]
    assert val_labels.tolist() == raw["val_y"][1:300:2].tolist()  # every second image, from the second


def test_holdout_evaluates_on_held_out_training_images_never_the_test_split(raw) -> None:
    """data.holdout=0.2 of the first 500 training images: evaluation sees 100 of them (with their own labels),
    training sees the other 400 and nothing else, the test split is never read, and the selection does not
    depend on the run's seed."""
    first = {raw["train_x"][i].tobytes(): i for i in range(500)}
    assert len(first) == 500  # no duplicate images among them, so each image names its index

    def indices(batches, meta) -> list[int]:
        out = []
        for images, labels in batches:
            for img, label in zip(pixels(images, meta["mean"][0], meta["std"][0]), labels.tolist()):
                i = first[np.ascontiguousarray(img[:, :, 0]).tobytes()]  # KeyError: not one of the 500
                assert label == raw["train_y"][i]
                out.append(i)
        return out

    picked = []
    for seed in (0, 1):
        loaders = build(limit=500, holdout=0.2, augment="none", seed=seed)
        meta = loaders.meta
        assert (meta["train_size"], meta["val_size"], meta["holdout"]) == (400, 100, 0.2)
        held = indices(loaders.val, meta)
        loaders.train.set_epoch(0)
        trained = indices(loaders.train, meta)
        assert len(held) == len(set(held)) == 100 and len(trained) == len(set(trained)) == 400
        assert set(held).isdisjoint(trained) and set(held) | set(trained) == set(range(500))
        picked.append(sorted(held))
    assert picked[0] == picked[1]
    # spread over the 500, not a block at one end
    assert min(picked[0]) < 50 and max(picked[0]) > 450


def test_holdout_is_checked() -> None:
    with pytest.raises(ValueError, match=r"holdout: 1\.5; expected a fraction in \[0, 1\)"):
        build(limit=100, holdout=1.5)
    from trainer.config import ConfigError, load

    with pytest.raises(ConfigError, match="data.holdout.*memory-loader option"):
        load("debug-cpu", ["data.holdout=0.1"])
    cfg = load("debug-cpu", ["data.loader=memory", f"data.path={SOURCE}", "data.holdout=0.1"])
    assert cfg.data.holdout == 0.1
