"""Value domains of settings: the intervals a number may lie in, and how to say so.

One vocabulary for every place that states a constraint on a number: the training settings
(:mod:`samkit.train.config`), the optimizer registry's options (:mod:`samkit.optim.registry`)
and the command line, which turns a domain into an argument type whose error reads
``'0' is not a number in (0, 1]``. A leaf module: it imports nothing from samkit.

Every number a command takes is bounded on both sides (the named domains below): a value past
the upper bound is a typo, an exponent too many, that would otherwise overflow float32 deep
inside a step (``--sam-rho 1e300``), exhaust the machine (``--threads 100000``) or run for days
before failing. Each bound is far above any published setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ANY",
    "AT_LEAST_TWO",
    "BATCH",
    "COUNT",
    "EPOCHS",
    "FRACTION",
    "Interval",
    "MAX_SCALE",
    "MAX_SEED",
    "NON_NEGATIVE",
    "PIXELS",
    "POSITIVE",
    "POSITIVE_SCALE",
    "POSITIVE_SECONDS",
    "SCALE",
    "SECONDS",
    "SEED",
    "THREADS",
    "UNIT_CLOSED_OPEN",
    "UNIT_OPEN_CLOSED",
    "WORKERS",
]


@dataclass(frozen=True)
class Interval:
    """The finite numbers between ``low`` and ``high`` (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, bool):
            return False
        if not isinstance(value, int) and not math.isfinite(value):  # ints past 1e308 too
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def describe(self, integer: bool = False) -> str:
        """What a value must be, as the end of "'x' is not ...": "a positive integer"."""
        kind = "integer" if integer else "number"
        a_kind = f"{'an' if integer else 'a'} {kind}"
        lo, hi = self.low, self.high
        if hi is None:
            if lo is None:
                return "an integer" if integer else "a finite number"
            if lo == 0:
                return f"a positive {kind}" if self.low_open else f"a non-negative {kind}"
            return f"{a_kind} {'>' if self.low_open else '>='} {_text(lo)}"
        if lo is None:
            return f"{a_kind} {'<' if self.high_open else '<='} {_text(hi)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        closed_unit = (lo, hi, self.low_open, self.high_open) == (0, 1, False, False)
        what = "a fraction" if closed_unit else a_kind
        return f"{what} in {left}{_text(lo)}, {_text(hi)}{right}"


def _text(bound: float) -> str:
    """A bound as written: ``4294967295`` and ``1000``, not ``4.29497e+09`` and ``1000.0``."""
    if float(bound).is_integer() and abs(bound) < 1e18:
        return str(int(bound))
    return f"{bound:g}"


ANY = Interval()
POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_TWO = Interval(2)
FRACTION = Interval(0, 1)
UNIT_CLOSED_OPEN = Interval(0, 1, high_open=True)
UNIT_OPEN_CLOSED = Interval(0, 1, low_open=True)

# Upper bounds (see the module docstring). Counts of things a machine has or does.
MAX_SEED = 2**32 - 1  # numpy's np.random.seed takes no more (torch takes up to 2**64 - 1)
MAX_THREADS = 1024  # threads or processes on one machine; the largest have ~768 hardware threads
MAX_BATCH = 65536  # twice the largest batch in the literature (LARS / LAMB, 32k)
MAX_EPOCHS = 100_000  # the seed's longest schedule is 1,800 epochs
MAX_COUNT = 10**9  # examples, steps: more than any data set samkit reads
MAX_PIXELS = 4096  # an image side: ImageNet crops are 224, EfficientNet-B7's 600
MAX_SECONDS = 10**7  # about 116 days
#: Scales: learning rate, rho, weight decay, clipping norm, GSAM's alpha, Friendly-SAM's sigma,
#: a landscape's range. Published values are below 10; 1000 keeps every product with a gradient's
#: reciprocal norm (up to 1e12) well inside float32.
MAX_SCALE = 1000.0

SEED = Interval(0, MAX_SEED)
THREADS = Interval(1, MAX_THREADS)
WORKERS = Interval(0, MAX_THREADS)  # 0: in the main process
BATCH = Interval(1, MAX_BATCH)
EPOCHS = Interval(1, MAX_EPOCHS)
COUNT = Interval(1, MAX_COUNT)
PIXELS = Interval(1, MAX_PIXELS)
SECONDS = Interval(0, MAX_SECONDS)
POSITIVE_SECONDS = Interval(0, MAX_SECONDS, low_open=True)
SCALE = Interval(0, MAX_SCALE)
POSITIVE_SCALE = Interval(0, MAX_SCALE, low_open=True)
