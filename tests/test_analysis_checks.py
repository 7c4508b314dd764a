"""The route's deterministic checks in the canary analysis: metric `checks`, from stored answers, on real SQLite
(and PostgreSQL) stores of AlpacaEval runs whose answers are rewritten as JSON."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update

from shadowjudge.alerts.findings import regression_findings
from shadowjudge.analysis import Classification, RunAnalysis, Verdict, analyze_run
from shadowjudge.config import RouteConfig
from shadowjudge.store import ShadowResult, TrafficSample, session_scope
from test_analysis_alpaca_runs import PROFILES, build_run, route_for

SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}
CHECKS = [{"kind": "json", "schema": SCHEMA}, {"kind": "length", "max_chars": 100_000, "name": "bounded"}]


def _breaks(sample_id: int) -> bool:
    return sample_id % 5 in (0, 1)  # 40% of samples


def _as_json(engine, run_id: int, broken: dict[str, callable]) -> None:
    """Every stored answer (replayed and logged) as {"answer": text}; a target in `broken` keeps its plain text
    where broken[target](sample_id) is true."""
    with session_scope(engine) as s:
        for sid, target, text in s.execute(select(ShadowResult.sample_id, ShadowResult.target,
                                                  ShadowResult.output_text)
                                           .where(ShadowResult.run_id == run_id)).all():
            if text is not None and not (target in broken and broken[target](sid)):
                s.execute(update(ShadowResult).where(ShadowResult.run_id == run_id, ShadowResult.sample_id == sid,
                                                     ShadowResult.target == target)
                          .values(output_text=json.dumps({"answer": text})))
        for sid, text in s.execute(select(TrafficSample.id, TrafficSample.response_text)).all():
            if text is not None and not ("logs" in broken and broken["logs"](sid)):
                s.execute(update(TrafficSample).where(TrafficSample.id == sid)
                          .values(response_text=json.dumps({"answer": text})))


def _with_checks(route: RouteConfig, checks=CHECKS, **criteria) -> RouteConfig:
    data = route.model_dump()
    data["criteria"] = {**{k: data["criteria"][k] for k in route.criteria.model_fields_set}, **criteria}
    return RouteConfig.model_validate({**data, "checks": checks})


@pytest.mark.parametrize("replay_incumbent", [True, False])
def test_a_candidate_breaking_the_json_check_fails_on_checks_and_names_the_check(engine, replay_incumbent):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       replay_incumbent=replay_incumbent, candidates={"same": "claude-2", "broken": "claude-2"})
    _as_json(engine, run_id, {"broken": _breaks})
    plain = route_for(["same", "broken"])
    route = _with_checks(plain)
    analysis = analyze_run(engine, run_id, route)
    assert analysis.incumbent_source == ("replay" if replay_incumbent else "logs")

    broken = analysis.candidate("broken")
    checks = broken.metric("checks")
    assert checks.classification is Classification.FAIL
    assert 0.15 < checks.candidate_value < 0.25 and checks.incumbent_value == 0.0  # 40% fail one check of two
    assert checks.ci_low > 0 and checks.tolerance == 0.0
    assert "json 0% -> 4" in checks.note and "bounded 0% -> 0%" in checks.note
    # Critical: the candidate fails although every other metric (the same model's answers) passes.
    assert all(m.classification is not Classification.FAIL for m in broken.metrics if m.metric != "checks")
    assert broken.verdict is Verdict.FAIL
    assert any("critical metric(s) failed: checks" in r for r in broken.reasons)
    assert any("json 0% -> 4" in r for r in broken.reasons)  # the verdict line says which check broke
    # Per slice, like every metric.
    tested = [sl for sl in broken.slices if sl.metrics]
    assert tested and all(sl.metrics[-1].metric == "checks" for sl in tested)

    same = analysis.candidate("same")
    assert same.metric("checks").classification is Classification.PASS and same.metric("checks").effect == 0.0
    assert same.verdict is Verdict.PASS

    # An alert names the metric and the check.
    findings = [f for f in regression_findings(analysis, route) if f.target == "broken" and f.metric == "checks"]
    assert findings and "json 0% -> 4" in findings[0].message
    # Deterministic and JSON, like the rest of the analysis.
    data = analysis.to_dict()
    assert analyze_run(engine, run_id, route).to_dict() == data
    assert RunAnalysis.from_dict(data).to_dict() == data

    # The same stored run analysed for a route without checks: no `checks` metric, and the broken candidate, whose
    # answers are otherwise the incumbent's, passes as it always did.
    without = analyze_run(engine, run_id, plain)
    assert [m.metric for m in without.candidate("broken").metrics] == [
        "quality", "error_rate", "cost_per_outcome", "latency_p95", "ttft"]
    assert without.candidate("broken").verdict is Verdict.PASS
    assert all(m.metric != "checks" for c in without.candidates for sl in c.slices for m in sl.metrics)
    assert "checks" not in json.dumps(without.to_dict())


def test_a_candidate_failing_checks_no_more_than_the_incumbent_passes_them(engine):
    """The incumbent breaks the format on the same 40% of samples: the candidate is no worse, and passes."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"as_bad": "claude-2"})
    _as_json(engine, run_id, {"as_bad": _breaks, "incumbent": _breaks})
    analysis = analyze_run(engine, run_id, _with_checks(route_for(["as_bad"])))
    cand = analysis.candidate("as_bad")
    checks = cand.metric("checks")
    assert checks.classification is Classification.PASS and checks.effect == 0.0
    assert checks.candidate_value == checks.incumbent_value == 0.2  # 40% fail one check of two, on both sides
    assert cand.verdict is Verdict.PASS


def test_checks_can_be_measured_without_being_critical_or_scored(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"broken": "claude-2"})
    _as_json(engine, run_id, {"broken": _breaks})
    route = _with_checks(route_for(["broken"], slice_key=None), critical=["quality", "error_rate"],
                         weights={"quality": 40, "error_rate": 20, "checks": 0})
    broken = analyze_run(engine, run_id, route).candidate("broken")
    assert broken.metric("checks").classification is Classification.FAIL
    assert broken.verdict is Verdict.PASS and broken.score == 100.0


def test_a_tolerance_lets_a_small_rise_in_check_failures_pass(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"slightly": "claude-2"})
    _as_json(engine, run_id, {"slightly": lambda sid: sid % 50 == 0})
    route = _with_checks(route_for(["slightly"], slice_key=None), max_check_failure_delta=0.1)
    checks = analyze_run(engine, run_id, route).candidate("slightly").metric("checks")
    assert 0 < checks.candidate_value < 0.1 and checks.classification is Classification.PASS


def test_replayed_answers_are_checked_as_redacted_as_the_logged_ones(engine):
    """Ingestion redacts logged answers and nothing redacted the replays: a check forbidding e-mail addresses saw 0%
    on the logged incumbent and 25% on a candidate answering exactly as it did, and failed it (critical)."""
    from shadowjudge.config import RedactionConfig
    from shadowjudge.traffic.redaction import Redactor

    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES, replay_incumbent=False,
                       candidates={"same": "claude-2"})
    redactor = Redactor.from_config(RedactionConfig())

    def with_mail(sample_id: int, text: str) -> str:
        return text + " Contact support@example.com." if sample_id % 4 == 0 else text

    with session_scope(engine) as s:
        for sid, target, text in s.execute(select(ShadowResult.sample_id, ShadowResult.target,
                                                  ShadowResult.output_text).where(ShadowResult.run_id == run_id)):
            if text is not None:
                s.execute(update(ShadowResult).where(ShadowResult.run_id == run_id, ShadowResult.sample_id == sid,
                                                     ShadowResult.target == target)
                          .values(output_text=with_mail(sid, text)))
        for sid, text in s.execute(select(TrafficSample.id, TrafficSample.response_text)).all():
            if text is not None:  # as ingestion stored it
                s.execute(update(TrafficSample).where(TrafficSample.id == sid)
                          .values(response_text=redactor.redact(with_mail(sid, text), {})))
    route = _with_checks(route_for(["same"], slice_key=None), checks=[
        {"kind": "regex", "pattern": r"[\w.+-]+@[\w-]+\.\w+", "must_match": False, "name": "no_email"}])
    checks = analyze_run(engine, run_id, route, redactor=redactor).candidate("same").metric("checks")
    assert checks.candidate_value == checks.incumbent_value == 0.0, checks.note
    unredacted = analyze_run(engine, run_id, route).candidate("same").metric("checks")
    assert unredacted.classification is Classification.FAIL  # what a replay checked raw against a redacted log gives


def test_a_check_both_sides_always_fail_hides_no_other_check(engine):
    """Metric `checks` was the share of answers failing at least one check: a JSON check on a route answering in
    prose failed every answer on both sides, the metric read 100% -> 100%, and a candidate breaking the JSON check's
    neighbour on 40% of its answers passed and was advanced."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"same": "claude-2", "broken": "claude-2"})
    _as_json(engine, run_id, {"broken": _breaks})  # 'broken' answers are plain text on 40% of samples
    never = {"kind": "regex", "pattern": r"\AXYZZY", "name": "never_met"}  # fails every answer of both sides
    route = _with_checks(route_for(["same", "broken"], slice_key=None), checks=[never, *CHECKS])
    analysis = analyze_run(engine, run_id, route)
    broken = analysis.candidate("broken").metric("checks")
    assert broken.classification is Classification.FAIL, broken
    assert "never_met 100% -> 100%" in broken.note and "json 0% -> 4" in broken.note
    assert analysis.candidate("same").metric("checks").classification is not Classification.FAIL
