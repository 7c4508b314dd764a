"""Statistics of the canary analysis: Hodges-Lehmann intervals, bootstrap, PSI; classifier and scorer rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowjudge.analysis import stats
from shadowjudge.analysis.canary import Classification, MetricResult, Verdict, classify_effect, score_metrics
from shadowjudge.analysis.stats import bootstrap_interval, mann_whitney_shift, population_stability_index
from shadowjudge.config import CriteriaConfig


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=1, max_size=30), st.lists(st.floats(-100, 100), min_size=1, max_size=30),
       st.data())
def test_kth_pairwise_difference_matches_brute_force_on_both_paths(x, y, data):
    xs, ys = np.sort(np.array(x)), np.sort(np.array(y))
    diffs = np.sort(np.subtract.outer(ys, xs).ravel())
    k = data.draw(st.integers(1, len(diffs)))
    assert stats._kth_pairwise_difference(xs, ys, k) == pytest.approx(diffs[k - 1])
    old = stats._MAX_PAIRWISE
    stats._MAX_PAIRWISE = 0  # force the bisection path
    try:
        assert stats._kth_pairwise_difference(xs, ys, k) == pytest.approx(diffs[k - 1], abs=1e-9)
    finally:
        stats._MAX_PAIRWISE = old


def test_hodges_lehmann_recovers_a_known_shift_and_its_interval_covers_it():
    rng = np.random.default_rng(3)
    x = rng.lognormal(5, 0.4, 400)
    y = rng.lognormal(5, 0.4, 500) + 40.0
    est = mann_whitney_shift(x, y, 0.95)
    assert est.ci_low < 40 < est.ci_high
    assert est.shift == pytest.approx(40, abs=12)
    assert est.p_value < 1e-6
    same = mann_whitney_shift(x, x, 0.95)
    assert same.shift == 0 and same.ci_low < 0 < same.ci_high and same.p_value == pytest.approx(1.0)


def test_hodges_lehmann_interval_coverage_is_near_nominal():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        est = mann_whitney_shift(rng.normal(0, 1, 40), rng.normal(0.5, 1, 40), 0.9)
        covered += est.ci_low <= 0.5 <= est.ci_high
    assert 0.84 <= covered / 200 <= 0.96


def test_bootstrap_pairs_within_a_group_and_keeps_infinite_values():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 300)
    paired = bootstrap_interval(lambda c, i: c.mean(1) / i.mean(1), [[base, base]], 500, 0.95, 0)
    assert (paired.estimate, paired.low, paired.high) == (1.0, 1.0, 1.0)
    unpaired = bootstrap_interval(lambda c, i: c.mean(1) / i.mean(1), [[base], [base]], 500, 0.95, 0)
    assert unpaired.low < 1.0 < unpaired.high
    zero = np.zeros(50)
    inf = bootstrap_interval(lambda c, i: i.sum(1) / c.sum(1), [[zero, np.ones(50)]], 300, 0.95, 0)
    assert math.isinf(inf.estimate) and math.isinf(inf.low)
    nan = bootstrap_interval(lambda c: c.sum(1) / c.sum(1), [[zero]], 300, 0.95, 0)
    assert math.isnan(nan.low)
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_interval(lambda a, b: a.mean(1), [[np.ones(3), np.ones(4)]])


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, 5000)
    assert population_stability_index(ref, rng.normal(0, 1, 5000)) < 0.02
    assert population_stability_index(ref, rng.normal(1, 1, 5000)) > 0.5


def test_psi_sees_judge_scores_move_past_a_tied_top_value():
    """Rubric scores are discrete: the reference's quantile edges all sat on its tied top score, whose bin took
    everything above it, so 98% at 8/10 -> 100% at 10/10 read 0.106 and constant 0.8 -> constant 1.0 read 0."""
    ref = np.array([0.8] * 196 + [0.7] * 4)
    assert population_stability_index(ref, np.full(200, 1.0)) > 5
    assert population_stability_index(np.full(200, 0.8), np.full(200, 1.0)) > 5
    assert population_stability_index(np.full(200, 0.8), np.full(200, 0.6)) > 5  # as the downward shift always was
    rng = np.random.default_rng(4)
    rubric = np.arange(1, 11) / 10
    weights = np.array([1, 1, 2, 3, 5, 8, 10, 8, 5, 2], dtype=float) / 45
    same = population_stability_index(rng.choice(rubric, 500, p=weights), rng.choice(rubric, 500, p=weights))
    assert same < 0.1  # about (10 - 1) * (1/500 + 1/500) from sampling alone, far under the 0.2 of drift
    # More distinct values than bins (quantile bins): a tied top value still keeps what lies above it apart.
    spread = np.linspace(0.1, 0.79, 50)
    assert population_stability_index(np.r_[spread, np.full(150, 0.8)], np.r_[spread, np.full(150, 1.0)]) > 5


def test_psi_of_continuous_values_is_not_inflated_by_the_bins_beyond_the_reference():
    """Without a pseudo-value in the bins beyond the reference's range, a 50-value window's PSI rose by ~0.27 on
    average when nothing changed (values beyond a sample's range are common in small samples)."""
    rng = np.random.default_rng(5)
    psi = [population_stability_index(rng.lognormal(6, 0.6, 200), rng.lognormal(6, 0.6, 200)) for _ in range(200)]
    assert float(np.mean(psi)) < 0.12, np.mean(psi)
    assert population_stability_index(rng.lognormal(6, 0.6, 200), rng.lognormal(6, 0.6, 200) * 3) > 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=1, max_size=40), st.data())
def test_kth_walsh_average_matches_brute_force_on_both_paths(d, data):
    ds = np.sort(np.array(d))
    rows, cols = np.triu_indices(len(ds))
    walsh = np.sort(0.5 * (ds[rows] + ds[cols]))
    k = data.draw(st.integers(1, len(walsh)))
    assert stats._kth_walsh_average(ds, k) == pytest.approx(walsh[k - 1])
    old = stats._MAX_PAIRWISE
    stats._MAX_PAIRWISE = 0  # force the bisection path
    try:
        assert stats._kth_walsh_average(ds, k) == pytest.approx(walsh[k - 1], abs=1e-9)
    finally:
        stats._MAX_PAIRWISE = old


def test_paired_shift_sees_a_small_consistent_change_that_the_unpaired_test_misses():
    """The candidate scores 0.03 lower on 199 of 200 prompts whose scores spread over 0.2-0.8."""
    rng = np.random.default_rng(2)
    incumbent = rng.uniform(0.2, 0.8, 200)
    candidate = np.clip(incumbent - 0.03 + rng.normal(0, 0.005, 200), 0, 1)
    paired = stats.wilcoxon_shift(candidate - incumbent, 0.99)
    assert paired.p_value < 1e-20 and paired.ci_high < 0 and paired.shift == pytest.approx(-0.03, abs=0.002)
    assert mann_whitney_shift(incumbent, candidate, 0.99).p_value > 0.05  # why quality no longer uses it
    nothing = stats.wilcoxon_shift(np.zeros(40), 0.95)
    assert (nothing.shift, nothing.ci_low, nothing.ci_high, nothing.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_shift_interval_coverage_is_near_nominal():
    rng = np.random.default_rng(6)
    estimates = [stats.wilcoxon_shift(rng.normal(0.3, 1, 40), 0.9) for _ in range(200)]
    covered = sum(e.ci_low <= 0.3 <= e.ci_high for e in estimates)
    assert 0.84 <= covered / 200 <= 0.96


def test_bootstrap_takes_enough_resamples_for_a_narrow_tail():
    """criteria.bootstrap_resamples may be 200; at 99.9% (10 slices x 5 metrics, Bonferroni) each tail is 0.0005,
    and 200 resamples made the bounds the smallest and largest resample. 20 / tail = 40000 are drawn instead."""
    values = np.random.default_rng(7).lognormal(0, 1, 80)
    few = bootstrap_interval(lambda v: v.mean(1), [[values]], 200, 0.999, 3)
    assert few == bootstrap_interval(lambda v: v.mean(1), [[values]], 40_000, 0.999, 3)


# --- classifier --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("effect, lo, hi, expected", [
    (1.00, 0.90, 1.10, Classification.PASS),        # no change, wide interval
    (0.95, 0.85, 1.05, Classification.MARGINAL),    # estimate beyond tolerance, not significantly worse
    (0.95, 0.93, 0.99, Classification.MARGINAL),    # significantly worse, estimate past tolerance, not confidently
    (0.98, 0.96, 0.995, Classification.PASS),       # significantly worse but within tolerance
    (0.80, 0.70, 0.90, Classification.FAIL),        # the whole interval beyond tolerance
    (float("nan"), 0.1, 0.2, Classification.NODATA),
])
def test_classify_effect_higher_is_better(effect, lo, hi, expected):
    assert classify_effect(effect, lo, hi, 0.97, 1.0, True) is expected


def test_classify_effect_lower_is_better_and_superiority():
    assert classify_effect(1.3, 1.2, 1.4, 1.1, 1.0, False) is Classification.FAIL
    assert classify_effect(1.0, 0.9, 1.1, 1.1, 1.0, False) is Classification.PASS
    assert classify_effect(math.inf, math.inf, math.inf, 1.1, 1.0, False) is Classification.FAIL
    # Demanding an improvement (ratio >= 1.05): an underpowered 'no change' must not pass.
    assert classify_effect(1.0, 0.9, 1.1, 1.05, 1.0, True) is Classification.MARGINAL
    assert classify_effect(1.2, 1.1, 1.3, 1.05, 1.0, True) is Classification.PASS


@settings(max_examples=200, deadline=None)
@given(st.floats(-5, 5), st.floats(0, 3), st.floats(0, 3), st.floats(-2, 2), st.floats(-2, 2), st.booleans())
def test_classification_follows_the_interval(center, down, up, tol, null, higher):
    """Whatever the margin: fail exactly when the interval lies beyond the tolerance; pass when inside it."""
    lo, hi = center - down, center + up
    result = classify_effect(center, lo, hi, tol, null, higher)
    beyond = hi < tol if higher else lo > tol
    assert (result is Classification.FAIL) == beyond
    inside = lo >= tol if higher else hi <= tol
    if inside:
        assert result is Classification.PASS


def _metric(name: str, classification: Classification) -> MetricResult:
    return MetricResult(name, classification, "test", "ratio", 1.0, 0.9, 1.1, 1.0, 1.0, True, 1.0, 1.0, 100, 100)


def test_scorer_weights_and_critical_metrics():
    criteria = CriteriaConfig()
    names = list(criteria.weights)
    all_pass = [_metric(n, Classification.PASS) for n in names]
    assert score_metrics(all_pass, criteria, 100, 30).verdict is Verdict.PASS
    assert score_metrics(all_pass, criteria, 10, 30).verdict is Verdict.INCONCLUSIVE  # too little data never passes
    latency_fail = [_metric(n, Classification.FAIL if n == "latency_p95" else Classification.PASS) for n in names]
    scored = score_metrics(latency_fail, criteria, 100, 30)
    assert scored.verdict is Verdict.MARGINAL and scored.score == 85.0
    quality_fail = [_metric(n, Classification.FAIL if n == "quality" else Classification.PASS) for n in names]
    assert score_metrics(quality_fail, criteria, 100, 30).verdict is Verdict.FAIL
    no_quality = [_metric(n, Classification.NODATA if n == "quality" else Classification.PASS) for n in names]
    assert score_metrics(no_quality, criteria, 100, 30).verdict is Verdict.INCONCLUSIVE
    two_fail = [_metric(n, Classification.FAIL if n in ("latency_p95", "cost_per_outcome") else Classification.PASS)
                for n in names]
    assert score_metrics(two_fail, criteria, 100, 30).verdict is Verdict.FAIL  # 70 < 75



def test_a_failed_critical_metric_fails_whatever_else_lacks_data():
    """The scorer returned 'no weighted metric has data' (or 'no data for critical metric(s)') before it looked at
    a critical metric whose interval lies wholly beyond its tolerance."""
    criteria = CriteriaConfig(weights={"latency_p95": 1.0, "ttft": 1.0}, critical=["error_rate"])
    results = [_metric("quality", Classification.PASS), _metric("error_rate", Classification.FAIL),
               _metric("cost_per_outcome", Classification.PASS), _metric("latency_p95", Classification.NODATA),
               _metric("ttft", Classification.NODATA)]
    scored = score_metrics(results, criteria, 100, 30)
    assert scored.verdict is Verdict.FAIL and scored.score is None
    assert scored.reasons[0] == "critical metric(s) failed: error_rate (no weighted metric has data)"
    no_quality = [_metric("quality", Classification.NODATA), _metric("error_rate", Classification.FAIL)]
    scored = score_metrics(no_quality, CriteriaConfig(), 100, 30)
    assert scored.verdict is Verdict.FAIL and "no data for critical metric(s) quality" in scored.reasons[0]
    no_failure = [_metric("quality", Classification.PASS), _metric("error_rate", Classification.PASS)]
    assert score_metrics(no_failure, criteria, 100, 30).verdict is Verdict.INCONCLUSIVE


def test_marginal_point_estimates_alone_hold_a_candidate_but_never_fail_it():
    """Quality and cost both a little off their declared margins, as noise makes them on a candidate that changed
    nothing (15% of null runs at n=40): the score drops below the marginal bar, but without a metric whose interval
    is beyond its tolerance the candidate is held, not failed and rolled back."""
    criteria = CriteriaConfig()
    names = list(criteria.weights)
    marginals = [_metric(n, Classification.MARGINAL if n in ("quality", "cost_per_outcome") else Classification.PASS)
                 for n in names]
    held = score_metrics(marginals, criteria, 100, 30)
    assert held.score < criteria.marginal_score and held.verdict is Verdict.MARGINAL
    assert "no metric failed on its interval" in held.reasons[0]
    with_evidence = [_metric(n, Classification.MARGINAL if n == "quality" else
                             Classification.FAIL if n == "cost_per_outcome" else Classification.PASS) for n in names]
    assert score_metrics(with_evidence, criteria, 100, 30).verdict is Verdict.FAIL


def test_criteria_reject_unknown_metrics():
    with pytest.raises(ValueError, match="unknown metric"):
        CriteriaConfig(weights={"qualty": 1})
    with pytest.raises(ValueError, match="marginal_score"):
        CriteriaConfig(pass_score=50, marginal_score=60)


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99, 1 - 0.05 / 6, 1 - 0.05 / 60, 0.9999])
def test_fewest_decisive_pairs_is_where_the_sign_test_can_first_reject(confidence):
    """n pairs all moving one way: the exact sign test (scipy's binomial test) rejects no change at n, not at n - 1;
    the bootstrap below it gives a point interval on such data, which is no evidence at all."""
    from scipy.stats import binomtest

    n = stats.fewest_decisive_pairs(confidence)
    assert binomtest(n, n, 0.5).pvalue <= 1 - confidence + 1e-12
    assert n == 1 or binomtest(n - 1, n - 1, 0.5).pvalue > 1 - confidence
    few = np.ones(max(1, n - 1))
    degenerate = bootstrap_interval(lambda c_: c_.mean(axis=1), [[few]], 200, confidence, seed=0)
    assert degenerate.low == degenerate.high == 1.0  # why the analysis needs the floor
