"""Kayenta-style canary judgement: a per-metric classifier and a separate scorer.

The classifier turns one metric's effect (candidate against incumbent) and its interval into pass / marginal /
fail / nodata against the tolerance declared in the route's criteria. The scorer weights the classifications into
one 0-100 score and a verdict. Keeping the two apart means the weights can change without touching any statistics,
and every verdict can be traced to the metric results behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from shadowjudge.config import CriteriaConfig


class Classification(StrEnum):
    PASS = "pass"
    MARGINAL = "marginal"
    FAIL = "fail"
    NODATA = "nodata"


class Verdict(StrEnum):
    PASS = "pass"
    MARGINAL = "marginal"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


_CREDIT = {Classification.PASS: 1.0, Classification.MARGINAL: 0.5, Classification.FAIL: 0.0}


@dataclass(frozen=True)
class MetricResult:
    """One metric, candidate against incumbent.

    `effect` is in the units the criterion is stated in: a ratio (candidate / incumbent, no change = 1), a
    difference (candidate - incumbent, no change = 0) or a level (mean preference, no change = 0.5);
    `tolerance` is the worst effect the criteria accept. `shift*` and `p_value` are the Mann-Whitney U test and
    Hodges-Lehmann shift (candidate - incumbent, in the metric's own unit) where the metric has one; for the
    paired judge scores of quality, the Wilcoxon signed-rank test and the one-sample Hodges-Lehmann shift.
    JSON (RunAnalysis.to_dict) turns infinite values into None: in a classified result only an infinite value
    can be missing, since a NaN effect or bound classifies as nodata.
    """

    metric: str
    classification: Classification
    method: str
    effect_kind: str
    effect: float | None
    ci_low: float | None
    ci_high: float | None
    tolerance: float | None
    no_change: float
    higher_is_better: bool
    candidate_value: float | None
    incumbent_value: float | None
    n_candidate: int
    n_incumbent: int
    p_value: float | None = None
    shift: float | None = None
    shift_ci_low: float | None = None
    shift_ci_high: float | None = None
    note: str = ""
    confidence: float | None = None  # of the intervals, after the multiplicity adjustment
    # Quality only: the effect with the judge's preference for longer answers taken out (see regression._quality).
    effect_at_equal_length: float | None = None

    def describe(self) -> str:
        """One line a person can act on: what moved, by how much, against what bound. Read from the
        classification, so it says the same before and after a JSON round trip (alerts and routing read that)."""
        if self.classification is Classification.NODATA:
            return f"{self.metric}: no data" + (f" ({self.note})" if self.note else "")
        unit = {"ratio": "x", "difference": "", "level": ""}[self.effect_kind]
        infinite = self.effect is None or math.isinf(self.effect)
        effect = f"unbounded ({_fmt(self.effect)})" if infinite else f"{self.effect:.3g}{unit}"
        bound = "min" if self.higher_is_better else "max"
        return (f"{self.metric} {self.classification}: {self.effect_kind} {effect} "
                f"[{_fmt(self.ci_low)}, {_fmt(self.ci_high)}], {bound} {_fmt(self.tolerance)} "
                f"(candidate {_fmt(self.candidate_value)} vs incumbent {_fmt(self.incumbent_value)}, "
                f"n={self.n_candidate}/{self.n_incumbent})" + (f"; {self.note}" if self.note else ""))


def _fmt(value: float | None) -> str:
    """A classified result's number; None is an infinity that JSON turned into null (NaN classifies as nodata)."""
    if value is None or math.isinf(value):
        return "∞" if value is None or value > 0 else "-∞"
    return f"{value:.3g}"


def classify_effect(effect: float, ci_low: float, ci_high: float, tolerance: float, no_change: float,
                    higher_is_better: bool) -> Classification:
    """Classify an effect and its interval against a tolerance bound.

    With a non-inferiority bound (tolerance at or on the worse side of no change): fail when the whole interval
    is beyond the tolerance; marginal when the estimate is beyond it but not the whole interval, if either the
    candidate is significantly worse than no change (as Kayenta) or the criteria allow a margin (a declared "at
    least 97% of the incumbent" is not met by an estimate of 95%, however noisy); pass otherwise. A "no worse"
    bound (tolerance at no change) thus needs a significant change to leave 'pass', or noise would flip it.
    With a superiority requirement (tolerance on the better side of no change), pass needs the whole interval
    inside the bound, so an underpowered comparison never passes by default.
    """
    if any(math.isnan(v) for v in (effect, ci_low, ci_high)):
        return Classification.NODATA
    sign = 1.0 if higher_is_better else -1.0
    # In 'goodness' orientation: bigger is better for every metric.
    est, lo, hi = sign * effect, min(sign * ci_low, sign * ci_high), max(sign * ci_low, sign * ci_high)
    tol, null = sign * tolerance, sign * no_change
    if hi < tol:
        return Classification.FAIL
    if tol > null:  # the criteria demand an improvement
        return Classification.PASS if lo >= tol else Classification.MARGINAL
    if est < tol and (hi < null or tol < null):
        return Classification.MARGINAL
    return Classification.PASS


@dataclass(frozen=True)
class Score:
    verdict: Verdict
    score: float | None
    reasons: list[str]


def score_metrics(results: list[MetricResult], criteria: CriteriaConfig, n: int, min_samples: int) -> Score:
    """Weight the classifications into a 0-100 score and a verdict.

    Too little data is inconclusive, never a pass: fewer than `min_samples` judged samples, a critical metric
    without data, or no weighted metric with data. A failed critical metric fails the candidate whatever the score,
    and before any of those: its interval lies wholly beyond the tolerance, which is evidence enough (a candidate
    that errors on every request has nothing to judge, and must not keep its traffic for want of judged samples or
    of another metric's data). Metrics without data are left out of the score (their weight does not count either
    way).
    """
    by_name = {r.metric: r for r in results}
    critical_failed = [m for m in criteria.critical
                       if m in by_name and by_name[m].classification is Classification.FAIL]

    def undecided(why: str) -> Score:
        if critical_failed:
            return Score(Verdict.FAIL, None, [f"critical metric(s) failed: {', '.join(critical_failed)} ({why})",
                                              *(by_name[m].describe() for m in critical_failed)])
        return Score(Verdict.INCONCLUSIVE, None, [why])

    if n < min_samples:
        return undecided(f"only {n} samples judged, {min_samples} needed")
    missing = [m for m in criteria.critical
               if m not in by_name or by_name[m].classification is Classification.NODATA]
    if missing:
        return undecided(f"no data for critical metric(s) {', '.join(missing)}")
    total = credit = 0.0
    for r in results:
        weight = criteria.weights.get(r.metric, 0.0)
        if r.classification is Classification.NODATA or weight == 0:
            continue
        total += weight
        credit += weight * _CREDIT[r.classification]
    if total == 0:
        return undecided("no weighted metric has data")
    score = round(100.0 * credit / total, 1)
    reasons = [r.describe() for r in results if r.classification in (Classification.FAIL, Classification.MARGINAL)]
    if critical_failed:
        return Score(Verdict.FAIL, score, [f"critical metric(s) failed: {', '.join(critical_failed)}", *reasons])
    if score < criteria.marginal_score:
        if any(r.classification is Classification.FAIL for r in results if criteria.weights.get(r.metric, 0.0)):
            return Score(Verdict.FAIL, score, [f"score {score} < {criteria.marginal_score}", *reasons])
        # Marginal classes rest on point estimates (a declared margin missed, however noisy); several of them on a
        # candidate that changed nothing are common, so failing (and rolling back) takes one metric whose interval
        # is beyond its tolerance. Without one the candidate is held.
        return Score(Verdict.MARGINAL, score, [f"score {score} < {criteria.marginal_score}, but no metric failed on "
                                               "its interval: held, not failed", *reasons])
    if score < criteria.pass_score:
        return Score(Verdict.MARGINAL, score, [f"score {score} < {criteria.pass_score}", *reasons])
    return Score(Verdict.PASS, score, reasons)
