"""Readers for the raw datasets that `trainer convert` turns into FFCV files.

Every reader returns :class:`Split` objects for the train and the validation split. A split is
an indexable ``(H x W x 3 uint8 array, int label)`` source, which is what FFCV's
``DatasetWriter.from_indexed_dataset`` consumes.

* Fashion-MNIST: the gzip IDX files of the Debian package ``dataset-fashion-mnist``. The 28x28
  grayscale images are replicated to 3 identical channels, because FFCV's ``RGBImageField`` (and
  its fast decoders) only store RGB; the models therefore always see 3 input channels.
* CIFAR-10 / CIFAR-100: the official "python version" archives (pickled batches), read straight
  from the ``.tar.gz`` or from its extracted folder. Pickles are loaded with an unpickler that
  only admits numpy arrays, so a crafted archive cannot run code.
* imagefolder: ImageNet layout ``SOURCE/train/<class>/*`` and ``SOURCE/val/<class>/*``;
  label = index of the class folder in the sorted list of train class folders.

All input problems raise ``ValueError`` with one line naming the file or key and what was expected.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

FASHION_MNIST_DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = [
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

# File extensions accepted in an image folder (compared lower-case). PIL decodes all of them.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


@dataclass
class ArraySplit:
    """A split held in memory: ``images`` is (N, H, W) or (N, H, W, C) uint8, ``labels`` (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def source_channels(self) -> int:
        """Channels of the source images (1 for grayscale, 3 for RGB)."""
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as a contiguous H x W x 3 uint8 array (grayscale replicated to 3 channels)."""
        img = self.images[i]
        if img.ndim == 2:
            # FFCV's RGBImageField stores 3 channels only; replicate the gray channel.
            img = np.repeat(img[:, :, None], 3, axis=2)
        return np.ascontiguousarray(img)

    def label(self, i: int) -> int:
        """Label of sample ``i``."""
        return int(self.labels[i])

    def subset(self, limit: int | None) -> "ArraySplit":
        """The first ``limit`` samples (all of them when ``limit`` is None)."""
        if limit is None:
            return self
        return ArraySplit(self.images[:limit], self.labels[:limit])


@dataclass
class FileSplit:
    """A split stored as image files, decoded lazily with PIL (in the writer's worker processes)."""

    paths: list[str]
    labels: np.ndarray
    source_channels: int = 3

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """Decode file ``i`` to an H x W x 3 uint8 RGB array (raises on unreadable files)."""
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def label(self, i: int) -> int:
        """Label of sample ``i``."""
        return int(self.labels[i])

    def subset(self, limit: int | None) -> "FileSplit":
        """The first ``limit`` samples in (sorted) file order (all of them when ``limit`` is None)."""
        if limit is None:
            return self
        return FileSplit(self.paths[:limit], self.labels[:limit], self.source_channels)


@dataclass
class SourceData:
    """What a reader returns: both splits plus the class names."""

    train: ArraySplit | FileSplit
    val: ArraySplit | FileSplit
    classes: list[str]


def one_line(e: BaseException) -> str:
    """An exception's text on one line (error messages must be single lines)."""
    return " ".join(str(e).split())


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------


def _open_maybe_gz(path: str) -> bytes:
    """Read ``path`` (gzip-compressed when it ends in .gz)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({one_line(e)}); expected a gzip IDX file") from None


def read_idx(path: str, expected_ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x0000080N) into an array of ``expected_ndim`` dims.

    The header is the 4-byte big-endian magic (two zero bytes, type 0x08 = uint8, ndim), then ndim
    big-endian uint32 sizes. The payload must be exactly the product of the sizes.
    """
    raw = _open_maybe_gz(path)
    header_len = 4 + 4 * expected_ndim
    magic = raw[:4]
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08 or magic[3] != expected_ndim:
        raise ValueError(
            f"{path}: bad IDX magic {magic.hex() or '(empty file)'}; expected "
            f"000008{expected_ndim:02x} (uint8, {expected_ndim} dims)"
        )
    if len(raw) < header_len:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {header_len}-byte IDX header")
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(expected_ndim)]
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes but the IDX header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_idx(source: str, stem: str) -> str:
    """Path of ``stem`` or ``stem.gz`` under ``source``."""
    for name in (stem + ".gz", stem):
        p = os.path.join(source, name)
        if os.path.isfile(p):
            return p
    raise ValueError(
        f"{os.path.join(source, stem + '.gz')}: missing; expected the Fashion-MNIST "
        f"IDX files (train-images-idx3-ubyte.gz, ...) in {source}"
    )


def read_fashion_mnist(source: str | None) -> SourceData:
    """Read Fashion-MNIST from the gzip IDX files in ``source`` (default: the Debian package)."""
    source = source or FASHION_MNIST_DEFAULT_SOURCE
    if not os.path.isdir(source):
        raise ValueError(
            f"{source}: not a directory; expected the Fashion-MNIST IDX files "
            f"(apt-get install dataset-fashion-mnist provides {FASHION_MNIST_DEFAULT_SOURCE})"
        )
    splits = []
    for prefix in ("train", "t10k"):
        img_path = _find_idx(source, f"{prefix}-images-idx3-ubyte")
        lab_path = _find_idx(source, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(img_path, 3)
        labels = read_idx(lab_path, 1).astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{lab_path}: {labels.shape[0]} labels but {img_path} has {images.shape[0]} images")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{lab_path}: label {int(labels.max())} out of range; expected 0..9")
        splits.append(ArraySplit(images, labels))
    return SourceData(splits[0], splits[1], list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------------------------
# CIFAR (python-version pickles)
# --------------------------------------------------------------------------------------------


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits only what the CIFAR batches contain: numpy arrays, dtypes and bytes."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        # Pickles written by numpy 1.x name numpy.core.*, which numpy 2 moved to numpy._core.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module == "_codecs":
            import codecs

            return codecs.encode
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError:  # numpy 1.x: numpy._core does not exist
            mod = importlib.import_module(module.replace("numpy._core", "numpy.core"))
        return getattr(mod, name)


def _unpickle(blob: bytes, where: str) -> dict[str, Any]:
    """Load one CIFAR pickle; keys are returned as str whatever the pickle used."""
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # corrupt data can raise many exception types
        raise ValueError(f"{where}: not a readable CIFAR pickle ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


class _MemberReader:
    """Finds files by base name in a tar archive or a folder (archive root or its extracted dir)."""

    def __init__(self, source: str, archive_name: str, folder_name: str):
        self.source = source
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._dir: str | None = None
        if os.path.isfile(source):
            self._open_tar(source)
        elif os.path.isdir(source):
            inner = os.path.join(source, folder_name)
            archive = os.path.join(source, archive_name)
            if os.path.isdir(inner):
                self._dir = inner
            elif os.path.isfile(archive):
                self._open_tar(archive)
            else:
                self._dir = source
        else:
            raise ValueError(
                f"{source}: no such file or directory; expected {archive_name} or its extracted folder {folder_name}/"
            )

    def _open_tar(self, path: str) -> None:
        try:
            self._tar = tarfile.open(path, "r:*")
            for m in self._tar.getmembers():
                if m.isfile():
                    self._members.setdefault(os.path.basename(m.name), m)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable tar archive ({one_line(e)})") from None
        self.source = path

    def read(self, name: str, expected: str) -> tuple[bytes, str]:
        """Bytes of member ``name`` and a human-readable location for error messages."""
        if self._tar is not None:
            m = self._members.get(name)
            if m is None:
                raise ValueError(f"{self.source}: archive has no member '{name}'; expected {expected}")
            where = f"{self.source}:{m.name}"
            try:
                f = self._tar.extractfile(m)
                assert f is not None
                return f.read(), where
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise ValueError(f"{where}: cannot extract ({one_line(e)})") from None
        assert self._dir is not None
        path = os.path.join(self._dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing; expected {expected}")
        with open(path, "rb") as f:
            return f.read(), path

    def close(self) -> None:
        """Close the archive (if any)."""
        if self._tar is not None:
            self._tar.close()


def _cifar_batch(reader: _MemberReader, name: str, label_key: str, expected: str) -> tuple[np.ndarray, np.ndarray]:
    blob, where = reader.read(name, expected)
    d = _unpickle(blob, where)
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{where}: key '{key}' missing; expected keys data and {label_key}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{where}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{where}: {data.shape[0]} images but {labels.shape[0]} '{label_key}'")
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar(source: str | None, num_classes: int) -> SourceData:
    """Read CIFAR-10 (``num_classes=10``) or CIFAR-100 (fine labels) python-version batches."""
    if num_classes == 10:
        archive, folder = "cifar-10-python.tar.gz", "cifar-10-batches-py"
        train_names, test_name, meta_name = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"
        label_key, names_key = "labels", "label_names"
    elif num_classes == 100:
        archive, folder = "cifar-100-python.tar.gz", "cifar-100-python"
        train_names, test_name, meta_name = ["train"], "test", "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    else:
        raise ValueError(f"num_classes={num_classes}: expected 10 or 100")
    if not source:
        raise ValueError(f"--source: required for cifar{num_classes}; expected the path of {archive}")
    expected = f"the python-version {archive} ({', '.join(train_names + [test_name, meta_name])})"
    reader = _MemberReader(source, archive, folder)
    try:
        meta_blob, meta_where = reader.read(meta_name, expected)
        meta = _unpickle(meta_blob, meta_where)
        if names_key not in meta:
            raise ValueError(f"{meta_where}: key '{names_key}' missing; expected the class names")
        classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
        if len(classes) != num_classes:
            raise ValueError(f"{meta_where}: {len(classes)} names in '{names_key}'; expected {num_classes}")
        parts = [_cifar_batch(reader, n, label_key, expected) for n in train_names]
        test_images, test_labels = _cifar_batch(reader, test_name, label_key, expected)
    finally:
        reader.close()
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    for labels, name in ((train_labels, "train"), (test_labels, test_name)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{reader.source}: '{label_key}' of {name} outside 0..{num_classes - 1}")
    return SourceData(ArraySplit(train_images, train_labels), ArraySplit(test_images, test_labels), classes)


# --------------------------------------------------------------------------------------------
# Image folders (ImageNet layout)
# --------------------------------------------------------------------------------------------


def _list_class_dirs(split_dir: str) -> list[str]:
    return sorted(
        d for d in os.listdir(split_dir) if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d))
    )


def _list_images(class_dir: str) -> list[str]:
    return sorted(
        os.path.join(class_dir, f)
        for f in os.listdir(class_dir)
        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(class_dir, f))
    )


def read_image_folder(source: str | None) -> SourceData:
    """List ``source/train/<class>/*`` and ``source/val/<class>/*`` (decoding happens later)."""
    if not source:
        raise ValueError("--source: required for imagefolder; expected a folder with train/ and val/")
    if not os.path.isdir(source):
        raise ValueError(f"{source}: not a directory; expected a folder with train/<class>/ and val/<class>/")
    splits: list[FileSplit] = []
    classes: list[str] = []
    for split in ("train", "val"):
        split_dir = os.path.join(source, split)
        if not os.path.isdir(split_dir):
            raise ValueError(f"{split_dir}: missing; expected {split}/<class>/<image files>")
        dirs = _list_class_dirs(split_dir)
        if not dirs:
            raise ValueError(f"{split_dir}: no class folders; expected {split}/<class>/<image files>")
        if split == "train":
            classes = dirs
        else:
            unknown = sorted(set(dirs) - set(classes))
            if unknown:
                raise ValueError(
                    f"{os.path.join(split_dir, unknown[0])}: class not present in "
                    f"{os.path.join(source, 'train')}; val classes must be a subset of train's"
                )
        index = {c: i for i, c in enumerate(classes)}
        paths: list[str] = []
        labels: list[int] = []
        for d in dirs:
            files = _list_images(os.path.join(split_dir, d))
            if not files:
                raise ValueError(
                    f"{os.path.join(split_dir, d)}: empty class folder; expected image "
                    f"files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(files)
            labels.extend([index[d]] * len(files))
        splits.append(FileSplit(paths, np.asarray(labels, dtype=np.int64)))
    return SourceData(splits[0], splits[1], classes)


def read_source(dataset: str, source: str | None) -> SourceData:
    """Dispatch to the reader of ``dataset`` (one of :data:`DATASETS`)."""
    readers: dict[str, Callable[[str | None], SourceData]] = {
        "fashion-mnist": read_fashion_mnist,
        "cifar10": lambda s: read_cifar(s, 10),
        "cifar100": lambda s: read_cifar(s, 100),
        "imagefolder": read_image_folder,
    }
    if dataset not in readers:
        raise ValueError(f"--dataset: unknown '{dataset}'; allowed: {', '.join(DATASETS)}")
    return readers[dataset](source)


DATASETS: Sequence[str] = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
