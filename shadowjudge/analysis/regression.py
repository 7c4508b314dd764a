"""Regression analysis of a shadow run: per candidate, is it better, worse or inconclusive, overall and per slice.

`analyze_run` is what the cycle calls. It measures each candidate against the incumbent on the metrics the route's
criteria name (judge quality, error rate, cost per accepted outcome, P95 latency, TTFT, and on a route that declares
checks the share of them an answer fails), classifies each against its tolerance, scores them into a verdict, and
repeats per slice of `route.slice_key` so a candidate that is better on average but worse on one slice is caught
with the slice named. A sample the gateway answered from its cache (measured from the logs) is left out of cost,
latency and TTFT, which it would measure the cache on (`n_cache_hits` counts them); TTFT is compared by sample where
both sides streamed.

`criteria.confidence` holds for a candidate's whole analysis, not one interval. The overall intervals are
Bonferroni-adjusted over the metrics the route measures, and the slices' over metrics times tested slices, each
family at alpha = 1 - confidence: a candidate that changed nothing fails some overall metric by chance at most
alpha / 2 of the time (a failure is one-sided), and some metric of some slice at most alpha / 2 as well. With
`slice_failure: fail` either fails the candidate, so a no-change candidate is failed by chance at most alpha of the
time (5% at the default 0.95), however many metrics and slices are looked at; with `mark` a slice only marks it,
and chance failures stay at alpha / 2. These bounds are as good as the intervals' coverage: the bootstrap's is
approximate, which is why a P95 is judged only from MIN_P95_VALUES values per side.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from sqlalchemy import Engine

from shadowjudge.analysis.canary import Classification, MetricResult, Verdict, classify_effect, score_metrics
from shadowjudge.analysis.run_data import MISSING_SLICE, PairJudgment, RunData, TargetRecord, load_run_data
from shadowjudge.analysis.stats import (
    Interval,
    Statistic,
    bootstrap_interval,
    fewest_decisive_pairs,
    length_feature,
    mann_whitney_shift,
    wilcoxon_shift,
)
from shadowjudge.config import CriteriaConfig, RouteConfig
from shadowjudge.traffic.redaction import Redactor

WORST_EXAMPLES = 10
# Values per side below which a P95 is not judged: 3 / (1 - 0.95), three values above it. With fewer the bootstrap
# of a P95 resamples the top two or three values, and its interval misses the declared confidence (at n = 30, 0.8%
# false fails where 0.5% were declared; at n = 20 in slices, 0.36% for 0.125%).
MIN_P95_VALUES = 60
# The metrics a gateway cache hit would distort: its answer came in a few ms and was often billed nothing.
CACHE_DISTORTED_METRICS = ("cost_per_outcome", "latency_p95", "ttft")


@dataclass(frozen=True)
class CheckFailure:
    """A sample whose candidate answer fails more of the route's checks than the incumbent's: an example for a
    `checks` alert, with the checks each side failed (in declared order)."""

    sample_id: int
    candidate_failed_checks: list[str]
    incumbent_failed_checks: list[str]


@dataclass
class SliceResult:
    key: str
    value: str
    n: int
    verdict: Verdict
    score: float | None
    metrics: list[MetricResult]
    reasons: list[str]
    worst_sample_ids: list[int] = field(default_factory=list)
    check_failures: list[CheckFailure] = field(default_factory=list)  # the examples of metric `checks`

    @property
    def label(self) -> str:
        return f"{self.key}={self.value}"


@dataclass
class CandidateAnalysis:
    target: str
    model: str
    verdict: Verdict
    score: float | None
    n: int  # samples the candidate was replayed on
    n_judged: int  # of those, judged pairs with scores (or preferences)
    metrics: list[MetricResult]
    slices: list[SliceResult]
    reasons: list[str]
    worst_sample_ids: list[int] = field(default_factory=list)
    check_failures: list[CheckFailure] = field(default_factory=list)  # the examples of metric `checks`
    # Of the n, samples whose logged answer came from the gateway's cache: left out of cost, latency and TTFT.
    n_cache_hits: int = 0

    @property
    def failing_slices(self) -> list[SliceResult]:
        return [s for s in self.slices if s.verdict is Verdict.FAIL]

    def metric(self, name: str) -> MetricResult | None:
        return next((m for m in self.metrics if m.metric == name), None)


@dataclass
class RunAnalysis:
    run_id: int
    route: str
    incumbent: str
    incumbent_source: str
    evaluator_version: str | None
    slice_key: str | None
    confidence: float
    candidates: list[CandidateAnalysis]

    def candidate(self, target: str) -> CandidateAnalysis:
        for c in self.candidates:
            if c.target == target:
                return c
        raise KeyError(f"run {self.run_id} has no analysis for candidate '{target}'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (NaN and infinities become null) for MLflow, alerts and the run summary."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunAnalysis:
        def metric(d: Mapping[str, Any]) -> MetricResult:
            return MetricResult(**{**d, "classification": Classification(d["classification"])})

        def check_failures(d: Mapping[str, Any]) -> list[CheckFailure]:
            return [CheckFailure(**f) for f in d.get("check_failures") or []]  # none in an analysis stored before

        def slice_(d: Mapping[str, Any]) -> SliceResult:
            return SliceResult(**{**d, "verdict": Verdict(d["verdict"]), "metrics": [metric(m) for m in d["metrics"]],
                                  "check_failures": check_failures(d)})

        candidates = [CandidateAnalysis(**{**c, "verdict": Verdict(c["verdict"]),
                                           "metrics": [metric(m) for m in c["metrics"]],
                                           "slices": [slice_(s) for s in c["slices"]],
                                           "check_failures": check_failures(c)})
                      for c in data["candidates"]]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and k != "candidates"}, candidates=candidates)


def json_safe(value: Any) -> Any:
    """The value with NaN and infinities as None, numpy scalars as Python ones: valid JSON for every consumer."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def _finite(values: list[float | None]) -> np.ndarray:
    arr = np.array([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def _is_number(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _scored(pair: PairJudgment | None) -> bool:
    """Both judge scores present and finite: one NaN score must cost its pair, not the candidate's whole analysis."""
    return pair is not None and _is_number(pair.candidate_score) and _is_number(pair.incumbent_score)


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


@dataclass(frozen=True)
class _Measure:
    """The shared settings of one set of metric computations (the whole run or one slice)."""

    criteria: CriteriaConfig
    confidence: float
    min_n: int
    accept_floor: float
    seed_base: str

    def seed(self, metric: str) -> int:
        return _seed(self.seed_base, metric)

    def interval(self, statistic: Statistic, groups: list[list[np.ndarray]], metric: str) -> Interval:
        return bootstrap_interval(statistic, groups, self.criteria.bootstrap_resamples, self.confidence,
                                  self.seed(metric))


def _nodata(metric: str, method: str, kind: str, no_change: float, higher: bool, n_c: int, n_i: int,
            note: str) -> MetricResult:
    return MetricResult(metric, Classification.NODATA, method, kind, None, None, None, None, no_change, higher,
                        None, None, n_c, n_i, note=note)


def _length_terms(sample_ids: list[int], cand: Mapping[int, TargetRecord],
                  inc: Mapping[int, TargetRecord]) -> tuple[np.ndarray, float | None]:
    """Per pair tanh(length difference / its standard deviation), AlpacaEval 2.0's length feature, and the ratio of
    the candidate's mean answer length to the incumbent's (None when no length is known); a pair with a length
    unknown gets 0 (no adjustment)."""
    delta = np.zeros(len(sample_ids))
    known = np.zeros(len(sample_ids), dtype=bool)
    c_total = i_total = 0
    for k, sid in enumerate(sample_ids):
        c, i = cand.get(sid), inc.get(sid)
        if c is not None and i is not None and c.output_chars is not None and i.output_chars is not None:
            delta[k], known[k] = c.output_chars - i.output_chars, True
            c_total, i_total = c_total + c.output_chars, i_total + i.output_chars
    x = np.zeros_like(delta)
    if not known.any():
        return x, None
    x[known] = length_feature(delta[known])
    return x, c_total / i_total if i_total else math.inf


def _length_explained(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row-wise, the part of mean(y) that the least-squares fit y = a + b x attributes to length: b mean(x).

    mean(y) minus it is the fit's prediction at zero length difference, the quantity AlpacaEval's length-controlled
    win rate reports (there through a logistic link; a linear one keeps the bootstrap vectorised).
    """
    xc = x - x.mean(axis=-1, keepdims=True)
    var = (xc * xc).mean(axis=-1)
    cov = (xc * (y - y.mean(axis=-1, keepdims=True))).mean(axis=-1)
    slope = np.divide(cov, var, out=np.zeros_like(cov), where=var > 1e-12)
    return slope * x.mean(axis=-1)


def _length_note(controlled: bool, plain: float, adjusted: float | None, unit: str,
                 length_ratio: float | None) -> str:
    if length_ratio is None:
        return "answer lengths unknown: not length-controlled"
    longer = f"answers {length_ratio:.2f}x the incumbent's length"
    if controlled:
        return f"at equal answer length ({longer}; plain {plain:.3g}{unit})"
    return f"{longer}; at equal length {adjusted:.3g}{unit}"


def _quality(pairs: list[PairJudgment], cand: Mapping[int, TargetRecord], inc: Mapping[int, TargetRecord],
             m: _Measure) -> MetricResult:
    """Mean judge scores as a ratio (or, for a judge that only gives preferences, the mean preference), plain or
    at equal answer length as the criteria say; the other reading rides along in the note."""
    scored = [p for p in pairs if _scored(p)]
    judged = scored or [p for p in pairs if _is_number(p.preference)]
    x, length_ratio = _length_terms([p.sample_id for p in judged], cand, inc)
    controlled = m.criteria.length_controlled_quality and length_ratio is not None
    adjusted_by = " at equal answer length" if controlled else ""
    n = len(judged)
    if scored:
        c = np.array([p.candidate_score for p in scored], dtype=float)
        i = np.array([p.incumbent_score for p in scored], dtype=float)
        method = f"paired bootstrap ratio of mean judge scores{adjusted_by}; Wilcoxon signed-rank"
        if n < m.min_n:
            return _nodata("quality", method, "ratio", 1.0, True, n, n, f"{n} judged pairs, {m.min_n} needed")
        if i.mean() <= 0:
            return _nodata("quality", method, "ratio", 1.0, True, n, n, "the incumbent's mean score is 0")

        def adjusted_ratio(c_, i_, x_):
            return (c_.mean(axis=1) - _length_explained(c_ - i_, x_)) / i_.mean(axis=1)

        plain = float(c.mean() / i.mean())
        adjusted = float(adjusted_ratio(c[None], i[None], x[None])[0]) if length_ratio is not None else None
        if controlled:
            ci = m.interval(adjusted_ratio, [[c, i, x]], "quality")
        else:
            ci = m.interval(lambda c_, i_: c_.mean(axis=1) / i_.mean(axis=1), [[c, i]], "quality")
        paired = wilcoxon_shift(c - i, m.confidence)  # the pairs share a prompt: the unpaired test wastes that
        tol = m.criteria.min_quality_ratio
        return MetricResult("quality", classify_effect(ci.estimate, ci.low, ci.high, tol, 1.0, True), method,
                            "ratio", ci.estimate, ci.low, ci.high, tol, 1.0, True,
                            ci.estimate * float(i.mean()) if controlled else float(c.mean()), float(i.mean()), n, n,
                            paired.p_value, paired.shift, paired.ci_low, paired.ci_high,
                            note=_length_note(controlled, plain, adjusted, "x", length_ratio),
                            effect_at_equal_length=adjusted)
    prefs = np.array([p.preference for p in judged], dtype=float)
    method = f"bootstrap mean preference P(candidate better){adjusted_by}"
    if n == 0:
        return _nodata("quality", method, "level", 0.5, True, 0, 0, "no judgments for this candidate")
    if n < m.min_n:
        return _nodata("quality", method, "level", 0.5, True, n, n, f"{n} judged pairs, {m.min_n} needed")

    def adjusted_level(q, x_):
        return q.mean(axis=1) - _length_explained(q, x_)

    plain = float(prefs.mean())
    adjusted = float(adjusted_level(prefs[None], x[None])[0]) if length_ratio is not None else None
    if controlled:
        ci = m.interval(adjusted_level, [[prefs, x]], "quality")
    else:
        ci = m.interval(lambda q: q.mean(axis=1), [[prefs]], "quality")
    tol = m.criteria.min_preference
    return MetricResult("quality", classify_effect(ci.estimate, ci.low, ci.high, tol, 0.5, True), method, "level",
                        ci.estimate, ci.low, ci.high, tol, 0.5, True, ci.estimate, 0.5, n, n,
                        note=_length_note(controlled, plain, adjusted, "", length_ratio),
                        effect_at_equal_length=adjusted)


def _rate_difference(metric: str, method: str, c: np.ndarray, i: np.ndarray, tolerance: float, m: _Measure,
                     paired: bool, unit: str, note: str = "") -> MetricResult:
    """A rate (share of 0/1 outcomes) of the candidate minus the incumbent's, bootstrapped and classified against
    `tolerance` (the largest increase accepted); `paired` resamples the two sides' values together, by sample."""
    if len(c) < m.min_n or len(i) < m.min_n:
        return _nodata(metric, method, "difference", 0.0, False, len(c), len(i),
                       f"{min(len(c), len(i))} {unit}, {m.min_n} needed")
    groups = [[c, i]] if paired else [[c], [i]]
    ci = m.interval(lambda c_, i_: c_.mean(axis=1) - i_.mean(axis=1), groups, metric)
    return MetricResult(metric, classify_effect(ci.estimate, ci.low, ci.high, tolerance, 0.0, False), method,
                        "difference", ci.estimate, ci.low, ci.high, tolerance, 0.0, False, float(c.mean()),
                        float(i.mean()), len(c), len(i), note=note)


def _error_rate(cand: list[TargetRecord], inc: list[TargetRecord], m: _Measure) -> MetricResult:
    c = np.array([r.error for r in cand], dtype=float)
    i = np.array([r.error for r in inc], dtype=float)
    return _rate_difference("error_rate", "bootstrap difference of error rates", c, i,
                            m.criteria.max_error_rate_delta, m, paired=False, unit="requests")


def _pct(rate: float) -> str:
    return f"{100 * rate:.3g}%"


def _checks(cand: Mapping[int, TargetRecord], inc: Mapping[int, TargetRecord], names: tuple[str, ...],
            m: _Measure) -> MetricResult:
    """The share of the route's checks an answer fails, candidate minus incumbent, on the samples both answered
    (paired: the same prompts). Per answer, not "fails at least one": a check both sides always fail (a JSON check
    on a route that answers in prose) would hide every other check's change. The note gives each check's failure
    rate on both sides, so a failure says which check broke."""
    both = [(c.failed_checks, inc[sid].failed_checks) for sid, c in cand.items()
            if c.failed_checks is not None and sid in inc and inc[sid].failed_checks is not None]
    c = np.array([len(cf) / len(names) for cf, _ in both], dtype=float)
    i = np.array([len(inf) / len(names) for _, inf in both], dtype=float)
    note = ""
    if both:
        rates = [(name, sum(name in cf for cf, _ in both) / len(both), sum(name in inf for _, inf in both) / len(both))
                 for name in names]
        note = "failing per check, incumbent -> candidate: " + ", ".join(
            f"{name} {_pct(i_rate)} -> {_pct(c_rate)}" for name, c_rate, i_rate in rates)
    return _rate_difference("checks", "paired bootstrap difference of the share of checks failed", c, i,
                            m.criteria.max_check_failure_delta, m, paired=True, unit="answers of both sides",
                            note=note)


def _cost_per_outcome(cand: dict[int, TargetRecord], inc: dict[int, TargetRecord],
                      pairs: dict[int, PairJudgment], m: _Measure) -> MetricResult:
    """Cost per accepted answer (judge score >= accept floor), paired by sample; per request without scores."""
    scored = any(_scored(p) for p in pairs.values())
    method = ("paired bootstrap ratio of cost per accepted answer" if scored
              else "paired bootstrap ratio of cost per request (no judge scores)")
    rows = []
    for sid, c in cand.items():
        i = inc.get(sid)
        if i is None or i.error:
            continue
        c_cost = 0.0 if c.cost_usd is None and c.error else c.cost_usd
        if c_cost is None or i.cost_usd is None:
            continue
        if scored:
            p = pairs.get(sid)
            if not c.error and not _scored(p):
                continue  # answered but not judged (or judged without a usable score): its outcome is unknown
            c_ok = (not c.error) and p.candidate_score >= m.accept_floor
            # A pair whose candidate errored is never judged, so the incumbent's outcome there is unknown, not a
            # failure (which would make the incumbent look dearer and the failing candidate cheaper): filled in
            # below with the incumbent's acceptance rate where it is known.
            i_ok = float(p.incumbent_score >= m.accept_floor) if _scored(p) else None
        else:
            c_ok, i_ok = not c.error, 1.0
        rows.append((c_cost, float(c_ok), i.cost_usd, i_ok))
    known = [r[3] for r in rows if r[3] is not None]
    rate = float(np.mean(known)) if known else 0.0
    rows = [(cc_, ca_, ic_, rate if ia_ is None else ia_) for cc_, ca_, ic_, ia_ in rows]
    if len(rows) < m.min_n:
        return _nodata("cost_per_outcome", method, "ratio", 1.0, False, len(rows), len(rows),
                       f"{len(rows)} samples with known cost, {m.min_n} needed")
    cc, ca, ic, ia = (np.array(col, dtype=float) for col in zip(*rows, strict=True))
    if ia.sum() == 0 or ic.sum() == 0:
        return _nodata("cost_per_outcome", method, "ratio", 1.0, False, len(rows), len(rows),
                       "the incumbent has no accepted answer or no cost")
    if ca.sum() == 0 and cc.sum() == 0:
        return _nodata("cost_per_outcome", method, "ratio", 1.0, False, len(rows), len(rows),
                       "undefined (0/0): no accepted answer from the candidate and no cost")

    def ratio(cc_, ca_, ic_, ia_):
        return (cc_.sum(axis=1) / ca_.sum(axis=1)) / (ic_.sum(axis=1) / ia_.sum(axis=1))

    ci = m.interval(ratio, [[cc, ca, ic, ia]], "cost_per_outcome")
    tol = m.criteria.max_cost_ratio
    c_val = float(cc.sum() / ca.sum()) if ca.sum() else math.inf
    return MetricResult("cost_per_outcome", classify_effect(ci.estimate, ci.low, ci.high, tol, 1.0, False), method,
                        "ratio", ci.estimate, ci.low, ci.high, tol, 1.0, False, c_val, float(ic.sum() / ia.sum()),
                        len(rows), len(rows), note="" if ca.sum() else "no accepted answer from the candidate")


def _latency_p95(cand: list[TargetRecord], inc: list[TargetRecord], m: _Measure) -> MetricResult:
    method = "bootstrap ratio of P95 total latency; Mann-Whitney U"
    c = _finite([r.latency_ms for r in cand if not r.error])
    i = _finite([r.latency_ms for r in inc if not r.error])
    needed = max(m.min_n, MIN_P95_VALUES)
    if len(c) < needed or len(i) < needed:
        why = "" if needed == m.min_n else " (a P95 needs 3 values above it per side)"
        return _nodata("latency_p95", method, "ratio", 1.0, False, len(c), len(i),
                       f"{min(len(c), len(i))} latencies, {needed} needed{why}")
    if np.percentile(i, 95) <= 0:
        return _nodata("latency_p95", method, "ratio", 1.0, False, len(c), len(i), "incumbent P95 latency is 0")
    ci = m.interval(lambda c_, i_: np.percentile(c_, 95, axis=1) / np.percentile(i_, 95, axis=1), [[c], [i]],
                    "latency_p95")
    mw = mann_whitney_shift(i, c, m.confidence)
    tol = m.criteria.max_p95_latency_ratio
    return MetricResult("latency_p95", classify_effect(ci.estimate, ci.low, ci.high, tol, 1.0, False), method,
                        "ratio", ci.estimate, ci.low, ci.high, tol, 1.0, False, float(np.percentile(c, 95)),
                        float(np.percentile(i, 95)), len(c), len(i), mw.p_value, mw.shift, mw.ci_low, mw.ci_high)


def _ttft(cand: Mapping[int, TargetRecord], inc: Mapping[int, TargetRecord], m: _Measure) -> MetricResult:
    """Time to first token on the samples where both sides have one, paired by sample: the Hodges-Lehmann shift of
    the differences, stated as a ratio to the incumbent's median. A logged request that was not streamed has no
    TTFT (run_data), and its prompt must then leave the candidate's side too, or the two sides' values would come
    from different prompts."""
    method = "Wilcoxon signed-rank, Hodges-Lehmann shift of paired TTFTs over the incumbent's median TTFT"
    both = [(c.ttft_ms, inc[sid].ttft_ms) for sid, c in cand.items()
            if sid in inc and not c.error and not inc[sid].error
            and _is_number(c.ttft_ms) and _is_number(inc[sid].ttft_ms)]
    n = len(both)
    note = (f"{len(cand) - n} of {len(cand)} samples without a TTFT on both sides (an error, or a request not "
            "streamed) left out") if n < len(cand) else ""
    if n < m.min_n:
        return _nodata("ttft", method, "ratio", 1.0, False, n, n,
                       f"{n} samples with a TTFT on both sides, {m.min_n} needed")
    c = np.array([c_ttft for c_ttft, _ in both], dtype=float)
    i = np.array([i_ttft for _, i_ttft in both], dtype=float)
    base = float(np.median(i))
    if base <= 0:
        return _nodata("ttft", method, "ratio", 1.0, False, n, n, "incumbent median TTFT is 0")
    paired = wilcoxon_shift(c - i, m.confidence)
    effect, lo, hi = 1 + paired.shift / base, 1 + paired.ci_low / base, 1 + paired.ci_high / base
    tol = m.criteria.max_ttft_ratio
    return MetricResult("ttft", classify_effect(effect, lo, hi, tol, 1.0, False), method, "ratio", effect, lo, hi,
                        tol, 1.0, False, float(np.median(c)), base, n, n, paired.p_value, paired.shift,
                        paired.ci_low, paired.ci_high, note=note)


def _with_note(result: MetricResult, note: str) -> MetricResult:
    return replace(result, note=f"{result.note}; {note}" if result.note else note)


def _measure(data: RunData, target: str, ids: set[int] | None, m: _Measure) -> tuple[list[MetricResult], int, int]:
    # In sample-id order: the bootstrap resamples by position, so the order rows came from the store in (judgments
    # committed by several score batches, a restored dump) must not move the intervals.
    cand = {sid: r for sid, r in sorted(data.candidates[target].items()) if ids is None or sid in ids}
    inc = {sid: r for sid, r in sorted(data.incumbent.items()) if ids is None or sid in ids}
    pairs = {sid: p for sid, p in sorted(data.judgments[target].items()) if ids is None or sid in ids}
    # An answer the gateway served from its cache took a few ms and was often billed nothing, where the replay pays
    # full time and price: that sample measures the cache, not either model, and leaves both sides of the speed and
    # price comparisons (the answer itself still counts for quality, errors and checks).
    cached = {sid for sid, r in inc.items() if r.cache_hit}
    served_cand = {sid: r for sid, r in cand.items() if sid not in cached}
    served_inc = {sid: r for sid, r in inc.items() if sid not in cached}
    quality = _quality(list(pairs.values()), cand, inc, m)
    metrics = [
        quality,
        _error_rate(list(cand.values()), list(inc.values()), m),
        _cost_per_outcome(served_cand, served_inc, pairs, m),
        _latency_p95(list(served_cand.values()), list(served_inc.values()), m),
        _ttft(served_cand, served_inc, m),
    ]
    if data.check_names:
        metrics.append(_checks(cand, inc, data.check_names, m))
    metrics = [replace(r, confidence=m.confidence) if r.classification is not Classification.NODATA
               # Classified NODATA without a note of its own: its estimate or interval is NaN, not short of samples.
               else r if r.note else replace(r, note="undefined: the estimate or its interval is 0/0")
               for r in metrics]
    if cached:
        metrics = [_with_note(r, f"{len(cached)} gateway cache hits left out")
                   if r.metric in CACHE_DISTORTED_METRICS else r for r in metrics]
    return metrics, len(cand), quality.n_candidate


def _worst_samples(data: RunData, target: str, ids: set[int] | None) -> list[int]:
    """Candidate errors first, then the pairs where the candidate lost most to the incumbent."""
    keyed = []
    for sid, rec in data.candidates[target].items():
        if ids is not None and sid not in ids:
            continue
        p = data.judgments[target].get(sid)
        if rec.error:
            keyed.append((-math.inf, sid))
        elif _scored(p):
            keyed.append((p.candidate_score - p.incumbent_score, sid))
        elif p is not None and _is_number(p.preference):
            keyed.append((p.preference - 0.5, sid))
    keyed.sort()
    return [sid for key, sid in keyed[:WORST_EXAMPLES] if key < 0]


def _check_failures(data: RunData, target: str, ids: set[int] | None) -> list[CheckFailure]:
    """The samples where the candidate's answer fails more of the route's checks than the incumbent's (both answered,
    as metric `checks` pairs them), most checks failed by the candidate and passed by the incumbent first: the
    examples of a `checks` regression, which the judge's worst pairs need not be."""
    keyed = []
    for sid, rec in data.candidates[target].items():
        inc = data.incumbent.get(sid)
        if (ids is not None and sid not in ids) or inc is None:
            continue
        cand_failed, inc_failed = rec.failed_checks, inc.failed_checks
        if cand_failed is None or inc_failed is None or len(cand_failed) <= len(inc_failed):
            continue
        newly_failed = len(set(cand_failed) - set(inc_failed))
        keyed.append(((-newly_failed, len(inc_failed) - len(cand_failed), sid),
                      CheckFailure(sid, list(cand_failed), list(inc_failed))))
    keyed.sort(key=lambda k: k[0])
    return [failure for _, failure in keyed[:WORST_EXAMPLES]]


def _slice_floor(sizes: list[int], min_slice_samples: int, alpha: float, n_metrics: int) -> tuple[int, float, int]:
    """Which slices are tested: (the fewest samples a tested slice has, the slices' confidence, the fewest values
    a metric of one needs). Bonferroni over the slices tested, so k slices give no k chances of a false alarm; but
    the more are tested, the stricter that confidence and the more samples a test needs to decide on (and no fewer
    than `min_slice_samples`). The floor is the smallest at which every slice it admits can be decided at the
    confidence of testing them all: a slice counted in the correction that could only be inconclusive would make
    the others' intervals wider for nothing."""
    floor = max(min_slice_samples, fewest_decisive_pairs(1 - alpha / n_metrics))  # as if one slice were tested
    while True:
        tested = sum(1 for size in sizes if size >= floor)
        confidence = 1 - alpha / (n_metrics * max(1, tested))
        decisive = max(min_slice_samples, fewest_decisive_pairs(confidence))
        if decisive <= floor:
            return floor, confidence, decisive
        floor += 1


def _analyse_candidate(data: RunData, route: RouteConfig, target: str, accept_floor: float) -> CandidateAnalysis:
    criteria = route.criteria
    alpha = 1 - criteria.confidence
    n_metrics = len(route.canary_metrics)  # `checks` counts only where the route declares checks
    overall_conf = 1 - alpha / n_metrics
    # However few samples the criteria ask for, no fewer than can show a change at the confidence used: on fewer,
    # a bootstrap interval that excludes no change is the degeneracy of resampling one or two values, not evidence.
    min_n = max(criteria.min_samples, fewest_decisive_pairs(overall_conf))
    overall = _Measure(criteria, overall_conf, min_n, accept_floor, f"{data.run_id}|{target}|all")
    metrics, n, n_judged = _measure(data, target, None, overall)
    score = score_metrics(metrics, criteria, n_judged, min_n)
    verdict, reasons = score.verdict, list(score.reasons)

    slices: list[SliceResult] = []
    if route.slice_key and data.slices:
        members: dict[str, set[int]] = {}
        for sid in data.candidates[target]:
            members.setdefault(data.slices.get(sid, MISSING_SLICE), set()).add(sid)
        floor, slice_conf, min_slice_n = _slice_floor([len(ids) for ids in members.values()],
                                                      criteria.min_slice_samples, alpha, n_metrics)
        for value in sorted(members):
            ids = members[value]
            if len(ids) < floor:
                slices.append(SliceResult(route.slice_key, value, len(ids), Verdict.INCONCLUSIVE, None, [],
                                          [f"only {len(ids)} samples, {floor} needed"]))
                continue
            m = _Measure(criteria, slice_conf, min_slice_n, accept_floor,
                         f"{data.run_id}|{target}|{route.slice_key}={value}")
            s_metrics, s_n, s_judged = _measure(data, target, ids, m)
            s_score = score_metrics(s_metrics, criteria, s_judged, min_slice_n)
            slices.append(SliceResult(route.slice_key, value, s_n, s_score.verdict, s_score.score, s_metrics,
                                      s_score.reasons, _worst_samples(data, target, ids),
                                      _check_failures(data, target, ids)))
        failing = [s for s in slices if s.verdict is Verdict.FAIL]
        if failing:
            names = ", ".join(s.label for s in failing)
            if criteria.slice_failure == "fail":
                verdict = Verdict.FAIL
                reasons.insert(0, f"slice(s) {names} fail")
            else:
                if verdict is Verdict.PASS:
                    verdict = Verdict.MARGINAL
                reasons.insert(0, f"slice(s) {names} fail (marked)")
            for s in failing:
                reasons.extend(f"[{s.label}] {r}" for r in s.reasons)
    n_cache_hits = sum(1 for sid in data.candidates[target] if sid in data.incumbent and data.incumbent[sid].cache_hit)
    return CandidateAnalysis(target, data.models.get(target, target), verdict, score.score, n, n_judged, metrics,
                             slices, reasons, _worst_samples(data, target, None),
                             _check_failures(data, target, None), n_cache_hits)


def analyze_run(engine: Engine, run_id: int, route: RouteConfig, evaluator_version: str | None = None,
                accept_floor: float = 0.5, redactor: Redactor | None = None) -> RunAnalysis:
    """Analyse every candidate of a stored shadow run against the incumbent, overall and per slice.

    `evaluator_version` picks whose judgments count (default: the run's judge). `accept_floor` is the judge score
    at which an answer counts as an accepted outcome (config.judge.accept_floor), for cost per outcome. `redactor`
    (ingestion's) redacts replayed answers before the route's checks, as the logged ones were.
    Deterministic: the same stored data gives the same analysis (bootstrap seeds derive from the run).
    """
    data = load_run_data(engine, run_id, route, evaluator_version, redactor)
    candidates = [_analyse_candidate(data, route, c.name, accept_floor) for c in route.candidates]
    return RunAnalysis(run_id, route.name, route.incumbent.name, data.incumbent_source, data.evaluator,
                       route.slice_key, route.criteria.confidence, candidates)
