"""mean_ci and paired_difference against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from samkit.report import Estimate, mean_ci, paired_difference

# t_{0.975, 2}, the 95% factor for three seeds. With 2 degrees of freedom the quantile has the
# closed form t_p = (2p - 1) sqrt(2 / (1 - (2p - 1)^2)) = 0.95 sqrt(2 / 0.0975)
# = 4.30265272974946...; the often quoted 4.302652729911275 is off by 1.6e-10.
T_975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))


def test_the_quantile_by_hand():
    exact = 4.3026527297494638
    assert exact == pytest.approx(T_975_DF2, rel=1e-15)
    assert scipy_stats.t.ppf(0.975, 2) == pytest.approx(exact, rel=1e-14)
    quoted = 4.302652729911275
    assert quoted == pytest.approx(exact, rel=1e-10)


def test_three_seeds_mean_std_and_t_interval():
    est = mean_ci([0.10, 0.12, 0.14])
    assert est.n == 3 and est.confidence == 0.95
    assert est.mean == pytest.approx(0.12, abs=1e-15)
    assert est.std == pytest.approx(0.02, rel=1e-12)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    half = T_975_DF2 * 0.02 / math.sqrt(3)
    assert est.half_width == pytest.approx(half, rel=1e-12)
    assert est.ci_low == pytest.approx(0.12 - half, rel=1e-12)
    assert est.ci_high == pytest.approx(0.12 + half, rel=1e-12)


def test_another_confidence_uses_its_own_quantile():
    # t_{0.95, 1} = tan(pi * (0.95 - 1/2)) = 6.313751514675...: the Cauchy distribution's quantile
    est = mean_ci([1.0, 3.0], confidence=0.9)
    assert est.mean == 2.0 and est.std == pytest.approx(math.sqrt(2))
    t = math.tan(math.pi * 0.45)
    assert est.half_width == pytest.approx(t * math.sqrt(2) / math.sqrt(2), rel=1e-12)


def test_one_value_has_no_spread_not_nan():
    est = mean_ci([0.25])
    assert est == Estimate(0.25, None, 1, None, None, None, 0.95)
    assert est.to_dict()["std"] is None


def test_equal_values_give_a_zero_width_interval():
    est = mean_ci([0.5, 0.5, 0.5])
    assert (est.std, est.half_width, est.ci_low, est.ci_high) == (0.0, 0.0, 0.5, 0.5)


@pytest.mark.parametrize("bad", [[], [0.1, math.nan], [math.inf]])
def test_no_or_non_finite_values_are_an_error(bad):
    with pytest.raises(ValueError):
        mean_ci(bad)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_confidence_outside_the_open_unit_interval(confidence):
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence)


def test_paired_difference_by_hand():
    # d = a - b = -0.01, -0.02, -0.02 over seeds 0, 1, 2 (seed 3 only in a, seed 9 only in b)
    a = {0: 0.09, 1: 0.10, 2: 0.12, 3: 0.5}
    b = {0: 0.10, 1: 0.12, 2: 0.14, 9: 0.0}
    d = paired_difference(a, b)
    assert d.n_pairs == d.n == 3
    assert d.differences == pytest.approx({0: -0.01, 1: -0.02, 2: -0.02})
    mean = -0.05 / 3
    std = 0.01 / math.sqrt(3)  # deviations 2/300, -1/300, -1/300: sqrt((6/300^2) / 2)
    assert d.mean == pytest.approx(mean, rel=1e-12)
    assert d.std == pytest.approx(std, rel=1e-9)
    assert d.half_width == pytest.approx(T_975_DF2 * std / math.sqrt(3), rel=1e-9)
    # t = mean / (std / sqrt 3) = -5; with 2 degrees of freedom the two-sided p-value is
    # 1 - |t| / sqrt(t^2 + 2) = 1 - 5 / sqrt(27)
    assert d.p_value == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-9)
    ref = scipy_stats.ttest_rel([0.09, 0.10, 0.12], [0.10, 0.12, 0.14])
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_paired_difference_of_one_pair_has_no_p_value():
    d = paired_difference({0: 0.3, 1: 0.2}, {1: 0.25, 5: 0.0})
    assert (d.n_pairs, d.mean, d.std, d.half_width, d.p_value) == (
        1,
        pytest.approx(-0.05),
        None,
        None,
        None,
    )


def test_paired_difference_with_constant_differences():
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5}).p_value == 0.0
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p_value == 1.0


def test_paired_difference_without_common_seeds():
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})
