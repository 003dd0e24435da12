"""`trainer convert`: turn a raw dataset into ``DIR/train.beton``, ``DIR/val.beton`` and ``DIR/meta.json``.

Layout of ``meta.json`` (``format_version`` 1)::

    dataset          "fashion-mnist" | "cifar10" | "cifar100" | "imagefolder"
    num_classes      int
    classes          class names, index = label
    train_size       images in train.beton
    val_size         images in val.beton
    image_size       [H, W] of every stored image for fixed-size datasets; null for imagefolder
    channels         channels of the SOURCE images (1 for Fashion-MNIST; the .beton always holds
                     3 channels because FFCV's RGBImageField is RGB-only: gray is replicated)
    mean, std        3 floats each, per channel on the 0-255 scale, population statistics over every
                     pixel of the stored TRAIN images (after --max-resolution resizing, before JPEG
                     compression); grayscale datasets repeat the same value 3 times
    write_mode       "raw" | "jpg"
    jpeg_quality     int (only meaningful for "jpg")
    max_resolution   int or null
    source           absolute path that was read
    files            {"train.beton": {"bytes": n, "samples": n}, "val.beton": {...}} so that a
                     truncated or swapped .beton is detected by ``validate_dataset``
    format_version   1

Crash safety: an existing ``meta.json`` is removed first, the .beton files are written under
temporary names and renamed, and ``meta.json`` is written (temp + rename) last. A directory is a
complete dataset exactly when ``meta.json`` exists.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import multiprocessing
import multiprocessing.sharedctypes
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .sources import DATASETS, ArraySplit, FileSplit, one_line, read_source

FORMAT_VERSION = 1
WRITE_MODES = ("raw", "jpg")
META_NAME = "meta.json"
SPLIT_FILES = {"train": "train.beton", "val": "val.beton"}

# FFCV's DatasetWriter page limits (ffcv.writer.MIN_PAGE_SIZE / MAX_PAGE_SIZE).
_MIN_PAGE = 1 << 21
_MAX_PAGE = 1 << 32
# Per-sample statistics columns: 3 channel sums, 3 sums of squares, pixel count.
_STAT_COLS = 7


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Undo FFCV's changes to torch's intra-op thread count on the calling thread.

    ``ffcv.pipeline.compiler`` calls ``torch.set_num_threads(1)`` when imported and
    ``torch.set_num_threads(num_workers)`` whenever a Loader is built or iterated; the trainer's
    own thread budget must not depend on whether (or when) the data layer was used.
    """
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def import_ffcv() -> None:
    """Import the ffcv modules this package uses, without FFCV's import-time thread side effect."""
    with keep_torch_threads():
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        import ffcv.writer  # noqa: F401


def _resized_shape(h: int, w: int, max_resolution: int | None) -> tuple[int, int]:
    """Shape after capping the longest side at ``max_resolution`` (aspect kept; never upscales)."""
    if max_resolution is None or max(h, w) <= max_resolution:
        return h, w
    ratio = max_resolution / max(h, w)
    # Same rounding as FFCV's own resizer (truncation), at least 1 pixel.
    return max(1, int(ratio * h)), max(1, int(ratio * w))


def _resize(img: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """Downscale ``img`` (H x W x 3 uint8) so its longest side is at most ``max_resolution``."""
    h, w = img.shape[:2]
    nh, nw = _resized_shape(h, w, max_resolution)
    if (nh, nw) == (h, w):
        return img
    from PIL import Image

    # BOX = area averaging, the PIL equivalent of the cv2.INTER_AREA that FFCV's writer uses.
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BOX), dtype=np.uint8).copy()


class _WriterDataset:
    """Indexable view handed to FFCV's DatasetWriter (runs in its worker processes).

    Besides returning ``(image, label)`` it records, per sample, the channel sums and sums of
    squares of the stored pixels into shared memory (so mean/std are exact and computed in the
    same single decoding pass), and the index of the first sample that failed to load: a worker
    that raised would die and leave FFCV's writer waiting forever, so failures are turned into a
    1x1 placeholder here and reported by the parent as a ValueError afterwards.
    """

    def __init__(self, split: ArraySplit | FileSplit, max_resolution: int | None, stats: Any | None, failed: Any):
        self.split = split
        self.max_resolution = max_resolution
        self.stats = stats
        self.failed = failed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            img = _resize(self.split.load(i), self.max_resolution)
        except Exception:  # any decode error; reported by the parent with the file name
            if self.failed.value < 0:
                self.failed.value = i
            img = np.zeros((1, 1, 3), dtype=np.uint8)
        if self.stats is not None:
            px = img.reshape(-1, 3).astype(np.int64)
            row = np.frombuffer(self.stats, dtype=np.int64).reshape(-1, _STAT_COLS)
            row[i, 0:3] = px.sum(axis=0)
            row[i, 3:6] = (px * px).sum(axis=0)
            row[i, 6] = px.shape[0]
        return img, self.split.label(i)


class _WriterWorkerDied(Exception):
    """Raised into the converting thread when one of FFCV's writer processes has died."""


class _WorkerStderr:
    """sys.stderr stand-in inherited by forked writer processes: the parent's writes pass through (tqdm's
    progress bar), a child's go to a file of its own, so the parent can report a dead worker's error in one line
    instead of the child's traceback."""

    def __init__(self, real: Any, folder: str) -> None:
        self.real, self.folder, self.parent = real, folder, os.getpid()
        self.muted = False  # after a failure: FFCV's abandoned progress bar must not print after the error line

    def write(self, text: str) -> int:
        if os.getpid() == self.parent:
            return len(text) if self.muted else self.real.write(text)
        with open(os.path.join(self.folder, f"worker-{os.getpid()}.log"), "a") as f:
            return f.write(text)

    def flush(self) -> None:
        if os.getpid() == self.parent:
            self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _last_error_line(folder: str) -> str:
    """The last line of the first worker log that has one, e.g. 'OSError: [Errno 28] No space left on device'."""
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
        if lines:
            return lines[-1]
    return ""


@contextmanager
def _watch_writer_workers(writer: Any) -> Iterator[None]:
    """Turn a dead FFCV writer process into an error instead of a hang.

    FFCV's ``DatasetWriter`` polls a shared counter until every sample is written, then reads each worker's
    allocation table from a queue; a worker that dies (ENOSPC when the disk fills, EIO, the OOM killer) never
    advances the counter or never sends its table, so the parent would wait forever. A watchdog thread reads the
    exit status of the writer's processes: one that exited non-zero raises ``_WriterWorkerDied`` in the writing
    thread (a signal in the main thread, which also breaks a blocking read; an asynchronous exception in any
    other thread). The survivors are terminated and FFCV's shared metadata block is freed.
    """
    in_main = threading.current_thread() is threading.main_thread()
    target = threading.get_ident()
    stop = threading.Event()
    died: list[str] = []
    logs = tempfile.mkdtemp(prefix="gnp-convert-")
    real_stderr = sys.stderr
    sys.stderr = wrapper = _WorkerStderr(real_stderr, logs)

    def raise_died(*_: Any) -> None:
        raise _WriterWorkerDied()

    if in_main:  # a signal also interrupts a blocking read (FFCV's final queue get), an async exception cannot
        old_handler = signal.signal(signal.SIGUSR1, raise_died)

    import ffcv.writer

    started: list[Any] = []
    ffcv_process = ffcv.writer.Process

    class Recorded(ffcv_process):  # the writer's processes, so their exit status can be read
        def start(self) -> None:
            super().start()
            started.append(self)

    ffcv.writer.Process = Recorded

    def watch() -> None:
        while not stop.wait(0.2):
            bad = [p.exitcode for p in list(started) if p.exitcode not in (None, 0)]
            if bad:
                code = bad[0]
                died.append(f"exit status {code}" if code > 0 else f"signal {-code}")
                if in_main:
                    signal.pthread_kill(target, signal.SIGUSR1)
                else:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(target), ctypes.py_object(_WriterWorkerDied)
                    )
                return

    watcher = threading.Thread(target=watch, name="convert-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    except _WriterWorkerDied:
        wrapper.muted = True
        real_stderr.write("\n")  # end FFCV's progress bar line (it ends in a carriage return) before the error
        reason = _last_error_line(logs) or f"a writer process died ({died[0] if died else 'unknown'})"
        for p in started:
            p.terminate()
            p.join(5)
        try:
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        except (AttributeError, OSError):
            pass
        code = errno.ENOSPC if "[Errno 28]" in reason else errno.EIO
        raise _WriterFailure(code, f"a writer process failed: {reason}") from None
    finally:
        stop.set()
        watcher.join()
        ffcv.writer.Process = ffcv_process
        sys.stderr = real_stderr
        if in_main:
            signal.signal(signal.SIGUSR1, old_handler)
        for name in os.listdir(logs):
            os.remove(os.path.join(logs, name))
        os.rmdir(logs)


class _WriterFailure(OSError):
    """A writer process died; ``str()`` is its last error line (the caller names the output path)."""


def _page_size(split_max_bytes: int, write_mode: str) -> int:
    """Smallest power-of-two FFCV page holding the largest sample (a sample may not span pages)."""
    need = split_max_bytes * (2 if write_mode == "jpg" else 1)  # JPEG can exceed raw on noise
    need += 4096  # slack for the label field and alignment
    page = _MIN_PAGE
    while page < need:
        page *= 2
    if page >= _MAX_PAGE:
        raise ValueError(
            f"--max-resolution: an image needs {need} bytes, more than FFCV's page limit; "
            f"set --max-resolution (e.g. 512)"
        )
    return page


def _max_sample_bytes(split: ArraySplit | FileSplit, max_resolution: int | None) -> int:
    """Largest stored image in bytes (H*W*3 after resizing)."""
    if isinstance(split, ArraySplit):
        h, w = split.images.shape[1:3]
        nh, nw = _resized_shape(int(h), int(w), max_resolution)
        return nh * nw * 3
    if max_resolution is not None:
        return max_resolution * max_resolution * 3
    # No cap: read every header (cheap, PIL does not decode pixels) to size the pages.
    from PIL import Image

    biggest = 0
    for p in split.paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception as e:
            raise ValueError(f"{p}: cannot read image ({type(e).__name__}: {one_line(e)})") from None
        biggest = max(biggest, w * h * 3)
    return biggest


def _write_split(
    path: str,
    split: ArraySplit | FileSplit,
    *,
    write_mode: str,
    jpeg_quality: int,
    max_resolution: int | None,
    num_workers: int,
    page_size: int,
    with_stats: bool,
) -> np.ndarray | None:
    """Write one split to ``path``; returns the (N, 7) per-sample [sum x3, sum of squares x3, pixels] table."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    n = len(split)
    ctx = multiprocessing.get_context()
    stats = ctx.RawArray("q", n * _STAT_COLS) if with_stats else None
    failed = ctx.RawValue("q", -1)
    dataset = _WriterDataset(split, max_resolution, stats, failed)
    fields = {
        # Resizing happens in _WriterDataset (so the statistics see the stored pixels).
        "image": RGBImageField(write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality),
        "label": IntField(),
    }
    writer = DatasetWriter(path, fields, page_size=page_size, num_workers=num_workers)
    with _watch_writer_workers(writer):
        writer.from_indexed_dataset(dataset)
    if failed.value >= 0:
        i = int(failed.value)
        try:
            split.load(i)
            reason = "unknown error"
        except Exception as e:
            reason = f"{type(e).__name__}: {one_line(e)}"
        where = split.paths[i] if isinstance(split, FileSplit) else f"sample {i}"
        raise ValueError(f"{where}: cannot decode image ({reason}); expected a readable image file")
    if stats is None:
        return None
    return np.frombuffer(stats, dtype=np.int64).reshape(n, _STAT_COLS).copy()


def _mean_std(table: np.ndarray) -> tuple[list[float], list[float]]:
    """Population mean/std per channel from per-sample sums (exact integer arithmetic)."""
    num_pixels = int(table[:, 6].sum())
    mean, std = [], []
    for c in range(3):
        s = int(table[:, c].sum())
        q = int(table[:, 3 + c].sum())
        # var = (n*q - s^2) / n^2 with Python ints: no cancellation error.
        var = (num_pixels * q - s * s) / (num_pixels * num_pixels)
        mean.append(s / num_pixels)
        std.append(float(np.sqrt(max(var, 0.0))))
    return mean, std


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_args(
    dataset: str, write_mode: str, jpeg_quality: int, max_resolution: int | None, num_workers: int, limit: int | None
) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"--dataset: unknown '{dataset}'; allowed: {', '.join(DATASETS)}")
    if write_mode not in WRITE_MODES:
        raise ValueError(f"--write-mode: unknown '{write_mode}'; allowed: {', '.join(WRITE_MODES)}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality: {jpeg_quality!r}; expected an integer in 1..100")
    if max_resolution is not None and (
        isinstance(max_resolution, bool) or not isinstance(max_resolution, int) or max_resolution < 8
    ):
        raise ValueError(f"--max-resolution: {max_resolution!r}; expected an integer >= 8 or none")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"--num-workers: {num_workers!r}; expected an integer >= 1")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit: {limit!r}; expected an integer >= 1 or none")


def convert(
    dataset: str,
    source: str | None,
    out: str,
    *,
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    write_mode: str = "raw",
    num_workers: int = 2,
    limit: int | None = None,
) -> dict:
    """Convert ``dataset`` read from ``source`` into FFCV files in ``out``; returns the meta dict.

    ``source`` None means the default location (Fashion-MNIST only). ``limit`` keeps the first
    ``limit`` images of each split (for tests and quick demos). ``num_workers`` is the number of
    writer processes. Raises ValueError (one line naming the path/key) on bad input.
    """
    _check_args(dataset, write_mode, jpeg_quality, max_resolution, num_workers, limit)
    data = read_source(dataset, source)
    train, val = data.train.subset(limit), data.val.subset(limit)
    for name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise ValueError(f"{source}: the {name} split is empty; expected at least one image")

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    page_size = _page_size(
        max(_max_sample_bytes(train, max_resolution), _max_sample_bytes(val, max_resolution)), write_mode
    )
    try:
        return _write_dataset(
            dataset,
            source,
            out,
            data,
            train,
            val,
            page_size,
            write_mode=write_mode,
            jpeg_quality=jpeg_quality,
            max_resolution=max_resolution,
            num_workers=num_workers,
        )
    except OSError as e:  # the output side only: sources are read (and their errors named) before this
        raise ValueError(output_error(f"--out {out}", e)) from None


def output_error(what: str, e: OSError) -> str:
    """One line for a failed write: disk full, read-only or unwritable folder, path that is a file."""
    code = errno.errorcode.get(e.errno or 0, "")
    reason = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "free some space or choose a folder on a larger disk",
        errno.EDQUOT: "free some space or raise the quota",
        errno.EROFS: "the file system is read-only; choose a writable folder",
        errno.EACCES: "choose a folder this user may write to",
        errno.EPERM: "choose a folder this user may write to",
        errno.ENOTDIR: "a parent of the path is a file; choose a folder path",
        errno.EEXIST: "the path exists and is not a folder",
    }.get(e.errno or 0, "expected a writable folder with free space")
    where = f" ({e.filename})" if e.filename else ""
    return f"{what}: cannot write{where}: {reason}{' [' + code + ']' if code else ''}; {hint}"


def _write_splits(temps: dict[str, str], train, val, *, page_size: int, **options: Any) -> np.ndarray:
    """Write both splits to their temporary files and fsync them; returns the train split's pixel statistics."""
    table = _write_split(temps["train"], train, page_size=page_size, with_stats=True, **options)
    _write_split(temps["val"], val, page_size=page_size, with_stats=False, **options)
    for tmp in temps.values():
        _fsync_file(tmp)
    assert table is not None
    return table


def _dataset_meta(dataset, source, data, train, val, table, temps, *, write_mode, jpeg_quality, max_resolution) -> dict:
    """The ``meta.json`` of the converted dataset (``temps``: the written .beton files, for their sizes)."""
    if isinstance(train, ArraySplit):
        h, w = (int(x) for x in train.images.shape[1:3])
        image_size: list[int] | None = list(_resized_shape(h, w, max_resolution))
    else:
        image_size = None
    mean, std = _mean_std(table)
    files = {}
    for s, f in SPLIT_FILES.items():
        files[f] = {"bytes": os.path.getsize(temps[s]), "samples": len(train if s == "train" else val)}
    meta = {
        "dataset": dataset,
        "num_classes": len(data.classes),
        "classes": list(data.classes),
        "train_size": len(train),
        "val_size": len(val),
        "image_size": image_size,
        "channels": train.source_channels,
        "mean": mean,
        "std": std,
        "write_mode": write_mode,
        "jpeg_quality": jpeg_quality,
        "max_resolution": max_resolution,
        "source": os.path.abspath(source) if source else None,
        "files": files,
        "format_version": FORMAT_VERSION,
    }
    if dataset == "fashion-mnist" and meta["source"] is None:
        from .sources import FASHION_MNIST_DEFAULT_SOURCE

        meta["source"] = FASHION_MNIST_DEFAULT_SOURCE
    return meta


def _publish(out: str, temps: dict[str, str], meta: dict, meta_tmp: str, meta_path: str) -> None:
    """Move the .beton files into place, then write meta.json atomically: the dataset looks complete only once
    everything it names is on disk."""
    for s, f in SPLIT_FILES.items():
        os.replace(temps[s], os.path.join(out, f))
    _fsync_dir(out)
    with open(meta_tmp, "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(meta_tmp, meta_path)
    _fsync_dir(out)


def _write_dataset(
    dataset, source, out, data, train, val, page_size, *, write_mode, jpeg_quality, max_resolution, num_workers
) -> dict:
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, META_NAME)
    # The old dataset must stop looking complete before any of its files is replaced.
    if os.path.exists(meta_path):
        os.remove(meta_path)
        _fsync_dir(out)
    # Everything is written under temporary names first; whatever is left of them on failure is removed.
    tag = f".tmp-{os.getpid()}"
    temps = {s: os.path.join(out, "." + f + tag) for s, f in SPLIT_FILES.items()}
    meta_tmp = meta_path + tag
    try:
        table = _write_splits(
            temps,
            train,
            val,
            page_size=page_size,
            write_mode=write_mode,
            jpeg_quality=jpeg_quality,
            max_resolution=max_resolution,
            num_workers=num_workers,
        )
        meta = _dataset_meta(
            dataset,
            source,
            data,
            train,
            val,
            table,
            temps,
            write_mode=write_mode,
            jpeg_quality=jpeg_quality,
            max_resolution=max_resolution,
        )
        _publish(out, temps, meta, meta_tmp, meta_path)
    finally:
        for tmp in (*temps.values(), meta_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `convert` subcommand's options on ``parser``."""
    parser.add_argument("--dataset", required=True, choices=list(DATASETS), help="which reader to use")
    parser.add_argument(
        "--source",
        default=None,
        help="input: Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist), "
        "cifar-10/100-python.tar.gz or its extracted folder, or an ImageNet-layout "
        "folder with train/ and val/",
    )
    parser.add_argument("--out", required=True, help="output folder for train.beton, val.beton, meta.json")
    parser.add_argument(
        "--max-resolution",
        type=int,
        default=None,
        help="downscale so the longest side is at most N pixels (recommended for imagefolder)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for --write-mode jpg")
    parser.add_argument(
        "--write-mode",
        default="raw",
        choices=list(WRITE_MODES),
        help="raw: uint8 pixels (fast decode, big files); jpg: JPEG (small, slower decode)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="writer processes")
    parser.add_argument(
        "--limit", type=int, default=None, help="keep only the first N images of each split (quick runs)"
    )


def run(args: argparse.Namespace) -> int:
    """Run `convert` from parsed CLI arguments; returns the exit status (ValueError propagates)."""
    meta = convert(
        args.dataset,
        args.source,
        args.out,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        write_mode=args.write_mode,
        num_workers=args.num_workers,
        limit=args.limit,
    )
    print(
        f"convert: {meta['dataset']} -> {args.out}: train.beton {meta['train_size']} images, "
        f"val.beton {meta['val_size']} images, {meta['num_classes']} classes, "
        f"mean {[round(m, 2) for m in meta['mean']]}, std {[round(s, 2) for s in meta['std']]}"
    )
    return 0
