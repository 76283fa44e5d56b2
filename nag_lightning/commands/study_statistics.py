"""The statistical tests behind a study's tables (``study_report``): Welch's t-test, Holm's
correction, TOST equivalence, the verdict, the detectable difference, and the least-squares slopes
of the depth trend. Pure functions of numbers; scipy supplies the distributions."""

from __future__ import annotations

import math
import statistics

ALPHA = 0.05
# z_{1-alpha/2} + z_{power} for alpha 0.05 two-sided and 80% power (1.960 + 0.842): the normal
# approximation of the smallest difference a two-sample test detects, 2.8 * sd * sqrt(2 / n).
Z_SUM = 2.8


def welch(values: list[float], reference: list[float]) -> tuple[float, float, float, float]:
    """(mean difference, 95% CI low, high, p-value) of ``values`` minus ``reference`` (Welch's t-test)."""
    difference = statistics.fmean(values) - statistics.fmean(reference)
    if len(values) < 2 or len(reference) < 2:
        return difference, math.nan, math.nan, math.nan
    from scipy import stats

    test = stats.ttest_ind(values, reference, equal_var=False)
    interval = test.confidence_interval(0.95)
    return difference, float(interval.low), float(interval.high), float(test.pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate
    without assuming independence): the i-th smallest of m is multiplied by m - i + 1, capped at 1,
    and kept from falling below the one before it. A NaN (no test) stays NaN and is not counted in m."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def tost(values: list[float], reference: list[float], margin: float) -> float:
    """p-value of two one-sided Welch t-tests that ``values`` minus ``reference`` lies within
    ±``margin`` (H0: the difference is <= -margin, or >= +margin): the larger of the two p-values."""
    if len(values) < 2 or len(reference) < 2:
        return math.nan
    from scipy import stats

    above = stats.ttest_ind([v + margin for v in values], reference, equal_var=False, alternative="greater")
    below = stats.ttest_ind([v - margin for v in values], reference, equal_var=False, alternative="less")
    return float(max(above.pvalue, below.pvalue))


def verdict(p_holm: float, tost_p_holm: float) -> str:
    """"equivalent" when the Holm-adjusted TOST rejects a difference beyond the margin (checked first:
    a difference both significant and within the margin is too small to matter), "different" when
    the Holm-adjusted Welch test rejects no difference, else "inconclusive" (NaN: no test)."""
    if tost_p_holm < ALPHA:
        return "equivalent"
    if p_holm < ALPHA:
        return "different"
    return "inconclusive"


def detectable_difference(sd: float, seeds: int) -> float:
    """The smallest true difference (nats) a two-sided test at alpha 0.05 detects with 80% power,
    with ``seeds`` runs per arm and standard deviation ``sd`` (normal approximation)."""
    return Z_SUM * sd * math.sqrt(2 / seeds)


def slope(x: list[float], y: list[float]) -> tuple[float, float, float, float]:
    """(slope, 95% CI low, high, p-value) of the least-squares line of ``y`` on ``x``: the standard
    error from the residuals, the CI and p (for a slope of zero) from the t distribution with
    n - 2 degrees of freedom. NaN without three points at two distinct x."""
    if len(x) < 3 or len(set(x)) < 2:
        return math.nan, math.nan, math.nan, math.nan
    from scipy import stats

    fit = stats.linregress(x, y)
    half = float(stats.t.ppf(1 - ALPHA / 2, len(x) - 2)) * fit.stderr
    return float(fit.slope), float(fit.slope - half), float(fit.slope + half), float(fit.pvalue)


def slope_of_means(x: list[float], mine: list[list[float]],
                   base: list[list[float]]) -> tuple[float, float, float, float]:
    """(slope, 95% CI low, high, p-value) of the least-squares line of the difference of means
    (``mine[k]`` minus ``base[k]``, the losses at ``x[k]``) on ``x``. Each difference's variance is
    s²(1/n_mine + 1/n_base), s² the within-group variance pooled over every group, so the slope's is
    sum((x - mean x)² var_k) / Sxx²; the CI and p come from the t distribution with the pooled
    degrees of freedom. NaN without two distinct x or any group of two."""
    groups = mine + base
    dof = sum(len(g) - 1 for g in groups)
    if len(set(x)) < 2 or dof < 1:
        return math.nan, math.nan, math.nan, math.nan
    from scipy import stats

    pooled = sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) > 1) / dof
    centred = [value - statistics.fmean(x) for value in x]
    sxx = sum(c * c for c in centred)
    differences = [statistics.fmean(m) - statistics.fmean(b) for m, b in zip(mine, base)]
    fitted = sum(c * d for c, d in zip(centred, differences)) / sxx
    error = math.sqrt(pooled * sum(c * c * (1 / len(m) + 1 / len(b)) for c, m, b in zip(centred, mine, base))) / sxx
    if error == 0:
        return fitted, fitted, fitted, math.nan
    half = float(stats.t.ppf(1 - ALPHA / 2, dof)) * error
    return fitted, fitted - half, fitted + half, float(2 * stats.t.sf(abs(fitted) / error, dof))
