"""Two-sample statistics used by the canary analysis and the drift checks.

Plain numpy/scipy functions: a Mann-Whitney U test with a Hodges-Lehmann shift interval (rank based, so one slow
outlier cannot move it), its paired counterpart (Wilcoxon signed-rank with the one-sample Hodges-Lehmann interval),
percentile-bootstrap intervals for rates, ratios and percentiles, the distribution distances (KS, PSI) of the
output-drift checks, and AlpacaEval's length feature. Every random step takes a seed so an analysis rerun on the
same data gives the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

# Materialise all pairwise differences up to this many; above it, select order statistics by bisection.
_MAX_PAIRWISE = 2_000_000
# Elements per bootstrap chunk (resamples x sample size), to bound memory on large windows.
_BOOTSTRAP_CHUNK = 2_000_000
# Resamples expected beyond each bound of a bootstrap interval, at least: with fewer, a Bonferroni-narrow tail makes
# the bounds the most extreme resamples, whose position is mostly Monte Carlo noise.
MIN_RESAMPLES_PER_TAIL = 20


@dataclass(frozen=True)
class ShiftEstimate:
    """Location shift of `y` relative to `x` (y - x): Hodges-Lehmann estimate, its interval and its rank test."""

    shift: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided: Mann-Whitney U, or Wilcoxon signed-rank for paired samples
    n_x: int
    n_y: int


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def finite_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The finite values as a float array: a NaN (a judge score that failed) must cost its value, not the test."""
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def _kth_by_bisection(count_le: Callable[[float], int], lo: float, hi: float, k: int) -> float:
    """The smallest value v in [lo, hi] with count_le(v) >= k: the k-th smallest of a set that is too large to build,
    given how many of its members are <= any value."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if count_le(mid) >= k:
            hi = mid
        else:
            lo = mid
    return hi


def _kth_pairwise_difference(x_sorted: np.ndarray, y_sorted: np.ndarray, k: int) -> float:
    """The k-th smallest (1-based) of all y_j - x_i, without building the m*n matrix when it is large."""
    m, n = len(x_sorted), len(y_sorted)
    if m * n <= _MAX_PAIRWISE:
        diffs = np.subtract.outer(y_sorted, x_sorted).ravel()
        return float(np.partition(diffs, k - 1)[k - 1])

    def count_le(d: float) -> int:
        # y_j - x_i <= d  <=>  x_i >= y_j - d
        return int(m * n - np.searchsorted(x_sorted, y_sorted - d, side="left").sum())

    return _kth_by_bisection(count_le, float(y_sorted[0] - x_sorted[-1]), float(y_sorted[-1] - x_sorted[0]), k)


def _kth_walsh_average(d_sorted: np.ndarray, k: int) -> float:
    """The k-th smallest (1-based) of the n(n+1)/2 Walsh averages (d_i + d_j) / 2, i <= j, without building them
    all when there are many."""
    n = len(d_sorted)
    if n * (n + 1) // 2 <= _MAX_PAIRWISE:
        rows, cols = np.triu_indices(n)
        walsh = 0.5 * (d_sorted[rows] + d_sorted[cols])
        return float(np.partition(walsh, k - 1)[k - 1])

    def count_le(a: float) -> int:
        # pairs i <= j with d_i + d_j <= 2a: for each i, the j >= i below 2a - d_i
        below = np.searchsorted(d_sorted, 2 * a - d_sorted, side="right")
        return int(np.maximum(below - np.arange(n), 0).sum())

    return _kth_by_bisection(count_le, float(d_sorted[0]), float(d_sorted[-1]), k)


def mann_whitney_shift(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                       confidence: float = 0.95) -> ShiftEstimate:
    """Mann-Whitney U test of y against x, with the Hodges-Lehmann shift and its distribution-free interval.

    The interval is the pair of order statistics of the m*n differences that the U distribution (normal
    approximation) puts at the requested confidence; it needs no assumption about the shape of either sample.
    """
    xs, ys = np.sort(finite_values(x)), np.sort(finite_values(y))
    m, n = len(xs), len(ys)
    if m == 0 or n == 0:
        raise ValueError("mann_whitney_shift needs at least one finite value in each sample")
    mn = m * n
    median = 0.5 * (_kth_pairwise_difference(xs, ys, (mn + 1) // 2) + _kth_pairwise_difference(xs, ys, mn // 2 + 1))
    z = sps.norm.ppf(0.5 + confidence / 2)
    k = int(math.floor(mn / 2 - z * math.sqrt(mn * (m + n + 1) / 12.0)))
    if k < 1:  # too few values for this confidence: the interval is the full range of differences
        low, high = float(ys[0] - xs[-1]), float(ys[-1] - xs[0])
    else:
        low, high = _kth_pairwise_difference(xs, ys, k), _kth_pairwise_difference(xs, ys, mn - k + 1)
    if np.ptp(np.concatenate([xs, ys])) == 0:
        p = 1.0
    else:
        p = float(sps.mannwhitneyu(ys, xs, alternative="two-sided", method="asymptotic").pvalue)
    return ShiftEstimate(float(median), float(low), float(high), p, m, n)


def wilcoxon_shift(differences: Sequence[float] | np.ndarray, confidence: float = 0.95) -> ShiftEstimate:
    """Wilcoxon signed-rank test of paired differences (y - x per pair), with the one-sample Hodges-Lehmann shift
    (median of the Walsh averages) and its distribution-free interval.

    For paired data: the unpaired Mann-Whitney test compares the two samples' spreads of values, and a small shift
    that is consistent pair by pair drowns in them. Zero differences (ties on a rubric) split their ranks between
    the two sides ('zsplit'), as they stay among the Walsh averages of the interval.
    """
    d = np.sort(finite_values(differences))
    n = len(d)
    if n == 0:
        raise ValueError("wilcoxon_shift needs at least one finite difference")
    total = n * (n + 1) // 2
    median = 0.5 * (_kth_walsh_average(d, (total + 1) // 2) + _kth_walsh_average(d, total // 2 + 1))
    z = sps.norm.ppf(0.5 + confidence / 2)
    k = int(math.floor(total / 2 - z * math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)))
    if k < 1:  # too few pairs for this confidence: the interval is the full range of differences
        low, high = float(d[0]), float(d[-1])
    else:
        low, high = _kth_walsh_average(d, k), _kth_walsh_average(d, total - k + 1)
    if not d.any():
        p = 1.0
    else:
        p = float(sps.wilcoxon(d, zero_method="zsplit", method="approx").pvalue)
    return ShiftEstimate(float(median), float(low), float(high), p, n, n)


def fewest_decisive_pairs(confidence: float) -> int:
    """The fewest pairs on which a change can be significant at `confidence` (two-sided): n pairs that all move
    the same way have a sign-test p-value of 2 * 0.5**n, the smallest any test of n pairs can give (an unpaired
    comparison of n values a side can do no better). A percentile bootstrap of fewer values can still give an
    interval that excludes no change (two equal values resample to a point): that is its degeneracy, not evidence."""
    tail = (1 - confidence) / 2
    return max(1, math.ceil(math.log2(1 / tail) - 1e-9))


Statistic = Callable[..., np.ndarray]


def bootstrap_interval(statistic: Statistic, groups: Sequence[Sequence[np.ndarray]], resamples: int = 2000,
                       confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `statistic` over independently resampled groups.

    `groups` is a list of groups; the arrays within a group share one index and are resampled together (paired
    data), different groups are resampled independently (unpaired data). `statistic` receives every array, in
    order, as a 2-D array (resamples x n) and returns one value per row; it is called once on the data itself
    (as 1 x n arrays) for the estimate. An infinite value is kept (a candidate with no accepted answer has an
    infinite cost per outcome); resamples where the statistic is NaN (0/0) are dropped, and if more than half
    are, the interval is NaN. `resamples` is raised to MIN_RESAMPLES_PER_TAIL / tail where that is more (4000 at
    99%, 40000 at the 99.9% of 10 Bonferroni-adjusted slices), so a bound is never just the extreme resample.
    """
    tail = (1 - confidence) / 2
    resamples = max(resamples, math.ceil(MIN_RESAMPLES_PER_TAIL / tail))
    arrays = [[np.asarray(a, dtype=float) for a in group] for group in groups]
    for group in arrays:
        if len({len(a) for a in group}) != 1 or len(group[0]) == 0:
            raise ValueError("bootstrap_interval: the arrays of a group must be non-empty and of equal length")
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(statistic(*[a[None, :] for group in arrays for a in group])[0])
    rng = np.random.default_rng(seed)
    largest = max(len(group[0]) for group in arrays)
    chunk = max(1, min(resamples, _BOOTSTRAP_CHUNK // largest))
    values: list[np.ndarray] = []
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        drawn = []
        for group in arrays:
            idx = rng.integers(0, len(group[0]), size=(b, len(group[0])))
            drawn.extend(a[idx] for a in group)
        with np.errstate(divide="ignore", invalid="ignore"):
            values.append(np.asarray(statistic(*drawn), dtype=float))
        done += b
    boot = np.concatenate(values)
    defined = np.sort(boot[~np.isnan(boot)])
    if len(defined) < resamples / 2:
        return Interval(estimate, math.nan, math.nan)
    # Order statistics rather than interpolation, so infinite values stay well defined.
    low = defined[int(math.floor(tail * (len(defined) - 1)))]
    high = defined[int(math.ceil((1 - tail) * (len(defined) - 1)))]
    return Interval(estimate, float(low), float(high))


def _psi_shares(ref: np.ndarray, cur: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's share per bin: one bin per distinct value of either sample when the reference has at most
    `bins` of them (judge scores on a rubric), else the reference's quantile bins and a bin beyond each end of its
    range. Without those, a tied top value shared its bin with everything above it, and a shift past it was not
    seen. The outer bins hold one pseudo-value in both samples: about 1/(n+1) of new values land beyond a sample's
    range when nothing changed, and an empty outer bin would otherwise add ~0.1 to the PSI of a 50-value window."""
    ref_values = np.unique(ref)
    if len(ref_values) <= bins:
        categories = np.union1d(ref_values, cur)
        ref_counts = np.bincount(np.searchsorted(categories, ref), minlength=len(categories)).astype(float)
        cur_counts = np.bincount(np.searchsorted(categories, cur), minlength=len(categories)).astype(float)
        return ref_counts / len(ref), cur_counts / len(cur)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    size = len(edges) + 3  # below the minimum, the quantile bins, above the maximum

    def shares(values: np.ndarray) -> np.ndarray:
        index = np.searchsorted(edges, values, side="right") + 1
        index[values < ref_values[0]] = 0
        index[values > ref_values[-1]] = size - 1
        counts = np.bincount(index, minlength=size).astype(float)
        counts[[0, -1]] += 1
        return counts / counts.sum()

    return shares(ref), shares(cur)


def population_stability_index(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray,
                               bins: int = 10) -> float:
    """PSI over the reference's quantile bins, or over the distinct values when the reference has at most `bins`
    (0.1: minor shift, 0.2: significant, by the usual reading)."""
    ref, cur = finite_values(reference), finite_values(current)
    if len(ref) == 0 or len(cur) == 0:
        return math.nan
    ref_share, cur_share = _psi_shares(ref, cur, bins)
    eps = 1e-4  # an empty bin must not make the index infinite
    p = np.clip(ref_share, eps, None)
    q = np.clip(cur_share, eps, None)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_test(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value."""
    result = sps.ks_2samp(finite_values(reference), finite_values(current))
    return float(result.statistic), float(result.pvalue)


def rate_difference(reference: Sequence[bool] | np.ndarray,
                    current: Sequence[bool] | np.ndarray) -> tuple[float, float]:
    """Current rate minus reference rate, and Fisher's exact two-sided p-value of the 2x2 table."""
    ref, cur = np.asarray(reference, dtype=bool), np.asarray(current, dtype=bool)
    table = [[int(cur.sum()), int(len(cur) - cur.sum())], [int(ref.sum()), int(len(ref) - ref.sum())]]
    p = float(sps.fisher_exact(table).pvalue)
    return float(cur.mean() - ref.mean()), p


def length_feature(length_difference: Sequence[float] | np.ndarray) -> np.ndarray:
    """AlpacaEval 2.0's length term: tanh(length difference / its standard deviation); zeros when it does not vary.

    The length-controlled win rates of the judge report and the canary's quality at equal length both use it.
    """
    delta = np.asarray(length_difference, dtype=float)
    sd = float(delta.std()) if delta.size else 0.0
    return np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
