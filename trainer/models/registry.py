"""Name registry for model builders.

Every model the trainer can build is registered under one lower-case name by a builder
function with the signature::

    @register_model("resnet50")
    def resnet50(*, num_classes: int, in_channels: int, image_size: int, stem: str | None = None) -> nn.Module:
        ...

``create_model(name, num_classes=..., **options)`` looks the name up, checks the options
against the builder's own keyword-only parameters (so a typo fails loudly instead of being
swallowed by ``**kwargs``), and calls it. ``list_models(pattern)`` is what the tests iterate
over: every registered name must build, run forward and backward, and give every parameter a
gradient (GNP's global gradient norm and DDP's bucketed all-reduce both rely on that).

The registry itself is plain Python; the families register themselves when
``trainer.models`` is imported.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, TypeVar

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_options"]

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

# Arguments every builder receives; everything else is a family-specific option.
_COMMON_ARGS = ("num_classes", "in_channels", "image_size")

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[_B], _B]:
    """Decorator that registers ``builder`` under ``name``.

    The builder must accept the keyword arguments ``num_classes``, ``in_channels`` and
    ``image_size`` plus its own keyword-only options. Registering a name twice raises
    ``ValueError`` (a silent overwrite would make the model depend on import order).
    """
    if not name or name != name.strip():
        raise ValueError(f"model: invalid registry name {name!r}")

    def decorator(builder: _B) -> _B:
        if name in _REGISTRY:
            raise ValueError(f"model: name {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        params = inspect.signature(builder).parameters
        missing = [arg for arg in _COMMON_ARGS if arg not in params]
        if missing and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"model: builder for {name!r} must accept {', '.join(missing)}")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (case-sensitive), sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern))


def model_options(name: str) -> dict[str, object]:
    """The family-specific options of ``name`` and their defaults (for help texts and tests)."""
    builder = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.name not in _COMMON_ARGS and p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    **kwargs: object,
) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: a name from ``list_models()``.
        num_classes: size of the classifier output.
        in_channels: channels of the input images (3 for RGB; grayscale data may be replicated).
        image_size: side length of the (square) training images; some families use it to pick
            their stem (see ``trainer.models.resnet``), the others ignore it.
        **kwargs: family-specific options, e.g. ``stem="imagenet"`` or ``dropout=0.3``.

    Raises:
        ValueError: unknown name (with a did-you-mean), unknown option, or invalid size.
    """
    builder = _lookup(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model: {key} must be a positive integer, got {value!r}")
    allowed = model_options(name)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown and not takes_any:
        allowed_text = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"model: unknown option(s) {', '.join(repr(k) for k in unknown)} for {name!r}; allowed: {allowed_text}"
        )
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def _lookup(name: str) -> Builder:
    """The builder registered as ``name``; ``ValueError`` with suggestions otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"model: unknown {name!r}; {hint}available: {', '.join(list_models())}")
