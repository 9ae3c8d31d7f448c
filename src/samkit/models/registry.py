"""A small model registry: ``@register_model``, ``create_model(name)``, ``list_models()``.

Besides single names, a *model family* maps every name matching a pattern to a model (e.g.
``wrn_{depth}_{k}``), see :func:`register_model_family`. The registry knows no architecture
itself: the architecture modules register their models and families when imported (importing
:mod:`samkit.models` imports the built-in ones).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import torch
import torch.nn as nn

__all__ = [
    "MAX_PARAMETERS",
    "count_parameters",
    "create_model",
    "is_model",
    "list_model_families",
    "list_models",
    "model_name_problem",
    "register_model",
    "register_model_family",
]

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclass(frozen=True)
class _Family:
    pattern: re.Pattern[str]
    builder: Callable[..., nn.Module]
    display: str
    check: Callable[[str], object] | None


#: pattern text -> family, in registration order (the first match builds).
_FAMILIES: dict[str, _Family] = {}


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


def register_model_family(
    pattern: str | re.Pattern[str],
    builder: Callable[..., nn.Module],
    *,
    display: str | None = None,
    check: Callable[[str], object] | None = None,
) -> None:
    """Register a family of models: every name that ``pattern`` (a regular expression) matches
    in full and that is not a registered model name.

    ``create_model(name, num_classes=..., in_channels=..., **kwargs)`` calls
    ``builder(name, num_classes=..., in_channels=..., **kwargs)``; the builder raises
    ``ValueError`` for a name that matches but names no possible model (e.g. ``wrn_27_10``).
    :func:`is_model` does not build anything: it calls ``check(name)`` (when given), for which
    ``ValueError`` likewise means "not a model". ``display`` is how the family is named to
    users (default: the pattern), e.g. ``"wrn_{depth}_{k}"``. Registering a pattern again is
    harmless with the same arguments and an error with others.
    """
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    family = _Family(compiled, builder, display or compiled.pattern, check)
    old = _FAMILIES.get(compiled.pattern)
    if old is not None and old != family:
        raise ValueError(f"a model family {old.display!r} is already registered")
    _FAMILIES[compiled.pattern] = family


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a shell-style pattern.

    Members of model families are not listed (see :func:`list_model_families`).
    """
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def list_model_families() -> list[str]:
    """Sorted display names of the registered model families, e.g. ``["wrn_{depth}_{k}"]``."""
    return sorted(f.display for f in _FAMILIES.values())


def _family(name: str) -> _Family | None:
    """The first registered family whose pattern matches all of ``name``."""
    for family in _FAMILIES.values():
        if family.pattern.fullmatch(name):
            return family
    return None


def model_name_problem(name: str) -> str | None:
    """Why ``name`` names no model, or None if it names one: ``"unknown model 'x'"``, or what
    its family's check says of an impossible member (``wrn_27_10``: the depth is not 6n + 4)."""
    if name in _REGISTRY:
        return None
    family = _family(name)
    if family is None:
        return f"unknown model {name!r}"
    if family.check is not None:
        try:
            family.check(name)
        except ValueError as exc:
            return str(exc)
    return None


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model or a possible member of a model family."""
    return model_name_problem(name) is None


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name``; unknown names raise ``ValueError`` listing the known."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        family = _family(name)
        if family is not None:  # its builder raises ValueError for an impossible member
            return family.builder(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
        known = ", ".join(list_models()) or "(none)"
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)


#: The most parameters a model may have (4 GB of float32 weights; SAM keeps about four copies):
#: 15 times the largest built-in model (EfficientNet-B7, 64M), and what stops ``wrn_1000_1000``
#: (1.6e13) from being allocated for minutes before the machine runs out of memory.
MAX_PARAMETERS = 1_000_000_000


@functools.lru_cache(maxsize=64)
def _meta_count(name: str, num_classes: int, in_channels: int, kwargs: tuple) -> int | None:
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = create_model(name, num_classes, in_channels, **dict(kwargs))
    except ValueError:
        raise
    except Exception:  # a model that cannot be built on the meta device: count unknown
        return None
    return sum(p.numel() for p in model.parameters())


def count_parameters(
    name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> int | None:
    """The number of parameters of model ``name``, built on the ``meta`` device (no memory is
    allocated; WRN-28-10 takes milliseconds); None if it cannot be built there. ``ValueError``
    as :func:`create_model` for an unknown name."""
    try:
        key = tuple(sorted(kwargs.items()))
        hash(key)
    except TypeError:  # unhashable keyword values (lists): not cached
        return _meta_count.__wrapped__(name, num_classes, in_channels, tuple(kwargs.items()))
    return _meta_count(name, num_classes, in_channels, key)
