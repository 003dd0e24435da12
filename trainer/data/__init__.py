"""Data layer: dataset conversion to FFCV (`convert`) and FFCV loaders (`build_loaders`).

FFCV (unmaintained upstream, numba-compiled) is only imported inside the functions that need it,
so importing this package stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["convert", "build_loaders", "validate_dataset", "Loaders"]

if TYPE_CHECKING:
    from .convert import convert
    from .loaders import Loaders, build_loaders, validate_dataset


def __getattr__(name: str) -> Any:
    # Lazy re-exports: `from trainer.data import build_loaders` without importing ffcv/torch eagerly.
    if name == "convert":
        from .convert import convert
        return convert
    if name in ("build_loaders", "validate_dataset", "Loaders"):
        from . import loaders
        return getattr(loaders, name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
