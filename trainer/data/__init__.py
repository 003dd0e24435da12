"""Data layer: dataset conversion to FFCV (`convert`), FFCV loaders (`build_loaders`) and
device-resident loaders for small datasets without FFCV (`build_memory_loaders`).

FFCV (unmaintained upstream, numba-compiled) is only imported inside the functions that need it,
so importing this package stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["convert", "build_loaders", "build_memory_loaders", "validate_dataset", "Loaders"]

if TYPE_CHECKING:
    from .convert import convert
    from .loaders import Loaders, build_loaders, validate_dataset
    from .memory import build_memory_loaders


def __getattr__(name: str) -> Any:
    # Lazy re-exports: `from trainer.data import build_loaders` without importing ffcv/torch eagerly.
    if name == "convert":
        from .convert import convert
        return convert
    if name in ("build_loaders", "validate_dataset", "Loaders"):
        from . import loaders
        return getattr(loaders, name)
    if name == "build_memory_loaders":
        from .memory import build_memory_loaders
        return build_memory_loaders
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
