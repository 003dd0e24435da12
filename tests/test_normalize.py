"""trainer.data.loaders.Normalizer: the uint8 -> normalized float32 conversion of every loader.

The reference here is the textbook arithmetic on an N x C x H x W float tensor with (1, C, 1, 1)
constants; the Normalizer's channels_last path computes it over a tiled N x H x (W*C) view instead,
which must give the very same floats.
"""

from __future__ import annotations

import pytest
import torch

from trainer.data.loaders import Normalizer

MEAN, STD = [73.5, 80.25, 91.0], [60.1, 61.7, 59.3]


def reference(images: torch.Tensor, mean, std) -> torch.Tensor:
    c = len(mean)
    inv_std = (1.0 / torch.tensor(std, dtype=torch.float64)).to(torch.float32).view(1, c, 1, 1)
    x = images.contiguous().to(torch.float32)
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)) * inv_std


def batches(c: int, seed: int = 0):
    """uint8 batches of odd sizes, stored NHWC (FFCV's and the memory loader's buffers) and NCHW."""
    g = torch.Generator().manual_seed(seed)
    for n, h, w in ((4, 5, 7), (2, 9, 3), (1, 1, 1), (3, 16, 16)):
        nhwc = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        yield nhwc.permute(0, 3, 1, 2)  # channels_last strides, no copy
        yield nhwc.permute(0, 3, 1, 2).contiguous()  # plain NCHW


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("channels_last", [True, False])
def test_same_floats_as_the_textbook_arithmetic(channels: int, channels_last: bool) -> None:
    mean, std = MEAN[:channels], STD[:channels]
    norm = Normalizer(mean, std, device=torch.device("cpu"), channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images in batches(channels):  # several widths in turn: the tiled constants are per width
        before = images.clone()
        x = norm(images)
        assert x.dtype == torch.float32 and x.shape == images.shape and x.is_contiguous(memory_format=fmt)
        assert torch.equal(x, reference(images, mean, std))  # bitwise, not approximately
        ref64 = (images.double() - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) / torch.tensor(
            std, dtype=torch.float64
        ).view(1, -1, 1, 1)
        assert torch.allclose(x.double(), ref64, rtol=0, atol=1e-5)  # and it is (x - mean) / std
        x.fill_(0)
        assert torch.equal(images, before)  # new storage: the source buffer is never written


def test_layouts_agree_and_wrong_input_is_refused() -> None:
    images = next(batches(3))
    a = Normalizer(MEAN, STD, device=torch.device("cpu"), channels_last=True)(images)
    b = Normalizer(MEAN, STD, device=torch.device("cpu"), channels_last=False)(images)
    assert torch.equal(a, b)
    norm = Normalizer(MEAN, STD, device=torch.device("cpu"), channels_last=True)
    for bad in (images.float(), images[0], images[:, :1]):
        with pytest.raises(ValueError, match="images: expected uint8 N x 3 x H x W"):
            norm(bad)


# --------------------------------------------------------------------------------------------
# data.normalize: the statistics the loaders normalize with
# --------------------------------------------------------------------------------------------

# Typed out again from zhaoyang-0204/gnp ds_pipeline/datasets/dataset_source.py:208-213 (e803362), 0-1 scale.
REFERENCE_CONSTANTS = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
}


def test_reference_constants_are_the_reference_codes() -> None:
    from trainer.data.loaders import REFERENCE_NORMALIZATION

    assert REFERENCE_NORMALIZATION == REFERENCE_CONSTANTS


def test_auto_keeps_the_computed_statistics_and_reference_replaces_them() -> None:
    from trainer.data.loaders import normalization_stats

    assert normalization_stats("auto", "cifar10", MEAN, STD) == (MEAN, STD)
    assert normalization_stats("auto", "fashion-mnist", [72.9] * 3, [90.0] * 3) == ([72.9] * 3, [90.0] * 3)
    for dataset, (m, s) in REFERENCE_CONSTANTS.items():
        mean, std = normalization_stats("reference", dataset, MEAN, STD)
        assert mean == [255.0 * v for v in m] and std == [255.0 * v for v in s]
    with pytest.raises(ValueError, match="'reference' has constants for cifar10, cifar100 only"):
        normalization_stats("reference", "fashion-mnist", MEAN, STD)
    with pytest.raises(ValueError, match="3 channels, the data 1"):
        normalization_stats("reference", "cifar10", MEAN[:1], STD[:1])
    with pytest.raises(ValueError, match="normalize: unknown 'fixed'"):
        normalization_stats("fixed", "cifar10", MEAN, STD)


def fake_cifar10(folder, n: int = 24):
    """An extracted cifar-10-batches-py folder of random images: n per train batch file, n test images."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir()

    def dump(name: str, obj: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(obj))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # Different brightness per file, so the statistics of a prefix move with its length.
        base = 30 * (int(name[-1]) if name[-1].isdigit() else 3)
        data = rng.integers(base, base + 60, size=(n, 3072), dtype=np.uint8)
        dump(name, {b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, n)]})
    dump("batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]})
    return folder


def test_memory_loader_reference_constants_do_not_move_with_limit_or_holdout(tmp_path) -> None:
    """auto: the statistics follow the loaded subset; reference: fixed, and the batches are (x/255 - m)/s."""
    from trainer.data.memory import build_memory_loaders

    source = f"cifar10:{fake_cifar10(tmp_path / 'cifar')}"
    kw = dict(batch_size=8, eval_batch_size=None, seed=0, rank=0, world_size=1, device="cpu", augment="none")
    m, s = REFERENCE_CONSTANTS["cifar10"]
    auto_means = []
    for subset in (dict(limit=24), dict(limit=100), dict(holdout=0.5)):
        auto = build_memory_loaders(source, **kw, **subset)
        ref = build_memory_loaders(source, **kw, **subset, normalize="reference")
        auto_means.append(auto.meta["mean"])
        assert ref.meta["mean"] == [255.0 * v for v in m] and ref.meta["std"] == [255.0 * v for v in s]
        images, _ = next(iter(ref.val))
        raw = next(iter(auto.val))[0].double() * torch.tensor(auto.meta["std"], dtype=torch.float64).view(1, 3, 1, 1)
        raw += torch.tensor(auto.meta["mean"], dtype=torch.float64).view(1, 3, 1, 1)  # back to the pixels
        expect = (raw / 255 - torch.tensor(m, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
            s, dtype=torch.float64
        ).view(1, 3, 1, 1)
        assert torch.allclose(images.double(), expect, rtol=0, atol=1e-4)
    assert auto_means[0] != auto_means[1] != auto_means[2]  # what "auto" does and "reference" avoids
    with pytest.raises(ValueError, match="not for dataset 'synthetic'"):
        build_memory_loaders("synthetic:8x8:2:16", **kw, normalize="reference")


def test_ffcv_loaders_take_data_normalize(fmnist_small) -> None:
    """The FFCV builder reads data.normalize too: auto = meta.json's statistics; reference is refused for a
    dataset the reference has no constants for (here Fashion-MNIST), naming the dataset meta.json records."""
    from trainer.config import DataConfig
    from trainer.data import build_data
    from trainer.data.loaders import LoaderFacts

    facts = LoaderFacts(
        batch_size=16,
        eval_batch_size=None,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        channels_last=False,
    )
    auto = build_data(DataConfig(path=str(fmnist_small), num_workers=1, augment="none"), facts)
    assert auto.meta["dataset"] == "fashion-mnist" and len(auto.meta["mean"]) == 3
    with pytest.raises(ValueError, match="not for dataset 'fashion-mnist'"):
        build_data(DataConfig(path=str(fmnist_small), num_workers=1, augment="none", normalize="reference"), facts)
