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
and g2, and the mean of their mixed gradients is all-reduced once (by the last sub-batch's pass 2).

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

Per-pass module settings (no_sync, BatchNorm freeze, RNG, ``true_gradient``) are one context manager,
``trainer.optim.passes.pass_policy``, used by both entry points. Gradient reuse on the plain steps between
full steps (``reuse="looksam"``) is a plug-in object, ``trainer.optim.reuse``, which also derives it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

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
        self._validate_groups()

    def _load_reuse(self, reuse_state: dict[str, Any]) -> None:
        """Give the reuse variant of the loaded settings its saved state (a fresh object: nothing of the
        state before the load survives). With reuse="none" no variant is kept and its state is not read."""
        if self.reuse == "none":
            self._reuse = None
            return
        self._reuse = REUSE_VARIANTS[self.reuse]()
        self._reuse.load_state_dict(reuse_state, [p for g in self.param_groups for p in g["params"]])

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

    @torch.no_grad()
    def _perturb_and_premix(
        self,
        collected: Collected,
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
        collected: Collected,
    ) -> None:
        """After pass 2 (θ already restored): multiply groups that were pre-scaled by c/α by α."""
        for (_, params, _), factor in zip(collected, post):
            if factor is not None:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)

    def _sub_batch_passes(
        self,
        loss_fn: Callable[[int], Tensor],
        k: int,
        modules: ModelModules,
        backward: Callable[[Tensor], None],
        scaler: torch.amp.GradScaler | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The 2k passes of an m-sharpness step (``train_step(sub_batches=k)``); leaves the mean mixed gradient
        in ``.grad`` (synchronised by the last pass 2) and returns (mean loss, mean perturbed loss, mean ‖g1‖,
        the GradScaler's inverse scale or None).

        Sub-batch j: pass 1 (unsynchronised unless ``sync_perturbations``) gives g1_j alone in ``.grad``, which
        is perturbed and pre-mixed exactly as in the one-perturbation step; pass 2 adds α·g2_j. The finished
        c_j·g1_j + α·g2_j is added to a running sum kept outside ``.grad`` (so the next g1 starts from zero);
        before the LAST pass 2 the sum goes back into ``.grad``, so DDP's one all-reduce averages all of it.
        """
        first = next(p for g in self.param_groups for p in g["params"])
        ddps = modules.ddps
        acc: dict[Tensor, Tensor] = {}
        losses, losses2, norms = [], [], []
        scale_inv: Tensor | None = None
        for j in range(k):
            last = j == k - 1
            self.base_optimizer.zero_grad(set_to_none=True)
            with pass_policy(FIRST, model=modules, sync=self.sync_perturbations, device=first.device) as pass1:
                loss = self._check_loss(loss_fn(j), "loss_fn(j)")
                backward(loss)
            collected = self._require_grads("the backward of loss_fn(j)")
            if scaler is not None:
                scale = scaler._get_scale_async()
                scale_inv = scale.float().reciprocal() if scale is not None else None
            norm, params, saved, weight, post = self._perturb_and_premix(
                collected, grad_scale_inv=scale_inv, loss_weight_free=True
            )
            if last:
                with torch.no_grad():
                    # back into .grad before the synchronised backward; a group pre-scaled by c/α is multiplied
                    # by α after pass 2 (_postmix), so its share of the sum is divided by α here
                    for (_, ps, gs), factor in zip(collected, post):
                        for p, g in zip(ps, gs):
                            if p in acc:
                                g.add_(acc.pop(p) if factor is None else acc.pop(p) / factor)
                    for p, s in acc.items():  # a parameter without a gradient in this sub-batch
                        p.grad = s.clone()
            try:
                with contextlib.ExitStack() as stack:
                    if not last:  # only the last backward of the step all-reduces
                        for d in ddps:
                            stack.enter_context(d.no_sync())
                    stack.enter_context(pass_policy(SECOND, model=modules, rng=pass1.rng))
                    loss2 = self._check_loss(loss_fn(j), "loss_fn(j) (pass 2)")
                    backward(loss2 * weight if weight != 1.0 else loss2)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(params, saved)
            self._postmix(post, collected)
            if not last:
                with torch.no_grad():
                    for p in params:
                        if p in acc:
                            acc[p].add_(p.grad)
                        else:
                            acc[p] = p.grad.detach().clone()
            losses.append(loss.detach())
            losses2.append(loss2.detach())
            norms.append(norm)
        with torch.no_grad():
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / k)
        return (
            torch.stack(losses).mean(),
            torch.stack(losses2).mean(),
            torch.stack(norms).mean(),
            scale_inv,
        )

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

    def _reuse_group(self, pass1: pass_policy) -> Any:
        """Where reuse all-reduces g1: the DDP process group when pass 1 ran a DDP model unsynchronised
        (g1 is rank-local then), else None."""
        return pass1.ddps[0].process_group if pass1.ddps and not self.sync_perturbations else None

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
            with pass_policy(PLAIN), torch.enable_grad():
                loss = self._check_loss(closure(), "closure")
            self._require_grads("the closure (did it call loss.backward()?)")
            self.base_optimizer.step()
            return loss

        reuse = self._reuse_enabled()
        first = next(p for g in self.param_groups for p in g["params"])
        with pass_policy(FIRST, sync=self.sync_perturbations, device=first.device) as pass1, torch.enable_grad():
            loss = self._check_loss(closure(), "closure")
        collected = self._require_grads("the closure (did it call loss.backward()?)")
        reuse_group = self._reuse_group(pass1)
        if reuse is not None:
            reuse.capture(collected, averaged_later=reuse_group is not None, norm_perturbations=self.norm_perturbations)
        norm, params, saved, _, post = self._perturb_and_premix(collected, grad_scale_inv=None, loss_weight_free=False)
        versions = [(g, g._version) for _, _, gs in collected for g in gs]
        try:
            with pass_policy(SECOND, rng=pass1.rng), torch.enable_grad():
                self._check_loss(closure(), "closure (pass 2)")
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        # AccumulateGrad either adds in place (version bump) or replaces .grad: either shows pass 2 ran.
        if all(p_grad is g and g._version == v for (g, v), p_grad in zip(versions, (p.grad for p in params))):
            raise RuntimeError("GNP: the closure did not call loss.backward() in pass 2")
        self._postmix(post, collected)
        if reuse is not None:
            reuse.store(
                collected,
                g1_norm=norm,
                eps=self.eps,
                norm_perturbations=self.norm_perturbations,
                scale_inv=None,
                process_group=reuse_group,
                keep_on_overflow=False,
            )
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
                are means over the sub-batches. Plain steps still call ``loss_fn()`` once on the whole
                batch. k = 1 (default) is the one-perturbation step, unchanged. Not with ``reuse``.

        Gradients are set to None at the start and the end of the step (PyTorch's default; with
        DDP ``gradient_as_bucket_view=True`` the reducer re-binds the bucket views on the next
        synchronised backward, and the in-place scaling between the passes never re-binds .grad).
        """
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or math.isnan(clip_norm):
            raise ValueError(f"GNP.train_step: clip_norm must be a number (<= 0 disables), got {clip_norm!r}")
        if isinstance(sub_batches, bool) or not isinstance(sub_batches, int) or sub_batches < 1:
            raise ValueError(f"GNP.train_step: sub_batches must be an integer >= 1, got {sub_batches!r}")
        gnp_on = self._validate_groups()  # GNP would run: the condition for the reuse correction
        active = gnp_on and bool(gnp)
        reuse = self._reuse_enabled()
        if sub_batches > 1 and reuse is not None:
            raise ValueError("GNP.train_step: sub_batches > 1 needs reuse='none' (reuse stores one g1 per step)")
        use_scaler = scaler is not None and scaler.is_enabled()
        modules = self._modules_of(model)
        self.base_optimizer.zero_grad(set_to_none=True)

        def backward(loss: Tensor) -> None:
            (scaler.scale(loss) if use_scaler else loss).backward()

        loss2: Tensor | None = None
        g1_norm: Tensor | None = None
        scale_inv: Tensor | None = None
        reuse_group: Any = None
        with torch.enable_grad():
            if not active:
                with pass_policy(PLAIN, model=modules):
                    loss = self._check_loss(loss_fn(), "loss_fn")
                    backward(loss)
                collected = self._require_grads("the backward of loss_fn()")
            elif sub_batches > 1:
                loss, loss2, g1_norm, scale_inv = self._sub_batch_passes(
                    loss_fn, sub_batches, modules, backward, scaler if use_scaler else None
                )
            else:
                first = next(p for g in self.param_groups for p in g["params"])
                # the forward too: DDP decides at forward time whether the backward synchronises
                with pass_policy(FIRST, model=modules, sync=self.sync_perturbations, device=first.device) as pass1:
                    loss = self._check_loss(loss_fn(), "loss_fn")
                    backward(loss)
                collected = self._require_grads("the backward of loss_fn()")
                reuse_group = self._reuse_group(pass1)
                if reuse is not None:
                    reuse.capture(
                        collected, averaged_later=reuse_group is not None, norm_perturbations=self.norm_perturbations
                    )
                if use_scaler:
                    scale = scaler._get_scale_async()  # the tensor; get_scale() would sync the host
                    # the scale is a power of two: its fp32 reciprocal is exact
                    scale_inv = scale.float().reciprocal() if scale is not None else None
                g1_norm, params, saved, weight, post = self._perturb_and_premix(
                    collected, grad_scale_inv=scale_inv, loss_weight_free=True
                )
                try:
                    with pass_policy(SECOND, model=modules, rng=pass1.rng):
                        loss2 = self._check_loss(loss_fn(), "loss_fn (pass 2)")
                        backward(loss2 * weight if weight != 1.0 else loss2)
                finally:
                    with torch.no_grad():  # θ ← saved θ: bitwise (subtracting ε is not exact, spreads NaN)
                        torch._foreach_copy_(params, saved)
                self._postmix(post, collected)

        with torch.no_grad():
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if use_scaler:
                scaler.unscale_(self.base_optimizer)
            if reuse is not None and active:
                assert g1_norm is not None
                reuse.store(
                    collected,
                    g1_norm=g1_norm,
                    eps=self.eps,
                    norm_perturbations=self.norm_perturbations,
                    scale_inv=scale_inv,
                    process_group=reuse_group,
                    keep_on_overflow=use_scaler,
                )
            elif reuse is not None and gnp_on:
                reuse.apply(self.param_groups, grads, weight=self.reuse_weight)  # unscaled, synchronised, unclipped
            grad_norm = global_norm(grads)
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
