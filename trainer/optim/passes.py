"""Per-pass module policy of a GNP step: what the model's modules see in each forward/backward pass.

A GNP step runs the model twice, at θ (pass 1) and at θ + ε (pass 2); a plain step runs it once. The
passes differ in four module-level settings, all applied by ONE context manager, ``pass_policy``:

============  ===============================  ==================================  =====================
pass          ``true_gradient`` attribute      DDP gradient synchronisation        BatchNorm / RNG
============  ===============================  ==================================  =====================
PLAIN (0)     False                            as configured (on)                  untouched
FIRST (1)     True (Shake-Shake / ShakeDrop:   off unless ``sync`` (what DDP's     RNG state snapshot
              the backward uses the forward's  ``no_sync()`` sets: the flag        taken on entry
              coefficients)                    ``require_backward_grad_sync``)     (``.rng``)
SECOND (2)    False                            as configured (on)                  running stats frozen;
                                                                                   RNG restored on entry
============  ===============================  ==================================  =====================

* RNG: pass 2 must draw the same dropout masks and Shake-Shake gates as pass 1, so pass 1 snapshots
  the CPU RNG (and the CUDA RNG of ``device``) on entry and pass 2 puts it back on entry.
* BatchNorm: pass 2's batch is the same batch at a perturbed θ; counting it in the running statistics
  would weight that batch twice. ``track_running_stats=False`` in train mode normalises with batch
  statistics and touches neither running_mean/var nor num_batches_tracked (``momentum=0`` would still
  bump num_batches_tracked and turn a NaN batch mean into NaN running stats). Layers already off are
  left alone and are not "restored", so nested or repeated use cannot flip a layer the user turned off.
* DDP: pass 1 must not all-reduce (each rank perturbs with its own g1); DDP decides at FORWARD time
  whether the backward synchronises, so the setting has to cover the forward too.

Everything changed is put back on exit, also when the body raises (``true_gradient`` to the value it
had, BatchNorm tracking and DDP synchronisation back on); the RNG is not rewound on exit.

Two ways to find the modules, for GNP's two entry points:

* ``model=`` (``train_step``): a module or a ``ModelModules`` (the lists found once per model object,
  which is what GNP caches); the settings are applied on entry.
* ``model=None`` (``step(closure)``, which never sees the model): a global forward pre-hook applies the
  settings to the whole subtree of every module the body calls, at its first call, before DDP's forward
  decides about synchronisation. ``.ddps`` lists the DDP wrappers met either way.

Plain PyTorch: nothing here imports the trainer package.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["FIRST", "PLAIN", "SECOND", "ModelModules", "RngSnapshot", "pass_policy"]

PLAIN, FIRST, SECOND = 0, 1, 2


class RngSnapshot:
    """CPU RNG state plus the CUDA RNG state of ``device`` (host-side copies, no sync)."""

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


def _classify(
    modules: Iterable[nn.Module],
) -> tuple[list[_BatchNorm], list[nn.Module], list[DistributedDataParallel]]:
    """(BatchNorm layers, modules with a ``true_gradient`` attribute, DDP wrappers) among ``modules``."""
    batchnorms, flagged, ddps = [], [], []
    for m in modules:
        if isinstance(m, _BatchNorm):
            batchnorms.append(m)
        if hasattr(m, "true_gradient"):
            flagged.append(m)
        if isinstance(m, DistributedDataParallel):
            ddps.append(m)
    return batchnorms, flagged, ddps


class ModelModules:
    """The modules of one model that the policy touches, found once (``model.modules()`` per step is slow).

    A DDP wrapper is found as the model itself, under ``torch.compile``'s ``_orig_mod`` or anywhere
    below. It is held weakly: an optimizer outliving its DDP model must not keep the reducer alive
    (gloo aborts at exit when DDP objects survive destroy_process_group).
    """

    def __init__(self, model: nn.Module) -> None:
        self.ref = weakref.ref(model)
        self.batchnorms, self.flagged, ddps = _classify(model.modules())
        self._ddp_refs = [weakref.ref(d) for d in ddps]

    def is_for(self, model: nn.Module) -> bool:
        """True when these lists were found in ``model`` (the very object, still alive)."""
        return self.ref() is model

    @property
    def ddps(self) -> list[DistributedDataParallel]:
        return [d for d in (r() for r in self._ddp_refs) if d is not None]


class pass_policy:  # lower case: used like torch.no_grad
    """Apply one pass's module settings for the duration of a ``with`` block (module docstring).

    Args:
        pass_: ``PLAIN``, ``FIRST`` or ``SECOND``.
        model: the model the body runs (a module or its ``ModelModules``), or None for the global
            forward pre-hook (every module the body calls).
        sync: FIRST only: keep DDP synchronisation on (GNP's ``sync_perturbations``).
        device: FIRST only: the parameters' device, whose CUDA RNG is snapshotted with the CPU one.
        rng: SECOND only: the FIRST pass's ``.rng``, restored on entry (None: the RNG is left alone).

    Attributes after entry: ``rng`` (FIRST: the snapshot), ``ddps`` (the DDP wrappers met).
    """

    def __init__(
        self,
        pass_: int,
        *,
        model: nn.Module | ModelModules | None = None,
        sync: bool = False,
        device: torch.device | None = None,
        rng: RngSnapshot | None = None,
    ) -> None:
        if pass_ not in (PLAIN, FIRST, SECOND):
            raise ValueError(f"pass_policy: pass_ must be PLAIN (0), FIRST (1) or SECOND (2), got {pass_!r}")
        self.pass_ = pass_
        self.modules = ModelModules(model) if isinstance(model, nn.Module) else model
        self.sync = sync
        self.device = device if device is not None else torch.device("cpu")
        self.rng = rng
        self.ddps: list[DistributedDataParallel] = []
        self._flags: list[tuple[nn.Module, Any]] = []  # (module, true_gradient before)
        self._frozen: list[_BatchNorm] = []
        self._unsynced: list[DistributedDataParallel] = []
        self._seen: set[int] = set()
        self._handle: Any = None

    def _apply(
        self, batchnorms: list[_BatchNorm], flagged: list[nn.Module], ddps: list[DistributedDataParallel]
    ) -> None:
        """The policy itself (both ways of finding modules end here)."""
        for m in flagged:
            self._flags.append((m, m.true_gradient))
            m.true_gradient = self.pass_ == FIRST
        self.ddps.extend(ddps)
        if self.pass_ == SECOND:
            changed = [m for m in batchnorms if m.track_running_stats]
            for m in changed:
                m.track_running_stats = False
            self._frozen.extend(changed)
        elif self.pass_ == FIRST and not self.sync:
            for d in ddps:
                if d.require_backward_grad_sync:
                    d.require_backward_grad_sync = False
                    self._unsynced.append(d)

    def _hook(self, module: nn.Module, args: Any) -> None:
        if id(module) in self._seen:
            return None
        new = [m for m in module.modules() if id(m) not in self._seen]
        self._seen.update(id(m) for m in new)
        self._apply(*_classify(new))
        return None

    def __enter__(self) -> pass_policy:
        if self.pass_ == FIRST:
            self.rng = RngSnapshot(self.device)
        elif self.pass_ == SECOND and self.rng is not None:
            self.rng.restore()
        if self.modules is None:
            self._handle = nn.modules.module.register_module_forward_pre_hook(self._hook)
        else:
            self._apply(self.modules.batchnorms, self.modules.flagged, self.modules.ddps)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for m in self._frozen:
            m.track_running_stats = True
        for d in self._unsynced:
            d.require_backward_grad_sync = True
        for m, value in reversed(self._flags):
            m.true_gradient = value
        self._frozen, self._unsynced, self._flags = [], [], []
