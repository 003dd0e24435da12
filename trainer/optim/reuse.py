"""Gradient reuse for the plain steps between full GNP steps: the plug-in interface and LookSAM.

The training loop may mix full GNP steps with plain one-pass steps (hybrid / every-k schedules,
``GNP.train_step(..., gnp=False)``). A reuse variant keeps something from the full steps and corrects
the plain ones with it. GNP calls the variant at named points (``GradientReuse``); a new variant is
one new module with a ``GradientReuse`` subclass, its entry in ``REUSE_VARIANTS`` and its name in the
``reuse`` option of the configuration.

LookSAM (``reuse="looksam"``, after Liu et al., CVPR 2022, arXiv 2203.02714). Write the full step's
gradient as::

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
means "replay what was measured" and w scales it. GNP applies the correction only on plain steps where
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
* v is in GNP's ``state_dict()["reuse"]["v"]`` (parameter index → tensor, like the base state), so
  resumes are bitwise. It is not kept in the shared base-optimizer ``state``: Adam/AdamW initialise a
  parameter's state only when it is empty.

Plain PyTorch: nothing here imports the trainer package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .grads import Collected, accumulation_dtype, global_norm

__all__ = ["REUSE_VARIANTS", "GradientReuse", "LookSAMReuse"]


class GradientReuse(ABC):
    """The points of a GNP step where a reuse variant is called (all under ``torch.no_grad``).

    Full step: ``capture`` after pass 1 (``.grad`` = g1, still scaled by a GradScaler, not yet
    scaled for the mix), ``store`` once the mixed gradient M is in ``.grad`` (synchronised, unscaled).
    Plain step where GNP would run: ``apply`` to the synchronised, unscaled gradients before clipping.
    ``state_dict`` / ``load_state_dict``: what GNP's ``state_dict()["reuse"]`` holds.
    """

    @abstractmethod
    def capture(self, collected: Collected, *, averaged_later: bool, norm_perturbations: bool) -> None: ...

    @abstractmethod
    def store(
        self,
        collected: Collected,
        *,
        g1_norm: Tensor,
        eps: float,
        norm_perturbations: bool,
        scale_inv: Tensor | None,
        process_group: Any,
        keep_on_overflow: bool,
    ) -> None: ...

    @abstractmethod
    def apply(self, param_groups: list[dict[str, Any]], grads: list[Tensor], *, weight: float) -> None: ...

    @abstractmethod
    def state_dict(self, index: dict[Tensor, int]) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None: ...


class LookSAMReuse(GradientReuse):
    """v = g2⊥/‖g1‖ from each full step, g + α·w·‖g‖·v on plain steps (module docstring).

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

    # -- layout -------------------------------------------------------------------------------

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

    # -- the points of a step -----------------------------------------------------------------

    @torch.no_grad()
    def capture(self, collected: Collected, *, averaged_later: bool, norm_perturbations: bool) -> None:
        """After pass 1, before .grad is scaled for the mix: copy g1 into the flat scratch.

        ``averaged_later``: DDP without sync_perturbations (g1 is rank-local and gets all-reduced in
        ``store``); with the normalised mix the scratch then has a second row for g1/(‖g1‖+eps).
        """
        params = [p for _, ps, _ in collected for p in ps]
        grads = [g for _, _, gs in collected for g in gs]
        device = grads[0].device
        if any(g.device != device for g in grads):
            raise ValueError("GNP: gnp.reuse='looksam' needs every parameter with a gradient on one device")
        self.ensure(params, accumulation_dtype(grads), device)
        rows = 2 if averaged_later and norm_perturbations else 1
        scratch = self.scratch_of(rows)
        torch._foreach_copy_(self.views(scratch), grads)

    @torch.no_grad()
    def store(
        self,
        collected: Collected,
        *,
        g1_norm: Tensor,
        eps: float,
        norm_perturbations: bool,
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
        assert self.v is not None and self.scratch is not None
        n, dtype = self.numel, self.v.dtype
        g1 = self.scratch[:n]
        if scale_inv is not None:
            g1.mul_(scale_inv.to(dtype))  # a power of two: exact
        inv = (1.0 / (g1_norm + eps)).to(dtype)
        # u: the first-pass term of the mix when it is not simply inv·g1 (normalised mix under DDP)
        u: Tensor | None = None
        if process_group is not None:
            if norm_perturbations:
                u = self.scratch[n : 2 * n]
                torch.mul(g1, inv, out=u)  # this rank's g1/(‖g1_k‖+eps), averaged with g1 below
            # One collective for g1 (and u): plain steps never get here.
            dist.all_reduce(self.scratch, group=process_group)
            self.scratch.div_(dist.get_world_size(process_group))
        target = torch.empty_like(self.v) if keep_on_overflow else self.v
        # M, flat. Read p.grad afresh: DDP's reducer may re-bind .grad to its buckets in pass 2.
        torch._foreach_copy_(self.views(target), [p.grad for _, ps, _ in collected for p in ps])
        start = 0
        for group, params, _ in collected:
            end = start + sum(p.numel() for p in params)
            a = float(group["alpha"])  # > 0 in every group of a full step (GNP checks it before pass 1)
            if a != 1.0:
                seg = target[start:end]
                if u is not None:
                    seg.add_(u[start:end], alpha=-(1.0 - a))
                elif norm_perturbations:
                    seg.addcmul_(g1[start:end], inv, value=-(1.0 - a))
                else:
                    seg.add_(g1[start:end], alpha=-(1.0 - a))
                seg.div_(a)
            start = end
        # target = ḡ2 now; remove its component along ḡ1 and divide by ‖ḡ1‖
        dot = torch.dot(g1, target)
        n1 = torch.linalg.vector_norm(g1)
        inv1 = 1.0 / (n1 + eps)
        target.addcmul_(g1, dot * inv1 * inv1, value=-1.0)
        target.mul_(inv1)
        if keep_on_overflow:
            # any inf/NaN in g1 or ḡ2 makes dot or ‖ḡ1‖ non-finite; full overlap with out= is allowed
            ok = torch.isfinite(dot) & torch.isfinite(n1)
            torch.where(ok, target, self.v, out=self.v)

    @torch.no_grad()
    def apply(self, param_groups: list[dict[str, Any]], grads: list[Tensor], *, weight: float) -> None:
        """Plain step: .grad ← .grad + α·w·‖g‖·v per group (g = every gradient, synced, unscaled)."""
        if self.v is None or weight == 0:
            return
        g_norm = global_norm(grads).to(self.v.dtype)
        for group in param_groups:
            a = float(group["alpha"])
            if a == 0:
                continue
            pairs = [
                (p.grad, self.v_views[self.index[p]]) for p in group["params"] if p.grad is not None and p in self.index
            ]
            if pairs:
                gs, vs = (list(t) for t in zip(*pairs))
                torch._foreach_add_(gs, torch._foreach_mul(vs, g_norm * (a * weight)))

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self, index: dict[Tensor, int]) -> dict[str, Any]:
        """``{"v": {param index: tensor}}``, ``index`` mapping each parameter to its index in the
        optimizer's state dict (views of one flat buffer, which ``torch.save`` writes once)."""
        return {"v": {index[p]: view for p, view in zip(self.params, self.v_views)}}

    def load_state_dict(self, state: dict[str, Any], params: list[Tensor]) -> None:
        """Rebuild the flat v from ``{"v": {param index: tensor}}`` (``params`` in state-dict index
        order); an empty ``v`` means no v yet: plain steps stay plain."""
        if not isinstance(state, dict) or not isinstance(state.get("v"), dict):
            raise ValueError("GNP.load_state_dict: 'reuse' must be a dict {'v': {param index: tensor}}")
        saved = state["v"]
        self.clear()
        if not saved:
            return
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
        self.set_layout([params[i] for i, _ in items], flat)


# name (GNP's ``reuse`` setting) -> variant; "none" is the absence of a variant
REUSE_VARIANTS: dict[str, type[GradientReuse]] = {"looksam": LookSAMReuse}
