"""A small model registry: ``@register_model``, ``create_model(name)``, ``list_models()``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar, overload

import torch.nn as nn

__all__ = ["create_model", "is_model", "list_models", "register_model"]

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@overload
def register_model(fn: F) -> F: ...
@overload
def register_model(fn: str | None = None) -> Callable[[F], F]: ...


def register_model(fn=None):
    """Register a model constructor under its ``__name__`` (or the name given).

    Use as ``@register_model`` or ``@register_model("name")``. The constructor must accept
    ``num_classes`` and ``in_channels`` keyword arguments. Registering a name twice is an error.
    """

    def add(f: F, name: str | None = None) -> F:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    if callable(fn):
        return add(fn)
    return lambda f: add(f, fn)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a shell-style pattern."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def is_model(name: str) -> bool:
    try:
        return name in _REGISTRY or _wrn_builder(name) is not None
    except ValueError:  # wrn_{d}_{k} with an impossible depth
        return False


def _wrn_builder(name: str) -> Callable[..., nn.Module] | None:
    """``wrn_{depth}_{width}`` names beyond the registered ones (lazy import: no cycle)."""
    from samkit.models.wide_resnet import parse_wrn_name, wrn_from_name

    if parse_wrn_name(name) is None:
        return None
    return lambda **kw: wrn_from_name(name, **kw)


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name``; unknown names raise ``ValueError`` listing the known."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        wrn = _wrn_builder(name)  # raises ValueError for a malformed depth, e.g. wrn_27_10
        if wrn is not None:
            return wrn(num_classes=num_classes, in_channels=in_channels, **kwargs)
        known = ", ".join(list_models()) or "(none)"
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
