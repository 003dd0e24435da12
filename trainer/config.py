"""Run configuration: typed, frozen, documented, loaded in layers.

Precedence: dataclass defaults < recipe YAML (by name from trainer/recipes/ or by path) < `--set a.b=c`.
Every field carries a docstring (the string literal under it); `python -m trainer train --help-config`
prints them. Loading is strict: an unknown section or key, a wrong type or an invalid value raises
`ConfigError` with one line naming the key, the bad value and what is allowed (with a did-you-mean for
typos). Every check of a setting lives here, once: components are built from their own section
(`Checkpointer.from_config`, `trainer.data.build_data`, `StepPolicy.from_config`) and do not re-check what
`_validate` accepted; the argument checks that remain in them guard their programmatic APIs. Only the entry
point (`trainer/train.py`) sees a whole `RunConfig`.

This module needs only the standard library and PyYAML (no torch), so it stays cheap to import.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.validate import split_s3_uri

RECIPES_DIR = Path(__file__).parent / "recipes"
# The per-image augmentations the device-resident loader implements (trainer.data.memory.MEMORY_AUGMENTS;
# a test keeps the two equal): the imagenet ones crop variable-size images, which it does not hold.
MEMORY_AUGMENTS = ("none", "basic", "autoaugment")


class ConfigError(ValueError):
    """A user error in the configuration; the CLI prints it as one line and exits with status 2."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (plain YAML loaders silently keep the last value)."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys in a mapping (merge keys `<<` may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise DuplicateKeyError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"duplicate key {key!r} (first at line {first[key] + 1}); each key may appear once",
                            key_node.start_mark,
                        )
                    first[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
        return super().construct_mapping(node, deep)


class YAMLShapeError(yaml.MarkedYAMLError):
    """YAML that no config can be: a key that is not a string, nesting deeper than MAX_YAML_DEPTH, a bad date."""


# Configs nest 3 levels (section, key, list); model.kwargs may add a few. PyYAML's composer recurses once
# per level, so a deeply nested document ends in a RecursionError (a traceback) instead of a message.
MAX_YAML_DEPTH = 32
_OPENERS = (
    yaml.BlockMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.FlowSequenceStartToken,
)
_CLOSERS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _check_depth(text: str) -> None:
    """YAMLShapeError at the first collection nested deeper than MAX_YAML_DEPTH (the scanner is iterative)."""
    depth = 0
    for tok in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(tok, _OPENERS):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise YAMLShapeError(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=tok.start_mark)
        elif isinstance(tok, _CLOSERS):
            depth -= 1


def _check_nodes(root: yaml.Node) -> None:
    """YAMLShapeError at the first mapping key that is not a string (1, true, null, a list): every config key
    is a name, and one that is not would otherwise surface far from its line, or not at all. Also at a
    date-like value that is no date."""
    seen, todo = set(), [root]
    while todo:  # aliases make the node graph a DAG: visit each node once (no billion-laughs blow-up)
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                str_key = isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str"
                if not str_key and key.tag != "tag:yaml.org,2002:merge":
                    scalar = isinstance(key, yaml.ScalarNode)
                    shown, hint = (repr(key.value), f" (quote it: '{key.value}')") if scalar else (f"a {key.id}", "")
                    raise YAMLShapeError(
                        problem=f"key {shown} is not a string; expected a name{hint}", problem_mark=key.start_mark
                    )
                todo.append(value)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif node.tag == "tag:yaml.org,2002:timestamp":
            # 2024-13-45 matches YAML's date pattern, and constructing it raises a bare ValueError (no line)
            try:
                yaml.SafeLoader.construct_yaml_timestamp(_StrictLoader(""), node)
            except (ValueError, OverflowError) as e:
                raise YAMLShapeError(
                    problem=f"{node.value!r} is not a date ({e})", problem_mark=node.start_mark
                ) from None


def strict_yaml_load(text: str) -> Any:
    """yaml.safe_load that raises DuplicateKeyError (a yaml.YAMLError with problem_mark) for a key given twice,
    and YAMLShapeError (one too) for a key that is not a string, nesting deeper than MAX_YAML_DEPTH or a
    date-like value that is no date.

    The one YAML reader of recipes, `--set` values, saved run configs and k8s/render.py's job specs: the
    last of two values silently winning is how a typo'd recipe trains something nobody wrote down."""
    _check_depth(text)
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = ""
    """Required. loader=ffcv: the folder with train.beton, val.beton and meta.json written by `python -m trainer
    convert`. loader=memory: NAME:PATH of a raw dataset (fashion-mnist:/usr/share/datasets/fashion-mnist,
    cifar10:FILE.tar.gz, cifar100:FILE.tar.gz) or synthetic:HxW:CLASSES:N (random images, for benchmarks)."""
    loader: Literal["ffcv", "memory"] = "ffcv"
    """ffcv: FFCV pipelines decoding on the CPU (any dataset size). memory: the whole dataset as uint8 on the
    training device, augmented there (small datasets; no data-pipeline cost; works without FFCV installed)."""
    limit: int = 0
    """loader=memory only: keep the first N images of each split (like `convert --limit`); 0 = all."""
    label_noise: float = 0.0
    """loader=memory only: this fraction of the training labels is replaced by a different class, drawn
    uniformly (symmetric label noise; a fixed selection, the same for every seed and method; validation labels
    are clean). A standard test of memorization, where SAM-type methods are known to help most. 0 = clean."""
    holdout: float = 0.0
    """loader=memory only: this fraction of the training images (a fixed selection, the same for every seed and
    method; labels as noisy as the rest) is kept out of training and evaluated on instead of the validation
    split, which is then never read: select hyper-parameters with it, then report the selected ones with 0."""
    augment: Literal["none", "basic", "autoaugment", "imagenet", "randaugment"] = "basic"
    """Per-image train augmentation: none; basic = random flip + reflect-pad-4 random crop (CIFAR-like);
    autoaugment = the AutoAugment CIFAR policy, then basic; imagenet = random-resized-crop + flip (val: center
    crop 224/256); randaugment = imagenet + RandAugment(N=2, M=9) (the reference's ImageNet 'autoaugment')."""
    batch_augment: Literal["none", "cutout", "mixup", "mixcut", "cutmix"] = "none"
    """Batch-level augmentation on the batch's device: cutout = one batch_cutout square at the same place in
    every image of the batch (the reference); mixup = Beta(mixup_alpha) mix with the reversed batch;
    mixcut = mixup then cutout (the reference's 'mixcut', not CutMix); cutmix = per-sample CutMix (extension)."""
    batch_cutout: int = 16
    """Side of the square of the batch-level cutout and mixcut."""
    mixup_alpha: float = 1.0
    """Beta(a, a) parameter of mixup, mixcut and cutmix."""
    image_size: int = 0
    """Output side for the imagenet pipeline (e.g. 224); 0 = the dataset's stored size (fixed-size data)."""
    normalize: Literal["auto", "reference"] = "auto"
    """Per-channel mean/std the images are normalized with: auto = the statistics of the training images loaded
    (meta.json; the memory loader computes them after data.limit / data.holdout); reference = the reference
    code's fixed CIFAR-10 / CIFAR-100 constants (ds_pipeline/datasets/dataset_source.py:208-213), whatever subset
    is loaded (cifar10 and cifar100 only)."""
    cutout: int = 0
    """Side of a per-image cutout square applied after the crop; 0 disables it (the reference uses 16)."""
    label_smoothing: float = 0.0
    """Label smoothing in the cross-entropy: target = (1-ls)*onehot + ls/K (uniform over all K classes)."""
    num_workers: int = 2
    """FFCV decoding threads per process; explicit because FFCV's default counts the host's CPUs, not the pod's."""
    os_cache: bool = True
    """Let the OS page cache hold the .beton (True suits data that fits in RAM; False streams)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "resnet_debug"
    """Registered model name (`python -m trainer models` lists them)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model builder (e.g. {dropout: 0.3} or {stem: cifar})."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """Base optimizer wrapped by GNP: sgd (momentum/nesterov as below) or adamw (decoupled weight decay)."""
    lr: float = 0.1
    """Peak learning rate (the schedule scales it)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum (the reference's 'Momentum' optimizer)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay, theta <- theta - lr*weight_decay*theta at the base step, for sgd and adamw alike
    (AdamW style; the reference's Adam uses 0.3). It enters neither the momentum nor g1, the perturbation or g2;
    use `l2` for a term inside the loss."""
    l2: float = 0.0
    """L2 term 0.5*l2*sum(w^2) added to the loss, as the reference does (1e-3 CIFAR, 1e-4 ImageNet):
    it is part of g1, ||g1||, g2 and the clipped gradient."""
    no_weight_decay_on_bn: bool = False
    """Exempt every parameter with ndim <= 1 (all biases, BN/LN scales and shifts) from l2 and weight_decay."""
    clip_norm: float = 5.0
    """Global-norm clip of the final (synchronized) gradient before the base step; <= 0 disables it."""


@dataclass(frozen=True, kw_only=True)
class GNPConfig:
    r: float = 0.1
    """Finite-difference step: the gradient is also taken at theta + r*g1/||g1||. 0 = plain optimizer."""
    alpha: float = 0.8
    """Mixing weight: g = (1-alpha)*g1 + alpha*g2; penalty strength lambda = alpha*r. 1 = SAM, 0 = plain."""
    norm_perturbations: bool = False
    """False: the paper's (1-alpha)*g1 + alpha*g2. True: (1-alpha)*g1/||g1|| + alpha*g2, the reference code's
    default (set it explicitly in recipes ported from the reference)."""
    sync_perturbations: bool = False
    """False: each rank perturbs with its own g1 (m-sharpness, one all-reduce per step). True: all-reduce g1
    before perturbing (a second all-reduce per step)."""
    eps: float = 1e-12
    """Added to ||g1|| before dividing (the reference has none and produces NaN when g1 = 0)."""
    warmup: Literal["none", "r", "lambda", "zero"] = "none"
    """Gradient-regularization warmup over `warmup_epochs`: r ramps r from 0 (alpha fixed); lambda ramps alpha
    from 0 (r fixed); zero runs plain steps until the warmup ends; none disables it."""
    warmup_epochs: float = 0.0
    """Length of the GR warmup in epochs (separate from the LR warmup; the reference couples the two)."""
    hybrid_p: float = 1.0
    """Probability that a step is a GNP step (else plain); the draw depends on (seed, step) only, so every rank
    agrees. 1.0 = always GNP."""
    every: int = 1
    """Deterministic alternative to hybrid_p: a GNP step every k-th step (1 = every step)."""
    reuse: Literal["none", "looksam"] = "none"
    """Gradient reuse on the plain steps of hybrid_p / every: none = plain steps are the base optimizer's;
    looksam = keep the last full step's part of g2 orthogonal to g1, v = g2_perp/||g1||, and use
    g + alpha*reuse_weight*||g||*v on plain steps (after LookSAM; one extra buffer, one extra all-reduce per
    full step under DDP, nothing extra on plain steps)."""
    reuse_weight: float = 1.0
    """w >= 0 in g + alpha*w*||g||*v (1 replays the measured orthogonal part at the current gradient norm)."""
    m: int = 0
    """m-sharpness: examples per perturbation. Each rank's batch is cut into sub-batches of m examples, each with
    its own g1, perturbation and g2, and their mixed gradients are averaged, so the objective does not depend on
    the number of GPUs. 0 = the per-rank batch (one perturbation per rank). Must divide the per-rank batch."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    name: Literal["cosine", "constant", "step"] = "cosine"
    """LR schedule: cosine decay to 0 after a linear warmup; constant after warmup; step = multiply by gamma
    at each milestone."""
    warmup_epochs: float = 0.0
    """Linear LR warmup from 0 (the first update uses lr(0), which is base_lr when there is no warmup)."""
    milestones: tuple[float, ...] = ()
    """Epochs at which the step schedule multiplies the LR by gamma."""
    gamma: float = 0.1
    """Factor of the step schedule."""


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    epochs: int = 1
    """Number of training epochs."""
    batch_size: int = 128
    """Training batch size; see batch_size_mode."""
    batch_size_mode: Literal["global", "per_rank"] = "global"
    """global: batch_size is split over the ranks (must divide by the world size; the reference's meaning);
    per_rank: every rank takes batch_size."""
    eval_batch_size: int = 0
    """Per-rank evaluation batch size; 0 = the per-rank training batch size."""
    eval_every: int = 1
    """Evaluate on the full validation set every N epochs (and always after the last epoch); 0 = only at the end."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (smoke tests); 0 = no cap."""
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    """Autocast precision: auto = bf16 on CUDA and fp32 on CPU; fp16 uses a GradScaler; fp32 = PyTorch's defaults
    (fp32 matmuls, TF32 cuDNN convolutions on Ampere+); tf32 = fp32 tensors with TF32 matmuls and convolutions,
    what JAX's default precision runs on NVIDIA GPUs (the reference recipes use it; the same as fp32 on a CPU)."""
    sync_bn_buffers: bool = True
    """Under DDP, average every BatchNorm running_mean/running_var over the ranks (in place) before each
    evaluation and each checkpoint, as the reference does; False = each rank evaluates with its own buffers and
    checkpoints hold rank 0's."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    channels_last: bool = True
    """Use the channels_last memory format for the model and the batches (faster convolutions on GPUs, and
    on CPUs too: +17 % for demo_cnn, +86 % for resnet_debug on one thread here)."""
    seed: int = 0
    """Training seed: data order, augmentation, dropout, hybrid draws."""
    init_seed: int = -1
    """Seed of the weight initialization; -1 = use `seed`."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) for bitwise-reproducible runs (slower on GPU)."""
    log_every: int = 50
    """Steps between log lines / metrics.jsonl records (host syncs happen only then)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    uri: str = ""
    """Where checkpoints go: a local folder; empty = <run.dir>/checkpoints."""
    every_epochs: int = 1
    """Save every N epochs (and after the last); 0 = only after the last epoch."""
    every_steps: int = 0
    """Also save every N optimizer steps, mid-epoch (preemptible nodes); 0 disables it."""
    keep: int = 2
    """How many complete checkpoints to keep (>= 2: the newest may be in the middle of being written)."""
    s3_endpoint: str = ""
    """Endpoint URL of an S3-compatible store (MinIO, Ceph, SeaweedFS); empty = AWS (or $AWS_ENDPOINT_URL_S3)."""
    s3_region: str = ""
    """S3 region; empty = the AWS credential chain's default (or us-east-1)."""
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    """botocore retry mode for S3 requests."""
    s3_max_attempts: int = 5
    """botocore max attempts per S3 request (the background uploader also retries whole uploads)."""


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    jsonl: bool = True
    """Rank 0 appends every logged value to <run.dir>/metrics.jsonl."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Rank 0 progress display: auto = a tqdm bar on a terminal, plain periodic lines otherwise."""
    progress_every_s: float = 60.0
    """Rank 0 logs a `progress step=... percent=... eta_s=...` line at most this often and after every evaluation
    (what `make status` reads); 0 = never. The TrainJob status updates do not depend on it."""
    prometheus: bool = False
    """Every training process serves Prometheus metrics on port + LOCAL_RANK."""
    port: int = 9300
    """Base port of the Prometheus endpoints (rank r of a node listens on port + r)."""
    addr: str = "0.0.0.0"
    """Address the Prometheus endpoints bind to (127.0.0.1 in tests)."""
    job: str = ""
    """Value of the `job_name` label; empty = $GNP_JOB_NAME, else the recipe name."""


CRASH_RESTARTS_ENV = "GNP_CRASH_RESTARTS"


def crash_restarts_default() -> int:
    """run.crash_restarts' default: $GNP_CRASH_RESTARTS (the Kubernetes renderer sets it), else 3. Read when a
    config is made, not at import; a bad value is a ConfigError."""
    value = os.environ.get(CRASH_RESTARTS_ENV, "")
    if value and not value.strip().isdigit():
        raise ConfigError(f"{CRASH_RESTARTS_ENV}: invalid value {value!r}; expected an integer >= 0 (crash restarts)")
    return int(value) if value else 3


@dataclass(frozen=True, kw_only=True)
class RunSection:
    dir: str = ""
    """Run directory (config, metrics.jsonl, checkpoints); empty = runs/<recipe name>."""
    fresh: bool = False
    """Start from scratch even if the run directory holds checkpoints (they are moved aside, never deleted)."""
    crash_restarts: int = field(default_factory=crash_restarts_default)
    """Restarts allowed after crashes from the same checkpoint (trainer/crash_budget.py); then exit 3.
    Default $GNP_CRASH_RESTARTS, else 3."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    recipe: str = ""
    """Name of the recipe this config came from (informational)."""
    description: str = ""
    """One line on what the recipe trains (shown by `python -m trainer recipes`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and input pipeline."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Base optimizer and regularizers."""
    gnp: GNPConfig = field(default_factory=GNPConfig)
    """Gradient norm penalty."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Logging and metrics."""
    run: RunSection = field(default_factory=RunSection)
    """Run directory handling."""

    def __post_init__(self) -> None:
        _validate(self)
        _validate_limits(self)


# ---------------------------------------------------------------------------------------------------
# Semantic checks: everything a type cannot express. One line each, naming the key.


# Integers reach torch and numpy as C int64s: a larger one raises an OverflowError there, mid-run.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Seeds: numpy's legacy generators take at most 2**32 - 1, torch's DistributedSampler adds the epoch to it.
MAX_SEED = 2**32 - 1
# FFCV allocates batch x side x side x 3 buffers up front and starts num_workers threads per process: past
# these, a run fails (an overflow, an allocation of petabytes) or hangs after its config.yaml was written.
MAX_IMAGE_SIZE = 4096
MAX_WORKERS = 256
# Float settings where inf or nan means something. None does: an inf lr, r or clip_norm trains to NaN (or
# stops at the first step), after the run directory was written. A key added here skips the finite check.
NON_FINITE_OK: frozenset[str] = frozenset()


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r}; expected {allowed}")


def _validate(c: RunConfig) -> None:
    """Every section's ranges and the combinations the trainer refuses (one ConfigError naming the key)."""
    for check in (_validate_data, _validate_optim, _validate_gnp, _validate_loop, _validate_outputs):
        check(c)


def _validate_data(c: RunConfig) -> None:
    """The data section: sizes, fractions, and what each loader supports."""
    d = c.data
    _check(
        d.image_size == 0 or 8 <= d.image_size <= MAX_IMAGE_SIZE,
        "data.image_size",
        d.image_size,
        f"0 (the stored size) or an integer in 8..{MAX_IMAGE_SIZE}",
    )
    _check(d.limit >= 0, "data.limit", d.limit, "an integer >= 0 (0 = all images)")
    _check(
        d.loader == "memory" or d.limit == 0,
        "data.limit",
        d.limit,
        "0 with data.loader=ffcv (convert with --limit instead)",
    )
    _check(0 <= d.label_noise < 1, "data.label_noise", d.label_noise, "a fraction in [0, 1)")
    _check(0 <= d.holdout < 1, "data.holdout", d.holdout, "a fraction in [0, 1)")
    _check(
        d.loader == "memory" or d.holdout == 0,
        "data.holdout",
        d.holdout,
        "0 with data.loader=ffcv (the held-out split is a memory-loader option)",
    )
    _check(
        d.loader == "memory" or d.label_noise == 0,
        "data.label_noise",
        d.label_noise,
        "0 with data.loader=ffcv (label noise is a memory-loader option)",
    )
    _check(
        d.loader == "ffcv" or d.image_size == 0,
        "data.image_size",
        d.image_size,
        "0 with data.loader=memory (images keep their stored size)",
    )
    _check(
        d.loader == "ffcv" or d.augment in MEMORY_AUGMENTS,
        "data.augment",
        d.augment,
        f"one of {', '.join(map(repr, MEMORY_AUGMENTS))} with data.loader=memory (the others need data.loader=ffcv)",
    )
    _check(d.cutout >= 0, "data.cutout", d.cutout, "an integer >= 0")
    _check(0.0 <= d.label_smoothing < 1.0, "data.label_smoothing", d.label_smoothing, "a number in [0, 1)")
    _check(1 <= d.num_workers <= MAX_WORKERS, "data.num_workers", d.num_workers, f"an integer in 1..{MAX_WORKERS}")
    _check(d.batch_cutout >= 1, "data.batch_cutout", d.batch_cutout, "an integer >= 1")
    _check(d.mixup_alpha > 0, "data.mixup_alpha", d.mixup_alpha, "a number > 0")


def _validate_optim(c: RunConfig) -> None:
    """The base optimizer and its regularizers."""
    o = c.optim
    _check(o.lr >= 0, "optim.lr", o.lr, "a number >= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "a number in [0, 1)")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two numbers in [0, 1)")
    _check(o.adam_eps > 0, "optim.adam_eps", o.adam_eps, "a number > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(o.l2 >= 0, "optim.l2", o.l2, "a number >= 0")
    _check(
        not (o.nesterov and o.name == "sgd" and o.momentum == 0),
        "optim.nesterov",
        o.nesterov,
        "false when optim.momentum is 0 (Nesterov needs momentum)",
    )


def _validate_gnp(c: RunConfig) -> None:
    """GNP: r, alpha, the m-sharpness sub-batches, warmup and the hybrid modes."""
    g = c.gnp
    _check(
        g.reuse_weight >= 0 and math.isfinite(g.reuse_weight),
        "gnp.reuse_weight",
        g.reuse_weight,
        "a finite number >= 0",
    )
    _check(g.r >= 0, "gnp.r", g.r, "a number >= 0 (0 = plain optimizer)")
    _check(g.alpha >= 0, "gnp.alpha", g.alpha, "a number >= 0 (1 = SAM; > 1 is allowed)")
    _check(g.eps > 0, "gnp.eps", g.eps, "a number > 0")
    _check(g.warmup_epochs >= 0, "gnp.warmup_epochs", g.warmup_epochs, "a number >= 0")
    _check(g.m >= 0, "gnp.m", g.m, "an integer >= 0 (0 = the per-rank batch)")
    _check(
        g.m == 0 or g.reuse == "none",
        "gnp.m",
        g.m,
        "0 with gnp.reuse=looksam (reuse stores one g1 per step, sub-batches have several)",
    )
    # issue 31: with sync_perturbations each sub-batch's g1 would be averaged over the ranks, so one perturbation
    # would cover m x world examples and gnp.m would again depend on the GPU count
    _check(
        g.m == 0 or not g.sync_perturbations,
        "gnp.m",
        g.m,
        "0 with gnp.sync_perturbations=true (g1 averaged over the ranks: one perturbation per m x world examples)",
    )
    _check(
        not (g.warmup != "none" and g.warmup_epochs == 0),
        "gnp.warmup_epochs",
        g.warmup_epochs,
        f"> 0 when gnp.warmup is {g.warmup!r}",
    )
    # The reference silently never takes a GNP step with hybrid on and p = 0 (its bug #9): refuse it.
    _check(0 < g.hybrid_p <= 1, "gnp.hybrid_p", g.hybrid_p, "a probability in (0, 1] (set gnp.r=0 for plain training)")
    _check(g.every >= 1, "gnp.every", g.every, "an integer >= 1")
    _check(not (g.every > 1 and g.hybrid_p < 1), "gnp.every", g.every, "1 when gnp.hybrid_p < 1 (pick one hybrid mode)")


def _validate_loop(c: RunConfig) -> None:
    """The learning-rate schedule and the loop's counts."""
    s, lp = c.schedule, c.loop
    _check(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, "a number >= 0")
    _check(
        list(s.milestones) == sorted(s.milestones) and all(m > 0 for m in s.milestones),
        "schedule.milestones",
        list(s.milestones),
        "increasing positive epochs",
    )
    _check(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "a number in (0, 1]")
    _check(lp.epochs >= 1, "loop.epochs", lp.epochs, "an integer >= 1")
    _check(s.warmup_epochs <= lp.epochs, "schedule.warmup_epochs", s.warmup_epochs, f"<= loop.epochs ({lp.epochs})")
    _check(lp.batch_size >= 1, "loop.batch_size", lp.batch_size, "an integer >= 1")
    _check(lp.eval_batch_size >= 0, "loop.eval_batch_size", lp.eval_batch_size, "an integer >= 0")
    _check(lp.eval_every >= 0, "loop.eval_every", lp.eval_every, "an integer >= 0")
    _check(lp.max_steps >= 0, "loop.max_steps", lp.max_steps, "an integer >= 0")
    _check(lp.log_every >= 1, "loop.log_every", lp.log_every, "an integer >= 1")


def _validate_outputs(c: RunConfig) -> None:
    """Checkpoints, the run and metrics."""
    ck = c.checkpoint
    _check(ck.every_epochs >= 0, "checkpoint.every_epochs", ck.every_epochs, "an integer >= 0")
    _check(ck.keep >= 2, "checkpoint.keep", ck.keep, "an integer >= 2 (the newest may still be in flight)")
    _check(
        "://" not in ck.uri or (ck.uri.startswith("s3://") and len(ck.uri) > 5),
        "checkpoint.uri",
        ck.uri,
        "a local folder or s3://bucket/prefix",
    )
    _check(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, "an integer >= 0")
    _check(ck.s3_max_attempts >= 1, "checkpoint.s3_max_attempts", ck.s3_max_attempts, "an integer >= 1")
    _check(c.run.crash_restarts >= 0, "run.crash_restarts", c.run.crash_restarts, "an integer >= 0")
    _check(1 <= c.metrics.port <= 65535 - 64, "metrics.port", c.metrics.port, "a TCP port in 1..65471")
    _check(
        math.isfinite(c.metrics.progress_every_s) and c.metrics.progress_every_s >= 0,
        "metrics.progress_every_s",
        c.metrics.progress_every_s,
        "a finite number of seconds >= 0 (0 = no progress lines)",
    )


def _validate_limits(c: RunConfig) -> None:
    """Values a type allows but torch, numpy or S3 refuse at run time, where a refusal comes too late."""
    lp, ck = c.loop, c.checkpoint
    if ck.uri.startswith("s3://"):  # a name the server refuses would be retried as an outage (exit 200)
        _check(not (why := split_s3_uri(ck.uri)[2]), "checkpoint.uri", ck.uri, f"s3://bucket/prefix ({why})")
    _check(0 <= lp.seed <= MAX_SEED, "loop.seed", lp.seed, f"an integer in 0..{MAX_SEED}")
    _check(-1 <= lp.init_seed <= MAX_SEED, "loop.init_seed", lp.init_seed, f"-1 (= loop.seed) or 0..{MAX_SEED}")


# ---------------------------------------------------------------------------------------------------
# Generic strict conversion of plain data (YAML) into the dataclasses above.


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple,):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`. No silent lossy casts."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: invalid value {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: invalid value {value!r}; expected {_type_name(tp)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        for name, item in value.items():  # model options reach torch as they are: the same limits apply
            if isinstance(item, (int, float, str)) and not isinstance(item, bool):
                _coerce(f"{key}.{name}", item, type(item))
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        _check(INT64_MIN <= value <= INT64_MAX, key, value, "an integer that fits in 64 bits (|value| < 2**63)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            raise bad from None
        _check(math.isfinite(value) or key.split("[")[0] in NON_FINITE_OK, key, value, "a finite number")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        # No setting can hold a NUL: as a path it makes every file-system call raise, mid-run.
        _check("\x00" not in value, key, value, "a string without NUL characters")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a programming error, not a user one


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, strictly."""
    fields, hints, kwargs = _fields(cls), _hints(cls), {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key; {_did_you_mean(name, list(fields))}allowed: {', '.join(fields)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(_fields(tp))}, got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON-safe: tuples become lists) of a config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs" else v
    return out


# ---------------------------------------------------------------------------------------------------
# Recipes and overrides.


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description, for every YAML file in trainer/recipes/."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = strict_yaml_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", ""))
    return out


def read_recipe(name_or_path: str) -> tuple[str, dict]:
    """Return (recipe name, raw dict) for a recipe name in trainer/recipes/ or a path to a YAML file."""
    path = Path(name_or_path)
    # A name has no '/'; anything that looks like a path is read as one, so a folder or a broken link given
    # as --recipe is reported as such rather than as an unknown recipe name.
    looks_like_path = "/" in name_or_path or path.exists() or path.is_symlink()
    if not (name_or_path.endswith((".yaml", ".yml")) or looks_like_path):
        names = list(list_recipes())
        if name_or_path not in names:
            raise ConfigError(
                f"--recipe: unknown recipe {name_or_path!r}; {_did_you_mean(name_or_path, names)}"
                f"available: {', '.join(names)} (or a path to a .yaml file)"
            )
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    text = read_text_file(path, "--recipe")
    try:
        data = strict_yaml_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        if isinstance(e, YAMLShapeError):
            raise ConfigError(f"--recipe: {str(path)!r}{where}: {problem}") from None
        raise ConfigError(
            f"--recipe: {str(path)!r}{where} is not valid YAML: {problem}; expected a mapping of sections"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--recipe: {str(path)!r} line {_first_content_line(text)} must hold a mapping of sections "
            f"(data:, model:, ...), got a {type(data).__name__}"
        )
    return path.stem, data


def _first_content_line(text: str) -> int:
    """Line number (1-based) of the first line that is not blank, a comment or a directive: where a
    document's top-level value starts."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith(("#", "%", "---")):
            return number
    return 1


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of file `path`, or ConfigError naming `what` and the file: missing, a broken link, a
    folder or FIFO (reading a FIFO would block forever), unreadable, or bytes that are not UTF-8 (with the line)."""
    name = str(path)
    if not path.exists():
        kind = "is a broken symbolic link" if path.is_symlink() else "does not exist"
        raise ConfigError(f"{what}: file {name!r} {kind}; expected a YAML file")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise ConfigError(f"{what}: {name!r} is {kind}; expected a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{what}: {name!r} cannot be read ({e.strerror or e}); expected a readable YAML file"
        ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{what}: {name!r} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); expected a UTF-8 YAML file"
        ) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as YAML, so 0.1, true, [1, 2] get their types)."""
    if "=" not in text:
        raise ConfigError(f"--set: {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: {text!r} has an empty key part")
    try:
        value = strict_yaml_load(raw) if raw.strip() else ""
    except (DuplicateKeyError, YAMLShapeError) as e:
        raise ConfigError(f"--set: {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw  # treat unparsable YAML as a plain string; type checking will complain if needed
    return parts, value


def load(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults < recipe YAML < overrides ('a.b=c'), strictly validated."""
    name, data = read_recipe(recipe)
    data = dict(data)
    data.setdefault("recipe", name)
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        data = _deep_merge(data, nested)
    return from_dict(data)


def from_dict(data: dict) -> RunConfig:
    """Build a RunConfig from a plain dict (e.g. a saved config.yaml), strictly."""
    return _build(RunConfig, data)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, docstring) for every field, from the attribute docstrings in this file."""
    docs = field_docs(cls)
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
    return rows


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after an annotated field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def sections() -> list[type]:
    """Every config dataclass (for tests that check docstrings)."""
    return [
        RunConfig,
        DataConfig,
        ModelConfig,
        OptimConfig,
        GNPConfig,
        ScheduleConfig,
        LoopConfig,
        CheckpointConfig,
        MetricsConfig,
        RunSection,
    ]


__all__ = [
    "ConfigError",
    "RunConfig",
    "load",
    "from_dict",
    "to_dict",
    "list_recipes",
    "read_recipe",
    "describe",
    "field_docs",
    "sections",
]


# ---------------------------------------------------------------------------------------------------
# What may change when a run resumes (the run directory's and the checkpoint location's identity checks).

# Keys that may differ between the config saved in a run directory and the one resuming it: they change
# how a run is observed or fed, not what it computes.
RESUMABLE_CHANGES = (
    "git_commit",
    "recipe",
    "description",
    "run.fresh",
    "run.crash_restarts",
    "run.dir",
    "data.path",
    "data.num_workers",
    "data.os_cache",
    "loop.max_steps",
    "loop.log_every",
    "loop.eval_every",
    "metrics.",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every key that differs, ignoring RESUMABLE_CHANGES.

    A key the saved config does not have is a setting added after the run was made: the run resumes with its
    current value (an upgrade must not strand a run directory; the checkpoint format is unchanged).
    """
    a, b = _flat(saved), _flat(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
            continue
        if key not in a:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs
