"""What deserves an alert: regression, golden-set and drift findings, each with the cause that fingerprints it.

Pure functions over analysis results. A failed metric raises an alert, overall or on a named slice; a marginal or
inconclusive one does not (it is visible in the analysis, and alerting on it would train people to ignore alerts).
The fingerprint is the cause (kind, route, target, metric, slice), not the run, so the same regression found
again in the next cycle bumps the open alert instead of paging twice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from shadowjudge.analysis.canary import Classification, MetricResult, Verdict
from shadowjudge.analysis.drift import DriftReport, DriftResult
from shadowjudge.analysis.golden import GoldenReport
from shadowjudge.analysis.regression import CandidateAnalysis, RunAnalysis, SliceResult, json_safe
from shadowjudge.config import RouteConfig


@dataclass(frozen=True)
class Finding:
    kind: str  # regression, golden or drift
    severity: str  # critical, warning or info
    route: str
    target: str | None
    metric: str
    slice: str | None
    effect_size: float | None
    ci_low: float | None
    ci_high: float | None
    message: str
    action: str | None
    run_id: int | None
    source_key: str  # what produced it (a run, a window): the same source twice is a rerun, not a recurrence
    sample_ids: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # What the triage examples of `sample_ids` add, by sample id: for metric `checks`, the checks each side failed.
    example_fields: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        cause = "|".join([self.kind, self.route, self.target or "", self.metric, self.slice or ""])
        return hashlib.sha256(cause.encode()).hexdigest()[:32]


def _default_action(candidate: CandidateAnalysis) -> str:
    if candidate.verdict is Verdict.FAIL:
        return "promotion blocked: candidate verdict fail; roll back any traffic it holds"
    return f"watch: candidate verdict {candidate.verdict}, routing decides"


def _examples(metric: str,
              examples_of: CandidateAnalysis | SliceResult) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """The samples a finding on `metric` shows, worst first, and what each example adds: for `checks` the answers
    that fail more of the route's checks than the incumbent's, with the checks each side failed (the judge's worst
    pairs need not fail any); for every other metric the candidate's errors and the judge's worst pairs."""
    failures = examples_of.check_failures
    if metric != "checks" or not failures:  # (an analysis stored before check failures were kept has none)
        return examples_of.worst_sample_ids, {}
    fields = {f.sample_id: {"candidate_failed_checks": f.candidate_failed_checks,
                            "incumbent_failed_checks": f.incumbent_failed_checks} for f in failures}
    return [f.sample_id for f in failures], fields


def _metric_finding(analysis: RunAnalysis, candidate: CandidateAnalysis, metric: MetricResult, severity: str,
                    slice_label: str | None, examples_of: CandidateAnalysis | SliceResult,
                    action: str | None) -> Finding:
    """`examples_of` is the candidate, or for a slice's finding its slice: the examples stay inside the slice."""
    sample_ids, example_fields = _examples(metric.metric, examples_of)
    where = f" on slice {slice_label}" if slice_label else ""
    message = (f"Candidate {candidate.target} ({candidate.model}) regresses{where} on route {analysis.route}: "
               f"{metric.describe()}. Verdict {candidate.verdict}"
               + (f" (canary score {candidate.score:g} on all traffic)" if candidate.score is not None else "") + ".")
    return Finding("regression", severity, analysis.route, candidate.target, metric.metric, slice_label,
                   metric.effect, metric.ci_low, metric.ci_high, message, action or _default_action(candidate),
                   analysis.run_id, f"run:{analysis.run_id}", sample_ids,
                   {"metric": json_safe(asdict(metric)), "verdict": str(candidate.verdict),
                    "score": candidate.score, "reasons": candidate.reasons[:10],
                    "evaluator": analysis.evaluator_version, "incumbent": analysis.incumbent,
                    "incumbent_source": analysis.incumbent_source},
                   example_fields)


def regression_findings(analysis: RunAnalysis, route: RouteConfig, action: str | None = None) -> list[Finding]:
    """Failed metrics per candidate, overall and per failing slice; a verdict that fails on score alone (many
    marginal metrics) gets one finding for the canary score."""
    findings: list[Finding] = []
    for candidate in analysis.candidates:
        severity = "critical" if candidate.verdict is Verdict.FAIL else "warning"
        found = [_metric_finding(analysis, candidate, m, severity, None, candidate, action)
                 for m in candidate.metrics if m.classification is Classification.FAIL]
        # A metric that fails overall is one cause, however many slices it also fails on (they are listed in
        # its details); a slice gets its own alert only for a metric that passes on average.
        failed_overall = {f.metric for f in found}
        for f in found:
            f.details["failing_slices"] = [sl.label for sl in candidate.failing_slices
                                           if any(m.metric == f.metric and m.classification is Classification.FAIL
                                                  for m in sl.metrics)]
        slice_severity = "critical" if route.criteria.slice_failure == "fail" else "warning"
        for sl in candidate.failing_slices:
            found.extend(_metric_finding(analysis, candidate, m, slice_severity, sl.label, sl, action)
                         for m in sl.metrics
                         if m.classification is Classification.FAIL and m.metric not in failed_overall)
        if not found and candidate.verdict is Verdict.FAIL:
            message = (f"Candidate {candidate.target} ({candidate.model}) fails on route {analysis.route}: "
                       + "; ".join(candidate.reasons[:5]))
            found.append(Finding("regression", "critical", analysis.route, candidate.target, "canary_score", None,
                                 candidate.score, None, None, message, action or _default_action(candidate),
                                 analysis.run_id, f"run:{analysis.run_id}", candidate.worst_sample_ids,
                                 {"verdict": str(candidate.verdict), "score": candidate.score,
                                  "reasons": candidate.reasons[:10], "evaluator": analysis.evaluator_version}))
        findings.extend(found)
    return findings


def golden_findings(report: GoldenReport, route: RouteConfig, run_id: int | None = None) -> list[Finding]:
    """A candidate that answers a golden case wrongly cannot be promoted: a critical finding (routing rolls it back).
    Cases it left unanswered (its requests failed: an outage, maybe the evaluator's) are no evidence against it:
    a warning naming the errors, with its own fingerprint, that rolls nothing back."""
    source_key = f"run:{run_id}" if run_id is not None else f"golden:{report.target}"
    n_cases, details = len(report.results), {"golden": report.to_dict()}
    findings = []
    if failed := report.failed:
        message = (f"Candidate {report.target} fails {len(failed)} of {n_cases} golden cases on route {route.name}: "
                   + "; ".join(f"{r.case_id}: {', '.join(r.failures)}" for r in failed[:5]))
        findings.append(Finding("golden", "critical", route.name, report.target, "golden_set", None,
                                float(len(failed)), None, None, message,
                                "promotion blocked: golden regression set failed", run_id, source_key, [], details))
    if unanswered := report.unanswered:
        errors = Counter(r.unanswered for r in unanswered)
        message = (f"Golden set of candidate {report.target} on route {route.name}: {len(unanswered)} of {n_cases} "
                   f"cases unanswered: " + ", ".join(f"{e} ({n})" for e, n in errors.most_common())
                   + " (availability, not wrong answers: not counted as failures)")
        findings.append(Finding("golden", "warning", route.name, report.target, "golden_unanswered", None,
                                float(len(unanswered)), None, None, message,
                                "golden gate inconclusive: not promoted on it, not rolled back; asked again next cycle",
                                run_id, source_key, [], details))
    return findings


def _drift_action(result: DriftResult) -> str:
    if result.kind == "judge":
        return "judge verdicts are suspect: recheck against the teacher before trusting regressions"
    if result.kind == "input":
        return "reported, routing unchanged: check whether the criteria and judge still fit the new traffic"
    return "reported, routing unchanged: compare the model's recent answers with the reference window"


def drift_findings(report: DriftReport, route: RouteConfig, run_id: int | None = None) -> list[Finding]:
    """One finding per drifted check; judge drift is critical (it undermines every verdict), others warn."""
    findings = []
    for r in report.drifted:
        who = f" of {r.target}" if r.target else ""
        message = f"{r.kind.capitalize()} drift{who} on route {route.name}: {r.describe()}."
        findings.append(Finding("drift", "critical" if r.kind == "judge" else "warning", route.name, r.target,
                                f"{r.kind}:{r.metric}", None, r.effect, None, None, message, _drift_action(r), run_id,
                                f"window:{report.current_window}", [],
                                {"drift": json_safe(asdict(r)), "reference_window": report.reference_window,
                                 "current_window": report.current_window}))
    return findings
