"""FFCV loaders for training and evaluation, single process or under torchrun.

What a batch is: ``(images, labels)``; images float32 N x C x H x W on ``device``, normalized with
the dataset's train mean/std (``meta.json``), in ``torch.channels_last`` when asked; labels int64
(N,) on ``device``. FFCV's numba stages only decode and augment uint8 pixels on the CPU; the
uint8 -> float conversion and the normalization run in torch after the copy to ``device`` (4x less
host-to-device traffic, and the arithmetic runs on the GPU).

Ordering and sharding (train):

* The order of an epoch is a function of ``(seed, epoch)`` only: single process it is
  ``numpy.random.default_rng(seed + epoch).permutation(N)``; distributed it is torch's
  ``DistributedSampler(shuffle=True, seed=seed, drop_last=False)`` at ``set_epoch(epoch)`` (FFCV
  ``distributed=True``): ``torch.randperm(N, generator seeded with seed + epoch)``, padded to
  ``P = ceil(N / W) * W`` by repeating its first ``P - N`` entries, and rank r takes positions
  r, r + W, r + 2W, ...
* "Disjoint and complete" therefore means: every epoch, the W per-rank lists (before dropping the
  last partial batch) together contain every index at least once; they are disjoint except for the
  ``P - N < W`` padded indices, each of which appears exactly twice (on two different ranks).
* ``drop_last=True`` for train: every rank yields exactly ``floor(ceil(N / W) / batch_size)``
  batches (identical on all ranks, so DDP never waits on a rank that ran out), and there is never
  a tiny last batch (BatchNorm fails on a batch of 1). Up to ``batch_size - 1`` samples per rank
  are skipped per epoch; which ones changes every epoch with the order. The reference drops the
  remainder too.
* ``train.set_epoch(e)`` makes the next iteration epoch e (for resuming); iterating advances the
  epoch by one.

Evaluation: rank r reads indices ``r, r + W, r + 2W, ...`` in order with ``drop_last=False``, so
across ranks every validation image is read exactly once (no DistributedSampler, which would pad
with duplicates). Ranks can yield different numbers of batches (their image counts differ by at
most one); evaluation must not run a collective per batch.

Augmentations (train only; validation is decode [+ center crop] only):

* ``none``: decode. With ``none``/``basic``, ``image_size`` None keeps fixed-size images as they
  are; an ``image_size`` different from the stored size (or images of varying size) takes the
  full center square resized to ``image_size``, for train and val alike.
* ``basic``: random horizontal flip, then a random HxW crop of the image padded by 4 pixels with
  REFLECTION (the reference's padding; numpy/TF "reflect" = mirror without repeating the edge
  pixel).
* ``imagenet``: ``RandomResizedCropRGBImageDecoder`` (scale 0.08-1, ratio 3/4-4/3) + flip for
  train; ``CenterCropRGBImageDecoder(ratio=224/256)`` for val; size ``image_size`` (default 224,
  or the native size of fixed-size datasets).
* ``autoaugment``: the reference's AutoAugment CIFAR policy (``trainer.data.augment.AutoAugment``,
  95 sub-policies), then ``basic``, in that order as in the reference; both run in torch on the
  uint8 batch on ``device`` (decode-only FFCV pipeline, like ``none``/``basic``).
* ``randaugment``: the ``imagenet`` pipeline (random-resized crop + flip in FFCV), then
  RandAugment(N=2, M=9) in torch on ``device`` (the reference's ImageNet "autoaugment").
* ``cutout > 0``: one ``cutout`` x ``cutout`` square per image after the crop, placed fully inside
  the image like FFCV's ``Cutout``, filled with the dataset mean rounded to integers so that the
  patch is ~0 after normalization. With ``autoaugment``/``randaugment`` it is applied in torch,
  after the policy (and after the crop).

Flip, reflect crop and cutout are one fused numba operation, ``RandomFlipCropCutout`` (FFCV's own
flip and cutout take 10-12 s each to JIT-compile; this one ~2-3 s).

The random numbers of the numba augmentations come from numba's own per-thread generator, which
is seeded from OS entropy: those augmentations are NOT reproducible, the order is. The torch stages
of ``autoaugment``/``randaugment`` are: their random numbers are a function of
``(seed, rank, epoch * len(train) + batch index)`` (``autoaugment`` is reproducible end to end;
``randaugment``'s crop and flip are not). They draw on the host and never sync with the GPU.

GPU: call ``torch.cuda.set_device(local_rank)`` before ``build_loaders`` (FFCV picks its CUDA
streams from the current device). FFCV's ``torch.set_num_threads`` side effects (at import and for
every loader/epoch) are undone on the calling thread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.config import DataConfig

from .augment import build_image_policy
from .convert import FORMAT_VERSION, META_NAME, SPLIT_FILES, import_ffcv, keep_torch_threads

AUGMENTS = ("none", "basic", "imagenet", "autoaugment", "randaugment")
BASIC_PADDING = 4
IMAGENET_CENTER_RATIO = 224 / 256
IMAGENET_DEFAULT_SIZE = 224

# The reference's fixed per-channel normalization constants, on the 0-1 scale it divides by 255 first
# (zhaoyang-0204/gnp ds_pipeline/datasets/dataset_source.py:208-213 at e803362, chosen by dataset name).
REFERENCE_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
}
NORMALIZE_MODES = ("auto", "reference")


def normalization_stats(
    normalize: str, dataset: str, mean: Sequence[float], std: Sequence[float]
) -> tuple[list[float], list[float]]:
    """The per-channel mean/std (0-255 scale) the loaders normalize with (``data.normalize``).

    ``auto``: ``mean``/``std`` unchanged, i.e. the statistics of the training images actually loaded (which
    move with ``data.limit`` / ``data.holdout``). ``reference``: the reference's fixed constants for
    ``dataset`` (cifar10 / cifar100), times 255, since ``(x/255 - m)/s == (x - 255 m)/(255 s)``.
    ValueError for an unknown mode, a dataset without reference constants or a channel-count mismatch.
    """
    if normalize == "auto":
        return list(mean), list(std)
    if normalize != "reference":
        raise ValueError(f"normalize: unknown {normalize!r}; allowed: {', '.join(NORMALIZE_MODES)}")
    if dataset not in REFERENCE_NORMALIZATION:
        raise ValueError(
            f"normalize: 'reference' has constants for {', '.join(REFERENCE_NORMALIZATION)} only, "
            f"not for dataset {dataset!r}; use 'auto'"
        )
    ref_mean, ref_std = REFERENCE_NORMALIZATION[dataset]
    if len(mean) != len(ref_mean):
        raise ValueError(f"normalize: {dataset!r} constants have {len(ref_mean)} channels, the data {len(mean)}")
    return [255.0 * m for m in ref_mean], [255.0 * s for s in ref_std]


# --------------------------------------------------------------------------------------------
# Validation of a converted dataset
# --------------------------------------------------------------------------------------------

_META_TYPES: dict[str, Any] = {
    "dataset": str,
    "num_classes": int,
    "classes": list,
    "train_size": int,
    "val_size": int,
    "mean": list,
    "std": list,
    "write_mode": str,
    "format_version": int,
}


@dataclass
class _SplitInfo:
    """What validation learned about one .beton."""

    path: str
    num_samples: int
    fixed_size: Optional[Tuple[int, int]]  # (H, W) when every image has the same size


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"{path}: {what}")


def _check_beton(path: str, expected_samples: int, expected_bytes: Optional[int], num_classes: int) -> _SplitInfo:
    """Check that ``path`` is a complete, sane FFCV file with an image and a label field.

    Everything FFCV's reader and its numba decoders would later trust is checked here, so that a
    damaged file gives a one-line ValueError instead of a numba crash or a segfault.
    """
    import_ffcv()
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_handlers, get_metadata_type

    hint = "re-run `python -m trainer convert`"
    if not os.path.isfile(path):
        raise _bad(path, f"missing; expected an FFCV .beton written by `trainer convert` ({hint})")
    size = os.path.getsize(path)
    if expected_bytes is not None and size != expected_bytes:
        raise _bad(path, f"{size} bytes but meta.json records {expected_bytes} (truncated or replaced; {hint})")
    if size < HeaderType.itemsize + 2 * FieldDescType.itemsize:
        raise _bad(path, f"{size} bytes is too short for an FFCV header (truncated; {hint})")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise _bad(
            path, f"not an FFCV .beton (format version {int(header['version'])}, expected {CURRENT_VERSION}; {hint})"
        )
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    page_size, table_ptr = int(header["page_size"]), int(header["alloc_table_ptr"])
    if num_fields != 2:
        raise _bad(path, f"{num_fields} fields; expected 2 (image, label) ({hint})")
    if page_size < (1 << 21) or page_size & (page_size - 1):
        raise _bad(path, f"corrupt header (page size {page_size}; {hint})")
    if num_samples != expected_samples:
        raise _bad(path, f"holds {num_samples} samples but meta.json expects {expected_samples} ({hint})")
    descs = np.fromfile(path, dtype=FieldDescType, count=2, offset=HeaderType.itemsize)
    type_ids = [int(t) for t in descs["type_id"]]
    names = [bytes(d).split(b"\0")[0].decode("ascii", "replace") for d in descs["name"]]
    if type_ids != [2, 1] or names != ["image", "label"]:
        raise _bad(
            path, f"fields {list(zip(names, type_ids))}; expected image (RGBImageField) and label (IntField) ({hint})"
        )
    meta_type = get_metadata_type(get_handlers(descs))
    meta_start = HeaderType.itemsize + descs.nbytes
    data_start = meta_start + num_samples * meta_type.itemsize
    if not data_start <= table_ptr <= size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise _bad(
            path, f"allocation table at byte {table_ptr} does not fit a {size}-byte file (truncated or corrupt; {hint})"
        )
    metadata = np.fromfile(path, dtype=meta_type, count=num_samples, offset=meta_start)
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    ptrs, sizes = table["ptr"].astype(np.int64), table["size"].astype(np.int64)
    if len(table) and (
        ptrs.min() < data_start or (ptrs + sizes).max() > table_ptr or table["sample_id"].max() >= num_samples
    ):
        raise _bad(path, f"allocation table points outside the data region (corrupt; {hint})")
    image, label = metadata[metadata.dtype.names[0]], metadata[metadata.dtype.names[1]]
    modes, heights, widths = image["mode"], image["height"].astype(np.int64), image["width"].astype(np.int64)
    if num_samples and (not np.isin(modes, (0, 1)).all() or heights.min() < 1 or widths.min() < 1):
        raise _bad(path, f"corrupt image records (mode/size; {hint})")
    order = np.argsort(ptrs)
    sorted_ptrs, sorted_sizes = ptrs[order], sizes[order]
    data_ptr = image["data_ptr"].astype(np.int64)
    pos = np.searchsorted(sorted_ptrs, data_ptr)
    found = pos < len(sorted_ptrs)
    found[found] = sorted_ptrs[pos[found]] == data_ptr[found]
    if not found.all():
        raise _bad(path, f"image {int(np.argmin(found))} has no allocated data (corrupt; {hint})")
    raw = modes == 1
    if raw.any() and not (sorted_sizes[pos[raw]] == heights[raw] * widths[raw] * 3).all():
        raise _bad(path, f"raw image sizes disagree with their records (corrupt; {hint})")
    labels = label.astype(np.int64)
    if num_samples and (labels.min() < 0 or labels.max() >= num_classes):
        raise _bad(path, f"labels outside 0..{num_classes - 1} (corrupt or wrong meta.json; {hint})")
    fixed = None
    if num_samples and heights.min() == heights.max() and widths.min() == widths.max():
        fixed = (int(heights[0]), int(widths[0]))
    return _SplitInfo(path, num_samples, fixed)


def _validate(data_dir: str) -> tuple[dict, dict[str, _SplitInfo]]:
    data_dir = os.fspath(data_dir)
    convert_hint = "expected the output folder of `python -m trainer convert`"
    if not os.path.isdir(data_dir):
        raise ValueError(f"{data_dir}: dataset folder missing; {convert_hint}")
    meta_path = os.path.join(data_dir, META_NAME)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{meta_path}: missing (conversion never finished?); {convert_hint}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: unreadable JSON ({' '.join(str(e).split())}); {convert_hint}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object; {convert_hint}")
    for key, typ in _META_TYPES.items():
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise ValueError(f"{meta_path}: key '{key}' missing or not {typ.__name__}; {convert_hint}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta['format_version']}; this trainer reads "
            f"{FORMAT_VERSION} (re-run convert)"
        )
    for key in ("mean", "std"):
        vals = meta[key]
        if len(vals) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise ValueError(f"{meta_path}: '{key}' must be 3 finite numbers")
    if not all(v > 0 for v in meta["std"]):
        raise ValueError(f"{meta_path}: 'std' must be positive")
    if meta["num_classes"] < 1 or len(meta["classes"]) != meta["num_classes"]:
        raise ValueError(
            f"{meta_path}: 'classes' has {len(meta['classes'])} names, num_classes is {meta['num_classes']}"
        )
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    infos = {}
    for split, fname in SPLIT_FILES.items():
        rec = files.get(fname) if isinstance(files.get(fname), dict) else {}
        expected_bytes = rec.get("bytes") if isinstance(rec.get("bytes"), int) else None
        infos[split] = _check_beton(
            os.path.join(data_dir, fname), meta[f"{split}_size"], expected_bytes, meta["num_classes"]
        )
    return meta, infos


def validate_dataset(data_dir: str | os.PathLike) -> dict:
    """Check that ``data_dir`` holds a complete converted dataset; return its ``meta.json`` dict.

    Checks meta.json (present, JSON, required keys, format version) and both .beton files
    (present, size as recorded, FFCV header, fields, sample count, allocation table and image
    records consistent, labels in range). Raises ValueError naming the offending file otherwise.
    """
    meta, _ = _validate(os.fspath(data_dir))
    return meta


# --------------------------------------------------------------------------------------------
# Random flip + reflect-padded random crop + cutout (one numba FFCV operation)
# --------------------------------------------------------------------------------------------


def _draw_fn() -> Callable:
    """The per-image random draws of both kernels, compiled by numba."""
    import numba

    @numba.njit
    def draw_fn(h, w, pad, cut, flip_prob):
        # Per image, in this order, in both variants: flip, crop offset, cutout corner. Compiled once
        # per process (the class is built once), called from every loader's parallel stage.
        flip = np.random.random() < flip_prob
        dy = np.random.randint(-pad, pad + 1)
        dx = np.random.randint(-pad, pad + 1)
        cy = np.random.randint(0, h - cut + 1)
        cx = np.random.randint(0, w - cut + 1)
        return flip, dy, dx, cy, cx

    return draw_fn


def _flip_cutout_in_place_kernel(my_range, draw, pad, cut, flip_prob, fill) -> Callable:
    """The padding-0 variant: flip by swapping pixels in the decoder's buffer, cutout in place."""

    def flip_cutout_in_place(images, _dst):
        n, h, w, c = images.shape
        for i in my_range(n):
            flip, _, _, cy, cx = draw(h, w, pad, cut, flip_prob)
            if flip:
                for y in range(h):
                    for x in range(w // 2):
                        for k in range(c):
                            t = images[i, y, x, k]
                            images[i, y, x, k] = images[i, y, w - 1 - x, k]
                            images[i, y, w - 1 - x, k] = t
            for y in range(cy, cy + cut):
                for x in range(cx, cx + cut):
                    for k in range(c):
                        images[i, y, x, k] = fill[k]
        return images

    flip_cutout_in_place.is_parallel = True
    return flip_cutout_in_place


def _flip_crop_cutout_kernel(my_range, draw, pad, cut, flip_prob, fill) -> Callable:
    """The copying variant: flip + reflect-padded crop + cutout from ``images`` into ``dst``."""

    def flip_crop_cutout(images, dst):
        n, h, w, c = images.shape
        for i in my_range(n):
            flip, dy, dx, cy, cx = draw(h, w, pad, cut, flip_prob)
            for y in range(h):
                sy = y + dy
                if sy < 0:
                    sy = -sy
                elif sy >= h:
                    sy = 2 * h - 2 - sy
                in_rows = cy <= y < cy + cut
                for x in range(w):
                    if in_rows and cx <= x < cx + cut:
                        for k in range(c):
                            dst[i, y, x, k] = fill[k]
                        continue
                    sx = x + dx
                    if sx < 0:
                        sx = -sx
                    elif sx >= w:
                        sx = 2 * w - 2 - sx
                    if flip:
                        sx = w - 1 - sx
                    for k in range(c):
                        dst[i, y, x, k] = images[i, sy, sx, k]
        return dst

    flip_crop_cutout.is_parallel = True
    return flip_crop_cutout


def _check_flip_crop_cutout(padding: int, cutout: int, fill: np.ndarray, shape: Tuple[int, int, int]) -> None:
    """ValueError when the operation's settings do not fit ``shape`` (H, W, C) images."""
    h, w, c = shape
    if padding < 0 or padding >= min(h, w):
        # Reflection cannot mirror more pixels than the image has.
        raise ValueError(f"padding: {padding}; reflect padding needs 0 <= padding < {min(h, w)}")
    if cutout < 0 or cutout > min(h, w):
        raise ValueError(f"cutout: {cutout}; expected 0..{min(h, w)} for {h}x{w} images")
    if len(fill) != c:
        raise ValueError(f"fill: {len(fill)} values for {c}-channel images")


def _flip_crop_cutout_operation() -> type:
    """Build the ``RandomFlipCropCutout`` class (deferred so that importing this module skips ffcv)."""
    import_ffcv()
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State

    draw_fn = _draw_fn()

    class RandomFlipCropCutout(Operation):
        """Random horizontal flip, reflect-padded random crop, then cutout, per image.

        * flip: with probability ``flip_prob`` (torchvision ``RandomHorizontalFlip``);
        * crop: pad by ``padding`` pixels with REFLECTION and crop back to H x W, the top-left
          corner uniform over the (2p+1)^2 positions (torchvision
          ``RandomCrop(size, padding, padding_mode="reflect")``; mirror without repeating the edge
          pixel: index -1 -> 1, H -> H-2);
        * cutout: when ``cutout > 0``, a ``cutout`` x ``cutout`` square, uniformly placed fully
          inside the image, is set to ``fill`` (same placement rule as FFCV's ``Cutout``).

        ``padding=0`` and ``cutout=0`` disable those parts. One fused pass over the uint8
        H x W x C arrays of FFCV's JIT stage, written as plain loops because that compiles in
        ~2-3 s, against ~12 s for FFCV's RandomHorizontalFlip and ~10 s for its Cutout.

        Without padding nothing needs a copy: the flip swaps pixels in the decoder's buffer (only
        for the images that flip) and the cutout fills in place. That is the ImageNet pipeline's
        case, where the copying pass cost 0.037 ms of FFCV's ~0.2 ms per 128 px image here. Both
        variants draw the same random numbers in the same order, so they give the same images.
        """

        def __init__(self, padding: int = 0, flip_prob: float = 0.5, cutout: int = 0, fill: Sequence[int] = (0, 0, 0)):
            super().__init__()
            self.padding = int(padding)
            self.flip_prob = float(flip_prob)
            self.cutout = int(cutout)
            self.fill = np.asarray(fill, dtype=np.uint8)

        def generate_code(self, in_place: Optional[bool] = None) -> Callable:
            """The numba code; ``in_place`` (default: when there is no padding) picks the variant."""
            in_place = not self.padding if in_place is None else in_place
            if in_place and self.padding:
                raise ValueError(f"padding: {self.padding}; the in-place variant needs padding 0")
            kernel = _flip_cutout_in_place_kernel if in_place else _flip_crop_cutout_kernel
            return kernel(Compiler.get_iterator(), draw_fn, self.padding, self.cutout, self.flip_prob, self.fill)

        def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
            _check_flip_crop_cutout(self.padding, self.cutout, self.fill, previous_state.shape)
            if not self.padding:
                return replace(previous_state, jit_mode=True), None  # in place
            h, w, c = previous_state.shape
            return (replace(previous_state, jit_mode=True), AllocationQuery((h, w, c), previous_state.dtype))

    return RandomFlipCropCutout


_OP_CLS: Optional[type] = None


def RandomFlipCropCutout(
    padding: int = 0,
    flip_prob: float = 0.5,
    cutout: int = 0,  # noqa: N802
    fill: Sequence[int] = (0, 0, 0),
) -> Any:
    """A new ``RandomFlipCropCutout`` FFCV operation (see ``_flip_crop_cutout_operation``)."""
    global _OP_CLS
    if _OP_CLS is None:
        _OP_CLS = _flip_crop_cutout_operation()
    return _OP_CLS(padding, flip_prob, cutout, fill)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class _EpochIterator:
    """Iterates one epoch of an FFCV loader, finishing each batch in torch."""

    def __init__(self, owner: "_BatchLoader"):
        self._owner = owner
        # FFCV's iter() advances next_epoch: read the epoch this iteration produces first.
        self._epoch = int(getattr(owner._loader, "next_epoch", 0))
        self._batch = 0
        with keep_torch_threads():
            self._it = iter(owner._loader)

    def __iter__(self) -> "_EpochIterator":
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self._it)
        # Key of the torch augmentations' random numbers: the global batch index of this epoch.
        step = self._epoch * len(self._owner) + self._batch
        self._batch += 1
        return self._owner._finish(images, labels, step)

    def close(self) -> None:
        """Stop FFCV's background thread (also done at the end of the epoch).

        Waits for the thread to exit: an abandoned epoch's thread would otherwise still be
        writing into the batch buffers that the next epoch's thread starts filling.
        """
        self._it.close()
        if self._it.is_alive() and threading.current_thread() is not self._it:
            self._it.join(timeout=60)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Normalizer:
    """uint8 images N x C x H x W (any strides, any device) -> ``(float32(x) - mean) * (1 / std)``.

    The result is a new tensor on ``device`` in the chosen layout (never a view of the input, whose
    buffers FFCV recycles). One definition for every loader (FFCV, memory, the torchvision side of
    ``trainer.bench.data``), so their floats are identical. How, and why:

    * uint8 crosses to the device first, then converts there: 4x fewer bytes over PCIe, and no
      float conversion on the host thread that feeds the GPU.
    * channels_last: the per-channel constants broadcast along an innermost dimension of size C = 3,
      which TensorIterator handles element by element (0.10 ms per 128 px image on one CPU thread
      here, 6x the vectorized cost). Viewing the NHWC result as N x H x (W*C) and tiling the constants
      along W*C makes the inner loop contiguous (0.017 ms). Per element the operations are the same
      (subtract mean[c], multiply by 1/std[c], both float32), so both layouts give the same floats.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, device: torch.device, channels_last: bool):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._mean = torch.tensor(mean, dtype=torch.float32).to(self.device)
        # 1/std in float64, then rounded once: the same constant everywhere.
        self._inv_std = (1.0 / torch.tensor(std, dtype=torch.float64)).to(torch.float32).to(self.device)
        self._tiled: dict = {}  # width -> (mean, inv_std) tiled along W*C

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != self._mean.numel():
            raise ValueError(
                f"images: expected uint8 N x {self._mean.numel()} x H x W, got {images.dtype} {tuple(images.shape)}"
            )
        x = images.to(self.device, non_blocking=True).to(torch.float32, memory_format=self.memory_format)
        n, c, h, w = x.shape
        if self.memory_format is torch.channels_last:
            if w not in self._tiled:
                self._tiled[w] = (self._mean.repeat(w), self._inv_std.repeat(w))
            mean, inv_std = self._tiled[w]
            x.permute(0, 2, 3, 1).view(n, h, w * c).sub_(mean).mul_(inv_std)
        else:
            x.sub_(self._mean.view(1, c, 1, 1)).mul_(self._inv_std.view(1, c, 1, 1))
        return x


class _BatchLoader:
    """Common part of TrainLoader and EvalLoader: an FFCV loader plus torch post-processing."""

    def __init__(
        self,
        loader: Any,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool,
        policy: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
    ):
        self._loader = loader
        self._policy = policy
        self.device = device
        self.channels_last = channels_last
        self._normalize = Normalizer(mean, std, device=device, channels_last=channels_last)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._policy is not None:
            # Per-image torch augmentation on the uint8 batch on `device`; returns a new tensor
            # (FFCV's buffer is never written).
            images = self._policy(images, step)
        # New float tensor: never aliases FFCV's recycled uint8 buffers.
        x = self._normalize(images)
        # Labels are cloned for the same reason (FFCV reuses its output slots a few batches later).
        y = labels.reshape(-1).to(device=self.device, dtype=torch.int64, copy=True)
        return x, y

    @property
    def batch_size(self) -> int:
        """Images per batch (the last eval batch may be smaller)."""
        return int(self._loader.batch_size) if self._loader is not None else 0

    def __len__(self) -> int:
        return len(self._loader) if self._loader is not None else 0

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            return iter(())
        return _EpochIterator(self)


class TrainLoader(_BatchLoader):
    """Shuffled, sharded training batches; ``len()`` is the (rank-independent) batches per epoch."""

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return int(self._loader.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` (order depends only on seed and epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: {epoch!r}; expected an integer >= 0")
        self._loader.next_epoch = int(epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices assigned to this rank in ``epoch``, in reading order.

        Includes the tail that ``drop_last`` skips: the batches of the epoch are exactly the first
        ``len(self) * self.batch_size`` entries. Under DDP this is the rank's DistributedSampler
        share (``ceil(N / world_size)`` entries, padding included).
        """
        return np.asarray(self._loader.traversal_order.sample_order(int(epoch)), dtype=np.int64)


class EvalLoader(_BatchLoader):
    """Sequential validation batches over this rank's indices ``rank::world_size``; nothing dropped."""

    def __init__(self, loader: Any, indices: np.ndarray, **kwargs: Any):
        super().__init__(loader, **kwargs)
        self.indices = indices

    @property
    def num_samples(self) -> int:
        """Validation images this rank evaluates."""
        return int(len(self.indices))


@dataclass
class Loaders:
    """Everything ``build_loaders`` returns."""

    train: TrainLoader
    val: EvalLoader
    meta: dict
    steps_per_epoch: int


@dataclass(frozen=True)
class LoaderFacts:
    """What a loader builder needs to know about the run besides its ``data`` section: this rank's place in
    the job, the per-rank batch sizes (``eval_batch_size`` None = ``batch_size``), the training seed, the
    device the batches go to and their memory format."""

    batch_size: int
    eval_batch_size: Optional[int]
    seed: int
    rank: int
    world_size: int
    device: torch.device
    channels_last: bool

    def kwargs(self) -> dict[str, Any]:
        """The facts as the keyword arguments both builders take."""
        return dataclasses.asdict(self) | {"device": self.device}


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: {value!r}; expected an integer >= {low}" + (" or none" if allow_none else ""))


def _check_common(batch_size: Any, eval_batch_size: Any, seed: Any, rank: Any, world_size: Any, cutout: Any) -> None:
    """The arguments both loader builders (FFCV and memory) take; ValueError naming the first bad one."""
    _check_int("batch_size", batch_size, 1)
    _check_int("eval_batch_size", eval_batch_size, 1, allow_none=True)
    _check_int("seed", seed, 0)
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    _check_int("cutout", cutout, 0)
    if rank >= world_size:
        raise ValueError(f"rank: {rank}; expected 0..{world_size - 1}")


def _numba_threads(num_workers: int) -> int:
    import numba

    limit = int(numba.config.NUMBA_NUM_THREADS)
    if num_workers > limit:
        # numba.set_num_threads refuses more threads than its pool (NUMBA_NUM_THREADS).
        warnings.warn(f"data.num_workers={num_workers} exceeds NUMBA_NUM_THREADS={limit}; using {limit}", stacklevel=2)
        return limit
    return num_workers


def _pipelines(
    train: bool,
    augment: str,
    native: Optional[Tuple[int, int]],
    image_size: Optional[int],
    cutout: int,
    mean: Sequence[float],
    device: torch.device,
    path: str,
) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    ops: list = []
    padding, flip_prob = 0, 0.0
    if augment in ("imagenet", "randaugment"):
        if image_size is None:
            square = native is not None and native[0] == native[1]
            size = native[0] if square else IMAGENET_DEFAULT_SIZE
        else:
            size = image_size
        if train:
            ops.append(RandomResizedCropRGBImageDecoder((size, size)))
            flip_prob = 0.5
        else:
            ops.append(CenterCropRGBImageDecoder((size, size), ratio=IMAGENET_CENTER_RATIO))
        out_hw = (size, size)
    else:
        if native is not None and (image_size is None or native == (image_size, image_size)):
            ops.append(SimpleRGBImageDecoder())
            out_hw = native
        elif image_size is None:
            raise ValueError(
                f"image_size: required with augment '{augment}' because the images of "
                f"{path} differ in size (or use augment 'imagenet')"
            )
        else:
            # Full center square resized to image_size, identical for train and val.
            ops.append(CenterCropRGBImageDecoder((image_size, image_size), ratio=1.0))
            out_hw = (image_size, image_size)
        if train and augment in ("basic", "autoaugment"):
            if BASIC_PADDING >= min(out_hw):
                raise ValueError(f"augment: '{augment}' pads by {BASIC_PADDING}, too much for {out_hw} images")
            if augment == "basic":
                padding, flip_prob = BASIC_PADDING, 0.5
    if train and cutout > min(out_hw):
        raise ValueError(f"cutout: {cutout} is larger than the {out_hw[0]}x{out_hw[1]} images")
    if augment in ("autoaugment", "randaugment"):
        cutout = 0  # applied in torch after the policy (see build_image_policy)
    if train and (padding or flip_prob or cutout):
        # Cutout patch in the dataset mean colour: ~0 after normalization, like the reference's
        # zero patch applied after normalization.
        fill = tuple(int(round(m)) for m in mean)
        ops.append(RandomFlipCropCutout(padding, flip_prob, cutout, fill))
    label_ops: list = [IntDecoder(), ToTensor()]
    ops.append(ToTensor())
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
        label_ops.append(ToDevice(device, non_blocking=True))
    # NHWC buffer viewed as NCHW (channels_last strides, no copy); _finish picks the final layout.
    ops.append(ToTorchImage(channels_last=True, convert_back_int16=False))
    return {"image": ops, "label": label_ops}


def _check_distributed(rank: int, world_size: int, *, required: bool) -> None:
    """With ``world_size > 1``: ``rank``/``world_size`` must match torch.distributed's, when it is initialised;
    ``required``: it must be (FFCV reads the rank from it)."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if required:
            raise ValueError(
                "world_size > 1 but torch.distributed is not initialised; call init_process_group before build_loaders"
            )
        return
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"rank/world_size {rank}/{world_size} disagree with torch.distributed "
            f"({dist.get_rank()}/{dist.get_world_size()})"
        )


def _check_ffcv_args(
    batch_size: Any,
    eval_batch_size: Any,
    num_workers: Any,
    seed: Any,
    rank: Any,
    world_size: Any,
    augment: Any,
    cutout: Any,
    image_size: Any,
) -> None:
    """``build_loaders``'s arguments; ValueError naming the first bad one."""
    _check_common(batch_size, eval_batch_size, seed, rank, world_size, cutout)
    _check_int("num_workers", num_workers, 1)
    _check_int("image_size", image_size, 8, allow_none=True)
    if augment not in AUGMENTS:
        raise ValueError(f"augment: unknown '{augment}'; allowed: {', '.join(AUGMENTS)}")


def _ffcv_train_loader(
    info: _SplitInfo,
    *,
    batch_size: int,
    threads: int,
    seed: int,
    world_size: int,
    os_cache: bool,
    pipelines: dict,
) -> Any:
    """The FFCV loader of the train split: shuffled by (seed, epoch), sharded under DDP, last batch dropped."""
    from ffcv.loader import Loader, OrderOption

    with keep_torch_threads():
        train = Loader(
            info.path,
            batch_size=int(batch_size),
            num_workers=threads,
            os_cache=os_cache,
            order=OrderOption.RANDOM,
            distributed=world_size > 1,
            seed=int(seed),
            pipelines=pipelines,
            drop_last=True,
        )
    if len(train) == 0:
        per_rank = math.ceil(info.num_samples / world_size)
        raise ValueError(
            f"batch_size: {batch_size} per rank is larger than the {per_rank} train images "
            f"each of the {world_size} rank(s) gets from {info.path}"
        )
    return train


def _ffcv_val_loader(
    info: _SplitInfo, indices: np.ndarray, *, batch_size: int, threads: int, os_cache: bool, pipelines: dict
) -> Any:
    """The FFCV loader of this rank's validation ``indices``, in order, nothing dropped."""
    from ffcv.loader import Loader, OrderOption

    with keep_torch_threads():
        return Loader(
            info.path,
            batch_size=int(batch_size),
            num_workers=threads,
            os_cache=os_cache,
            order=OrderOption.SEQUENTIAL,
            distributed=False,
            indices=indices,
            pipelines=pipelines,
            drop_last=False,
        )


def build_loaders(
    data_dir: str | os.PathLike,
    *,
    batch_size: int,
    eval_batch_size: Optional[int],
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    augment: str = "basic",
    cutout: int = 0,
    image_size: Optional[int] = None,
    channels_last: bool = False,
    os_cache: bool = True,
    normalize: str = "auto",
) -> Loaders:
    """Validate ``data_dir`` and build this rank's train and eval loaders.

    ``batch_size`` and ``eval_batch_size`` (default: ``batch_size``) are per rank. ``num_workers``
    is FFCV's number of decoding threads. With ``world_size > 1`` torch.distributed must already
    be initialised (FFCV reads the rank from it). See the module docstring for ordering, sharding,
    drop_last and augmentation semantics. Raises ValueError for a damaged dataset or bad arguments.
    """
    import_ffcv()
    # Arguments first, then the dataset: a bad call fails before any file is read.
    _check_ffcv_args(batch_size, eval_batch_size, num_workers, seed, rank, world_size, augment, cutout, image_size)
    device = torch.device(device)
    _check_distributed(rank, world_size, required=True)
    meta, infos = _validate(os.fspath(data_dir))
    threads = _numba_threads(int(num_workers))
    mean, std = normalization_stats(normalize, meta["dataset"], meta["mean"], meta["std"])
    train_info, val_info = infos["train"], infos["val"]

    # The torch stage of autoaugment/randaugment (None for the others), keyed by (seed, rank, step).
    policy = build_image_policy(
        augment,
        seed=int(seed),
        rank=int(rank),
        cutout=int(cutout),
        fill=tuple(int(round(m)) for m in mean),
        padding=BASIC_PADDING,
    )
    # Train: FFCV decodes (and flips/crops/cuts out) uint8 on the CPU; _finish normalizes on `device`.
    train = _ffcv_train_loader(
        train_info,
        batch_size=batch_size,
        threads=threads,
        seed=seed,
        world_size=world_size,
        os_cache=os_cache,
        pipelines=_pipelines(True, augment, train_info.fixed_size, image_size, cutout, mean, device, train_info.path),
    )
    # Validation: rank r reads r, r + W, ... so that the ranks together read every image exactly once.
    # A rank without validation images (more ranks than images) gets an empty EvalLoader, and no pipeline.
    indices = np.arange(rank, val_info.num_samples, world_size, dtype=np.int64)
    val_loader = None
    if len(indices):
        val_loader = _ffcv_val_loader(
            val_info,
            indices,
            # At most the rank's whole share: FFCV allocates the batch's buffers up front, so a huge
            # loop.eval_batch_size failed to allocate after config.yaml was written (the results are the same:
            # evaluation is per image).
            batch_size=min(eval_batch_size or batch_size, len(indices)),
            threads=threads,
            os_cache=os_cache,
            pipelines=_pipelines(False, augment, val_info.fixed_size, image_size, 0, mean, device, val_info.path),
        )
    common = dict(device=device, mean=mean, std=std, channels_last=channels_last)
    train_loader = TrainLoader(train, policy=policy, **common)
    eval_loader = EvalLoader(val_loader, indices, **common)
    return Loaders(train=train_loader, val=eval_loader, meta=meta, steps_per_epoch=len(train_loader))


def loaders_from_config(cfg: DataConfig, facts: LoaderFacts) -> Loaders:
    """``build_loaders`` for a run's ``data`` section (loader=ffcv); data.image_size 0 = the stored size."""
    return build_loaders(
        cfg.path,
        num_workers=cfg.num_workers,
        augment=cfg.augment,
        cutout=cfg.cutout,
        image_size=cfg.image_size or None,
        os_cache=cfg.os_cache,
        normalize=cfg.normalize,
        **facts.kwargs(),
    )
