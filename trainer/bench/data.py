"""Benchmark: data loading alone on the CPU, FFCV vs torchvision (``python -m trainer.bench.data``).

Both sides read the same real images and produce the same batches: ``(images, labels)`` with images
float32 N x 3 x S x S normalized with the dataset's mean/std, in ``--layout`` (default channels_last,
the trainer's default ``loop.channels_last``; ``nchw`` = contiguous), labels int64, after
an ImageNet-style train augmentation (random-resized crop to S, scale 0.08-1, ratio 3/4-4/3, then a
horizontal flip with probability 1/2). Nothing consumes the batches: this times the input pipeline.

1. A JPEG ImageFolder (``WORK/jpeg/{train,val}/<class>/<index>.jpg``) is built from the first
   ``--images`` Fashion-MNIST training images (the val split, which the converter requires but
   nobody times, from the test images): each 28x28 image is upscaled (bicubic) to a random
   ImageNet-like size (each side uniform in 0.75-1.25 x ``--source-px``, so aspect ratios vary too),
   tinted with a random per-image colour so the JPEG's chroma planes are not empty, and saved with
   PIL at ``--jpeg-quality``. Class folders are ``NN-name`` so sorted order = label order.
2. ``trainer.data.convert`` (the ``imagefolder`` source) turns it into ``WORK/ffcv-<mode>/``;
   ``--write-mode jpg`` (default) stores JPEG re-encoded at the same quality (FFCV's writer decodes
   and re-encodes with OpenCV), so both sides decode JPEGs of the same pixels. Both folders are
   reused when ``WORK/params.json`` matches the parameters, rebuilt otherwise.
3. Pipelines, each with ``--workers`` W and ``--batch-size`` B, shuffled, ``drop_last``:

   * ``ffcv``: ``trainer.data.loaders.build_loaders(augment="imagenet", image_size=S)``, the
     trainer's own train loader: W numba threads decode (libjpeg-turbo) + crop/resize (OpenCV
     INTER_AREA) + flip (in place); uint8 -> float and normalization (``Normalizer``) in torch in the
     calling thread.
   * ``tv-uint8``: ``ImageFolder`` + ``DataLoader(num_workers=W, persistent_workers=True)``,
     ``RandomResizedCrop(S)`` (PIL, bilinear + antialias) + ``RandomHorizontalFlip`` +
     uint8 pixels in the workers, H x W x C for channels_last (``PILToTensor``'s C x H x W for nchw, so
     collating never transposes); uint8 -> float and normalization in the main process with the
     trainer's own ``Normalizer`` (the split FFCV uses: 4x less data through shared memory).
   * ``tv-float``: the same, with ``ToTensor`` + ``Normalize`` in the workers (torchvision's
     ImageNet example; the batches arrive finished in NCHW and are made channels_last if asked).

   The ratios reported are FFCV against the better torchvision variant.

Thread budget: W decoding threads (FFCV; capped at ``NUMBA_NUM_THREADS``, reported) or W worker
processes (torchvision; DataLoader sets 1 torch thread in each, and ``worker_init_fn`` does so
again explicitly), plus the main thread, whose torch intra-op threads are set to 1 for both.
Asymmetries: FFCV has one more thread that only schedules its numba stage; OpenCV is built with TBB,
but its INTER_AREA resize measured single-threaded (wall = CPU time per call, 200-2000 px); the
resize filters differ (OpenCV area vs PIL antialiased bilinear), each the library's standard.
CPU seconds (main process incl. all threads + the DataLoader worker processes, from /proc) are
reported next to wall time: on a machine shared with other processes they are the steadier measure
of cost.

Timing: one untimed warm-up epoch per pipeline first (FFCV's numba JIT compilation, DataLoader
worker start-up, page cache), then ``--repeats`` rounds of ``--epochs`` full epochs each,
pipelines alternating within a round so that load bursts from other processes hit all of them;
images/s is that of the best round of each pipeline, CPU ms/image the lowest of its rounds (both are
inflated by contention). The targets compare FFCV with the better torchvision variant: ``ratio``
(images/s) and ``cpu_ratio`` (CPU time per image, the steadier one on a shared machine). The
DataLoaders are built and warmed up first, so their workers fork before FFCV has started any thread.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

# Bump when the way the JPEG folder is made changes: older work folders are then rebuilt.
RECIPE_VERSION = 1
PARAMS_NAME = "params.json"
TARGET_RATIO = 3.0
PIPELINES = ("ffcv", "tv-uint8", "tv-float")
WRITE_MODES = ("jpg", "raw")
LAYOUTS = ("channels_last", "nchw")
FASHION_MNIST_TRAIN = 60000
FASHION_MNIST_TEST = 10000


@dataclass(frozen=True)
class FolderParams:
    """Everything the JPEG folder depends on (its cache key)."""

    images: int
    val_images: int
    source_px: int
    jpeg_quality: int
    seed: int
    source: str
    recipe_version: int = RECIPE_VERSION

    @property
    def side_range(self) -> tuple[int, int]:
        """Smallest and largest image side: 0.75-1.25 x source_px."""
        return max(8, round(0.75 * self.source_px)), round(1.25 * self.source_px)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name}: {value!r}; expected {allowed}")


def _class_dir(label: int, name: str) -> str:
    # Fashion-MNIST names contain '/' ("T-shirt/top"); the number prefix keeps sorted order = label.
    return f"{label:02d}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# The dataset: a JPEG ImageFolder and its FFCV conversion
# --------------------------------------------------------------------------------------------


def _write_split(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    params: FolderParams,
    rng: np.random.Generator,
) -> None:
    from PIL import Image

    lo, hi = params.side_range
    for i, (img, label) in enumerate(zip(images, labels)):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        tint = rng.integers(96, 256, size=3).astype(np.float32) / 255.0
        gray = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        rgb = np.clip(np.rint(gray[:, :, None] * tint), 0, 255).astype(np.uint8)
        d = out / _class_dir(int(label), names[int(label)])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(d / f"{i:05d}.jpg", quality=params.jpeg_quality)


def build_jpeg_folder(root: Path, params: FolderParams) -> None:
    """Write ``root/train`` and ``root/val`` from Fashion-MNIST (see the module docstring)."""
    from trainer.data.sources import read_fashion_mnist

    data = read_fashion_mnist(params.source)
    train_x, train_y = data.train.images[: params.images], data.train.labels[: params.images]
    # The converter wants val classes to be a subset of train's (matters only for tiny --images).
    keep = np.isin(data.val.labels, np.unique(train_y))
    val_x, val_y = data.val.images[keep][: params.val_images], data.val.labels[keep][: params.val_images]
    rng = np.random.default_rng(params.seed)
    _write_split(root / "train", train_x, train_y, data.classes, params, rng)
    _write_split(root / "val", val_x, val_y, data.classes, params, rng)


@dataclass
class Prepared:
    """Where the prepared dataset lives and whether it was reused."""

    jpeg_dir: Path
    ffcv_dir: Path
    reused: bool
    meta: dict
    jpeg_bytes_per_image: float
    ffcv_bytes_per_image: float
    pixels_per_image: float


def _folder_stats(train_dir: Path) -> tuple[float, float]:
    from PIL import Image

    files = sorted(train_dir.glob("*/*.jpg"))
    size = sum(f.stat().st_size for f in files)
    pixels = 0
    for f in files:
        with Image.open(f) as im:  # header only, no decode
            pixels += im.size[0] * im.size[1]
    return size / len(files), pixels / len(files)


def prepare(work: str | os.PathLike, params: FolderParams, write_mode: str = "jpg") -> Prepared:
    """Build (or reuse) ``work/jpeg`` and its FFCV conversion ``work/ffcv-<write_mode>``.

    ``work`` must be absent, empty, or a folder made by this function (it holds ``params.json``):
    anything else is refused rather than overwritten.
    """
    from trainer.data.convert import convert, keep_torch_threads
    from trainer.data.loaders import validate_dataset

    if write_mode not in WRITE_MODES:
        raise ValueError(f"--write-mode: unknown '{write_mode}'; allowed: {', '.join(WRITE_MODES)}")
    work = Path(work)
    if work.exists() and not work.is_dir():
        raise ValueError(f"--work {work}: exists and is not a directory")
    params_path = work / PARAMS_NAME
    wanted = asdict(params)
    old = None
    if params_path.is_file():
        try:
            old = json.loads(params_path.read_text())
        except (OSError, ValueError):
            old = None
    elif work.is_dir() and any(work.iterdir()):
        raise ValueError(
            f"--work {work}: not empty and has no {PARAMS_NAME}; expected a folder made by "
            f"trainer.bench.data (or a new one)"
        )
    jpeg_dir, ffcv_dir = work / "jpeg", work / f"ffcv-{write_mode}"
    reused = old == wanted and (jpeg_dir / "train").is_dir()
    if not reused:
        # A placeholder params.json first: an interrupted build is ours (rebuilt next time, not
        # refused) and never matches real parameters.
        work.mkdir(parents=True, exist_ok=True)
        params_path.write_text(json.dumps({"incomplete": True}) + "\n")
        for d in [jpeg_dir, *work.glob("ffcv-*")]:
            shutil.rmtree(d, ignore_errors=True)
        build_jpeg_folder(jpeg_dir, params)
        params_path.write_text(json.dumps(wanted, indent=2) + "\n")
    try:
        meta = validate_dataset(ffcv_dir)
        ffcv_ok = (
            meta.get("write_mode") == write_mode
            and meta.get("jpeg_quality") == params.jpeg_quality
            and meta.get("train_size") == params.images
        )
    except ValueError:
        ffcv_ok = False
    if not ffcv_ok:
        reused = False
        shutil.rmtree(ffcv_dir, ignore_errors=True)
        # max_resolution = the largest side: nothing is resized, only the page size is bounded.
        meta = convert(
            "imagefolder",
            str(jpeg_dir),
            str(ffcv_dir),
            write_mode=write_mode,
            jpeg_quality=params.jpeg_quality,
            max_resolution=params.side_range[1],
            num_workers=2,
        )
    jpeg_bytes, pixels = _folder_stats(jpeg_dir / "train")
    with keep_torch_threads():  # importing ffcv modules may reset torch's thread count
        from ffcv.reader import Reader
    # Bytes of the stored images (the allocation table), not the file size, which includes page padding.
    ffcv_bytes = float(Reader(str(ffcv_dir / "train.beton")).alloc_table["size"].mean())
    return Prepared(jpeg_dir, ffcv_dir, reused, meta, jpeg_bytes, ffcv_bytes, pixels)


# --------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------


def ffcv_loader(
    ffcv_dir: Path, *, batch_size: int, workers: int, size: int, channels_last: bool = True, seed: int = 0
) -> Any:
    """The trainer's FFCV train loader with the ImageNet augmentation, on the CPU."""
    from trainer.data.loaders import build_loaders

    return build_loaders(
        ffcv_dir,
        batch_size=batch_size,
        eval_batch_size=None,
        num_workers=workers,
        seed=seed,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        augment="imagenet",
        image_size=size,
        channels_last=channels_last,
    ).train


def build_pipelines(
    prep: Prepared, *, batch_size: int, workers: int, size: int, channels_last: bool = True, seed: int = 0
) -> dict[str, Any]:
    """The three pipelines of ``PIPELINES`` on ``prep``'s data, torchvision ones first (creation order)."""
    mean, std = prep.meta["mean"], prep.meta["std"]
    loaders: dict[str, Any] = {}
    for name, in_workers in (("tv-uint8", False), ("tv-float", True)):
        loaders[name] = TorchvisionLoader(
            prep.jpeg_dir / "train",
            batch_size=batch_size,
            workers=workers,
            size=size,
            mean=mean,
            std=std,
            normalize_in_workers=in_workers,
            channels_last=channels_last,
            seed=seed,
        )
    loaders["ffcv"] = ffcv_loader(
        prep.ffcv_dir, batch_size=batch_size, workers=workers, size=size, channels_last=channels_last, seed=seed
    )
    return loaders


def _one_torch_thread(_worker_id: int) -> None:
    # DataLoader already does this in each worker; repeated so the budget is explicit here.
    torch.set_num_threads(1)


class _PILToHWC:
    """PIL image -> uint8 H x W x C tensor: collated into N x H x W x C, the channels_last batch as is."""

    def __call__(self, pic: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(pic, dtype=np.uint8, copy=True))


class TorchvisionLoader:
    """``ImageFolder`` + ``DataLoader`` yielding the same batches as the trainer's FFCV loader.

    uint8 variant: each worker hands over pixels in the layout of the requested batch (H x W x C for
    channels_last, C x H x W otherwise), so collating is a plain copy and the main process runs the
    trainer's own ``Normalizer``: torchvision gets the cheapest route to the same floats.
    """

    def __init__(
        self,
        train_dir: Path,
        *,
        batch_size: int,
        workers: int,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize_in_workers: bool,
        channels_last: bool = True,
        seed: int = 0,
    ):
        from torchvision import datasets, transforms

        from trainer.data.loaders import Normalizer

        ops: list = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        if normalize_in_workers:
            ops += [transforms.ToTensor(), transforms.Normalize([m / 255 for m in mean], [s / 255 for s in std])]
        else:
            ops.append(_PILToHWC() if channels_last else transforms.PILToTensor())
        self.normalize_in_workers = normalize_in_workers
        self.channels_last = channels_last
        self.dataset = datasets.ImageFolder(str(train_dir), transform=transforms.Compose(ops))
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=True,
            worker_init_fn=_one_torch_thread,
            generator=torch.Generator().manual_seed(seed),
        )
        self._normalize = Normalizer(mean, std, device=torch.device("cpu"), channels_last=channels_last)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize_in_workers:
            # Finished floats in N x C x H x W; the trainer would want its layout.
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            return images.contiguous(memory_format=fmt)
        return self._normalize(images.permute(0, 3, 1, 2) if self.channels_last else images)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield self._finish(images), labels

    def worker_pids(self) -> list[int]:
        """PIDs of the persistent worker processes (empty before the first epoch)."""
        # DataLoader keeps its persistent iterator in the private `_iterator`; only for CPU accounting.
        it = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", []) if w.pid is not None]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of another process from /proc (None where /proc is unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of stat(5); the split above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: Sequence[int]) -> float | None:
    total = time.process_time()  # this process, every thread (FFCV's numba threads included)
    for pid in pids:
        s = _proc_cpu_seconds(pid)
        if s is None:
            return None
        total += s
    return total


@dataclass
class EpochStats:
    """Totals over the epochs of one timed round."""

    seconds: float
    cpu_seconds: float | None
    images: int


def run_epochs(loader: Iterable, epochs: int, pids: Callable[[], list[int]] = list) -> EpochStats:
    """Iterate ``epochs`` full epochs of ``loader``; wall time, CPU time and images seen."""
    procs = pids()
    cpu0 = _cpu_seconds(procs)
    start = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for _images, labels in loader:
            n += int(labels.shape[0])
    seconds = time.perf_counter() - start
    cpu1 = _cpu_seconds(procs)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return EpochStats(seconds, cpu, n)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Run:
    """What ``benchmark`` returns: the JSON-able result and the pipelines it timed (still usable)."""

    result: dict
    loaders: dict[str, Any]


def _time_pipelines(
    loaders: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, list[EpochStats]]]:
    """One warm-up epoch per pipeline, then ``args.repeats`` rounds of ``args.epochs`` epochs, the pipelines
    alternating within a round; returns the warm-up seconds and each pipeline's rounds."""
    pids: dict[str, Callable[[], list[int]]] = {name: getattr(loaders[name], "worker_pids", list) for name in PIPELINES}
    # In creation order: the DataLoader workers fork at their first epoch, before FFCV's threads start.
    warmup = {name: run_epochs(loader, 1).seconds for name, loader in loaders.items()}
    rounds: dict[str, list[EpochStats]] = {name: [] for name in PIPELINES}
    for _ in range(args.repeats):
        for name in PIPELINES:
            rounds[name].append(run_epochs(loaders[name], args.epochs, pids[name]))
    return warmup, rounds


def _result_rows(
    rounds: dict[str, list[EpochStats]], warmup: dict[str, float], ffcv_threads: int, workers: int
) -> list[dict]:
    """One row per pipeline: its best round, and the lowest CPU time per image over its rounds."""
    rows = []
    for name in PIPELINES:
        best = min(rounds[name], key=lambda s: s.seconds)
        cpu = [1e3 * s.cpu_seconds / s.images for s in rounds[name] if s.cpu_seconds is not None]
        rows.append(
            {
                "pipeline": name,
                "images_per_s": best.images / best.seconds,
                "seconds": best.seconds,
                "images": best.images,
                "rounds_images_per_s": [s.images / s.seconds for s in rounds[name]],
                # Lowest over the rounds, like the wall time: contention inflates CPU time per image too.
                "cpu_ms_per_image": min(cpu) if len(cpu) == len(rounds[name]) else None,
                "warmup_epoch_s": warmup[name],
                "threads": ffcv_threads if name == "ffcv" else workers,
            }
        )
    return rows


def _comparison(rows: list[dict], repeats: int) -> dict:
    """FFCV against the faster torchvision variant: images/s ratio, CPU-time ratio and the per-round ratios."""
    by = {r["pipeline"]: r for r in rows}
    tv_names = ("tv-uint8", "tv-float")
    tv_best = max(tv_names, key=lambda n: by[n]["images_per_s"])
    ratio = by["ffcv"]["images_per_s"] / by[tv_best]["images_per_s"]
    cpu_ratio = None
    if all(by[n]["cpu_ms_per_image"] is not None for n in PIPELINES):
        cpu_ratio = min(by[n]["cpu_ms_per_image"] for n in tv_names) / by["ffcv"]["cpu_ms_per_image"]
    # The same comparison within each round: the pipelines of a round ran back to back, under the same
    # load, so the spread of these is the run's own measure of how far to trust `ratio`.
    round_ratios = [
        by["ffcv"]["rounds_images_per_s"][i] / by[tv_best]["rounds_images_per_s"][i] for i in range(repeats)
    ]
    return {"fastest_torchvision": tv_best, "ratio": ratio, "cpu_ratio": cpu_ratio, "round_ratios": round_ratios}


def _config_record(args: argparse.Namespace, params: FolderParams, prep: Prepared, prep_s: float) -> dict:
    """The ``config`` part of the result: the parameters and what the prepared data turned out to be."""
    lo, hi = params.side_range
    return {
        "images": args.images,
        "classes": prep.meta["num_classes"],
        "source_px": [lo, hi],
        "jpeg_quality": args.jpeg_quality,
        "write_mode": args.write_mode,
        "size": args.size,
        "layout": args.layout,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "work": str(args.work),
        "reused": prep.reused,
        "prepare_s": prep_s,
        "jpeg_kb_per_image": prep.jpeg_bytes_per_image / 1024,
        "ffcv_kb_per_image": prep.ffcv_bytes_per_image / 1024,
        "pixels_per_image": prep.pixels_per_image,
    }


def _machine_record(load_before: tuple, load_after: tuple, numba_version: str) -> dict:
    """The ``machine`` part of the result: CPU, load around the timing, library versions."""
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_before": list(load_before),
        "load_after": list(load_after),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ffcv": _version("ffcv"),
        "pillow": _version("pillow"),
        "numba": numba_version,
        "numba_threading_layer": _numba_layer(),
        "python": platform.python_version(),
    }


def benchmark(args: argparse.Namespace) -> Run:
    """Prepare the data, time every pipeline; returns the result and the pipelines."""
    import numba

    params = FolderParams(
        images=args.images,
        val_images=max(10, args.images // 10),
        source_px=args.source_px,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        source=os.path.abspath(args.source),
    )
    t0 = time.perf_counter()
    prep = prepare(args.work, params, args.write_mode)
    prep_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    # One intra-op thread in the main process for every pipeline (see the module docstring).
    torch.set_num_threads(1)

    loaders = build_pipelines(
        prep,
        batch_size=args.batch_size,
        workers=args.workers,
        size=args.size,
        channels_last=args.layout == "channels_last",
        seed=args.seed,
    )
    ffcv_threads = int(loaders["ffcv"]._loader.num_workers)
    warmup, rounds = _time_pipelines(loaders, args)
    load_after = os.getloadavg()

    rows = _result_rows(rounds, warmup, ffcv_threads, args.workers)
    cmp = _comparison(rows, args.repeats)
    result = {
        "config": _config_record(args, params, prep, prep_s),
        "machine": _machine_record(load_before, load_after, numba.__version__),
        "results": rows,
        "fastest_torchvision": cmp["fastest_torchvision"],
        "ratio": cmp["ratio"],
        "cpu_ratio": cmp["cpu_ratio"],
        "target": TARGET_RATIO,
        "target_met": cmp["ratio"] >= TARGET_RATIO,
        "round_ratios": cmp["round_ratios"],
    }
    return Run(loaders=loaders, result=result)


def _numba_layer() -> str:
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel region has run yet
        return "unknown"


def format_table(result: dict) -> str:
    """The human-readable report of ``benchmark``'s result."""
    c, m = result["config"], result["machine"]
    lines = [
        f"data loading on the CPU: {c['images']} JPEG images ({c['classes']} classes, sides "
        f"{c['source_px'][0]}-{c['source_px'][1]} px, quality {c['jpeg_quality']}, "
        f"{c['jpeg_kb_per_image']:.1f} KB/image; FFCV {c['write_mode']} {c['ffcv_kb_per_image']:.1f} KB/image)",
        f"augmentation: RandomResizedCrop {c['size']} + flip -> float32 normalized, {c['layout']}; "
        f"batch {c['batch_size']}, "
        f"{c['workers']} workers, best of {c['repeats']} x {c['epochs']} epoch(s) after 1 warm-up epoch",
        f"machine: {m['cpu']}, {m['usable_cpus']} usable of {m['cpu_count']} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in m['load_before'])} before / "
        f"{' '.join(f'{x:.2f}' for x in m['load_after'])} after; torch {m['torch']}, "
        f"torchvision {m['torchvision']}, ffcv {m['ffcv']}, pillow {m['pillow']}, numba {m['numba']} "
        f"({m['numba_threading_layer']})",
        "",
    ]
    header = (
        f"{'pipeline':<10} {'threads':>7} {'images/s':>9} {'FFCV x':>7} {'CPU ms/image':>13} "
        f"{'FFCV x':>7} {'warm-up epoch s':>16}"
    )
    lines += [header, "-" * len(header)]
    ffcv = next(r for r in result["results"] if r["pipeline"] == "ffcv")
    for r in result["results"]:
        cpu, cpu_x = "n/a", "n/a"
        if r["cpu_ms_per_image"] is not None and ffcv["cpu_ms_per_image"] is not None:
            cpu, cpu_x = f"{r['cpu_ms_per_image']:.3f}", f"{r['cpu_ms_per_image'] / ffcv['cpu_ms_per_image']:.2f}"
        lines.append(
            f"{r['pipeline']:<10} {r['threads']:>7} {r['images_per_s']:>9.0f} "
            f"{ffcv['images_per_s'] / r['images_per_s']:>7.2f} {cpu:>13} {cpu_x:>7} "
            f"{r['warmup_epoch_s']:>16.2f}"
        )
    verdict = "met" if result["target_met"] else "NOT met"
    cpu_ratio = "n/a" if result["cpu_ratio"] is None else f"{result['cpu_ratio']:.2f}x"
    lines += [
        "",
        f"FFCV / fastest torchvision ({result['fastest_torchvision']}): {result['ratio']:.2f}x images/s "
        f"(target >= {result['target']:.0f}x: {verdict}); {cpu_ratio} less CPU time per image than the "
        f"cheaper torchvision variant",
        f"per round (pipelines back to back): FFCV / {result['fastest_torchvision']} "
        f"{' '.join(f'{r:.2f}' for r in result['round_ratios'])}",
        "images/s: best round; CPU ms/image: lowest round (this process's threads + DataLoader workers); "
        "the warm-up epoch (FFCV's numba compilation, worker start-up) is not timed",
    ]
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    """ValueError (one line naming the option) for values argparse's types let through."""
    _check_int("--images", args.images, 1, FASHION_MNIST_TRAIN)
    _check_int("--source-px", args.source_px, 16, 4096)
    _check_int("--size", args.size, 8)
    _check_int("--batch-size", args.batch_size, 1)
    _check_int("--workers", args.workers, 1)
    _check_int("--repeats", args.repeats, 1)
    _check_int("--epochs", args.epochs, 1)
    _check_int("--jpeg-quality", args.jpeg_quality, 1, 100)
    _check_int("--seed", args.seed, 0)
    if args.batch_size > args.images:
        raise ValueError(
            f"--batch-size: {args.batch_size} is larger than --images {args.images}; every "
            f"pipeline drops the last partial batch, so an epoch would be empty"
        )


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    from trainer.data.sources import FASHION_MNIST_DEFAULT_SOURCE

    ap = argparse.ArgumentParser(prog="python -m trainer.bench.data", description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="data/bench-jpeg", help="work folder for the JPEG and FFCV datasets")
    ap.add_argument("--images", type=int, default=6000, help="training images (first N of Fashion-MNIST)")
    ap.add_argument("--source-px", type=int, default=160, help="image sides are uniform in 0.75-1.25 x this")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument(
        "--write-mode",
        default="jpg",
        choices=list(WRITE_MODES),
        help="how the FFCV copy stores images (jpg: same decode work as torchvision)",
    )
    ap.add_argument("--size", type=int, default=128, help="RandomResizedCrop output size")
    ap.add_argument(
        "--layout",
        default="channels_last",
        choices=list(LAYOUTS),
        help="memory layout of the batches (channels_last: the trainer's default, loop.channels_last)",
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="FFCV threads = DataLoader worker processes")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; the best counts")
    ap.add_argument("--epochs", type=int, default=1, help="full epochs per timed round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default=FASHION_MNIST_DEFAULT_SOURCE, help="Fashion-MNIST IDX folder")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    return ap


def main(argv: list[str] | None = None) -> Run:
    """Run the benchmark, print the table, optionally write JSON; returns the ``Run``."""
    args = parser().parse_args(argv)
    check_args(args)
    run = benchmark(args)
    print(format_table(run.result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(run.result, indent=2) + "\n")
    return run


if __name__ == "__main__":
    import sys

    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
