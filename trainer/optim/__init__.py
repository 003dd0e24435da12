"""Optimizers: the GNP wrapper and what it is built from, and the step schedules.

* ``gnp``: the GNP update and its two entry points (``step(closure)``, ``train_step``).
* ``passes``: the per-pass module policy (BatchNorm freeze, RNG restore, DDP no_sync, ``true_gradient``).
* ``reuse``: gradient reuse on plain steps (the variant interface and LookSAM).
* ``grads``: the global norm and gradient layout shared by the three above (plain PyTorch, like them).
* ``factory``: ``build_optimizer`` from the ``optim`` and ``gnp`` configuration sections.
* ``schedules``: learning-rate, GR-warmup and hybrid step schedules.
"""

from trainer.optim.gnp import GNP, StepInfo, exact_gnp_gradient

__all__ = ["GNP", "StepInfo", "exact_gnp_gradient"]
