"""GNP: gradient-norm penalty as a wrapper around any torch optimizer.

Zhao, Zhang, Hu, "Penalizing Gradient Norm for Efficiently Improving Generalization in Deep
Learning", ICML 2022 (arXiv 2202.03599). The objective and its exact gradient (H = Hessian of L_S)::

    L(θ)  = L_S(θ) + λ·‖∇L_S(θ)‖₂                     λ = α·r
    ∇L(θ) = ∇L_S(θ) + λ·H·∇L_S(θ)/‖∇L_S(θ)‖

A GNP step replaces the Hessian-vector product by a finite difference (paper §3.3)::

    g1 = ∇L_S(θ)                                       pass 1
    ε  = r · g1 / (‖g1‖ + eps)                         ONE global L2 norm over every parameter that
                                                       has a gradient, accumulated in fp32 (fp64 for
                                                       fp64 gradients); r may differ per param_group
    g2 = ∇L_S(θ + ε)                                   pass 2; θ is then restored bitwise (copy_)
    g  = (1 − α)·g1               + α·g2               norm_perturbations=False (the paper; default)
    g  = (1 − α)·g1/(‖g1‖ + eps)  + α·g2               norm_perturbations=True (reference JAX default)
    base_optimizer.step() with g

α = 1 is SAM with ρ = r; α = 0, or r = 0, is a plain step (one pass, bitwise the base optimizer's
step). α > 1 is legal (the limit r → 0 at fixed λ needs α = λ/r → ∞). ``eps`` (default 1e-12) is a
deliberate deviation from the reference, which divides by ‖g1‖ and returns NaN when g1 = 0.

Distributed (DDP): pass 1 runs under ``no_sync()`` (forward AND backward, since DDP decides at forward
time whether the backward all-reduces), so every rank perturbs with its own g1 (the reference's
default, m-sharpness with m = per-rank batch). ``.grad`` is then scaled in place by (1 − α) (or
(1 − α)/(‖g1‖+eps)) and pass 2 backpropagates α·L_S(θ+ε) with synchronisation on, so DDP's single
all-reduce averages ``c·g1_k + α·g2_k`` over ranks: one all-reduce per GNP step, the same traffic as
an SGD step. ``sync_perturbations=True`` runs pass 1 synchronised too (g1 averaged before the norm,
as the reference's option): a second all-reduce per step. ``train_step(sub_batches=k)`` fixes m
independently of the number of ranks: each rank's batch is cut into k sub-batches, each with its own g1, ε
and g2, and the mean of their mixed gradients is all-reduced once (by the last sub-batch's pass 2). Its
BatchNorm running statistics are the mean of the k sub-batches' pass-1 updates, one step counted
(``_BatchNormMean``): what k ranks end with once their buffers are averaged (loop.sync_bn_buffers).
``sync_perturbations`` is refused with sub-batches (g1 averaged over ranks: m × world examples per ε).

Pass 2 sees the same randomness as pass 1 (CPU and CUDA RNG state restored), leaves BatchNorm
running statistics (running_mean/var and num_batches_tracked) untouched, and modules with a
``true_gradient`` attribute (Shake-Shake/ShakeDrop) get ``True`` in pass 1 and ``False`` in pass 2
and in plain steps (each pass puts back the value it found).

Two entry points:

* ``step(closure)`` — the torch-style contract; the closure runs forward + loss + ``backward()``
  and returns the loss. Module settings per pass (no_sync, BatchNorm freeze, ``true_gradient``)
  are applied through a global forward pre-hook to every module the closure calls. fp16
  ``GradScaler`` is not supported here (the closure owns the backward); use ``train_step``.
* ``train_step(loss_fn, model=...)`` — what the training loop calls: ``loss_fn()`` returns the loss
  without calling backward, so the passes can be weighted and scaled; supports GradScaler,
  clipping of the final gradient, and returns a ``StepInfo`` of detached device tensors without a
  host synchronisation.

Both entry points, and the m-sharpness step (k perturbations), run every perturbation through ONE routine,
``GNP._perturbation``: pass 1 → perturb → pass 2 → restore θ → mix → (after the step's last backward) unscale →
reuse store. r and α have one source of truth, the param_groups (schedules write them there, like ``lr``); a
step reads them once at its start (``_Hyper``) and passes them to each of those named steps.

Per-pass module settings (no_sync, BatchNorm freeze, RNG, ``true_gradient``) are one context manager,
``trainer.optim.passes.pass_policy``, used by both entry points. Gradient reuse on the plain steps between
full steps (``reuse="looksam"``) is a plug-in object, ``trainer.optim.reuse``, which also derives it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .grads import Collected, global_norm
from .passes import FIRST, PLAIN, SECOND, ModelModules, pass_policy
from .reuse import REUSE_VARIANTS, GradientReuse

__all__ = ["GNP", "REUSE_MODES", "StepInfo", "exact_gnp_gradient"]

REUSE_MODES = ("none", *REUSE_VARIANTS)


@dataclass
class StepInfo:
    """What one ``GNP.train_step`` did. Tensors are detached 0-dim tensors on the model's device.

    Reading them (``.item()``) is a host synchronisation: do it on log steps only.
    """

    loss: Tensor  # pass-1 loss, at θ
    loss_perturbed: Tensor | None  # pass-2 loss, at θ + ε (None on a plain step)
    g1_norm: Tensor | None  # ‖g1‖ (rank-local unless sync_perturbations; unscaled under fp16)
    grad_norm: Tensor  # norm of the final combined, synchronised gradient before clipping
    gnp: bool  # True when this was a two-pass GNP step
    skipped: Tensor | None  # GradScaler found inf/NaN and skipped the update (None without scaler)


# ----------------------------------------------------------------------------------------------
# small helpers


def _check_hyper(name: str, value: Any, where: str) -> float:
    """Validate a non-negative finite hyper-parameter (r, alpha) and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"GNP: {name} must be a number >= 0{where}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"GNP: {name} must be a finite number >= 0{where}, got {value!r}")
    return value


def _check_reuse(value: Any, where: str) -> str:
    """Validate the gradient-reuse mode."""
    if not isinstance(value, str) or value not in REUSE_MODES:
        allowed = " or ".join(repr(m) for m in REUSE_MODES)
        raise ValueError(f"GNP: gnp.reuse must be {allowed}{where}, got {value!r}")
    return value


def _check_reuse_weight(value: Any, where: str) -> float:
    """Validate the reuse weight w (finite, >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"GNP: gnp.reuse_weight must be a finite number >= 0{where}, got {value!r}")
    return float(value)


def _inverse_scale(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """1/scale of an enabled GradScaler as a device tensor (None without one). ``get_scale()`` would sync the
    host; the scale is a power of two, so its fp32 reciprocal is exact."""
    if scaler is None:
        return None
    scale = scaler._get_scale_async()
    return scale.float().reciprocal() if scale is not None else None


def _unscale(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_`` once per step, after the step's last backward (it may run only once per update)."""
    if scaler is not None:
        with torch.no_grad():
            scaler.unscale_(optimizer)


class _Hyper:
    """r and α of every param_group for ONE step.

    One source of truth: the param_groups. GNP's constructor only seeds them (``setdefault``, as torch does
    with ``lr``; ``defaults`` also seeds groups added later); a schedule (``trainer.loop.StepPolicy``, GR
    warmups) writes r and α only there, like an LR scheduler writes ``lr``; nothing else keeps a copy. Each
    step reads the groups exactly once, at its start, into this object, and hands it to every named step
    (perturbation, mix, post-mix factor), so r and α cannot differ between the parts of one step. The reuse
    variant reads ``group["alpha"]`` within the same step, when nothing has written the groups since.
    """

    def __init__(self, values: list[tuple[dict[str, Any], float, float]]) -> None:
        self._by_group = {id(group): (r, a) for group, r, a in values}
        self.alphas = tuple(a for _, _, a in values)
        self.active = any(r > 0 and a > 0 for _, r, a in values)  # a GNP step (else plain)
        self.uniform_alpha = all(a == self.alphas[0] for a in self.alphas)

    def r(self, group: dict[str, Any]) -> float:
        return self._by_group[id(group)][0]

    def alpha(self, group: dict[str, Any]) -> float:
        return self._by_group[id(group)][1]


@dataclass
class _Source:
    """How an entry point runs one pass of its model.

    ``run()`` is the forward (the closure: forward + backward); ``backward`` backpropagates a loss_fn's loss
    (GradScaler included), None when ``run`` calls backward itself. ``name`` and ``no_grad_hint`` go into
    error messages. ``modules``: the model's modules for the pass policy, None for its global forward
    pre-hook (``step(closure)`` never sees the model).
    """

    run: Callable[[], Tensor]
    backward: Callable[[Tensor], None] | None
    name: str
    no_grad_hint: str
    modules: ModelModules | None


@dataclass
class _Perturbed:
    """What ``_perturb`` leaves for pass 2 and after it."""

    norm: Tensor  # ‖g1‖ (unscaled)
    params: list[Tensor]  # the parameters with a gradient, perturbed
    saved: list[Tensor]  # their θ
    loss_weight: float  # weight of the pass-2 loss (α, or 1 when .grad was pre-scaled by c/α)
    post: list[float | None]  # per collected group: the factor (α) to multiply .grad by after pass 2


class _PairResult(NamedTuple):
    """What a perturbation (or the mean of a step's perturbations) reports."""

    loss: Tensor  # pass 1, at θ
    loss_perturbed: Tensor  # pass 2, at θ + ε
    g1_norm: Tensor


class _BatchNormMean:
    """BatchNorm running statistics of an m-sharpness step: the mean of the k sub-batches' pass-1 updates.

    k ranks with one perturbation each make ONE update per step on every rank, each from the statistics the
    step started with, and ``loop.sync_bn_buffers`` averages the ranks' buffers. One process with k sub-batches
    must end where those k ranks end (gnp.m is a property of the method, not of the GPU count), so each
    sub-batch's pass 1 starts from the step's starting buffers, and after the last one the buffers are the mean
    of the k updated ones (summed in fp64 and divided by k, as the cross-rank average is) and
    num_batches_tracked is the starting value + 1 (the mean of k equal increments). Letting every pass 1
    update in turn would make k updates per step (issue 31).

    Under DDP with ``broadcast_buffers`` the first forward of a step replaces every rank's buffers by rank 0's,
    so that is where the ranks' updates start; when DDP is about to do that, rank 0's BatchNorm buffers are
    broadcast here first (one collective of a flat fp64 copy, exact), so the start copied below is the one
    sub-batch 0's pass 1 sees (DDP's own broadcast then re-sends the same values). Only layers in training
    mode with ``track_running_stats`` are touched; pass 2 never updates them (``passes.pass_policy``).
    """

    def __init__(self, modules: ModelModules, k: int) -> None:
        self.k = k
        self.layers = [m for m in modules.batchnorms if m.training and m.track_running_stats]
        self.ddps = modules.ddps
        self.start: list[list[Tensor]] = []  # per layer: running_mean, running_var, num_batches_tracked
        self.sums: list[list[Tensor]] = []

    @staticmethod
    def _buffers(m: _BatchNorm) -> list[Tensor]:
        return [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def _rank0_buffers(self) -> None:
        """What DDP's next forward does to these buffers (``broadcast_buffers``), done before the copy."""
        for d in self.ddps:
            if d.will_sync_module_buffers():
                bufs = [b for m in self.layers for b in self._buffers(m)]
                flat = torch.cat([b.detach().double().reshape(-1) for b in bufs])
                dist.broadcast(flat, src=dist.get_global_rank(d.process_group, 0), group=d.process_group)
                torch._foreach_copy_(bufs, [c.view_as(b) for c, b in zip(flat.split([b.numel() for b in bufs]), bufs)])
                return

    @torch.no_grad()
    def before_pass1(self, j: int) -> None:
        if not self.layers:
            return
        if j == 0:
            self._rank0_buffers()
            self.start = [[b.detach().clone() for b in self._buffers(m)] for m in self.layers]
            return
        for m, start in zip(self.layers, self.start):
            torch._foreach_copy_(self._buffers(m), start)

    @torch.no_grad()
    def after_pass1(self, j: int) -> None:
        for i, m in enumerate(self.layers):
            # fp64 copies (integers as they are), summed like the cross-rank average sums them
            bufs = [
                b.detach().to(torch.float64 if b.is_floating_point() else b.dtype, copy=True) for b in self._buffers(m)
            ]
            if j == 0:
                self.sums.append(bufs)
            else:
                torch._foreach_add_(self.sums[i], bufs)
        if j == self.k - 1:
            for m, sums in zip(self.layers, self.sums):
                for b, total in zip(self._buffers(m), sums):
                    b.copy_(total / self.k if b.is_floating_point() else total // self.k)


class _SubBatchSum:
    """The m-sharpness bookkeeping across the k perturbations of one step (``train_step(sub_batches=k)``).

    Gradients: sub-batch j's finished c_j·g1_j + α·g2_j is summed outside ``.grad`` (so the next g1 starts
    from zero); before the LAST pass 2 the sum goes back into ``.grad``, so DDP's single all-reduce (the
    step's last backward) averages all of it; after the last mix ``.grad`` is divided by k. BatchNorm
    statistics: ``_BatchNormMean``.
    """

    def __init__(self, k: int, modules: ModelModules, param_groups: list[dict[str, Any]]) -> None:
        self.k = k
        self.param_groups = param_groups
        self.acc: dict[Tensor, Tensor] = {}
        self.bn = _BatchNormMean(modules, k)

    def before_pass1(self, j: int) -> None:
        self.bn.before_pass1(j)

    def after_pass1(self, j: int) -> None:
        self.bn.after_pass1(j)

    @torch.no_grad()
    def fold_into_grads(self, collected: Collected, post: list[float | None]) -> None:
        """Before the last pass 2: the sum of the earlier sub-batches back into ``.grad``. A group pre-scaled by
        c/α is multiplied by α after pass 2 (``GNP._mix``), so its share of the sum is divided by α here."""
        for (_, ps, gs), factor in zip(collected, post):
            for p, g in zip(ps, gs):
                if p in self.acc:
                    g.add_(self.acc.pop(p) if factor is None else self.acc.pop(p) / factor)
        for p, s in self.acc.items():  # a parameter without a gradient in this sub-batch
            p.grad = s.clone()

    @torch.no_grad()
    def after_mix(self, j: int, params: list[Tensor]) -> None:
        """Add sub-batch j's mixed gradient to the sum; after the last one, the mean over the k sub-batches."""
        if j < self.k - 1:
            for p in params:
                if p in self.acc:
                    self.acc[p].add_(p.grad)
                else:
                    self.acc[p] = p.grad.detach().clone()
            return
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.k)


# ----------------------------------------------------------------------------------------------
# the optimizer


class GNP(torch.optim.Optimizer):
    """Gradient-norm-penalty wrapper: ``GNP(base, r=0.1, alpha=0.8)``; λ = α·r (see module docstring).

    Args:
        base_optimizer: any ``torch.optim.Optimizer``; GNP shares its ``param_groups`` (one set for
            LR schedulers; a scheduler may be attached to either object) and its ``state``.
        r: perturbation radius (>= 0), stored in every param_group (``setdefault``) so schedules
            can drive it like ``lr``.
        alpha: mixing weight α (>= 0; 1 = SAM; > 1 allowed), stored in every param_group.
        norm_perturbations: False = paper formula (1−α)·g1 + α·g2; True = reference-code default
            (1−α)·g1/(‖g1‖+eps) + α·g2. The perturbation itself is always normalised.
        sync_perturbations: under DDP, average g1 across ranks before perturbing (costs a second
            all-reduce per GNP step); False = each rank perturbs with its own g1.
        eps: added to ‖g1‖ in every division (>= 0).
        reuse: ``"none"`` or ``"looksam"``: full GNP steps store v = (g2 − <g1,g2>/‖g1‖²·g1)/‖g1‖
            (global inner products, rank-averaged g1 and g2; ‖g1‖ + eps in the divisions) and plain
            steps of ``train_step(..., gnp=False)`` use g + α·reuse_weight·‖g‖·v (``trainer.optim.reuse``,
            which derives it; works with both mixes, with DDP, fp16 GradScaler and ``step(closure)``).
        reuse_weight: w >= 0 in that correction (1 = replay the measured orthogonal part; 0 = off).

    ``reuse`` and ``reuse_weight`` are attributes, not param_group entries: v is defined by global
    inner products over all groups, and nothing schedules the weight; α in the correction is the
    group's current alpha.

    A step is a GNP step when some param_group has r > 0 and alpha > 0; otherwise it is a plain
    single-pass step. Within a GNP step each group uses its own r (perturbation) and alpha (mix);
    alphas that differ between groups must all be > 0.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        r: float,
        alpha: float,
        norm_perturbations: bool = False,
        sync_perturbations: bool = False,
        eps: float = 1e-12,
        reuse: str = "none",
        reuse_weight: float = 1.0,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"GNP: base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, GNP):
            raise ValueError("GNP: base_optimizer is already a GNP; wrap the plain optimizer once")
        r = _check_hyper("r", r, "")
        alpha = _check_hyper("alpha", alpha, "")
        eps = _check_hyper("eps", eps, "")
        reuse = _check_reuse(reuse, "")
        reuse_weight = _check_reuse_weight(reuse_weight, "")
        for name, flag in (("norm_perturbations", norm_perturbations), ("sync_perturbations", sync_perturbations)):
            if not isinstance(flag, bool):
                raise ValueError(f"GNP: {name} must be True or False, got {flag!r}")
        # Optimizer.__init__ runs add_param_group on the base's own group dicts: that setdefaults r and
        # alpha into them; then the lists are shared outright so both objects see one set of groups.
        super().__init__(base_optimizer.param_groups, dict(r=r, alpha=alpha))
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.norm_perturbations = norm_perturbations
        self.sync_perturbations = sync_perturbations
        self.eps = eps
        self.reuse = reuse
        self.reuse_weight = reuse_weight
        # the reuse variant's object (its buffers); kept when ``reuse`` is later set to "none", as v is
        self._reuse: GradientReuse | None = REUSE_VARIANTS[reuse]() if reuse != "none" else None
        # Transient θ copies, one per parameter, reused every step (never part of state_dict).
        self._theta: dict[Tensor, Tensor] = {}
        self._model_info: ModelModules | None = None

    # -- param groups and state ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (its defaults apply) and give it GNP's r and alpha."""
        if not hasattr(self, "base_optimizer"):  # called from Optimizer.__init__ on the base's groups
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        for key, value in self.defaults.items():
            self.base_optimizer.param_groups[-1].setdefault(key, value)

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state (momentum buffers, Adam moments, groups incl. lr/r/alpha) + settings.

        The transient θ copies are not included. Plain values only (``torch.load(weights_only=True)``).
        ``"reuse": {"v": {index: tensor}}`` holds the stored reuse direction (same parameter indices
        as ``"state"``; views of one flat buffer, which ``torch.save`` writes once).
        """
        base = self.base_optimizer.state_dict()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {
            "state": base["state"],
            "param_groups": base["param_groups"],
            "gnp": {
                "norm_perturbations": self.norm_perturbations,
                "sync_perturbations": self.sync_perturbations,
                "eps": self.eps,
                "reuse": self.reuse,
                "reuse_weight": self.reuse_weight,
            },
            # the format of a checkpoint without reuse state ({"v": {}}) is kept for reuse="none"
            "reuse": self._reuse.state_dict(index) if self._reuse is not None else {"v": {}},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; a plain base-optimizer state dict is accepted too."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("GNP.load_state_dict: expected a dict with 'state' and 'param_groups'")
        settings = state_dict.get("gnp", {})
        reuse_state = state_dict.get("reuse", {"v": {}})
        if not isinstance(reuse_state, dict):  # the variant checks its own entries below
            raise ValueError("GNP.load_state_dict: 'reuse' must be a dict {'v': {param index: tensor}}")
        self.base_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k not in ("gnp", "reuse")})
        # torch's load_state_dict builds new group dicts and a new state dict: re-share them.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if "norm_perturbations" in settings:
            self.norm_perturbations = bool(settings["norm_perturbations"])
        if "sync_perturbations" in settings:
            self.sync_perturbations = bool(settings["sync_perturbations"])
        if "eps" in settings:
            self.eps = _check_hyper("eps", settings["eps"], " in the state dict")
        if "reuse" in settings:
            self.reuse = _check_reuse(settings["reuse"], " in the state dict")
        if "reuse_weight" in settings:
            self.reuse_weight = _check_reuse_weight(settings["reuse_weight"], " in the state dict")
        self._load_reuse(reuse_state)
        self._read_hyper()  # validates the loaded r/alpha

    def _load_reuse(self, reuse_state: dict[str, Any]) -> None:
        """Give the reuse variant of the loaded settings its saved state (a fresh object: nothing of the
        state before the load survives). With reuse="none" no variant is kept and its state is not read."""
        if self.reuse == "none":
            self._reuse = None
            return
        self._reuse = REUSE_VARIANTS[self.reuse]()
        self._reuse.load_state_dict(reuse_state, [p for g in self.param_groups for p in g["params"]])

    # -- r and α of a step: read once from param_groups ------------------------------------------

    def _read_hyper(self) -> _Hyper:
        """Check r/alpha of every group and read them once for this step (see ``_Hyper``)."""
        values = []
        for i, group in enumerate(self.param_groups):
            # a group added to the base optimizer directly gets GNP's defaults, like add_param_group
            r = _check_hyper("r", group.setdefault("r", self.defaults["r"]), f" (param_groups[{i}])")
            a = _check_hyper("alpha", group.setdefault("alpha", self.defaults["alpha"]), f" (param_groups[{i}])")
            values.append((group, r, a))
        hyper = _Hyper(values)
        alphas = [a for _, _, a in values]
        if hyper.active and any(a != alphas[0] for a in alphas) and any(a == 0 for a in alphas):
            # checked before pass 1, so nothing has been perturbed when it raises
            raise ValueError(
                f"GNP: param_groups have different alphas {alphas} including 0; "
                "use one alpha for all groups or alpha > 0 in every group"
            )
        return hyper

    # -- gradient bookkeeping -------------------------------------------------------------------

    def _collect(self) -> Collected:
        """(group, params with a gradient, their gradients) for every group that has any."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                out.append((group, params, [p.grad for p in params]))
        return out

    def _theta_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Persistent buffers for θ (allocated once per parameter, reused every step)."""
        out = []
        for p in params:
            buf = self._theta.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = torch.empty_like(p, memory_format=torch.preserve_format)
                self._theta[p] = buf
            out.append(buf)
        return out

    @staticmethod
    def _check_loss(loss: Any, where: str) -> Tensor:
        """The loss must be a scalar tensor that requires grad."""
        if loss is None:
            raise RuntimeError(f"GNP: {where} returned None; it must return the loss tensor")
        if not isinstance(loss, Tensor):
            raise RuntimeError(f"GNP: {where} must return the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise RuntimeError(f"GNP: {where} must return a scalar loss, got shape {tuple(loss.shape)}")
        return loss

    def _require_grads(self, where: str) -> Collected:
        collected = self._collect()
        if not collected:
            raise RuntimeError(
                f"GNP: no parameter has a gradient after {where}; the closure/loss must call or allow "
                "backward() and the loss must depend on the optimizer's parameters"
            )
        return collected

    # -- the named steps of a pass pair ----------------------------------------------------------

    def _run(self, src: _Source, where: str, weight: float) -> Tensor:
        """Forward (+ backward) of one pass: the closure does its own backward; a loss_fn's loss is
        backpropagated here, scaled by the GradScaler and weighted by ``weight``."""
        loss = self._check_loss(src.run(), where)
        if src.backward is not None:
            src.backward(loss * weight if weight != 1.0 else loss)
        return loss

    def _plain_pass(self, src: _Source, scaler: torch.amp.GradScaler | None) -> Tensor:
        """A plain step's one pass: zero grads, forward + backward at θ, unscale. Returns the loss."""
        self.base_optimizer.zero_grad(set_to_none=True)
        with pass_policy(PLAIN, model=src.modules), torch.enable_grad():
            loss = self._run(src, src.name, 1.0)
        self._require_grads(src.no_grad_hint)
        _unscale(scaler, self.base_optimizer)
        return loss

    def _pass1(self, src: _Source) -> tuple[Tensor, Collected, pass_policy]:
        """Pass 1 at θ: .grad = g1 (rank-local unless sync_perturbations). The policy covers the forward too,
        since DDP decides at forward time whether the backward synchronises; it also snapshots the RNG."""
        first = next(p for g in self.param_groups for p in g["params"])
        with (
            pass_policy(FIRST, model=src.modules, sync=self.sync_perturbations, device=first.device) as pass1,
            torch.enable_grad(),
        ):
            loss = self._run(src, src.name, 1.0)
        return loss, self._require_grads(src.no_grad_hint), pass1

    @torch.no_grad()
    def _perturb(
        self, collected: Collected, hyper: _Hyper, *, grad_scale_inv: Tensor | None, loss_weight_free: bool
    ) -> _Perturbed:
        """After pass 1: ‖g1‖, save θ, θ += ε, scale .grad in place for the mix.

        With ``loss_weight_free`` (train_step) and one alpha for all groups the pass-2 loss is weighted by α
        directly; otherwise (closure, or alphas differing per group) .grad is pre-scaled by c/α, pass 2 runs
        unweighted and the sum is multiplied by α afterwards (``_mix``). ``grad_scale_inv`` (GradScaler) marks
        .grad as scaled: the norm is unscaled and a non-finite g1 perturbs by 0 (pass 2 still runs so
        collectives stay aligned; the inf/NaN left in .grad makes the scaler skip the step).
        """
        all_grads = [g for _, _, gs in collected for g in gs]
        all_params = [p for _, ps, _ in collected for p in ps]
        norm = global_norm(all_grads)
        if grad_scale_inv is not None:
            norm = norm * grad_scale_inv.to(norm.dtype)
        inv = 1.0 / (norm + self.eps)

        saved = self._theta_buffers(all_params)
        torch._foreach_copy_(saved, all_params)

        pert_scale = inv if grad_scale_inv is None else inv * grad_scale_inv.to(inv.dtype)
        if grad_scale_inv is not None:
            pert_scale = torch.where(torch.isfinite(norm), pert_scale, torch.zeros_like(pert_scale))
        for group, params, grads in collected:
            r = hyper.r(group)
            if r == 0:
                continue
            # A transient grad-sized list (the caching allocator recycles it on CUDA); scaling .grad
            # in place and back instead would cost the same memory traffic and round twice.
            delta = torch._foreach_mul(grads, pert_scale * r)
            if grad_scale_inv is not None:
                # inf·0 = NaN: make a non-finite g1 perturb by exactly 0 (fp16 path only).
                for d in delta:
                    torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_add_(params, delta)
            del delta

        weighted = loss_weight_free and hyper.uniform_alpha
        loss_weight = hyper.alphas[0] if weighted else 1.0
        post: list[float | None] = []
        for group, _, grads in collected:
            a = hyper.alpha(group)
            c: float | Tensor = (1.0 - a) * inv if self.norm_perturbations else 1.0 - a
            if not weighted:
                c = c / a
            if isinstance(c, Tensor) or c != 1.0:
                torch._foreach_mul_(grads, c)
            post.append(None if weighted or a == 1.0 else a)
        return _Perturbed(norm, all_params, saved, loss_weight, post)

    def _pass2(self, src: _Source, pass1: pass_policy, weight: float, *, sync: bool) -> Tensor:
        """Pass 2 at θ + ε: adds weight·∇L(θ+ε) to the pre-mixed .grad, with pass 1's randomness and frozen
        BatchNorm statistics. ``sync=False`` keeps DDP from all-reducing (not the step's last backward)."""
        # step(closure) cannot see whether the closure called backward: a .grad that neither changed version nor
        # was replaced shows it did not (AccumulateGrad either adds in place or replaces .grad)
        check = src.backward is None
        params = [p for _, ps, _ in self._collect() for p in ps] if check else []
        versions = [(p.grad, p.grad._version) for p in params]
        with contextlib.ExitStack() as stack:
            if not sync and src.modules is not None:
                for d in src.modules.ddps:
                    stack.enter_context(d.no_sync())
            stack.enter_context(pass_policy(SECOND, model=src.modules, rng=pass1.rng))
            stack.enter_context(torch.enable_grad())
            loss2 = self._run(src, f"{src.name} (pass 2)", weight)
        if check and all(p.grad is g and g._version == v for (g, v), p in zip(versions, params)):
            raise RuntimeError("GNP: the closure did not call loss.backward() in pass 2")
        return loss2

    @torch.no_grad()
    def _restore(self, pert: _Perturbed) -> None:
        """θ ← saved θ: bitwise (subtracting ε is not exact, and spreads NaN)."""
        torch._foreach_copy_(pert.params, pert.saved)

    @torch.no_grad()
    def _mix(self, pert: _Perturbed, collected: Collected) -> None:
        """After pass 2 (θ restored): multiply the groups that were pre-scaled by c/α by α; .grad = the mix."""
        for (_, params, _), factor in zip(collected, pert.post):
            if factor is not None:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)

    def _reuse_group(self, pass1: pass_policy) -> Any:
        """Where reuse all-reduces g1: the DDP process group when pass 1 ran a DDP model unsynchronised
        (g1 is rank-local then), else None."""
        return pass1.ddps[0].process_group if pass1.ddps and not self.sync_perturbations else None

    # -- THE pass pair: every GNP step is one or more of these -----------------------------------

    def _perturbation(
        self,
        src: _Source,
        hyper: _Hyper,
        *,
        scaler: torch.amp.GradScaler | None,
        reuse: GradientReuse | None,
        sub: _SubBatchSum | None = None,
        j: int = 0,
    ) -> _PairResult:
        """One perturbation: pass 1 → perturb → pass 2 → restore → mix → (last of the step) unscale → reuse store.

        Used by ``step(closure)`` (one, no scaler), ``train_step`` (one) and the m-sharpness step (k, with the
        ``sub`` bookkeeping: sub-batch j of ``sub.k``). On return .grad holds the mixed gradient of this
        perturbation (for the last one of the step: all of them, synchronised by DDP and unscaled).
        """
        last = sub is None or j == sub.k - 1
        self.base_optimizer.zero_grad(set_to_none=True)  # g1 alone in .grad
        if sub is not None:
            sub.before_pass1(j)
        loss, collected, pass1 = self._pass1(src)
        if sub is not None:
            sub.after_pass1(j)
        scale_inv = _inverse_scale(scaler)
        reuse_group = self._reuse_group(pass1)
        if reuse is not None:
            reuse.capture(collected, averaged_later=reuse_group is not None, norm_perturbations=self.norm_perturbations)
        pert = self._perturb(collected, hyper, grad_scale_inv=scale_inv, loss_weight_free=src.backward is not None)
        if sub is not None and last:
            sub.fold_into_grads(collected, pert.post)
        try:
            loss2 = self._pass2(src, pass1, pert.loss_weight, sync=last)
        finally:
            self._restore(pert)
        self._mix(pert, collected)
        if sub is not None:
            sub.after_mix(j, pert.params)
        if last:
            _unscale(scaler, self.base_optimizer)
        if reuse is not None:
            reuse.store(
                collected,
                g1_norm=pert.norm,
                eps=self.eps,
                norm_perturbations=self.norm_perturbations,
                scale_inv=scale_inv,
                process_group=reuse_group,
                keep_on_overflow=scaler is not None,
            )
        return _PairResult(loss, loss2, pert.norm)

    def _gnp_passes(
        self,
        loss_fn: Callable[..., Tensor],
        k: int,
        hyper: _Hyper,
        modules: ModelModules,
        backward: Callable[[Tensor], None],
        scaler: torch.amp.GradScaler | None,
        reuse: GradientReuse | None,
    ) -> _PairResult:
        """train_step's GNP step: one perturbation of the whole batch (k = 1), or one per sub-batch (k > 1,
        ``loss_fn(j)``; the mean over the sub-batches of the mixed gradients, losses and ‖g1‖)."""
        if k == 1:
            src = _Source(loss_fn, backward, "loss_fn", "the backward of loss_fn()", modules)
            return self._perturbation(src, hyper, scaler=scaler, reuse=reuse)
        sub = _SubBatchSum(k, modules, self.param_groups)
        results = []
        for j in range(k):
            src = _Source(functools.partial(loss_fn, j), backward, "loss_fn(j)", "the backward of loss_fn(j)", modules)
            results.append(self._perturbation(src, hyper, scaler=scaler, reuse=None, sub=sub, j=j))
        # the step reports means over the sub-batches (loss, perturbed loss, ‖g1‖)
        return _PairResult(*(torch.stack([x[i].detach() for x in results]).mean() for i in range(3)))

    # -- gradient reuse (trainer.optim.reuse) --------------------------------------------------

    def _reuse_enabled(self) -> GradientReuse | None:
        """Re-check the (public, assignable) reuse settings; the variant object when full steps store."""
        self.reuse = _check_reuse(self.reuse, "")
        self.reuse_weight = _check_reuse_weight(self.reuse_weight, "")
        if self.reuse == "none":
            return None
        if type(self._reuse) is not REUSE_VARIANTS[self.reuse]:  # first use, or reuse was re-assigned
            self._reuse = REUSE_VARIANTS[self.reuse]()
        return self._reuse

    # -- entry point 1: the torch-style closure step --------------------------------------------

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One GNP update (two closure calls) or a plain update (one call); returns the pass-1 loss.

        ``closure()`` must run forward, compute the loss, call ``loss.backward()`` and return the
        loss. Gradients are zeroed before pass 1; pass 2 accumulates into the pre-scaled g1 on
        purpose (it is what lets DDP all-reduce the mixed gradient once). With ``reuse="looksam"``
        a GNP step stores v; the plain step here runs only when GNP is off and is never corrected.
        """
        if closure is None or not callable(closure):
            raise ValueError("GNP.step needs a closure that runs forward, calls loss.backward() and returns the loss")
        hyper = self._read_hyper()
        # modules=None: the passes' module settings reach the model through a global forward pre-hook
        src = _Source(closure, None, "closure", "the closure (did it call loss.backward()?)", None)
        if hyper.active:
            loss = self._perturbation(src, hyper, scaler=None, reuse=self._reuse_enabled()).loss
        else:
            loss = self._plain_pass(src, None)
        self.base_optimizer.step()
        return loss

    # -- entry point 2: what the training loop calls ------------------------------------------

    def _modules_of(self, model: nn.Module) -> ModelModules:
        """The pass policy's module lists for ``model``, found once per model object."""
        info = self._model_info
        if info is None or not info.is_for(model):
            info = self._model_info = ModelModules(model)
        return info

    def train_step(
        self,
        loss_fn: Callable[[], Tensor],
        *,
        model: nn.Module,
        gnp: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        clip_norm: float = 0.0,
        sub_batches: int = 1,
    ) -> StepInfo:
        """One full training step: passes, mix, clip, base step, zero grads. No host sync.

        Args:
            loss_fn: runs the forward (with autocast if wanted) and returns the scalar loss; it must
                NOT call backward. Called once (plain step) or twice (GNP step).
            model: the module ``loss_fn`` uses — DDP-wrapped, ``torch.compile``d, or plain. Used
                for ``no_sync``, BatchNorm freezing and ``true_gradient`` (cached per model object).
            gnp: False forces a plain step (hybrid / warmup schedules). A plain step also runs when
                no param_group has both r > 0 and alpha > 0. Decided before pass 1, so a
                ``no_sync`` pass is never the step's last backward. With ``reuse="looksam"`` a
                full step stores v and a ``gnp=False`` step (while some group has r > 0 and
                alpha > 0) adds α·reuse_weight·‖g‖·v to its gradient before clipping.
            scaler: fp16 ``torch.amp.GradScaler`` (None or disabled: no scaling). Both passes
                accumulate under one scale; ``unscale_``, ``step`` (skips on inf/NaN from either
                pass) and ``update`` run once per step.
            clip_norm: > 0 clips the final combined gradient to this global norm (after the DDP
                all-reduce, before the base step); <= 0 disables clipping.
            sub_batches: k >= 1. k > 1 (m-sharpness with m = batch/k) makes a GNP step call
                ``loss_fn(j)`` for j = 0..k-1, which must return the mean loss over sub-batch j of the
                batch: each sub-batch gets its own g1, ε and g2, and the step uses the mean over the
                sub-batches of (1 − α)·c_j·g1_j + α·g2_j (then DDP's average over ranks). 2k passes, one
                all-reduce (the last sub-batch's pass 2); the loss, g1 norm and perturbed loss reported
                are means over the sub-batches; BatchNorm statistics make one update per step, the mean of
                the sub-batches' (``_BatchNormMean``). Plain steps still call ``loss_fn()`` once on the whole
                batch. k = 1 (default) is the one-perturbation step, unchanged. Not with ``reuse`` or
                ``sync_perturbations``.

        Gradients are set to None at the start and the end of the step (PyTorch's default; with
        DDP ``gradient_as_bucket_view=True`` the reducer re-binds the bucket views on the next
        synchronised backward, and the in-place scaling between the passes never re-binds .grad).
        """
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or math.isnan(clip_norm):
            raise ValueError(f"GNP.train_step: clip_norm must be a number (<= 0 disables), got {clip_norm!r}")
        if isinstance(sub_batches, bool) or not isinstance(sub_batches, int) or sub_batches < 1:
            raise ValueError(f"GNP.train_step: sub_batches must be an integer >= 1, got {sub_batches!r}")
        hyper = self._read_hyper()  # hyper.active: GNP would run, the condition for the reuse correction
        active = hyper.active and bool(gnp)
        reuse = self._reuse_enabled()
        if sub_batches > 1 and reuse is not None:
            raise ValueError("GNP.train_step: sub_batches > 1 needs reuse='none' (reuse stores one g1 per step)")
        if sub_batches > 1 and self.sync_perturbations:  # g1 averaged over ranks: m x world examples per perturbation
            raise ValueError("GNP.train_step: sub_batches > 1 needs sync_perturbations=False (issue 31)")
        scaler = scaler if scaler is not None and scaler.is_enabled() else None
        modules = self._modules_of(model)

        def backward(loss: Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        result: _PairResult | None = None
        if active:
            result = self._gnp_passes(loss_fn, sub_batches, hyper, modules, backward, scaler, reuse)
            loss = result.loss
        else:
            loss = self._plain_pass(_Source(loss_fn, backward, "loss_fn", "the backward of loss_fn()", modules), scaler)
        with torch.no_grad():
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if reuse is not None and not active and hyper.active:
                reuse.apply(self.param_groups, grads, weight=self.reuse_weight)  # unscaled, synchronised, unclipped
            grad_norm = self._clip(grads, clip_norm)
            skipped = self._base_step(scaler, grad_norm)
        # An LR scheduler attached to this object checks that its step() ran; train_step is our step.
        self._opt_called = True
        self.base_optimizer.zero_grad(set_to_none=True)
        return StepInfo(
            loss=loss.detach(),
            loss_perturbed=None if result is None else result.loss_perturbed.detach(),
            g1_norm=None if result is None else result.g1_norm.detach(),
            grad_norm=grad_norm.detach(),
            gnp=active,
            skipped=skipped,
        )

    @staticmethod
    def _clip(grads: list[Tensor], clip_norm: float) -> Tensor:
        """The final gradient's global norm (returned, before clipping); clip to ``clip_norm`` when > 0."""
        grad_norm = global_norm(grads)
        if clip_norm > 0:
            # Same rule as torch.nn.utils.clip_grad_norm_: g·min(1, max/(‖g‖+1e-6)), no sync.
            coef = torch.clamp(clip_norm / (grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        return grad_norm

    def _base_step(self, scaler: torch.amp.GradScaler | None, grad_norm: Tensor) -> Tensor | None:
        """The base optimizer's step (through the scaler: skipped on inf/NaN); the skip flag or None."""
        if scaler is None:
            self.base_optimizer.step()
            return None
        scaler.step(self.base_optimizer)
        scaler.update()
        # unscale_ flags inf/NaN per element; a finite set of grads has a finite norm.
        return ~torch.isfinite(grad_norm)


# ----------------------------------------------------------------------------------------------
# verification


def exact_gnp_gradient(loss_fn: Callable[[], Tensor], params: Iterable[Tensor], lam: float) -> list[Tensor]:
    """Exact gradient of L + lam*||grad L|| by double backprop (verification only).

    ``loss_fn()`` runs the forward and returns the scalar loss L (no backward). Returns one detached
    tensor per parameter: ∇L + lam·H·∇L/‖∇L‖. Costs a Hessian-vector product; BatchNorm layers in
    train mode update their running stats once per call.
    """
    params = list(params)
    if not params:
        raise ValueError("exact_gnp_gradient: params is empty")
    with torch.enable_grad():
        loss = loss_fn()
        GNP._check_loss(loss, "loss_fn")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        total = loss + lam * norm
        out = torch.autograd.grad(total, params)
    return [g.detach() for g in out]
