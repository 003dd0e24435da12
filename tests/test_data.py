"""Data layer: convert round trips, meta statistics, loaders (order, sharding, augmentation), errors.

References are independent of trainer.data: source files are written here by hand (IDX bytes,
CIFAR pickles, image files), .beton contents are read back with FFCV's own Reader plus a memmap,
statistics come from numpy, and the expected orders from the documented numpy/torch formulas.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FMNIST, ROOT, run_torchrun

# numba's dispatcher finalizer raises a harmless KeyError when FFCV's compiled pipelines are
# garbage collected (libffcv/ffcv#167); pytest would report it as an unraisable-exception warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# ------------------------------------------------------------------------------------------
# helpers: write sources, read .beton files independently
# ------------------------------------------------------------------------------------------


def write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """IDX: magic 00 00 08 <ndim>, big-endian uint32 dims, uint8 payload; gzip-compressed."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def indexed_gray_images(n: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    """Random 28x28 images whose pixels (0,0) and (0,1) hold the image index (low, high byte)."""
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    idx = np.arange(n) + offset
    imgs[:, 0, 0] = idx % 256
    imgs[:, 0, 1] = idx // 256
    return imgs


def make_fake_fashion(root: Path, n_train: int, n_val: int, seed: int = 0) -> dict:
    """Fashion-MNIST-format IDX files with indexed random images and random labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "train_x": indexed_gray_images(n_train, rng),
        "val_x": indexed_gray_images(n_val, rng),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "val_y": rng.integers(0, 10, n_val).astype(np.uint8),
    }
    write_idx_gz(root / "train-images-idx3-ubyte.gz", data["train_x"])
    write_idx_gz(root / "train-labels-idx1-ubyte.gz", data["train_y"])
    write_idx_gz(root / "t10k-images-idx3-ubyte.gz", data["val_x"])
    write_idx_gz(root / "t10k-labels-idx1-ubyte.gz", data["val_y"])
    return data


def read_beton(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """(images, labels) of a raw-mode .beton via FFCV's Reader and the bytes at each data_ptr."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    img_meta = r.metadata[r.metadata.dtype.names[0]]
    labels = np.asarray(r.metadata[r.metadata.dtype.names[1]], dtype=np.int64)
    images = []
    for rec in img_meta:
        assert rec["mode"] == 1, "expected raw mode"
        h, w, p = int(rec["height"]), int(rec["width"]), int(rec["data_ptr"])
        images.append(np.array(mm[p : p + h * w * 3]).reshape(h, w, 3))
    return images, labels


def population_stats(pixels_nhwc: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.concatenate([p.reshape(-1, 3).astype(np.float64) for p in pixels_nhwc])
    return flat.mean(axis=0), flat.std(axis=0)


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def cifar_pickle(obj: dict) -> bytes:
    """A batch as the official archives store it: protocol-2 pickle with bytes keys."""
    return pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2)


def make_fake_cifar(path: Path, num_classes: int, per_batch: int, n_test: int, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz / cifar-100-python.tar.gz lookalike with random data."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    train_x, train_y = [], []
    if num_classes == 10:
        folder, names, label_key = "cifar-10-batches-py", ["data_batch_%d" % i for i in range(1, 6)], "labels"
        members["batches.meta"] = cifar_pickle(
            {"label_names": [f"c10_{i}".encode() for i in range(10)], "num_vis": 3072}
        )
    else:
        folder, names, label_key = "cifar-100-python", ["train"], "fine_labels"
        members["meta"] = cifar_pickle(
            {
                "fine_label_names": [f"c100_{i}".encode() for i in range(100)],
                "coarse_label_names": [f"s{i}".encode() for i in range(20)],
            }
        )
    for name in names:
        n = per_batch * (5 if num_classes == 100 else 1)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, num_classes, n).tolist()
        d = {"data": x, label_key: y, "batch_label": name.encode()}
        if num_classes == 100:
            d["coarse_labels"] = [v // 5 for v in y]
        members[name] = cifar_pickle(d)
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = rng.integers(0, num_classes, n_test).tolist()
    test_name = "test_batch" if num_classes == 10 else "test"
    td = {"data": tx, label_key: ty}
    if num_classes == 100:
        td["coarse_labels"] = [v // 5 for v in ty]
    members[test_name] = cifar_pickle(td)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

    def to_hwc(flat: np.ndarray) -> np.ndarray:
        # documented layout: 1024 R, then 1024 G, then 1024 B values, each plane row-major 32x32
        out = np.empty((flat.shape[0], 32, 32, 3), np.uint8)
        for c in range(3):
            out[..., c] = flat[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32)
        return out

    return {
        "train_x": to_hwc(np.concatenate(train_x)),
        "train_y": np.array(train_y),
        "val_x": to_hwc(tx),
        "val_y": np.array(ty),
    }


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in ("train.beton", "val.beton", "meta.json"))


# ------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Fake Fashion-MNIST source (203 train, 97 val) converted in raw mode: (out dir, meta, data)."""
    from trainer.data.convert import convert

    root = tmp_path_factory.mktemp("fake_fashion")
    data = make_fake_fashion(root / "src", 203, 97)
    out = root / "ds"
    meta = convert("fashion-mnist", str(root / "src"), str(out))
    return out, meta, data


def test_fashion_round_trip_is_byte_exact(fake_fashion) -> None:
    out, meta, data = fake_fashion
    for split, fname in (("train", "train.beton"), ("val", "val.beton")):
        images, labels = read_beton(out / fname)
        src = data[f"{split}_x"]
        assert len(images) == len(src)
        for img, s in zip(images, src):
            np.testing.assert_array_equal(img, rgb(s))  # gray replicated to 3 identical channels
        np.testing.assert_array_equal(labels, data[f"{split}_y"])
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(data[f"{split}_y"], minlength=10))
    assert leftovers(out) == []


def test_fashion_meta(fake_fashion) -> None:
    out, meta, data = fake_fashion
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["dataset"] == "fashion-mnist" and meta["format_version"] == 1
    assert meta["num_classes"] == 10 and meta["classes"] == FASHION_NAMES
    assert (meta["train_size"], meta["val_size"]) == (203, 97)
    assert meta["image_size"] == [28, 28] and meta["channels"] == 1
    assert meta["write_mode"] == "raw" and meta["max_resolution"] is None
    x = data["train_x"].astype(np.float64)  # statistics of the TRAIN split only
    np.testing.assert_allclose(meta["mean"], [x.mean()] * 3, rtol=1e-12)
    np.testing.assert_allclose(meta["std"], [x.std()] * 3, rtol=1e-12)
    for fname in ("train.beton", "val.beton"):
        assert meta["files"][fname]["bytes"] == (out / fname).stat().st_size


def test_real_fashion_mnist_subset(fmnist_small: Path) -> None:
    """The Debian package's files: first 500 images of each split, against a plain numpy reader."""

    def read(name: str, header: int) -> np.ndarray:
        with gzip.open(FMNIST / f"{name}.gz", "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=header)

    meta = json.loads((fmnist_small / "meta.json").read_text())
    for split, prefix in (("train", "train"), ("val", "t10k")):
        src = read(f"{prefix}-images-idx3-ubyte", 16).reshape(-1, 28, 28)[:500]
        lab = read(f"{prefix}-labels-idx1-ubyte", 8)[:500].astype(np.int64)
        images, labels = read_beton(fmnist_small / f"{split}.beton")
        np.testing.assert_array_equal(np.stack(images), rgb(src))
        np.testing.assert_array_equal(labels, lab)
        if split == "train":
            np.testing.assert_allclose(meta["mean"], [src.astype(np.float64).mean()] * 3, rtol=1e-12)
            np.testing.assert_allclose(meta["std"], [src.astype(np.float64).std()] * 3, rtol=1e-12)
    assert meta["classes"] == FASHION_NAMES and meta["train_size"] == meta["val_size"] == 500


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_archive_round_trip(tmp_path: Path, num_classes: int) -> None:
    from trainer.data.convert import convert

    archive = tmp_path / f"cifar-{num_classes}-python.tar.gz"
    data = make_fake_cifar(archive, num_classes, per_batch=12, n_test=25, seed=num_classes)
    out = tmp_path / "ds"
    meta = convert(f"cifar{num_classes}", str(archive), str(out), num_workers=1)
    for split in ("train", "val"):
        images, labels = read_beton(out / f"{split}.beton")
        np.testing.assert_array_equal(np.stack(images), data[f"{split}_x"])
        np.testing.assert_array_equal(labels, data[f"{split}_y"])
    assert meta["classes"] == [f"c{num_classes}_{i}" for i in range(num_classes)]
    assert meta["num_classes"] == num_classes and meta["channels"] == 3
    assert meta["image_size"] == [32, 32] and meta["train_size"] == 60 and meta["val_size"] == 25
    mean, std = population_stats(list(data["train_x"]))
    np.testing.assert_allclose(meta["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(meta["std"], std, rtol=1e-12)

    if num_classes == 10:
        # The extracted folder reads the same.
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path / "extracted", filter="data")
        meta2 = convert("cifar10", str(tmp_path / "extracted"), str(tmp_path / "ds2"), num_workers=1)
        assert meta2["mean"] == meta["mean"] and meta2["classes"] == meta["classes"]
        assert (tmp_path / "ds2" / "train.beton").read_bytes() == (out / "train.beton").read_bytes()


def test_cifar_archive_missing_member(tmp_path: Path) -> None:
    from trainer.data.convert import convert

    full = tmp_path / "full.tar.gz"
    make_fake_cifar(full, 10, per_batch=2, n_test=2)
    broken = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(full) as src, tarfile.open(broken, "w:gz") as dst:
        for m in src.getmembers():
            if not m.name.endswith("data_batch_3"):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz.*data_batch_3"):
        convert("cifar10", str(broken), str(tmp_path / "out"))


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    """A crafted batch that would call os.system when unpickled is rejected, not executed."""
    from trainer.data.convert import convert

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    archive = tmp_path / "cifar-10-python.tar.gz"
    make_fake_cifar(archive, 10, per_batch=2, n_test=2)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(evil, "w:gz") as dst:
        for m in src.getmembers():
            if m.name.endswith("batches.meta"):
                blob = pickle.dumps({b"label_names": Evil()}, protocol=2)
                m.size = len(blob)
                dst.addfile(m, io.BytesIO(blob))
            else:
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match="batches.meta.*not allowed"):
        convert("cifar10", str(evil), str(tmp_path / "out"))
    assert not (tmp_path / "pwned").exists()


def make_image_folder(root: Path, ext: str = ".png", seed: int = 0) -> dict:
    """train/{ant,bee,cat}, val/{ant,cat}; random RGB images of varying sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    layout = {"train": {"cat": 3, "ant": 2, "bee": 4}, "val": {"ant": 2, "cat": 1}}
    arrays: dict = {"train": [], "val": []}
    for split, classes in layout.items():
        for cls in sorted(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(classes[cls]):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"img{k}{ext}")
                arrays[split].append((cls, a))
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    return arrays


def test_image_folder_png_round_trip(tmp_path: Path) -> None:
    from trainer.data.convert import convert

    arrays = make_image_folder(tmp_path / "src")
    meta = convert("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds"), num_workers=1)
    classes = ["ant", "bee", "cat"]  # sorted train folders; label = index
    assert meta["classes"] == classes and meta["num_classes"] == 3 and meta["image_size"] is None
    assert (meta["train_size"], meta["val_size"]) == (9, 3)
    for split in ("train", "val"):
        images, labels = read_beton(tmp_path / "ds" / f"{split}.beton")
        # files are read class by class in sorted order: the same order make_image_folder used
        assert [classes[i] for i in labels] == [c for c, _ in arrays[split]]
        for img, (_, a) in zip(images, arrays[split]):
            np.testing.assert_array_equal(img, a)
    mean, std = population_stats([a for _, a in arrays["train"]])
    np.testing.assert_allclose(meta["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(meta["std"], std, rtol=1e-12)


def test_image_folder_jpeg_max_resolution(tmp_path: Path) -> None:
    from trainer.data.convert import convert

    make_image_folder(tmp_path / "src", ext=".JPEG")
    meta = convert(
        "imagefolder",
        str(tmp_path / "src"),
        str(tmp_path / "ds"),
        num_workers=1,
        write_mode="jpg",
        max_resolution=16,
        jpeg_quality=80,
    )
    assert meta["write_mode"] == "jpg" and meta["max_resolution"] == 16
    from ffcv.reader import Reader

    r = Reader(str(tmp_path / "ds" / "train.beton"))
    rec = r.metadata[r.metadata.dtype.names[0]]
    assert (rec["mode"] == 0).all()  # JPEG
    assert max(rec["height"].max(), rec["width"].max()) == 16


def test_convert_errors(tmp_path: Path) -> None:
    from trainer.data.convert import convert

    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="nowhere"):
        convert("fashion-mnist", str(tmp_path / "nowhere"), out)
    with pytest.raises(ValueError, match="--write-mode.*png"):
        convert("fashion-mnist", None, out, write_mode="png")
    with pytest.raises(ValueError, match="--dataset.*mnist"):
        convert("mnist", None, out)
    with pytest.raises(ValueError, match="--source.*cifar10"):
        convert("cifar10", None, out)

    src = tmp_path / "fm"
    make_fake_fashion(src, 4, 4)
    bad = src / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:  # wrong magic (labels type 0x801)
        f.write(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + b"\0" * 4)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*magic"):
        convert("fashion-mnist", str(src), out)
    write_idx_gz(bad, np.zeros((4, 28, 28), np.uint8))
    raw = gzip.decompress(bad.read_bytes())[:-10]  # truncated payload
    bad.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*implies"):
        convert("fashion-mnist", str(src), out)

    folder = tmp_path / "imgs"
    make_image_folder(folder)
    empty = folder / "train" / "dog"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"train/dog: empty class folder"):
        convert("imagefolder", str(folder), out)
    empty.rmdir()
    (folder / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match="val/zebra.*subset"):
        convert("imagefolder", str(folder), out)
    shutil.rmtree(folder / "val" / "zebra")
    (folder / "val" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read image"):
        convert("imagefolder", str(folder), out, num_workers=1)


def test_reconvert_removes_meta_first(fake_fashion, tmp_path: Path) -> None:
    """A failing re-conversion leaves no meta.json, so the half-replaced folder never looks complete."""
    from trainer.data.convert import convert
    from trainer.data.loaders import validate_dataset

    out = tmp_path / "ds"
    shutil.copytree(fake_fashion[0], out)
    assert validate_dataset(out)["train_size"] == 203
    folder = tmp_path / "imgs"
    make_image_folder(folder)
    (folder / "train" / "ant" / "broken.png").write_bytes(b"garbage")
    # max_resolution: no header pre-scan, so the bad file is only found while writing
    with pytest.raises(ValueError, match="broken.png: cannot decode"):
        convert("imagefolder", str(folder), str(out), num_workers=2, max_resolution=16)
    with pytest.raises(ValueError, match="meta.json"):
        validate_dataset(out)
    assert leftovers(out) == []  # temp files removed


def test_convert_cli_entry(tmp_path: Path) -> None:
    """add_arguments/run as the lead mounts them (argparse)."""
    import argparse

    from trainer.data import convert as conv

    src = tmp_path / "fm"
    make_fake_fashion(src, 10, 5)
    parser = argparse.ArgumentParser()
    conv.add_arguments(parser)
    args = parser.parse_args(
        [
            "--dataset",
            "fashion-mnist",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "ds"),
            "--write-mode",
            "jpg",
            "--jpeg-quality",
            "95",
        ]
    )
    assert conv.run(args) == 0
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["write_mode"] == "jpg" and meta["jpeg_quality"] == 95 and meta["train_size"] == 10


# ------------------------------------------------------------------------------------------
# validate_dataset: damaged datasets
# ------------------------------------------------------------------------------------------


def test_validate_rejects_damaged_datasets(fake_fashion, tmp_path: Path) -> None:
    from trainer.data.loaders import build_loaders, validate_dataset

    good = fake_fashion[0]
    assert validate_dataset(good) == fake_fashion[1]
    with pytest.raises(ValueError, match="missing-dir: dataset folder missing"):
        validate_dataset(tmp_path / "missing-dir")

    def fresh(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = fresh("nometa")
    (d / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"nometa/meta\.json: missing"):
        validate_dataset(d)

    d = fresh("nobeton")
    (d / "val.beton").unlink()
    with pytest.raises(ValueError, match=r"nobeton/val\.beton: missing"):
        validate_dataset(d)

    d = fresh("truncated")
    p = d / "train.beton"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"truncated/train\.beton: .*truncated"):
        validate_dataset(d)
    # build_loaders goes through the same check (no numba traceback)
    with pytest.raises(ValueError, match=r"truncated/train\.beton"):
        build_loaders(
            d,
            batch_size=8,
            eval_batch_size=None,
            num_workers=1,
            seed=0,
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
        )
    # same truncation without the recorded sizes: the allocation table check catches it
    meta = json.loads((d / "meta.json").read_text())
    del meta["files"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"truncated/train\.beton: allocation table"):
        validate_dataset(d)

    d = fresh("garbage")
    p = d / "val.beton"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"garbage/val\.beton: not an FFCV \.beton"):
        validate_dataset(d)

    d = fresh("tiny")
    (d / "train.beton").write_bytes(b"\x02\x00")
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["train.beton"]["bytes"] = 2
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tiny/train\.beton: 2 bytes is too short"):
        validate_dataset(d)

    d = fresh("swapped")  # val.beton where train.beton belongs
    shutil.copy(d / "val.beton", d / "train.beton")
    meta = json.loads((d / "meta.json").read_text())
    del meta["files"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"swapped/train\.beton: holds 97 samples but meta.json expects 203"):
        validate_dataset(d)

    d = fresh("badjson")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"badjson/meta\.json: unreadable JSON"):
        validate_dataset(d)


# ------------------------------------------------------------------------------------------
# loaders, single process
# ------------------------------------------------------------------------------------------


def decode_index(images: torch.Tensor, mean: list[float], std: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, denormalized uint8 pixels NHWC) of a batch of the indexed dataset."""
    px = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    px = torch.round(px).to(torch.int64).permute(0, 2, 3, 1).numpy()
    return px[:, 0, 0, 0] + 256 * px[:, 0, 1, 0], px


def test_loader_order_decoding_and_eval(fake_fashion) -> None:
    from trainer.data.loaders import build_loaders

    out, meta, data = fake_fashion
    threads = torch.get_num_threads()
    L = build_loaders(
        out,
        batch_size=32,
        eval_batch_size=40,
        num_workers=2,
        seed=7,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        augment="none",
        channels_last=True,
    )
    assert torch.get_num_threads() == threads  # FFCV's torch.set_num_threads is undone
    assert L.steps_per_epoch == len(L.train) == 203 // 32
    assert L.meta == meta
    mean, std = meta["mean"], meta["std"]

    epochs = []
    for epoch in range(2):
        assert L.train.epoch == epoch
        seen = []
        for images, labels in L.train:
            assert images.shape == (32, 3, 28, 28) and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert labels.shape == (32,) and labels.dtype == torch.int64
            idx, px = decode_index(images, mean, std)
            np.testing.assert_array_equal(px, rgb(data["train_x"][idx]))  # lossless decode
            np.testing.assert_array_equal(labels.numpy(), data["train_y"][idx])
            # normalization: (x - mean) / std with the meta statistics
            ref = (torch.from_numpy(rgb(data["train_x"][idx])).permute(0, 3, 1, 2).double() - mean[0]) / std[0]
            assert torch.allclose(images.double(), ref, atol=1e-5)
            seen += idx.tolist()
        # single-process order: numpy default_rng(seed + epoch).permutation, tail batch dropped
        expected = np.random.default_rng(7 + epoch).permutation(203)[: 6 * 32]
        np.testing.assert_array_equal(seen, expected)
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    L.train.set_epoch(0)
    again = [i for images, _ in L.train for i in decode_index(images, mean, std)[0].tolist()]
    assert again == epochs[0]
    assert torch.get_num_threads() == threads

    # eval: every image once, in order, last partial batch kept (97 = 2*40 + 17)
    sizes, seen = [], []
    for images, labels in L.val:
        sizes.append(images.shape[0])
        idx, px = decode_index(images, mean, std)
        np.testing.assert_array_equal(px, rgb(data["val_x"][idx]))
        np.testing.assert_array_equal(labels.numpy(), data["val_y"][idx])
        seen += idx.tolist()
    assert sizes == [40, 40, 17] and seen == list(range(97)) and len(L.val) == 3

    # an iterator abandoned mid-epoch does not disturb the next epoch
    it = iter(L.train)
    next(it)
    it.close()
    assert sum(1 for _ in L.train) == 6


def reflect_crop_candidates(img: np.ndarray, pad: int) -> np.ndarray:
    """All flip x crop outputs of torchvision RandomCrop(padding, 'reflect') after a flip."""
    out = []
    for flipped in (img, img[:, ::-1]):
        p = np.pad(flipped, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        h, w = img.shape[:2]
        for ty in range(2 * pad + 1):
            for tx in range(2 * pad + 1):
                out.append(p[ty : ty + h, tx : tx + w])
    return np.stack(out)


@pytest.mark.slow
def test_basic_augmentation_is_flip_reflect_crop_cutout(tmp_path: Path) -> None:
    """Every train image = (flip?) + reflect-pad-4 crop of its source, with one 8x8 mean patch."""
    from trainer.data.convert import convert
    from trainer.data.loaders import build_loaders

    # 64 copies of one random RGB image (CIFAR layout), so the source of every output is known.
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flat = src.transpose(2, 0, 1).reshape(1, 3072)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, obj: dict) -> None:
            blob = cifar_pickle(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for i in range(1, 6):
            add(f"data_batch_{i}", {"data": np.repeat(flat, 13, 0), "labels": [1] * 13})
        add("test_batch", {"data": np.repeat(flat, 5, 0), "labels": [2] * 5})
        add("batches.meta", {"label_names": [b"x%d" % i for i in range(10)]})
    meta = convert("cifar10", str(archive), str(tmp_path / "ds"), num_workers=1)
    L = build_loaders(
        tmp_path / "ds",
        batch_size=64,
        eval_batch_size=5,
        num_workers=2,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        augment="basic",
        cutout=8,
    )
    mean, std = meta["mean"], meta["std"]
    fill = np.array([round(m) for m in mean])
    cands = reflect_crop_candidates(src, 4).astype(np.int64)  # (162, 32, 32, 3)
    used = set()
    for images, labels in L.train:
        assert images.shape == (64, 3, 32, 32) and (labels == 1).all()
        _, px = decode_index(images, mean, std)
        for out in px:
            # the cutout square: an 8x8 window entirely equal to the fill colour
            is_fill = (out == fill).all(-1).astype(np.int64)
            c = np.pad(is_fill.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            win = c[8:, 8:] - c[:-8, 8:] - c[8:, :-8] + c[:-8, :-8]
            ys, xs = np.nonzero(win == 64)
            assert len(ys) >= 1, "no cutout square"
            ok = False
            for y, x in zip(ys, xs):
                keep = np.ones((32, 32), bool)
                keep[y : y + 8, x : x + 8] = False
                match = np.nonzero((cands[:, keep] == out[keep]).all(axis=(1, 2)))[0]
                if len(match):
                    ok = True
                    used.add(int(match[0]))
                    break
            assert ok, "output is not a flipped reflect-padded crop of the source"
    assert len(used) > 20  # offsets and flips actually vary
    assert any(u < 81 for u in used) and any(u >= 81 for u in used)
    for images, _ in L.val:  # validation: no augmentation
        _, px = decode_index(images, mean, std)
        assert (px == src).all()


@pytest.mark.parametrize("cutout", [0, 5])
@pytest.mark.parametrize("width", [10, 11])
def test_flip_cutout_in_place_equals_the_copying_op(cutout: int, width: int) -> None:
    """padding 0 (the ImageNet pipeline): the in-place variant gives the copying variant's images."""
    import numba
    from ffcv.pipeline.compiler import Compiler

    from trainer.data.loaders import RandomFlipCropCutout

    @numba.njit
    def seed(s):  # numba's generator is its own, separate from numpy's
        np.random.seed(s)

    enabled, threads = Compiler.is_enabled, Compiler.num_threads
    Compiler.set_enabled(True)
    Compiler.set_num_threads(1)  # plain range: every draw on this thread, from the seeded state
    try:
        op = RandomFlipCropCutout(padding=0, flip_prob=0.5, cutout=cutout, fill=(7, 8, 9))
        copy = Compiler.compile(op.generate_code(in_place=False))
        in_place = Compiler.compile(op.generate_code())  # padding 0: in place by default
        src = np.random.default_rng(width).integers(0, 256, (64, 12, width, 3), dtype=np.uint8)
        seed(5)
        expected = copy(src, np.empty_like(src))
        buf = src.copy()
        seed(5)
        got = in_place(buf, None)
    finally:
        Compiler.set_enabled(enabled)
        Compiler.set_num_threads(threads)
    assert got is buf and np.array_equal(got, expected)
    with pytest.raises(ValueError, match="padding: 4; the in-place variant needs padding 0"):
        RandomFlipCropCutout(padding=4).generate_code(in_place=True)
    flipped = [np.array_equal(o, s[:, ::-1]) for o, s in zip(expected, src)]
    kept = [np.array_equal(o, s) for o, s in zip(expected, src)]
    if cutout == 0:  # every image is its source or its mirror, and both happen
        assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    else:  # at least a cutout x cutout square of each image has the fill colour
        assert ((expected == [7, 8, 9]).all(-1).sum(axis=(1, 2)) >= cutout**2).all()


@pytest.mark.slow
def test_imagenet_pipelines_on_image_folder(tmp_path: Path) -> None:
    from trainer.data.convert import convert
    from trainer.data.loaders import build_loaders

    make_image_folder(tmp_path / "src", ext=".jpg")
    convert("imagefolder", str(tmp_path / "src"), str(tmp_path / "ds"), num_workers=1, write_mode="jpg")
    with pytest.raises(ValueError, match="image_size: required"):
        build_loaders(
            tmp_path / "ds",
            batch_size=4,
            eval_batch_size=2,
            num_workers=1,
            seed=0,
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
            augment="basic",
        )
    L = build_loaders(
        tmp_path / "ds",
        batch_size=4,
        eval_batch_size=2,
        num_workers=1,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        augment="imagenet",
        image_size=16,
    )
    assert len(L.train) == 9 // 4
    n = 0
    for images, labels in L.train:
        assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()
        assert ((labels >= 0) & (labels < 3)).all()
        n += 1
    assert n == 2
    val = [(x.shape, y.tolist()) for x, y in L.val]
    assert [s for s, _ in val] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    assert sum((y for _, y in val), []) == [0, 0, 2]


def test_build_loaders_argument_errors(fake_fashion) -> None:
    from trainer.data.loaders import build_loaders

    out = fake_fashion[0]
    kw = dict(
        batch_size=8, eval_batch_size=None, num_workers=1, seed=0, rank=0, world_size=1, device=torch.device("cpu")
    )
    with pytest.raises(ValueError, match="augment: unknown 'autoaug'"):
        build_loaders(out, **{**kw, "augment": "autoaug"})
    with pytest.raises(ValueError, match="num_workers: 0"):
        build_loaders(out, **{**kw, "num_workers": 0})
    with pytest.raises(ValueError, match="batch_size: 500 per rank is larger than the 203"):
        build_loaders(out, **{**kw, "batch_size": 500})
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        build_loaders(out, **{**kw, "world_size": 2})


# ------------------------------------------------------------------------------------------
# loaders under torchrun (2 ranks, gloo)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.dist
def test_distributed_shards_and_eval(fake_fashion, tmp_path: Path) -> None:
    out, meta, data = fake_fashion
    n, n_val, batch, eval_batch, seed, world = 203, 97, 16, 16, 5, 2
    script = ROOT / "tests" / "support" / "dist_scripts" / "data_shards.py"
    proc = run_torchrun(str(script), str(out), str(tmp_path), str(batch), str(eval_batch), str(seed), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    per_rank = math.ceil(n / world)  # 102: DistributedSampler pads 203 -> 204
    steps = per_rank // batch  # 6, drop_last
    for r in res:
        assert r["len_train"] == r["steps_per_epoch"] == r["max_len_train"] == steps
        assert set(r["train_batch_sizes"]) == {batch}
        assert r["contiguous"]

    for epoch in (0, 1):
        # independent reference: torch DistributedSampler(shuffle=True, seed, drop_last=False)
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        padded = perm + perm[: per_rank * world - n]
        orders = [r["epochs"][str(epoch)]["order"] for r in res]
        for k, r in enumerate(res):
            assert orders[k] == padded[k::world]
            assert r["epochs"][str(epoch)]["seen"] == orders[k][: steps * batch]
        # complete: every index assigned; disjoint up to the documented padding
        assert set(orders[0]) | set(orders[1]) == set(range(n))
        assert len(set(orders[0]) & set(orders[1])) == per_rank * world - n == 1
        seen0, seen1 = (set(r["epochs"][str(epoch)]["seen"]) for r in res)
        assert len(seen0 & seen1) <= 1
    for r in res:
        assert r["epochs"]["0"]["seen"] != r["epochs"]["1"]["seen"]
        assert r["epoch1_again"] == r["epochs"]["1"]["seen"]

    # eval: rank r reads r::2 (49 and 48 images -> 4 and 3 batches); together every image once
    assert [r["val_batches"] for r in res] == [4, 3]
    all_idx = res[0]["val_idx"] + res[1]["val_idx"]
    assert sorted(all_idx) == list(range(n_val))
    for r in res:
        assert r["val_idx"] == r["val_indices"] == list(range(r["rank"], n_val, world))
        np.testing.assert_array_equal(r["val_labels"], data["val_y"][r["val_idx"]])
    sums = sorted(res[0]["val_sums"] + res[1]["val_sums"])
    assert sums == sorted((3 * data["val_x"].reshape(n_val, -1).astype(np.int64).sum(1)).tolist())


def test_build_data_takes_the_data_section_and_the_run_facts(fake_fashion) -> None:
    """build_data(DataConfig, LoaderFacts) picks the FFCV loader and hands on the settings and run facts."""
    from trainer.config import DataConfig
    from trainer.data import LoaderFacts, build_data

    out, meta, data = fake_fashion
    cfg = DataConfig(loader="ffcv", path=str(out), augment="none", num_workers=1, image_size=0)
    facts = LoaderFacts(
        batch_size=16, eval_batch_size=10, seed=0, rank=0, world_size=1, device=torch.device("cpu"), channels_last=True
    )
    L = build_data(cfg, facts)
    assert len(L.train) == L.steps_per_epoch == 203 // 16 and L.meta["num_classes"] == meta["num_classes"]
    L.train.set_epoch(0)
    images, _ = next(iter(L.train))
    assert images.shape == (16, 3, 28, 28) and images.is_contiguous(memory_format=torch.channels_last)
    val = list(L.val)
    assert [len(y) for _, y in val] == [10] * 9 + [7]
    assert torch.cat([y for _, y in val]).tolist() == data["val_y"].tolist()
