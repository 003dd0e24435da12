"""The training loop: one epoch of GNP steps, and evaluation over the whole validation set.

Components arrive as plain objects: the DDP-wrapped model, the GNP optimizer, the loaders, a `StepPolicy`
with every per-step number (built from its config sections by `StepPolicy.from_config`), and a `Sink` for log
records, grouped for `train_epoch` in one `TrainContext`.
Host syncs (`.item()`) happen only on log steps: GNP already pays for two backward passes, and a per-step
sync would stall the GPU's queue as well.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F

from trainer.config import ConfigError, GNPConfig, LoopConfig, OptimConfig, ScheduleConfig
from trainer.data.augment import soft_target_cross_entropy
from trainer.dist import DistEnv, all_reduce_sum
from trainer.optim.gnp import GNP, StepInfo
from trainer.optim.schedules import gr_warmup, is_gnp_step, learning_rate


class Sink(Protocol):
    """Where log records go (metrics.jsonl, progress display, ...); see trainer.metrics."""

    def log(self, kind: str, record: dict) -> None: ...

    def progress(self, done: int, total: int, epoch: int) -> None: ...


@dataclass(frozen=True)
class StepPolicy:
    """Everything that changes from step to step, as pure functions of the global step and epoch."""

    base_lr: float
    lr_kind: str
    lr_warmup_steps: int
    total_steps: int
    lr_milestones: tuple[int, ...]
    lr_gamma: float
    r: float
    alpha: float
    gr_strategy: str
    gr_warmup_steps: int
    gr_warmup_epochs: float
    hybrid_p: float
    gnp_every: int
    seed: int

    @classmethod
    def from_config(
        cls,
        schedule: ScheduleConfig,
        gnp: GNPConfig,
        loop: LoopConfig,
        optim: OptimConfig,
        steps_per_epoch: int,
    ) -> StepPolicy:
        """The policy of a run: epochs in the config become steps here (rounded to the nearest step)."""
        spe = steps_per_epoch
        return cls(
            base_lr=optim.lr,
            lr_kind=schedule.name,
            lr_warmup_steps=round(schedule.warmup_epochs * spe),
            total_steps=loop.epochs * spe,
            lr_milestones=tuple(round(m * spe) for m in schedule.milestones),
            lr_gamma=schedule.gamma,
            r=gnp.r,
            alpha=gnp.alpha,
            gr_strategy=gnp.warmup,
            gr_warmup_steps=round(gnp.warmup_epochs * spe),
            gr_warmup_epochs=gnp.warmup_epochs,
            hybrid_p=gnp.hybrid_p,
            gnp_every=gnp.every,
            seed=loop.seed,
        )

    def apply(self, opt: torch.optim.Optimizer, step: int, epoch: int) -> bool:
        """Write lr, r and alpha for `step` into every param group; return the hybrid schedule's draw.

        The param groups are the one place r and alpha live during a step: GNP reads them there and runs a plain
        step when they are 0 (zero warmup, r = 0), so the draw alone is returned rather than a second decision
        from this policy's own copy of r and alpha."""
        lr = learning_rate(
            step,
            base_lr=self.base_lr,
            kind=self.lr_kind,
            warmup_steps=self.lr_warmup_steps,
            total_steps=self.total_steps,
            milestones=self.lr_milestones,
            gamma=self.lr_gamma,
        )
        r, alpha = gr_warmup(
            step,
            epoch,
            r=self.r,
            alpha=self.alpha,
            strategy=self.gr_strategy,
            warmup_steps=self.gr_warmup_steps,
            warmup_epochs=self.gr_warmup_epochs,
        )
        for group in opt.param_groups:
            group["lr"], group["r"], group["alpha"] = lr, r, alpha
        return is_gnp_step(step, seed=self.seed, p=self.hybrid_p, every=self.gnp_every)


@dataclass
class LoopState:
    """Progress counters saved in checkpoints: where the run is, down to the batch within the epoch."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch completed (the data-loader position)
    step: int = 0  # optimizer steps taken (GNP and plain)
    gnp_steps: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "gnp_steps": self.gnp_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.batch = int(sd["epoch"]), int(sd.get("batch", 0))
        self.step, self.gnp_steps = int(sd["step"]), int(sd["gnp_steps"])


BatchAugmentFn = Callable[[torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class LossSpec:
    """How the training loss is formed: CE with label smoothing (or soft targets from a batch augmentation)
    plus the reference's L2 term."""

    label_smoothing: float = 0.0
    l2: float = 0.0
    l2_params: tuple[torch.nn.Parameter, ...] = field(default=())
    batch_augment: BatchAugmentFn | None = None  # (images, labels, step) -> (images, soft targets)


def l2_term(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum(w^2) over `params`, differentiable (no norm: its gradient is NaN for an all-zero tensor)."""
    return torch.stack([p.float().pow(2).sum() for p in params]).sum()


def gnp_sub_batches(m: int, per_rank_batch: int) -> int:
    """How many perturbations a rank makes per GNP step for gnp.m = m (0 = the per-rank batch: one)."""
    if m == 0 or m == per_rank_batch:
        return 1
    if m < 0 or per_rank_batch % m:
        raise ConfigError(
            f"gnp.m: invalid value {m}; expected 0 (the per-rank batch) or a divisor of the per-rank batch "
            f"({per_rank_batch})"
        )
    return per_rank_batch // m


def set_float32_math(precision: str) -> None:
    """Process-wide fp32 math for `precision` (loop.precision): tf32 lets cuBLAS matmuls and cuDNN convolutions
    round their fp32 inputs to TF32 on Ampere and newer GPUs, as JAX does by default there (its DEFAULT
    precision: https://docs.jax.dev/en/latest/_autosummary/jax.default_matmul_precision.html); every other value
    keeps PyTorch's defaults (fp32 matmuls, TF32 cuDNN convolutions). Older GPUs and CPUs ignore both flags."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = True


def bn_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """running_mean and running_var of every BatchNorm/InstanceNorm layer that tracks running statistics."""
    out = []
    for mod in module.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            out += [b for b in (mod.running_mean, mod.running_var) if b is not None]
    return out


@torch.no_grad()
def average_bn_buffers(module: torch.nn.Module, env: DistEnv) -> int:
    """Replace every rank's BatchNorm running_mean/running_var by their mean over the ranks, in place.

    A COLLECTIVE under DDP (every rank calls it; a no-op on one process). DDP trains with each rank's batch
    statistics, so the ranks' running buffers drift apart; the reference averages them across devices before
    evaluating and before saving (zhaoyang-0204/gnp@e803362 training/training_core.py:255 and
    training/utli.py:79). One all-reduce of a flat fp64 copy; num_batches_tracked is equal on every rank and is
    left alone. Returns the number of buffers averaged.
    """
    bufs = bn_buffers(module)
    if not env.distributed or not bufs:
        return 0
    flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
    all_reduce_sum(flat, env)
    flat /= env.world_size
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    return len(bufs)


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for `dtype`, or a no-op for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class TrainContext:
    """What stays fixed over a run's epochs: the model, optimizer, step policy, loss, precision and limits.

    clip_norm: global-norm clip of the final gradient (<= 0 disables it); max_steps: stop after this many
    steps in total (0 = no cap); log_every: steps between train records (the only host syncs); sub_batches:
    GNP steps cut the rank's batch into this many equal sub-batches, each perturbed on its own (gnp.m).
    """

    model: torch.nn.Module
    opt: GNP
    env: DistEnv
    policy: StepPolicy
    loss_spec: LossSpec
    sink: Sink
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_norm: float = 0.0
    max_steps: int = 0
    log_every: int = 1
    sub_batches: int = 1  # gnp.m: perturbations per rank per GNP step (per-rank batch / m); 1 = one per rank


@dataclass
class _Window:
    """Throughput of the steps between two train records. Windows tile the epoch's wall time: one ends, and the
    next begins, when a record is made, so logging (and any checkpoint after the step) counts in the next."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    data_s: float = 0.0  # waiting for the loader
    step_times: list[float] = field(default_factory=list)  # host wall time per step (paced by the device queue)
    skipped: torch.Tensor | None = None  # fp16 GradScaler: steps skipped, summed on the device (no host sync)

    def add_step(self, info: StepInfo, images: int, step_s: float) -> None:
        if info.skipped is not None:
            self.skipped = info.skipped.int() if self.skipped is None else self.skipped + info.skipped.int()
        self.images += images
        self.step_times.append(step_s)

    def close(self, record: dict, world_size: int) -> "_Window":
        """Add this window's numbers to ``record``; return the window that begins now."""
        now = time.perf_counter()
        elapsed = now - self.start
        record.update(
            images_per_s=self.images * world_size / max(elapsed, 1e-9),
            window_s=elapsed,
            data_wait_s=self.data_s,
            window_steps=len(self.step_times),
            window_images=self.images,
            step_times_s=self.step_times,
        )
        if self.skipped is not None:
            record["window_skipped_steps"] = int(self.skipped.item())
        return _Window(start=now)


def _loss_fn(
    ctx: TrainContext, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None, ce_seen: list
) -> Callable[..., torch.Tensor]:
    """The loss of one batch for GNP.train_step: ``loss_fn()`` on the whole batch, ``loss_fn(part)`` on sub-batch
    `part`; appends each pass's cross-entropy (without the L2 term) to ``ce_seen`` for logging."""
    model, env, loss_spec = ctx.model, ctx.env, ctx.loss_spec

    def loss_fn(
        part: int | None = None,
        images: torch.Tensor = images,
        labels: torch.Tensor = labels,
        targets: torch.Tensor | None = targets,
    ) -> torch.Tensor:
        if part is not None:  # sub-batch `part` of ctx.sub_batches equal ones (GNP.train_step(sub_batches=...))
            m = images.shape[0] // ctx.sub_batches
            images, labels = images[part * m : (part + 1) * m], labels[part * m : (part + 1) * m]
            targets = None if targets is None else targets[part * m : (part + 1) * m]
        with autocast_for(env.device, ctx.amp_dtype):
            logits = model(images)
        if targets is None:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=loss_spec.label_smoothing)
        else:  # soft targets (mixup/cutmix; label smoothing already folded in)
            loss = soft_target_cross_entropy(logits, targets)
        ce_seen.append(loss.detach())
        if loss_spec.l2 > 0:
            # In the loss (not added to .grad afterwards) so DDP averages it with the rest: pass 2's
            # L2 gradient l2*(theta+eps_k) differs per rank when perturbations are per rank.
            loss = loss + 0.5 * loss_spec.l2 * l2_term(loss_spec.l2_params)
        return loss

    return loss_fn


def _train_step(
    ctx: TrainContext, images: torch.Tensor, labels: torch.Tensor, step: int, epoch: int
) -> tuple[StepInfo, list[torch.Tensor], int]:
    """One optimizer step on a batch: schedules, batch augmentation, GNP (or plain) step.

    Returns the step's info, the cross-entropy of each pass and the number of images trained on.
    """
    use_gnp = ctx.policy.apply(ctx.opt, step, epoch)
    targets = None
    if ctx.loss_spec.batch_augment is not None:
        images, targets = ctx.loss_spec.batch_augment(images, labels, step)
    ce_seen: list[torch.Tensor] = []  # the cross-entropy of each pass, without the L2 term, for logging
    info = ctx.opt.train_step(
        _loss_fn(ctx, images, labels, targets, ce_seen),
        model=ctx.model,
        gnp=use_gnp,
        scaler=ctx.scaler,
        clip_norm=ctx.clip_norm,
        sub_batches=ctx.sub_batches,
    )
    return info, ce_seen, images.shape[0]


def train_epoch(ctx: TrainContext, loader, state: LoopState, after_step: Callable[[], None] | None = None) -> bool:
    """Run the rest of the current epoch (from batch `state.batch`) or until `ctx.max_steps`.

    Returns False when max_steps stopped it early. `after_step` runs after every step (mid-epoch
    checkpoints). Resuming mid-epoch skips the batches already trained on: the loader's order is a function
    of (seed, epoch), so the skipped batches are exactly those.
    """
    ctx.model.train()
    epoch, total, skip = state.epoch, len(loader), state.batch
    window = _Window()
    fetch_start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        if i < skip:  # decoded and dropped: only on the first epoch after a mid-epoch resume
            fetch_start = time.perf_counter()
            continue
        step_start = time.perf_counter()
        window.data_s += step_start - fetch_start
        if ctx.max_steps and state.step >= ctx.max_steps:
            return False
        info, ce_seen, batch_images = _train_step(ctx, images, labels, state.step, epoch)
        state.step += 1
        state.batch = i + 1
        state.gnp_steps += int(info.gnp)
        window.add_step(info, batch_images, time.perf_counter() - step_start)
        if state.step % ctx.log_every == 0 or i + 1 == total:
            # The only host sync of the step loop: turn the detached tensors into floats.
            record = _train_record(info, ce_seen, ctx.opt, state, epoch, i + 1, total)
            window = window.close(record, ctx.env.world_size)
            ctx.sink.log("train", record)
        ctx.sink.progress(i + 1, total, epoch)
        if after_step is not None:
            after_step()
        fetch_start = time.perf_counter()
    return True


def _train_record(
    info: StepInfo, ce_seen: list[torch.Tensor], opt: GNP, state: LoopState, epoch: int, batch: int, total: int
) -> dict:
    """One log record. `loss` is the pass-1 cross-entropy at theta (the reference logs the perturbed one);
    `objective` adds the L2 term; `loss_perturbed` is the cross-entropy at theta + eps."""
    group = opt.param_groups[0]
    # ce_seen holds pass 1, pass 2 of each sub-batch in turn (gnp.m); one entry per pass without sub-batches
    ce1 = ce_seen[0] if len(ce_seen) <= 2 else torch.stack(ce_seen[0::2]).mean()
    rec = {
        "step": state.step,
        "epoch": epoch + batch / total,
        "loss": ce1.item(),
        "objective": info.loss.item(),
        "grad_norm": info.grad_norm.item(),
        "lr": group["lr"],
        "r": group["r"],
        "alpha": group["alpha"],
        "gnp": info.gnp,
        "gnp_steps": state.gnp_steps,
    }
    if info.loss_perturbed is not None and len(ce_seen) > 1:
        rec["loss_perturbed"] = (ce_seen[1] if len(ce_seen) == 2 else torch.stack(ce_seen[1::2]).mean()).item()
        rec["sharpness"] = rec["loss_perturbed"] - rec["loss"]  # L(theta+eps) - L(theta), cross-entropy only
    if info.g1_norm is not None:
        rec["g1_norm"] = info.g1_norm.item()
    if info.skipped is not None:
        rec["skipped"] = bool(info.skipped.item())
    return rec


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader, env: DistEnv, amp_dtype: torch.dtype | None) -> dict:
    """Loss, top-1 and top-5 accuracy/error over the validation set, summed exactly across ranks.

    Runs the unwrapped module: a DDP forward would broadcast buffers, a collective, and ranks may hold
    different numbers of eval batches (every image is evaluated exactly once, so shards differ by one).
    """
    was_training = module.training
    module.eval()
    # float64 sums: exact counts for any realistic dataset size
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss_sum, top1, top5, n
    for images, labels in loader:
        with autocast_for(env.device, amp_dtype):
            logits = module(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        sums[3] += labels.shape[0]
    all_reduce_sum(sums, env)
    module.train(was_training)
    loss_sum, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {
        "eval_loss": loss_sum / n,
        "top1": top1 / n,
        "top5": top5 / n,
        "top1_error": 1 - top1 / n,
        "top5_error": 1 - top5 / n,
        "images": int(sums[3].item()),
    }


def measure_sharpness(
    module: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    r: float,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Train loss, gradient norm and sharpness of a trained model, averaged over `batches`.

    For each batch b, with g_b = grad L_b(theta) (plain cross-entropy, no label smoothing or L2):
        loss = L_b(theta),  g1_norm = ||g_b||,  sharpness = L_b(theta + r*g_b/||g_b||) - L_b(theta)
    (the quantities GNP logs during training, but measured identically for every method, including plain
    SGD which never computes them). The model is in eval mode: BatchNorm uses its running statistics, so the
    numbers are a deterministic function of the weights and the batches. Parameters are restored exactly.
    """
    was_training = module.training
    module.eval()
    params = [p for p in module.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "g1_norm": 0.0, "sharpness": 0.0}
    n_batches = n_images = 0
    device = params[0].device

    def ce(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, amp_dtype):
            logits = module(images)
        # at least fp32 (autocast may give bf16), never below the model's own precision
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)

    try:
        for images, labels in batches:
            loss = ce(images, labels)
            grads = torch.autograd.grad(loss, params)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                scale = r / (norm + 1e-12)
                for p, g in zip(params, grads):
                    p.add_(g, alpha=float(scale))
                perturbed = ce(images, labels)
                for p, s in zip(params, saved):
                    p.copy_(s)
            sums["loss"] += loss.item()
            sums["g1_norm"] += norm.item()
            sums["sharpness"] += perturbed.item() - loss.item()
            n_batches += 1
            n_images += labels.shape[0]
    finally:
        module.train(was_training)
    if not n_batches:
        raise ValueError("measure: no batches; expected at least one training batch")
    return {**{k: v / n_batches for k, v in sums.items()}, "batches": n_batches, "images": n_images, "r": r}
