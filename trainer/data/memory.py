"""Device-resident loaders for small datasets: the whole dataset as uint8 on ``device``, no FFCV.

An alternative to ``build_loaders`` (FFCV) for datasets that fit in device memory (Fashion-MNIST,
CIFAR-10/100, synthetic benchmark data): nothing is decoded or copied per batch, there is no data
pipeline on the host, and it runs where FFCV is not installed. Both splits are uploaded once as
uint8 N x H x W x 3 tensors; every batch is an index into them, the augmentation runs on
``device``, then the uint8 -> float conversion and normalization, exactly as in the FFCV loaders.
Every rank holds the whole dataset (sharding only selects indices).

Sources (the ``data.path`` string)::

    fashion-mnist:PATH   the IDX files read by trainer.data.sources (gray replicated to 3 channels
    cifar10:PATH         the python-version archive or its folder         like `trainer convert` does)
    cifar100:PATH
    synthetic:HxW:CLASSES:N   N random uint8 H x W x 3 train images with labels in 0..CLASSES-1,
                              plus max(1, N // 10) val images (e.g. synthetic:224x224:1000:10000),
                              for throughput benchmarks. Drawn on ``device`` from a fixed seed:
                              identical across runs on the same kind of device.

``limit`` keeps the first ``limit`` images of each split, as ``trainer convert --limit`` does.
``label_noise`` f replaces round(f·N) training labels by a different class, drawn uniformly (symmetric
label noise), chosen by a fixed generator (``LABEL_NOISE_SEED``) independent of ``seed``: every run of a
comparison sees the same noisy labels. Validation labels stay clean.
``holdout`` f keeps round(f·N) training images (after ``limit`` and ``label_noise``, so their labels are as
noisy as the rest: what a user selecting hyper-parameters would have) out of training and evaluates on them
instead of the validation split, which is then never read: hyper-parameters can be selected without touching
the test set. The held-out images are a fixed selection (``HOLDOUT_SEED``), the same for every seed and method.

``meta`` has the ``meta.json`` keys the trainer reads: dataset, num_classes, classes, train_size,
val_size, image_size [H, W], channels (of the source), mean, std (3 floats each on the 0-255 scale,
population statistics of the train images after ``limit``, computed with convert's exact integer
formula, so they equal what ``trainer convert`` writes for the same data), source, plus
``loader: "memory"``. There is no .beton and no ``format_version``: ``validate_dataset`` does not
apply.

Order and sharding (train), the same indices as the FFCV loader for the same seed:

* one process: ``numpy.random.default_rng(seed + epoch).permutation(N)``;
* ``world_size`` W > 1: ``torch.randperm(N)`` from a CPU generator seeded with ``seed + epoch``
  (torch's DistributedSampler), repeated cyclically to ``P = ceil(N / W) * W`` entries (the first
  ``P - N < W`` indices appear twice, on different ranks), and rank r takes positions r, r + W, ...
  Every rank gets ``ceil(N / W)`` indices, so every rank yields the same number of batches.
* ``drop_last=True`` (default): ``len(train) = ceil(N / W) // batch_size``, the tail of each rank's
  list is skipped (it changes with the order every epoch); ``False`` yields a last partial batch.
* Iterating produces epoch ``train.epoch`` and advances it by one; ``set_epoch(e)`` picks the next.
  torch.distributed is not needed (ranks may be simulated in one process); when it is initialised,
  ``rank``/``world_size`` must agree with it.

Evaluation: rank r reads val images ``r, r + W, r + 2W, ...`` in order, nothing dropped, so across
ranks every image is evaluated exactly once (ranks may differ by one image).

Augmentation (train only), ``augment``:

* ``none``: the images as stored.
* ``basic``: random horizontal flip (p = 0.5), then a random H x W crop of the image reflect-padded
  by 4 (mirror without repeating the edge pixel; offset uniform over the 81 positions), the
  semantics of the FFCV loader's ``RandomFlipCropCutout``; done as one gather from the stored
  dataset.
* ``autoaugment``: ``trainer.data.augment``'s reference AutoAugment CIFAR policy, then flip +
  reflect crop (+ cutout), i.e. the FFCV loader's torch stage, keyed the same way by
  ``(seed, rank, epoch * len(train) + batch)``.
* ``cutout > 0`` (with any ``augment``): one ``cutout`` x ``cutout`` square per image after the
  crop, fully inside the image, in the dataset mean colour rounded to integers (~0 after normalization).

Unlike the FFCV loaders, ``basic`` is reproducible: the flip, offset and cutout position of every
image of an epoch are drawn once per epoch from a CPU ``torch.Generator`` seeded by
``(seed, epoch, rank)`` (entry k belongs to the k-th index of the rank's order), so a resumed epoch
replays exactly and CPU and GPU see the same numbers. Per batch there is no host/device sync: the
order and the draws reach the device once per epoch, batches are device-side slices of them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.config import DataConfig

from .augment import build_image_policy
from .convert import _mean_std
from .loaders import (
    BASIC_PADDING,
    LoaderFacts,
    Loaders,
    Normalizer,
    _check_common,
    _check_distributed,
    _check_int,
    normalization_stats,
)
from .sources import ArraySplit, read_source

MEMORY_AUGMENTS = ("none", "basic", "autoaugment")
ARRAY_DATASETS = ("fashion-mnist", "cifar10", "cifar100")
SYNTHETIC_SEED = 0  # the synthetic dataset must not change with the run's seed
SYNTHETIC_VAL_FRACTION = 10  # val images = max(1, N // 10)
_SYNTHETIC = re.compile(r"synthetic:(\d+)x(\d+):(\d+):(\d+)")
_STREAM_DRAWS = 1  # SeedSequence stream of the per-epoch flip/crop/cutout draws

SOURCE_FORMS = (
    "fashion-mnist:PATH, cifar10:PATH, cifar100:PATH or synthetic:HxW:CLASSES:N (e.g. synthetic:224x224:1000:10000)"
)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A parsed ``data.path``: an array dataset (name, path) or a synthetic spec (h, w, classes, n)."""

    name: str
    path: str = ""
    shape: Tuple[int, int] = (0, 0)
    classes: int = 0
    count: int = 0


def _bad_source(source: Any, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"data.path: {source!r} is not a memory-loader source{why}; expected {SOURCE_FORMS}")


def parse_source(source: str | os.PathLike) -> _Source:
    """Parse a memory-loader ``data.path`` string; ValueError (one line, naming data.path) otherwise."""
    if not isinstance(source, (str, os.PathLike)):
        raise _bad_source(source)
    text = os.fspath(source)
    name, sep, rest = text.partition(":")
    if name == "synthetic":
        m = _SYNTHETIC.fullmatch(text)
        if m is None:
            raise _bad_source(text)
        h, w, classes, n = (int(g) for g in m.groups())
        if min(h, w, classes, n) < 1:
            raise _bad_source(text, "H, W, CLASSES and N must be >= 1")
        return _Source("synthetic", shape=(h, w), classes=classes, count=n)
    if not sep or name not in ARRAY_DATASETS:
        raise _bad_source(text)
    if not rest:
        raise _bad_source(text, "empty PATH")
    return _Source(name, path=rest)


def _upload(split: ArraySplit, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images N x H x W x C uint8, labels N int64) on ``device``; C = 1 for grayscale sources."""
    images = torch.from_numpy(np.array(split.images, dtype=np.uint8, copy=True)).to(device)
    if images.ndim == 3:
        images = images[..., None]
    labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(device)
    return images, labels


LABEL_NOISE_SEED = 20220717  # fixed: the noisy labels are part of the dataset, not of a run's randomness
HOLDOUT_SEED = 20221202  # fixed: the held-out images are part of the protocol, not of a run's randomness


def noisy_labels(labels: torch.Tensor, num_classes: int, fraction: float) -> tuple[torch.Tensor, int]:
    """Symmetric label noise: round(fraction·N) labels, chosen by ``LABEL_NOISE_SEED``, each moved to one of
    the other ``num_classes - 1`` classes uniformly. Returns (new labels on the same device, changed count)."""
    y = labels.cpu().numpy().copy()
    k = int(round(fraction * len(y)))
    if k == 0:
        return labels, 0
    if num_classes < 2:
        raise ValueError(f"label_noise: {fraction} needs at least 2 classes; the dataset has {num_classes}")
    rng = np.random.default_rng(LABEL_NOISE_SEED)
    picked = rng.permutation(len(y))[:k]
    y[picked] = (y[picked] + rng.integers(1, num_classes, size=k)) % num_classes
    return torch.from_numpy(y).to(labels.device), k


def holdout_split(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices of n training images: round(fraction·n) held out, chosen by ``HOLDOUT_SEED``
    (independent of the run's seed and of the label-noise draw), both in increasing order."""
    k = int(round(fraction * n))
    if k == 0:
        return torch.arange(n), torch.arange(0)
    if k >= n:
        raise ValueError(f"holdout: {fraction} of {n} training images leaves none to train on")
    held = np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k])
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(held)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Gray N x H x W x 1 -> the 3 identical channels `trainer convert` stores (FFCV is RGB-only), so
    the model sees 3 input channels whichever loader feeds it. Replicated on the device."""
    if images.shape[3] == 1:
        return images.expand(-1, -1, -1, 3).contiguous()
    return images


def _synthetic(src: _Source, device: torch.device) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
    """Random train and val splits generated directly on ``device`` (no host copy of big images)."""
    g = torch.Generator(device=device)
    g.manual_seed(SYNTHETIC_SEED)
    h, w = src.shape
    splits = []
    for n in (src.count, max(1, src.count // SYNTHETIC_VAL_FRACTION)):
        images = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g, device=device)
        labels = torch.randint(0, src.classes, (n,), dtype=torch.int64, generator=g, device=device)
        splits.append((images, labels))
    return tuple(splits)


def _channel_stats(images: torch.Tensor) -> Tuple[list, list]:
    """Mean/std of N x H x W x C uint8 images (C = 1 or 3), as ``trainer convert`` computes them.

    A 256-bin histogram per channel gives exact integer sums and sums of squares, fed to convert's
    own formula, so the floats are identical to its meta.json (gray: the value repeated 3 times,
    as for convert's replicated channels). bincount without weights is deterministic on GPU too.
    One host sync, at build time.
    """
    n, h, w, c = images.shape
    chunk = max(1, (1 << 26) // (h * w))  # bounds the per-channel copy that bincount needs
    hist = torch.zeros(c, 256, dtype=torch.int64, device=images.device)
    for start in range(0, n, chunk):
        part = images[start : start + chunk]
        for k in range(c):
            hist[k] += torch.bincount(part[..., k].reshape(-1), minlength=256)
    values = np.arange(256, dtype=object)  # Python ints: no overflow
    counts = [np.asarray(row, dtype=object) for row in hist.tolist()]
    s = [int((values * cnt).sum()) for cnt in counts]
    q = [int((values * values * cnt).sum()) for cnt in counts]
    if c == 1:
        s, q = s * 3, q * 3
    table = np.asarray([[*s, *q, n * h * w]], dtype=np.int64)
    return _mean_std(table)


# --------------------------------------------------------------------------------------------
# Orders and per-epoch draws (host, once per epoch)
# --------------------------------------------------------------------------------------------


def shard_order(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The dataset indices of rank ``rank`` in ``epoch``, in reading order (see the module docstring).

    Equal to the FFCV loader's ``epoch_order``: numpy's permutation in one process, torch
    DistributedSampler's (``shuffle=True, drop_last=False``) with W > 1.
    """
    if world_size == 1:
        return np.random.default_rng(seed + epoch).permutation(num_samples).astype(np.int64)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=g).numpy()
    padded = math.ceil(num_samples / world_size) * world_size
    # np.resize repeats cyclically: DistributedSampler's padding, also when W > N.
    return np.resize(perm, padded)[rank::world_size].astype(np.int64)


def _epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """CPU generator of one (seed, epoch, rank); SeedSequence hashes them (no seed + epoch collisions)."""
    words = np.random.SeedSequence([seed, epoch, rank, _STREAM_DRAWS]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed((int(words[0]) << 32) | int(words[1]))
    return g


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without blocking the host (pinned, non-blocking)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class _MemoryBatches:
    """Common part of the train and eval loaders: the stored split and the float conversion."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool,
    ):
        self.device = images.device
        self.channels_last = channels_last
        self._images = images  # N x H x W x 3 uint8
        self._labels = labels  # N int64
        self._batch_size = int(batch_size)
        # The FFCV loaders' conversion: identical floats.
        self._normalize = Normalizer(mean, std, device=self.device, channels_last=channels_last)

    @property
    def batch_size(self) -> int:
        """Images per batch (the last batch may be smaller when nothing is dropped)."""
        return self._batch_size

    def _finish(self, nchw: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W (any strides) -> normalized float32, new storage, chosen layout."""
        return self._normalize(nchw)


class MemoryTrainLoader(_MemoryBatches):
    """Shuffled, sharded, augmented training batches; ``len()`` is the (rank-independent) batches per epoch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        augment: str,
        cutout: int,
        drop_last: bool,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool,
    ):
        super().__init__(images, labels, batch_size=batch_size, mean=mean, std=std, channels_last=channels_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.augment, self.cutout, self.drop_last = augment, int(cutout), bool(drop_last)
        self.num_samples = math.ceil(images.shape[0] / world_size)  # this rank's indices per epoch
        self._next_epoch = 0
        # `none` with a cutout runs the same gather with no flip and no offset (as FFCV's op does).
        self._pad = BASIC_PADDING if augment == "basic" else 0
        self._flip_prob = 0.5 if augment == "basic" else 0.0
        self._use_draws = augment == "basic" or (augment == "none" and self.cutout > 0)
        _, h, w, c = images.shape
        fill = [int(round(m)) for m in mean]
        self._fill = torch.tensor(fill, dtype=torch.uint8, device=self.device)
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)
        self._policy: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
        if augment == "autoaugment":
            self._policy = build_image_policy(
                augment, seed=self.seed, rank=self.rank, cutout=self.cutout, fill=fill, padding=BASIC_PADDING
            )

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self._batch_size
        return math.ceil(self.num_samples / self._batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` (order and draws depend only on seed, epoch, rank)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: {epoch!r}; expected an integer >= 0")
        self._next_epoch = int(epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of this rank in ``epoch``, in reading order (``ceil(N / W)`` entries, padding
        included; with ``drop_last`` the batches are the first ``len(self) * batch_size`` of them)."""
        return shard_order(
            int(self._images.shape[0]), seed=self.seed, epoch=int(epoch), rank=self.rank, world_size=self.world_size
        )

    def epoch_draws(self, epoch: int) -> torch.Tensor:
        """The flip/crop/cutout numbers of ``epoch`` (CPU int64, 5 x ceil(N / W)): rows flip (0/1),
        dy, dx (-4..4; 0 without ``basic``), cutout top, cutout left; column k goes with
        ``epoch_order(epoch)[k]``."""
        _, h, w, _ = self._images.shape
        n, pad, cut = self.num_samples, self._pad, self.cutout
        g = _epoch_generator(self.seed, int(epoch), self.rank)
        # Always all five rows, in this order: changing `cutout` never changes the flips or crops.
        flip = (torch.rand(n, generator=g) < self._flip_prob).to(torch.int64)
        dy = torch.randint(-pad, pad + 1, (n,), generator=g)
        dx = torch.randint(-pad, pad + 1, (n,), generator=g)
        cy = torch.randint(0, h - cut + 1, (n,), generator=g)
        cx = torch.randint(0, w - cut + 1, (n,), generator=g)
        return torch.stack([flip, dy, dx, cy, cx])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        # Like FFCV: creating the iterator consumes the epoch, so iterating again gives the next one.
        epoch = self._next_epoch
        self._next_epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = _to_device(torch.from_numpy(self.epoch_order(epoch)), self.device)
        draws = _to_device(self.epoch_draws(epoch), self.device) if self._use_draws else None
        total, bs = len(self), self._batch_size
        for i in range(total):
            sl = slice(i * bs, (i + 1) * bs)
            idx = order[sl]
            if draws is not None:
                images = self._flip_crop_cutout(idx, draws[:, sl])
            else:
                images = self._images.index_select(0, idx).permute(0, 3, 1, 2)
                if self._policy is not None:
                    # The FFCV loader's key for its torch stage: global batch index of the run.
                    images = self._policy(images, epoch * total + i)
            yield self._finish(images), self._labels.index_select(0, idx)

    def _flip_crop_cutout(self, idx: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Flip + reflect-padded crop (+ cutout) of images ``idx`` as one gather; uint8 N x C x H x W view."""
        _, h, w, _ = self._images.shape
        flip, dy, dx, cy, cx = draws
        rows = (self._rows[None, :] + dy[:, None]).abs()  # (B, H), reflect at 0 ...
        rows = torch.where(rows >= h, 2 * h - 2 - rows, rows)  # ... and at H - 1
        cols = (self._cols[None, :] + dx[:, None]).abs()
        cols = torch.where(cols >= w, 2 * w - 2 - cols, cols)
        cols = torch.where(flip[:, None].bool(), w - 1 - cols, cols)  # flip, then crop
        out = self._images[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
        if self.cutout:
            cut = self.cutout
            in_rows = (self._rows[None, :] >= cy[:, None]) & (self._rows[None, :] < cy[:, None] + cut)
            in_cols = (self._cols[None, :] >= cx[:, None]) & (self._cols[None, :] < cx[:, None] + cut)
            box = in_rows[:, :, None, None] & in_cols[:, None, :, None]
            out = torch.where(box, self._fill, out)
        return out.permute(0, 3, 1, 2)


class MemoryEvalLoader(_MemoryBatches):
    """Sequential validation batches over this rank's indices ``rank::world_size``; nothing dropped."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, rank: int, world_size: int, **kwargs: Any):
        # Strided views: the rank's shard costs no copy and no index tensor.
        super().__init__(images[rank::world_size], labels[rank::world_size], **kwargs)
        self.indices = np.arange(rank, images.shape[0], world_size, dtype=np.int64)

    @property
    def num_samples(self) -> int:
        """Validation images this rank evaluates."""
        return int(len(self.indices))

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self._batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        bs = self._batch_size
        for i in range(len(self)):
            sl = slice(i * bs, (i + 1) * bs)
            # Labels are copied so a consumer writing into them cannot alter the stored split.
            yield self._finish(self._images[sl].permute(0, 3, 1, 2)), self._labels[sl].clone()


@dataclass
class _Splits:
    """Both splits of a source as uint8 tensors on the device, before label noise, holdout and RGB."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list
    channels: int  # of the stored images (1 for gray)
    where: str  # what meta.json calls the source


def _check_memory_args(
    batch_size: Any,
    eval_batch_size: Any,
    seed: Any,
    rank: Any,
    world_size: Any,
    cutout: Any,
    limit: Any,
    label_noise: Any,
    holdout: Any,
    augment: Any,
) -> None:
    """``build_memory_loaders``'s arguments; ValueError naming the first bad one."""
    _check_common(batch_size, eval_batch_size, seed, rank, world_size, cutout)
    _check_int("limit", limit, 1, allow_none=True)
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0 <= label_noise < 1:
        raise ValueError(f"label_noise: {label_noise!r}; expected a fraction in [0, 1)")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout: {holdout!r}; expected a fraction in [0, 1)")
    if augment not in MEMORY_AUGMENTS:
        raise ValueError(
            f"augment: '{augment}' is not supported by the memory loader; allowed: {', '.join(MEMORY_AUGMENTS)}"
        )


def _check_image_size(augment: str, cutout: int, h: int, w: int) -> None:
    """ValueError when the padding of ``augment`` or the ``cutout`` square does not fit h x w images."""
    if augment != "none" and BASIC_PADDING >= min(h, w):
        raise ValueError(f"augment: '{augment}' pads by {BASIC_PADDING}, too much for {h}x{w} images")
    if cutout > min(h, w):
        raise ValueError(f"cutout: {cutout} is larger than the {h}x{w} images")


def _load_splits(
    src: _Source, source: str | os.PathLike, device: torch.device, augment: str, limit: Optional[int]
) -> _Splits:
    """Generate (synthetic) or read both splits, keep the first ``limit`` images of each, upload them."""
    if src.name == "synthetic":
        _check_image_size(augment, 0, *src.shape)  # before allocating anything big
        (train_x, train_y), (val_x, val_y) = _synthetic(src, device)
        if limit is not None:
            train_x, train_y, val_x, val_y = train_x[:limit], train_y[:limit], val_x[:limit], val_y[:limit]
        return _Splits(train_x, train_y, val_x, val_y, [str(k) for k in range(src.classes)], 3, os.fspath(source))
    data = read_source(src.name, src.path)
    train, val = data.train.subset(limit), data.val.subset(limit)
    assert isinstance(train, ArraySplit) and isinstance(val, ArraySplit)  # array datasets only
    for split_name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise ValueError(f"data.path: the {split_name} split of {src.path} is empty; expected images")
    classes, channels, where = list(data.classes), train.source_channels, os.path.abspath(src.path)
    (train_x, train_y), (val_x, val_y) = _upload(train, device), _upload(val, device)
    return _Splits(train_x, train_y, val_x, val_y, classes, channels, where)


def _noise_and_holdout(splits: _Splits, label_noise: float, holdout: float) -> int:
    """Flip a ``label_noise`` fraction of the train labels, then (``holdout``) replace val by held-out train
    images, in place on ``splits``; returns how many labels were flipped."""
    splits.train_y, noisy = noisy_labels(splits.train_y, len(splits.classes), label_noise)
    if holdout:
        kept, held = holdout_split(splits.train_x.shape[0], holdout)
        kept, held = kept.to(splits.train_x.device), held.to(splits.train_x.device)
        x, y = splits.train_x, splits.train_y
        splits.train_x, splits.train_y = x[kept], y[kept]
        splits.val_x, splits.val_y = x[held], y[held]
    return noisy


def _memory_meta(
    src: _Source, splits: _Splits, mean: list, std: list, noisy: int, label_noise: float, holdout: float
) -> dict:
    """The ``meta.json``-like dict of a memory dataset (what the FFCV loaders read from ``meta.json``)."""
    _, h, w, _ = splits.train_x.shape
    meta = {
        "dataset": src.name,
        "num_classes": len(splits.classes),
        "classes": splits.classes,
        "train_size": int(splits.train_x.shape[0]),
        "val_size": int(splits.val_x.shape[0]),
        "image_size": [int(h), int(w)],
        "channels": splits.channels,
        "mean": mean,
        "std": std,
        "source": splits.where,
        "loader": "memory",
    }
    if noisy:
        meta.update(label_noise=float(label_noise), noisy_labels=noisy)
    if holdout:
        meta.update(holdout=float(holdout), val_split="held-out training images")
    return meta


def build_memory_loaders(
    source: str | os.PathLike,
    *,
    batch_size: int,
    eval_batch_size: Optional[int],
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device | str,
    augment: str = "basic",
    cutout: int = 0,
    channels_last: bool = True,
    limit: Optional[int] = None,
    drop_last: bool = True,
    label_noise: float = 0.0,
    holdout: float = 0.0,
    normalize: str = "auto",
) -> Loaders:
    """Load ``source`` onto ``device`` and build this rank's train and eval loaders.

    ``source`` is a ``data.path`` string of the forms in the module docstring. ``batch_size`` and
    ``eval_batch_size`` (default: ``batch_size``) are per rank. ``drop_last`` applies to train only.
    Returns the same ``Loaders`` as ``build_loaders``. Raises ValueError (one line) for a bad source,
    unreadable files or bad arguments.
    """
    # Arguments first: a bad call fails before anything is read or allocated.
    src = parse_source(source)
    _check_memory_args(
        batch_size, eval_batch_size, seed, rank, world_size, cutout, limit, label_noise, holdout, augment
    )
    _check_distributed(rank, world_size, required=False)
    device = torch.device(device)

    # Both splits on the device, then the train labels' noise and the holdout (val = held-out train images).
    splits = _load_splits(src, source, device, augment, limit)
    noisy = _noise_and_holdout(splits, label_noise, holdout)
    # Normalization constants (data.normalize): from the (kept) train images, before replicating gray (a third
    # of the work), or the reference's fixed ones.
    mean, std = normalization_stats(normalize, src.name, *_channel_stats(splits.train_x))
    splits.train_x, splits.val_x = _rgb(splits.train_x), _rgb(splits.val_x)
    _, h, w, _ = splits.train_x.shape
    _check_image_size(augment, cutout, h, w)

    common = dict(mean=mean, std=std, channels_last=bool(channels_last))
    train_loader = MemoryTrainLoader(
        splits.train_x,
        splits.train_y,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        augment=augment,
        cutout=cutout,
        drop_last=drop_last,
        **common,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"batch_size: {batch_size} per rank is larger than the {train_loader.num_samples} "
            f"train images each of the {world_size} rank(s) gets from {source}"
        )
    eval_loader = MemoryEvalLoader(
        splits.val_x, splits.val_y, rank=rank, world_size=world_size, batch_size=eval_batch_size or batch_size, **common
    )
    meta = _memory_meta(src, splits, mean, std, noisy, label_noise, holdout)
    return Loaders(
        train=train_loader,
        val=eval_loader,
        meta=meta,  # type: ignore[arg-type]
        steps_per_epoch=len(train_loader),
    )


def memory_loaders_from_config(cfg: DataConfig, facts: LoaderFacts) -> Loaders:
    """``build_memory_loaders`` for a run's ``data`` section (loader=memory); data.limit 0 = all images."""
    return build_memory_loaders(
        cfg.path,
        augment=cfg.augment,
        cutout=cfg.cutout,
        limit=cfg.limit or None,
        label_noise=cfg.label_noise,
        holdout=cfg.holdout,
        normalize=cfg.normalize,
        **facts.kwargs(),
    )
