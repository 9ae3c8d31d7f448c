"""Statistics over seeds: the mean with a Student-t confidence interval, and paired differences.

For values ``x_1 .. x_n`` (one per seed) and a confidence ``c`` in (0, 1)::

    mean       = (1/n) sum_i x_i
    std        = sqrt( sum_i (x_i - mean)^2 / (n - 1) )          (sample std, ddof = 1)
    half_width = t_{(1+c)/2, n-1} * std / sqrt(n)                 (scipy.stats.t.ppf)
    CI         = [mean - half_width, mean + half_width]

With one value the spread is unknown: ``std``, ``half_width`` and the interval are None (not NaN).

A paired difference of ``a`` and ``b`` (seed -> value each) is the estimate above of
``d_s = a_s - b_s`` over the seeds both have, with the two-sided paired t-test of "mean d = 0"::

    t = mean(d) / (std(d) / sqrt(n)),    p = 2 * (1 - F_{t, n-1}(|t|))

(None when n < 2; when every d_s is equal, std = 0 and p is 0 if they are not zero, 1 if they are).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats as scipy_stats

__all__ = ["Estimate", "PairedDifference", "mean_ci", "paired_difference", "ratio_of_means"]


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` values, their sample std and the ``confidence`` interval ``[ci_low,
    ci_high]`` = mean ± half_width (std and the interval None when n = 1)."""

    mean: float
    std: float | None
    n: int
    ci_low: float | None
    ci_high: float | None
    half_width: float | None
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference(Estimate):
    """The :class:`Estimate` of ``a_s - b_s`` over ``n_pairs`` common seeds, with the two-sided
    paired t-test's p-value (None when fewer than two pairs) and each seed's difference."""

    n_pairs: int = 0
    p_value: float | None = None
    differences: dict[Any, float] | None = None


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Estimate:
    """The mean of ``values`` with the Student-t interval ``mean ± t_{(1+c)/2, n-1} std/sqrt(n)``
    (sample std, ddof = 1); ``std`` and the interval are None for a single value.

    ``ValueError`` for no values, a non-finite value or a confidence outside (0, 1)."""
    _check_confidence(confidence)
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci: no values")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"mean_ci: non-finite value in {xs}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Estimate(mean, None, 1, None, None, None, confidence)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half, half, confidence)


def ratio_of_means(num: list[float], den: list[float], confidence: float = 0.95) -> Estimate | None:
    """``mean(num) / mean(den)`` for paired values (one pair per seed) with Fieller's interval:
    the ``theta`` with ``(m_n - theta m_d)^2 <= t^2 / n * var(num - theta den)``, ``t`` the
    Student-t quantile with n - 1 degrees of freedom (sample variances and covariance, ddof 1).
    The interval is None (unbounded) when ``mean(den)`` is not significantly away from 0 at
    that level, and for one pair; the estimate is None when ``mean(den)`` is 0."""
    _check_confidence(confidence)
    n = len(num)
    if n == 0 or n != len(den):
        raise ValueError(f"ratio_of_means: {n} and {len(den)} values")
    m_n, m_d = math.fsum(num) / n, math.fsum(den) / n
    if m_d == 0.0:
        return None
    ratio = m_n / m_d
    if n == 1:
        return Estimate(ratio, None, 1, None, None, None, confidence)
    s_nn = math.fsum((a - m_n) ** 2 for a in num) / (n - 1)
    s_dd = math.fsum((b - m_d) ** 2 for b in den) / (n - 1)
    s_nd = math.fsum((a - m_n) * (b - m_d) for a, b in zip(num, den)) / (n - 1)
    q = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) ** 2 / n
    a, b, c = m_d**2 - q * s_dd, -2.0 * (m_n * m_d - q * s_nd), m_n**2 - q * s_nn
    if a <= 0.0:  # the denominator's own interval contains 0: no bounded interval
        return Estimate(ratio, None, n, None, None, None, confidence)
    root = math.sqrt(max(b * b - 4.0 * a * c, 0.0))  # >= 0: theta = ratio is in the set
    return Estimate(ratio, None, n, (-b - root) / (2 * a), (-b + root) / (2 * a), None, confidence)


def _p_value(estimate: Estimate) -> float | None:
    """Two-sided paired t-test of mean 0: ``2 * t.sf(|mean| / (std / sqrt(n)), n - 1)``."""
    if estimate.std is None:
        return None
    if estimate.std == 0.0:
        return 1.0 if estimate.mean == 0.0 else 0.0
    t = estimate.mean / (estimate.std / math.sqrt(estimate.n))
    return float(2.0 * scipy_stats.t.sf(abs(t), estimate.n - 1))


def paired_difference(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], confidence: float = 0.95
) -> PairedDifference:
    """The estimate of ``d_s = a[s] - b[s]`` over the seeds ``s`` in both maps (see the module
    docstring), its ``n_pairs`` and the paired t-test's p-value (None when n_pairs < 2).

    ``ValueError`` when the maps have no seed in common."""
    common = [s for s in a if s in b]
    if not common:
        raise ValueError(
            f"paired_difference: no seed in common (a has {sorted(map(str, a))}, "
            f"b has {sorted(map(str, b))})"
        )
    diffs = {s: float(a[s]) - float(b[s]) for s in sorted(common, key=_seed_order)}
    est = mean_ci(diffs.values(), confidence)
    return PairedDifference(**asdict(est), n_pairs=est.n, p_value=_p_value(est), differences=diffs)


def _seed_order(seed: Hashable) -> tuple[int, Any]:
    """Integers first, in numeric order, then anything else by its text."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))
