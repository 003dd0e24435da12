"""Optimizers: the GNP wrapper (``trainer.optim.gnp``) and step schedules (``trainer.optim.schedules``)."""

from trainer.optim.gnp import GNP, StepInfo, exact_gnp_gradient

__all__ = ["GNP", "StepInfo", "exact_gnp_gradient"]
