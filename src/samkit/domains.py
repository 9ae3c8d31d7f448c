"""Value domains of settings: the intervals a number may lie in, and how to say so.

One vocabulary for every place that states a constraint on a number: the training settings
(:mod:`samkit.train.config`), the optimizer registry's options (:mod:`samkit.optim.registry`)
and the command line, which turns a domain into an argument type whose error reads
``'0' is not a number in (0, 1]``. A leaf module: it imports nothing from samkit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ANY",
    "AT_LEAST_TWO",
    "FRACTION",
    "Interval",
    "NON_NEGATIVE",
    "POSITIVE",
    "UNIT_CLOSED_OPEN",
    "UNIT_OPEN_CLOSED",
]


@dataclass(frozen=True)
class Interval:
    """The finite numbers between ``low`` and ``high`` (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def describe(self, integer: bool = False) -> str:
        """What a value must be, as the end of "'x' is not ...": "a positive integer"."""
        kind = "integer" if integer else "number"
        lo, hi = self.low, self.high
        if hi is None:
            if lo is None:
                return "an integer" if integer else "a finite number"
            if lo == 0:
                return f"a positive {kind}" if self.low_open else f"a non-negative {kind}"
            return f"{'an' if integer else 'a'} {kind} {'>' if self.low_open else '>='} {lo:g}"
        if lo is None:
            return f"{'an' if integer else 'a'} {kind} {'<' if self.high_open else '<='} {hi:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        closed_unit = (lo, hi, self.low_open, self.high_open) == (0, 1, False, False)
        return f"{'a fraction' if closed_unit else f'a {kind}'} in {left}{lo:g}, {hi:g}{right}"


ANY = Interval()
POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_TWO = Interval(2)
FRACTION = Interval(0, 1)
UNIT_CLOSED_OPEN = Interval(0, 1, high_open=True)
UNIT_OPEN_CLOSED = Interval(0, 1, low_open=True)
