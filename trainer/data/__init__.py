"""Data layer: dataset conversion to FFCV (`convert`), FFCV loaders (`build_loaders`) and
device-resident loaders for small datasets without FFCV (`build_memory_loaders`); `build_data` picks one
for a run's `data` section.

FFCV (unmaintained upstream, numba-compiled) is only imported inside the functions that need it,
so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "convert",
    "build_data",
    "build_loaders",
    "build_memory_loaders",
    "validate_dataset",
    "Loaders",
    "LoaderFacts",
]

if TYPE_CHECKING:
    from trainer.config import DataConfig

    from .convert import convert
    from .loaders import LoaderFacts, Loaders, build_loaders, validate_dataset
    from .memory import build_memory_loaders


def build_data(cfg: DataConfig, facts: LoaderFacts) -> Loaders:
    """This rank's train and eval loaders for a run's `data` section: the FFCV or the device-resident
    loader (cfg.loader), with the run facts (batch sizes, rank, device, seed) in `facts`."""
    if cfg.loader == "memory":
        from .memory import memory_loaders_from_config

        return memory_loaders_from_config(cfg, facts)
    from .loaders import loaders_from_config

    return loaders_from_config(cfg, facts)


def __getattr__(name: str) -> Any:
    # Lazy re-exports: `from trainer.data import build_loaders` without importing ffcv/torch eagerly.
    if name == "convert":
        from .convert import convert

        return convert
    if name in ("build_loaders", "validate_dataset", "Loaders", "LoaderFacts"):
        from . import loaders

        return getattr(loaders, name)
    if name == "build_memory_loaders":
        from .memory import build_memory_loaders

        return build_memory_loaders
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
