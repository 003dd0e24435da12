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
as the reference's option): a second all-reduce per step.

Pass 2 sees the same randomness as pass 1 (CPU and CUDA RNG state restored), leaves BatchNorm
running statistics (running_mean/var and num_batches_tracked) untouched, and modules with a
``true_gradient`` attribute (Shake-Shake/ShakeDrop) get ``True`` in pass 1 and ``False`` otherwise.

Two entry points:

* ``step(closure)`` — the torch-style contract; the closure runs forward + loss + ``backward()``
  and returns the loss. Module settings per pass (no_sync, BatchNorm freeze, ``true_gradient``)
  are applied through a global forward pre-hook to every module the closure calls. fp16
  ``GradScaler`` is not supported here (the closure owns the backward); use ``train_step``.
* ``train_step(loss_fn, model=...)`` — what the training loop calls: ``loss_fn()`` returns the loss
  without calling backward, so the passes can be weighted and scaled; supports GradScaler,
  clipping of the final gradient, and returns a ``StepInfo`` of detached device tensors without a
  host synchronisation.

Gradient reuse (``reuse="looksam"``, after LookSAM: Liu et al., CVPR 2022, arXiv 2203.02714). The
training loop may mix full GNP steps with plain one-pass steps (hybrid / every-k schedules,
``train_step(..., gnp=False)``). Write the full step's gradient as::

    (1 − α)·g1 + α·g2 = g1 + α·(g2∥ − g1) + α·g2⊥       g2∥ = (<g1,g2>/‖g1‖²)·g1,  g2⊥ = g2 − g2∥

The term α·g2⊥ is the part of the penalty that turns the update away from the plain gradient. A
full step stores it relative to the gradient's size, ONE global inner product and norm over every
parameter that has a gradient (the parameters whose gradients enter ‖g1‖)::

    v = (g2 − <g1,g2>/(‖g1‖ + eps)² · g1) / (‖g1‖ + eps)           kept per parameter, fp32 (fp64)

and a later plain step with gradient g (synchronised, unscaled, before clipping) becomes::

    g ← g + α·w·‖g‖·v                α = the group's current alpha, w = reuse_weight

i.e. g2 ≈ g + ‖g‖·v: with w = 1 and an unchanged gradient the plain step reproduces the full step's
orthogonal part α·g2⊥ exactly and drops the along-g1 part α·(g2∥ − g1), a rescaling of g1 that is
close to a learning-rate change. LookSAM instead replays g + α_L·(‖g‖/‖g_v‖)·g_v, keeping only the
direction of its stored g_v (g_v = the SAM gradient's part orthogonal to g, which is what v·‖g1‖ is
for α = 1) with a tuned α_L (≈ 0.7 there); v keeps the measured ratio ‖g2⊥‖/‖g1‖, so w = 1
means "replay what was measured" and w scales it. The correction is applied only on plain steps where
GNP would otherwise run (some group has r > 0 and α > 0, i.e. ``gnp=False`` steps), so α = 0 or
r = 0 stays bitwise the base optimizer; before the first full step there is no v and plain steps are
plain. Definitions:

* g1, g2 are the raw gradients at θ and θ + ε, rank-averaged under DDP (ḡ1 = mean_k g1_k, ḡ2 =
  mean_k g2_k). With ``norm_perturbations=True`` the mix uses g1/(‖g1‖+eps), but v is still built
  from the raw g1 and g2: v describes how the gradient turns under the perturbation, independent of
  how the full step mixes, and the plain step it corrects uses the raw gradient. The mix mode only
  changes how ḡ2 is recovered from the mixed ``.grad``.
* ḡ2 is recovered from the mixed gradient M (the one DDP all-reduced): ḡ2 = (M − (1 − α)·U)/α with
  U = ḡ1 (paper mix) or U = mean_k g1_k/(‖g1_k‖+eps) (normalised mix); α > 0 in every group of a
  full step. Its rounding error is about ulp(M)/α.
* Cost: buffers v (one per parameter, fp32) and a g1 copy (transient, reused; two copies with
  ``norm_perturbations=True`` under DDP without ``sync_perturbations``); on full steps one extra
  all-reduce of that copy under DDP without ``sync_perturbations`` (none in one process or with
  ``sync_perturbations``, where g1 is already averaged); plain steps: one more global norm and a
  fused add, no communication, no host synchronisation. All parameters with gradients must sit on
  one device (v is one flat buffer).
* fp16 ``GradScaler``: g1 and M are unscaled before use; if either pass overflowed (the scaler skips
  the step) v keeps its previous value. The plain-step correction is added after ``unscale_``.
* ``step(closure)`` stores v on its full steps; its plain steps happen only when GNP is off (α = 0 or
  r = 0), so they are never corrected.
* v is in ``state_dict()["reuse"]["v"]`` (parameter index → tensor, like the base state), so resumes
  are bitwise. It is not kept in the shared base-optimizer ``state``: Adam/AdamW initialise a
  parameter's state only when it is empty.
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GNP", "REUSE_MODES", "StepInfo", "exact_gnp_gradient"]

REUSE_MODES = ("none", "looksam")


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


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 gradients, fp64 when any gradient is fp64 (verification runs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over all tensors (fused per-tensor norms, then the norm of the norms).

    Returns a 0-dim tensor on the first tensor's device; no host synchronisation.
    """
    norms = torch._foreach_norm(list(tensors), 2, dtype=_accumulation_dtype(tensors))
    device = tensors[0].device
    if any(n.device != device for n in norms):  # model spread over devices: gather the partials
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


class _RngSnapshot:
    """CPU RNG state plus the CUDA RNG state of the parameters' device (host-side copies, no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_index: int | None = None
        self.cuda: Tensor | None = None
        if device.type == "cuda":
            self.cuda_index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.cuda_index)

    def restore(self) -> None:
        """Put the generators back, so pass 2 draws the same dropout masks / gates as pass 1."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_index)


def _freeze_batchnorm(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """Stop BatchNorm layers from updating running stats; returns exactly the layers changed.

    ``track_running_stats=False`` in train mode normalises with batch statistics and touches neither
    running_mean/var nor num_batches_tracked (``momentum=0`` would still bump num_batches_tracked and
    turn a NaN batch mean into NaN running stats). Layers already off are left alone and are not
    "restored", so nested or repeated use cannot flip a layer the user had turned off.
    """
    changed = [m for m in modules if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    return changed


def _unfreeze_batchnorm(changed: Iterable[_BatchNorm]) -> None:
    """Undo ``_freeze_batchnorm``."""
    for m in changed:
        m.track_running_stats = True


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of ``model``: the model itself, or under ``torch.compile``'s ``_orig_mod``."""
    if isinstance(model, DistributedDataParallel):
        return model
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, DistributedDataParallel):
        return inner
    return None


class _ModelInfo:
    """Per-model lists the step needs every time (computed once per model object)."""

    def __init__(self, model: nn.Module) -> None:
        self.ref = weakref.ref(model)
        modules = list(model.modules())
        self.batchnorms = [m for m in modules if isinstance(m, _BatchNorm)]
        self.true_gradient = [m for m in modules if hasattr(m, "true_gradient")]
        # weak: an optimizer outliving its DDP model must not keep the reducer alive (gloo aborts
        # at exit when DDP objects survive destroy_process_group)
        ddp = _find_ddp(model)
        self.ddp_ref = weakref.ref(ddp) if ddp is not None else None

    @property
    def ddp(self) -> DistributedDataParallel | None:
        return self.ddp_ref() if self.ddp_ref is not None else None


class _ReuseBuffers:
    """Flat buffers of the gradient-reuse mode (module docstring, "Gradient reuse").

    ``v`` is one flat tensor laid out parameter after parameter in param_group order (only the
    parameters that had a gradient at the full step), so the global inner product and norm are single
    kernels and the DDP all-reduce of g1 is one collective; ``v_views`` are the per-parameter views.
    ``scratch`` holds g1 (and, when needed, the rank-averaged normalised g1) during a full step.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.params: list[Tensor] = []
        self.index: dict[Tensor, int] = {}
        self.bounds: list[tuple[int, int]] = []
        self.v: Tensor | None = None
        self.v_views: list[Tensor] = []
        self.scratch: Tensor | None = None

    @property
    def numel(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    def set_layout(self, params: list[Tensor], v: Tensor) -> None:
        """Adopt ``params`` (in flat order) and the flat ``v`` that belongs to them."""
        self.params = list(params)
        self.index = {p: i for i, p in enumerate(self.params)}
        self.bounds, start = [], 0
        for p in self.params:
            self.bounds.append((start, start + p.numel()))
            start += p.numel()
        if v.numel() != start:
            raise ValueError(f"GNP: reuse v has {v.numel()} elements, the parameters {start}")
        self.v = v
        self.v_views = self.views(v)
        self.scratch = None

    def ensure(self, params: list[Tensor], dtype: torch.dtype, device: torch.device) -> None:
        """Keep v when the parameters and dtype are unchanged (a skipped fp16 step keeps the old v);
        otherwise start a fresh layout whose v is 0 (adds nothing to a plain step)."""
        v = self.v
        if (
            v is not None
            and v.dtype == dtype
            and v.device == device
            and len(params) == len(self.params)
            and all(a is b for a, b in zip(params, self.params))
        ):
            return
        self.set_layout(params, torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device))

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of the first ``numel`` elements of ``flat``, in the layout's order."""
        return [flat[a:b].view(p.shape) for p, (a, b) in zip(self.params, self.bounds)]

    def scratch_of(self, rows: int) -> Tensor:
        """The g1 scratch with ``rows`` stacked copies (allocated once, reused every full step)."""
        assert self.v is not None
        n = rows * self.numel
        if self.scratch is None or self.scratch.numel() != n:
            self.scratch = torch.empty(n, dtype=self.v.dtype, device=self.v.device)
        return self.scratch


class _ClosureHooks:
    """Global forward pre-hook applying per-pass module settings inside ``step(closure)``.

    ``step(closure)`` never sees the model, so it cannot call ``no_sync()`` or find the BatchNorm
    layers itself. Instead, while the closure runs, the first call of any module applies the pass's
    settings to that module's whole subtree (before DDP's forward decides about synchronisation):
    pass 1: ``true_gradient=True``, DDP ``require_backward_grad_sync=False`` (what ``no_sync`` sets)
    unless ``sync``; pass 2: ``true_gradient=False``, BatchNorm frozen; plain: ``true_gradient=False``.
    Everything changed is restored on exit.
    """

    def __init__(self, mode: str, sync: bool) -> None:
        self.mode, self.sync = mode, sync
        self.seen: set[int] = set()
        self.bn_changed: list[_BatchNorm] = []
        self.ddp_changed: list[DistributedDataParallel] = []
        self.ddps: list[DistributedDataParallel] = []  # every DDP wrapper the closure ran (reuse's all-reduce)
        self.handle: Any = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        if id(module) in self.seen:
            return None
        for m in module.modules():
            if id(m) in self.seen:
                continue
            self.seen.add(id(m))
            if hasattr(m, "true_gradient"):
                m.true_gradient = self.mode == "pass1"
            if isinstance(m, DistributedDataParallel):
                self.ddps.append(m)
            if self.mode == "pass2":
                self.bn_changed.extend(_freeze_batchnorm([m]))
            elif self.mode == "pass1" and not self.sync and isinstance(m, DistributedDataParallel):
                if m.require_backward_grad_sync:
                    m.require_backward_grad_sync = False
                    self.ddp_changed.append(m)
        return None

    def __enter__(self) -> "_ClosureHooks":
        self.handle = nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        _unfreeze_batchnorm(self.bn_changed)
        for m in self.ddp_changed:
            m.require_backward_grad_sync = True


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
            steps of ``train_step(..., gnp=False)`` use g + α·reuse_weight·‖g‖·v (module docstring,
            "Gradient reuse"; works with both mixes, with DDP, fp16 GradScaler and ``step(closure)``).
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
        self._reuse = _ReuseBuffers()
        # Transient θ copies, one per parameter, reused every step (never part of state_dict).
        self._theta: dict[Tensor, Tensor] = {}
        self._model_info: _ModelInfo | None = None

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
        buf = self._reuse
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
            "reuse": {"v": {index[p]: view for p, view in zip(buf.params, buf.v_views)}},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; a plain base-optimizer state dict is accepted too."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("GNP.load_state_dict: expected a dict with 'state' and 'param_groups'")
        settings = state_dict.get("gnp", {})
        reuse_state = state_dict.get("reuse", {"v": {}})
        if not isinstance(reuse_state, dict) or not isinstance(reuse_state.get("v"), dict):
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
        self._load_reuse(reuse_state["v"])
        self._validate_groups()

    def _load_reuse(self, saved: dict[Any, Any]) -> None:
        """Rebuild the flat v from ``{param index: tensor}`` (empty: no v, plain steps stay plain)."""
        self._reuse.clear()
        if not saved:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        items = sorted(saved.items(), key=lambda kv: kv[0] if isinstance(kv[0], int) else -1)
        for i, v in items:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"GNP.load_state_dict: reuse v index must be a parameter index, got {i!r}")
            if not isinstance(v, Tensor) or v.numel() != params[i].numel():
                raise ValueError(f"GNP.load_state_dict: reuse v[{i}] must be a tensor shaped like parameter {i}")
        dtype = items[0][1].dtype
        if any(v.dtype != dtype for _, v in items):
            raise ValueError("GNP.load_state_dict: reuse v tensors must share one dtype")
        device = params[items[0][0]].device
        flat = torch.cat([v.detach().reshape(-1).to(device=device, dtype=dtype) for _, v in items])
        self._reuse.set_layout([params[i] for i, _ in items], flat)

    # -- shared pieces of both entry points ---------------------------------------------------

    def _validate_groups(self) -> bool:
        """Check r/alpha of every group (a schedule may have written them); True for a GNP step."""
        active = False
        for i, group in enumerate(self.param_groups):
            # a group added to the base optimizer directly gets GNP's defaults, like add_param_group
            r = _check_hyper("r", group.setdefault("r", self.defaults["r"]), f" (param_groups[{i}])")
            a = _check_hyper("alpha", group.setdefault("alpha", self.defaults["alpha"]), f" (param_groups[{i}])")
            active = active or (r > 0 and a > 0)
        alphas = [g["alpha"] for g in self.param_groups]
        if active and any(a != alphas[0] for a in alphas) and any(a == 0 for a in alphas):
            # checked before pass 1, so nothing has been perturbed when it raises
            raise ValueError(
                f"GNP: param_groups have different alphas {alphas} including 0; "
                "use one alpha for all groups or alpha > 0 in every group"
            )
        return active

    def _collect(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
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

    @torch.no_grad()
    def _perturb_and_premix(
        self,
        collected: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
        *,
        grad_scale_inv: Tensor | None,
        loss_weight_free: bool,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], float, list[float | None]]:
        """After pass 1: ‖g1‖, save θ, θ += ε, scale .grad in place for the mix.

        Returns (‖g1‖, params, saved θ, weight for the pass-2 loss, per-group factor to apply after
        pass 2). With ``loss_weight_free`` (train_step) and one alpha for all groups the pass-2 loss
        is weighted by α directly; otherwise (closure, or alphas differing per group) .grad is
        pre-scaled by c/α, pass 2 runs unweighted and the sum is multiplied by α afterwards.
        ``grad_scale_inv`` (GradScaler) marks .grad as scaled: the norm is unscaled and a
        non-finite g1 perturbs by 0 (pass 2 still runs so collectives stay aligned; the inf/NaN
        left in .grad makes the scaler skip the step).
        """
        all_grads = [g for _, _, gs in collected for g in gs]
        all_params = [p for _, ps, _ in collected for p in ps]
        norm = _global_norm(all_grads)
        if grad_scale_inv is not None:
            norm = norm * grad_scale_inv.to(norm.dtype)
        inv = 1.0 / (norm + self.eps)

        saved = self._theta_buffers(all_params)
        torch._foreach_copy_(saved, all_params)

        pert_scale = inv if grad_scale_inv is None else inv * grad_scale_inv.to(inv.dtype)
        if grad_scale_inv is not None:
            pert_scale = torch.where(torch.isfinite(norm), pert_scale, torch.zeros_like(pert_scale))
        for group, params, grads in collected:
            if group["r"] == 0:
                continue
            # A transient grad-sized list (the caching allocator recycles it on CUDA); scaling .grad
            # in place and back instead would cost the same memory traffic and round twice.
            delta = torch._foreach_mul(grads, pert_scale * group["r"])
            if grad_scale_inv is not None:
                # inf·0 = NaN: make a non-finite g1 perturb by exactly 0 (fp16 path only).
                for d in delta:
                    torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_add_(params, delta)
            del delta

        alphas = [float(g["alpha"]) for g in self.param_groups]
        uniform = all(a == alphas[0] for a in alphas)
        weighted = loss_weight_free and uniform
        loss_weight = alphas[0] if weighted else 1.0
        post: list[float | None] = []
        for group, _, grads in collected:
            a = float(group["alpha"])
            c: float | Tensor = (1.0 - a) * inv if self.norm_perturbations else 1.0 - a
            if not weighted:
                c = c / a
            if isinstance(c, Tensor) or c != 1.0:
                torch._foreach_mul_(grads, c)
            post.append(None if weighted or a == 1.0 else a)
        return norm, all_params, saved, loss_weight, post

    @torch.no_grad()
    def _postmix(
        self,
        post: list[float | None],
        collected: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
    ) -> None:
        """After pass 2 (θ already restored): multiply groups that were pre-scaled by c/α by α."""
        for (_, params, _), factor in zip(collected, post):
            if factor is not None:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)

    # -- gradient reuse (module docstring, "Gradient reuse") ------------------------------------

    def _reuse_enabled(self) -> bool:
        """Re-check the (public, assignable) reuse settings; True when full steps store v."""
        self.reuse = _check_reuse(self.reuse, "")
        self.reuse_weight = _check_reuse_weight(self.reuse_weight, "")
        return self.reuse == "looksam"

    @torch.no_grad()
    def _reuse_capture(
        self, collected: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], averaged_later: bool
    ) -> None:
        """After pass 1, before .grad is scaled for the mix: copy g1 into the flat scratch.

        ``averaged_later``: DDP without sync_perturbations (g1 is rank-local and gets all-reduced in
        ``_reuse_store``); with the normalised mix the scratch then has a second row for g1/(‖g1‖+eps).
        """
        params = [p for _, ps, _ in collected for p in ps]
        grads = [g for _, _, gs in collected for g in gs]
        device = grads[0].device
        if any(g.device != device for g in grads):
            raise ValueError("GNP: gnp.reuse='looksam' needs every parameter with a gradient on one device")
        self._reuse.ensure(params, _accumulation_dtype(grads), device)
        rows = 2 if averaged_later and self.norm_perturbations else 1
        scratch = self._reuse.scratch_of(rows)
        torch._foreach_copy_(self._reuse.views(scratch), grads)

    @torch.no_grad()
    def _reuse_store(
        self,
        collected: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
        *,
        g1_norm: Tensor,
        scale_inv: Tensor | None,
        process_group: Any,
        keep_on_overflow: bool,
    ) -> None:
        """After the mix M is in .grad (synchronised, unscaled): v from ḡ1 and ḡ2 = (M − (1−α)U)/α.

        ``g1_norm`` is the (unscaled) norm the perturbation used, so 1/(g1_norm+eps) is bitwise the
        factor of the normalised mix. ``process_group``: all-reduce the rank-local g1 there (DDP
        without sync_perturbations), else None. ``keep_on_overflow`` (GradScaler): a non-finite g1
        or M leaves the previous v in place, decided on the device (no host sync).
        """
        buf = self._reuse
        assert buf.v is not None and buf.scratch is not None
        n, dtype = buf.numel, buf.v.dtype
        g1 = buf.scratch[:n]
        if scale_inv is not None:
            g1.mul_(scale_inv.to(dtype))  # a power of two: exact
        inv = (1.0 / (g1_norm + self.eps)).to(dtype)
        # u: the first-pass term of the mix when it is not simply inv·g1 (normalised mix under DDP)
        u: Tensor | None = None
        if process_group is not None:
            if self.norm_perturbations:
                u = buf.scratch[n : 2 * n]
                torch.mul(g1, inv, out=u)  # this rank's g1/(‖g1_k‖+eps), averaged with g1 below
            # One collective for g1 (and u): plain steps never get here.
            dist.all_reduce(buf.scratch, group=process_group)
            buf.scratch.div_(dist.get_world_size(process_group))
        target = torch.empty_like(buf.v) if keep_on_overflow else buf.v
        # M, flat. Read p.grad afresh: DDP's reducer may re-bind .grad to its buckets in pass 2.
        torch._foreach_copy_(buf.views(target), [p.grad for _, ps, _ in collected for p in ps])
        start = 0
        for group, params, _ in collected:
            end = start + sum(p.numel() for p in params)
            a = float(group["alpha"])  # > 0 in every group of a full step (_validate_groups)
            if a != 1.0:
                seg = target[start:end]
                if u is not None:
                    seg.add_(u[start:end], alpha=-(1.0 - a))
                elif self.norm_perturbations:
                    seg.addcmul_(g1[start:end], inv, value=-(1.0 - a))
                else:
                    seg.add_(g1[start:end], alpha=-(1.0 - a))
                seg.div_(a)
            start = end
        # target = ḡ2 now; remove its component along ḡ1 and divide by ‖ḡ1‖
        dot = torch.dot(g1, target)
        n1 = torch.linalg.vector_norm(g1)
        inv1 = 1.0 / (n1 + self.eps)
        target.addcmul_(g1, dot * inv1 * inv1, value=-1.0)
        target.mul_(inv1)
        if keep_on_overflow:
            # any inf/NaN in g1 or ḡ2 makes dot or ‖ḡ1‖ non-finite; full overlap with out= is allowed
            ok = torch.isfinite(dot) & torch.isfinite(n1)
            torch.where(ok, target, buf.v, out=buf.v)

    @torch.no_grad()
    def _reuse_apply(self, grads: list[Tensor]) -> None:
        """Plain step: .grad ← .grad + α·w·‖g‖·v per group (g = every gradient, synced, unscaled)."""
        buf = self._reuse
        if buf.v is None or self.reuse_weight == 0:
            return
        g_norm = _global_norm(grads).to(buf.v.dtype)
        for group in self.param_groups:
            a = float(group["alpha"])
            if a == 0:
                continue
            pairs = [
                (p.grad, buf.v_views[buf.index[p]]) for p in group["params"] if p.grad is not None and p in buf.index
            ]
            if pairs:
                gs, vs = (list(t) for t in zip(*pairs))
                torch._foreach_add_(gs, torch._foreach_mul(vs, g_norm * (a * self.reuse_weight)))

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

    def _require_grads(self, where: str) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        collected = self._collect()
        if not collected:
            raise RuntimeError(
                f"GNP: no parameter has a gradient after {where}; the closure/loss must call or allow "
                "backward() and the loss must depend on the optimizer's parameters"
            )
        return collected

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
        active = self._validate_groups()
        self.base_optimizer.zero_grad(set_to_none=True)
        if not active:
            with _ClosureHooks("plain", self.sync_perturbations), torch.enable_grad():
                loss = self._check_loss(closure(), "closure")
            self._require_grads("the closure (did it call loss.backward()?)")
            self.base_optimizer.step()
            return loss

        reuse = self._reuse_enabled()
        first = next(p for g in self.param_groups for p in g["params"])
        rng = _RngSnapshot(first.device)
        with _ClosureHooks("pass1", self.sync_perturbations) as hooks1, torch.enable_grad():
            loss = self._check_loss(closure(), "closure")
        collected = self._require_grads("the closure (did it call loss.backward()?)")
        # g1 is rank-local when pass 1 ran a DDP model unsynchronised: reuse must average it
        reuse_group = hooks1.ddps[0].process_group if hooks1.ddps and not self.sync_perturbations else None
        if reuse:
            self._reuse_capture(collected, averaged_later=reuse_group is not None)
        norm, params, saved, _, post = self._perturb_and_premix(collected, grad_scale_inv=None, loss_weight_free=False)
        versions = [(g, g._version) for _, _, gs in collected for g in gs]
        rng.restore()
        try:
            with _ClosureHooks("pass2", self.sync_perturbations), torch.enable_grad():
                self._check_loss(closure(), "closure (pass 2)")
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        # AccumulateGrad either adds in place (version bump) or replaces .grad: either shows pass 2 ran.
        if all(p_grad is g and g._version == v for (g, v), p_grad in zip(versions, (p.grad for p in params))):
            raise RuntimeError("GNP: the closure did not call loss.backward() in pass 2")
        self._postmix(post, collected)
        if reuse:
            self._reuse_store(
                collected, g1_norm=norm, scale_inv=None, process_group=reuse_group, keep_on_overflow=False
            )
        self.base_optimizer.step()
        return loss

    # -- entry point 2: what the training loop calls ------------------------------------------

    def _info_for(self, model: nn.Module) -> _ModelInfo:
        info = self._model_info
        if info is None or info.ref() is not model:
            info = self._model_info = _ModelInfo(model)
        return info

    def train_step(
        self,
        loss_fn: Callable[[], Tensor],
        *,
        model: nn.Module,
        gnp: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        clip_norm: float = 0.0,
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

        Gradients are set to None at the start and the end of the step (PyTorch's default; with
        DDP ``gradient_as_bucket_view=True`` the reducer re-binds the bucket views on the next
        synchronised backward, and the in-place scaling between the passes never re-binds .grad).
        """
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or math.isnan(clip_norm):
            raise ValueError(f"GNP.train_step: clip_norm must be a number (<= 0 disables), got {clip_norm!r}")
        gnp_on = self._validate_groups()  # GNP would run: the condition for the reuse correction
        active = gnp_on and bool(gnp)
        reuse = self._reuse_enabled()
        use_scaler = scaler is not None and scaler.is_enabled()
        minfo = self._info_for(model)
        self.base_optimizer.zero_grad(set_to_none=True)

        def backward(loss: Tensor) -> None:
            (scaler.scale(loss) if use_scaler else loss).backward()

        loss2: Tensor | None = None
        g1_norm: Tensor | None = None
        scale_inv: Tensor | None = None
        reuse_group: Any = None
        with torch.enable_grad():
            if not active:
                for m in minfo.true_gradient:
                    m.true_gradient = False
                loss = self._check_loss(loss_fn(), "loss_fn")
                backward(loss)
                collected = self._require_grads("the backward of loss_fn()")
            else:
                first = next(p for g in self.param_groups for p in g["params"])
                rng = _RngSnapshot(first.device)
                for m in minfo.true_gradient:
                    m.true_gradient = True
                ddp = minfo.ddp
                no_sync = ddp.no_sync() if ddp is not None and not self.sync_perturbations else nullcontext()
                with no_sync:  # the forward too: DDP decides at forward time whether backward syncs
                    loss = self._check_loss(loss_fn(), "loss_fn")
                    backward(loss)
                collected = self._require_grads("the backward of loss_fn()")
                if ddp is not None and not self.sync_perturbations:
                    reuse_group = ddp.process_group
                if reuse:
                    self._reuse_capture(collected, averaged_later=reuse_group is not None)
                if use_scaler:
                    scale = scaler._get_scale_async()  # the tensor; get_scale() would sync the host
                    # the scale is a power of two: its fp32 reciprocal is exact
                    scale_inv = scale.float().reciprocal() if scale is not None else None
                g1_norm, params, saved, weight, post = self._perturb_and_premix(
                    collected, grad_scale_inv=scale_inv, loss_weight_free=True
                )
                rng.restore()
                for m in minfo.true_gradient:
                    m.true_gradient = False
                frozen = _freeze_batchnorm(minfo.batchnorms)
                try:
                    loss2 = self._check_loss(loss_fn(), "loss_fn (pass 2)")
                    backward(loss2 * weight if weight != 1.0 else loss2)
                finally:
                    _unfreeze_batchnorm(frozen)
                    with torch.no_grad():  # θ ← saved θ: bitwise (subtracting ε is not exact, spreads NaN)
                        torch._foreach_copy_(params, saved)
                self._postmix(post, collected)

        with torch.no_grad():
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if use_scaler:
                scaler.unscale_(self.base_optimizer)
            if reuse and active:
                assert g1_norm is not None
                self._reuse_store(
                    collected,
                    g1_norm=g1_norm,
                    scale_inv=scale_inv,
                    process_group=reuse_group,
                    keep_on_overflow=use_scaler,
                )
            elif reuse and gnp_on:
                self._reuse_apply(grads)  # unscaled and synchronised, before clipping
            grad_norm = _global_norm(grads)
            if clip_norm > 0:
                # Same rule as torch.nn.utils.clip_grad_norm_: g·min(1, max/(‖g‖+1e-6)), no sync.
                coef = torch.clamp(clip_norm / (grad_norm + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef)
            skipped: Tensor | None = None
            if use_scaler:
                scaler.step(self.base_optimizer)
                scaler.update()
                # unscale_ flags inf/NaN per element; a finite set of grads has a finite norm.
                skipped = ~torch.isfinite(grad_norm)
            else:
                self.base_optimizer.step()
        # An LR scheduler attached to this object checks that its step() ran; train_step is our step.
        self._opt_called = True
        self.base_optimizer.zero_grad(set_to_none=True)
        return StepInfo(
            loss=loss.detach(),
            loss_perturbed=None if loss2 is None else loss2.detach(),
            g1_norm=None if g1_norm is None else g1_norm.detach(),
            grad_norm=grad_norm.detach(),
            gnp=active,
            skipped=skipped,
        )


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
