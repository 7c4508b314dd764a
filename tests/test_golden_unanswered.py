"""A golden case the candidate gave no answer to is unanswered, not failed.

With every provider out of reach (the replay server stopped: an outage on the evaluator's side as likely as the
candidate's), no answer was checked: the golden gate is inconclusive, a warning names the error, and the candidate
holding traffic is neither rolled back nor advanced. A wrong answer still fails, beside unanswered cases too.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_alerts_sinks import closed_port
from test_analysis_alpaca_runs import route_for
from test_routing_controller import T0, make_route, run, v

from shadowjudge.alerts.findings import golden_findings
from shadowjudge.analysis.golden import GoldenCase, GoldenReport, run_golden_set
from shadowjudge.config import ShadowConfig, TargetConfig
from shadowjudge.routing.controller import RolloutState
from shadowjudge.routing.verdicts import apply_golden_gate
from shadowjudge.shadow.golden_answers import ask_golden_cases

CASES = [GoldenCase(id="refund", prompt="What is the refund window?", must_contain="30 days"),
         GoldenCase(id="over-refusal-creative-writing", prompt="Write a poem about rain.", must_not_contain="I cannot"),
         GoldenCase(id="capital", prompt="Capital of France?", must_contain="Paris")]


@pytest.fixture(scope="module")
def outage_report() -> GoldenReport:
    """The golden report of a candidate whose endpoint refuses connections, asked as the cycle asks it."""
    target = TargetConfig(name="a", model="yi-34b", base_url=f"http://127.0.0.1:{closed_port()}/v1")
    answers = ask_golden_cases(target, CASES, ShadowConfig(max_retries=1, retry_backoff_s=0.01, timeout_s=2))
    return run_golden_set(CASES, answers, target="a")


def test_cases_an_unreachable_candidate_could_not_answer_are_unanswered_not_failed(outage_report):
    assert outage_report.failed == [] and not outage_report.passed
    counts = {k: outage_report.to_dict()[k] for k in ("status", "n_passed", "n_failed", "n_unanswered")}
    assert counts == {"status": "incomplete", "n_passed": 0, "n_failed": 0, "n_unanswered": 3}
    assert {r.unanswered for r in outage_report.results} == {"connection_error"}


def test_an_outage_raises_one_warning_naming_the_error_and_no_critical_alert(outage_report):
    [finding] = golden_findings(outage_report, route_for(["a"]), run_id=7)
    assert (finding.kind, finding.severity, finding.metric) == ("golden", "warning", "golden_unanswered")
    assert "3 of 3 cases unanswered: connection_error (3)" in finding.message
    assert "fails" not in finding.message and "no answer" not in finding.message


def test_an_outage_neither_rolls_back_nor_advances_the_candidate_holding_traffic(outage_report):
    route = make_route()
    state = run(route, RolloutState.initial(route), [v("a")]).applied
    golden = {"a": outage_report.to_dict()}
    for verdict in (v("a", "inconclusive", score=None, n=0), v("a")):  # shadow tests down too, or up
        [gated] = apply_golden_gate([verdict], golden)
        assert not gated.rolls_back and gated.verdict == "inconclusive"
        decision = run(route, state, [gated], T0 + timedelta(hours=1))
        assert decision.action == "hold" and decision.after == state.weights and "a" not in decision.applied.failed


def test_wrong_answers_fail_beside_unanswered_cases_and_roll_the_candidate_back():
    report = run_golden_set(CASES, {"refund": "Refunds are accepted for 90 days."}, target="a")  # two not asked
    assert [r.case_id for r in report.failed] == ["refund"] and report.status == "failed"
    assert [(r.case_id, r.unanswered) for r in report.unanswered] == [
        ("over-refusal-creative-writing", "not_asked"), ("capital", "not_asked")]
    critical, warning = golden_findings(report, route_for(["a"]))
    assert critical.severity == "critical" and "fails 1 of 3 golden cases" in critical.message
    assert warning.severity == "warning" and "2 of 3 cases unanswered: not_asked (2)" in warning.message
    assert critical.fingerprint != warning.fingerprint
    [gated] = apply_golden_gate([v("a")], {"a": report.to_dict()})
    assert gated.verdict == "fail" and gated.critical_alert


@pytest.mark.parametrize("error_class", ["malformed_response", "bad_request", "auth_error", "not_found"])
def test_a_reply_the_candidate_broke_or_refused_fails_the_case(error_class):
    """Only an outage leaves a case unanswered; a candidate whose endpoint answers every golden case with a broken
    or refused reply was held as inconclusive for ever instead of failing."""
    from shadowjudge.analysis.golden import NoAnswer

    answers = {c.id: NoAnswer(error_class) for c in CASES}
    report = run_golden_set(CASES, answers, target="a")
    assert report.status == "failed" and report.unanswered == []
    assert all(r.failures == [f"no usable answer: {error_class}"] for r in report.failed)
    [critical] = golden_findings(report, route_for(["a"]))
    assert critical.severity == "critical"
