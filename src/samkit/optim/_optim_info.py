"""The optimizer registry's two data types, :class:`OptimOption` and :class:`OptimInfo`.

:mod:`samkit.optim.registry` describes every training method with them (and re-exports them);
see its docstring. Kept apart so that the registry module is its list of methods.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer

from samkit.domains import Interval

__all__ = ["OptimInfo", "OptimOption"]

_KINDS = (float, int, bool, str)


@dataclass(frozen=True)
class OptimOption:
    """One hyper-parameter of a training method.

    ``name`` is the optimizer's constructor keyword; ``flag`` the ``samkit train`` setting (a
    ``TrainConfig`` field, snake_case) that sets it; ``help`` its one-line command-line help.
    Numbers have a ``domain``, strings may have ``choices``; ``kind`` is the Python type of a value
    (float, int, bool or str). ``optional``: None is a valid value too (the setting is
    ``kind | None``).
    """

    name: str
    flag: str
    default: Any
    help: str
    domain: Interval | None = None
    choices: tuple[str, ...] | None = None
    kind: type = float
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"option {self.name!r}: kind must be one of {_KINDS}, got {self.kind}")
        if self.domain is not None and self.kind not in (float, int):
            raise ValueError(f"option {self.name!r}: a domain is for numbers, not {self.kind}")
        if self.choices is not None and self.kind is not str:
            raise ValueError(f"option {self.name!r}: choices are for strings, not {self.kind}")
        reason = self.check(self.default)
        if reason is not None:
            raise ValueError(f"option {self.name!r}: default {self.default!r} is not {reason}")

    def describe_values(self) -> str:
        """What a valid value is, e.g. ``"a number in (0, 1]"`` or ``"one of 'a', 'b'"``."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.domain is not None:
            text = self.domain.describe(integer=self.kind is int)
        else:
            kinds = {float: "a number", int: "an integer", bool: "True or False", str: "a string"}
            text = kinds[self.kind]
        return text + " or None" if self.optional else text

    def check(self, value: Any) -> str | None:
        """None when ``value`` is valid; otherwise what it should be (``describe_values()``)."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            valid = isinstance(value, bool)
        elif self.kind is str:
            valid = isinstance(value, str) and (self.choices is None or value in self.choices)
        else:
            number = numbers.Integral if self.kind is int else numbers.Real
            valid = isinstance(value, number) and not isinstance(value, bool)
            valid = valid and (self.domain is None or self.domain.contains(value))
        return None if valid else self.describe_values()


@dataclass(frozen=True)
class OptimInfo:
    """A training method: its optimizer class and options.

    ``cls`` is None for ``"sgd"``, the base optimizer alone. ``sharpness_aware`` says whether a
    step takes SAM's two passes; ``supports_sync_perturbations`` whether the step helper may
    all-reduce the first-pass gradients (ESAM may not: its weight masks leave parameters without
    first-pass gradients). ``label(values)`` formats the run label from the option values (all
    options present); use :meth:`describe`. ``param_groups(model)``, for a method that chooses
    which parameters to perturb, builds its param groups from the model (None: all of the
    model's parameters, one group).
    """

    name: str
    cls: type[Optimizer] | None
    description: str
    paper: str = ""
    options: tuple[OptimOption, ...] = ()
    sharpness_aware: bool = True
    supports_sync_perturbations: bool = True
    label: Callable[[Mapping[str, Any]], str] | None = field(default=None, compare=False)
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = field(
        default=None, compare=False
    )

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer {self.name!r}: duplicate option names in {names}")

    def option(self, name: str) -> OptimOption:
        """The option called ``name``; ValueError naming the known options otherwise."""
        for opt in self.options:
            if opt.name == name:
                return opt
        known = ", ".join(o.name for o in self.options) or "none"
        raise ValueError(f"optimizer {self.name!r} has no option {name!r} (options: {known})")

    def defaults(self) -> dict[str, Any]:
        """Every option's default, by constructor keyword."""
        return {o.name: o.default for o in self.options}

    def validate(self, values: Mapping[str, Any]) -> None:
        """ValueError, naming this optimizer, the option and its domain, for an invalid value.

        Keys that are not options of this method are ignored (they are base-optimizer keywords).
        """
        for opt in self.options:
            if opt.name in values:
                reason = opt.check(values[opt.name])
                if reason is not None:
                    raise ValueError(
                        f"optimizer {self.name!r}: option {opt.name!r} must be {reason}, "
                        f"got {values[opt.name]!r}"
                    )

    def describe(self, kwargs: Mapping[str, Any] | None = None) -> str:
        """The run label for these option values (defaults for those missing; other keys are
        ignored), e.g. ``"SAM rho=0.05"``, ``"ASAM rho=0.1"``, ``"ESAM rho=0.05 beta=0.6
        gamma=0.5 adaptive"``."""
        values = {**self.defaults(), **(kwargs or {})}
        return self.label(values) if self.label is not None else self.name.upper()
