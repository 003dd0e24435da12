"""Gradient bookkeeping shared by the GNP core (``gnp.py``) and its gradient-reuse variants (``reuse.py``).

Plain PyTorch: nothing here imports the trainer package.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["Collected", "accumulation_dtype", "global_norm"]

# (param_group, its parameters that have a gradient, their gradients) for every group that has any,
# in param_group order: the layout every global norm / inner product of a step runs over.
Collected = list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 gradients, fp64 when any gradient is fp64 (verification runs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over all tensors (fused per-tensor norms, then the norm of the norms).

    Returns a 0-dim tensor on the first tensor's device; no host synchronisation.
    """
    norms = torch._foreach_norm(list(tensors), 2, dtype=accumulation_dtype(tensors))
    device = tensors[0].device
    if any(n.device != device for n in norms):  # model spread over devices: gather the partials
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))
