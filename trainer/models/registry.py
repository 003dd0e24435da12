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

A model's family is the module that registered it (``wrn28_10`` -> ``wideresnet``,
``wrn26_2x96_shakeshake`` -> ``shakeshake``; ``model_family``). Each family declares one debug
variant (``register_debug_variant``): a tiny member that the CPU tests build in place of the
family's full-size models; ``debug_variant(name)`` answers it for any member, ``debug_variants()``
lists them all.

The registry itself is plain Python; the families register themselves when
``trainer.models`` is imported.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, TypeVar

from torch import nn

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "model_options",
    "model_family",
    "register_debug_variant",
    "debug_variant",
    "debug_variants",
]

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

# Arguments every builder receives; everything else is a family-specific option.
_COMMON_ARGS = ("num_classes", "in_channels", "image_size")

_REGISTRY: dict[str, Builder] = {}
# family -> the name of its debug variant
_DEBUG: dict[str, str] = {}


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


def model_family(name: str) -> str:
    """The family of the registered model ``name``: the last part of its builder's module name."""
    return (getattr(_lookup(name), "__module__", None) or "").rsplit(".", 1)[-1]


def register_debug_variant(name: str) -> None:
    """Declare the registered model ``name`` the debug variant of its family.

    One per family: declaring a second one raises ``ValueError`` (which one the tests build would
    otherwise depend on import order); declaring the same name again is a no-op.
    """
    family = model_family(name)
    current = _DEBUG.get(family, name)
    if current != name:
        raise ValueError(f"model: family {family!r} already has the debug variant {current!r}, not {name!r}")
    _DEBUG[family] = name


def debug_variant(name: str) -> str:
    """The debug variant of the family of the registered model ``name`` (``wrn28_10`` -> ``wrn_debug``)."""
    family = model_family(name)
    if family not in _DEBUG:
        raise ValueError(
            f"model: family {family!r} (of {name!r}) declares no debug variant; "
            f"families with one: {', '.join(sorted(_DEBUG)) or 'none'}"
        )
    return _DEBUG[family]


def debug_variants() -> dict[str, str]:
    """Every family's debug variant, ``{family: name}``, sorted by family."""
    return dict(sorted(_DEBUG.items()))


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
