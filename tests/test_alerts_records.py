"""Alerts from real regressions and drift in stored AlpacaEval runs: bundles, dedup, delivery, ack/resolve."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from shadowjudge.alerts import (
    AlertError,
    acknowledge_alert,
    build_sinks,
    drift_alerts,
    get_alert,
    golden_alerts,
    list_alerts,
    raise_alerts,
    resolve_alert,
)
from shadowjudge.alerts.findings import regression_findings
from shadowjudge.analysis import TimeWindow, analyze_run, detect_drift, parse_golden_set, run_golden_set
from shadowjudge.config import AlertsConfig, DriftConfig
from shadowjudge.store import Alert, session_scope
from test_alerts_sinks import Receiver
from test_analysis_alpaca_runs import PROFILES, START, build_run, mini, route_for

GEMMA, FALCON = "FuseChat-Gemma-2-9B-Instruct", "falcon-40b-instruct"
LINK = "http://127.0.0.1:5000/#/experiments/1/runs/abc123"


def _webhook(url: str, **kw):
    return build_sinks(AlertsConfig(sinks=[{"name": "hook", "kind": "webhook", "url": url, "backoff_s": 0, **kw}]))


def _count(engine) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(Alert))


def test_a_slice_regression_raises_one_alert_with_its_triage_bundle_and_no_change_raises_nothing(engine):
    route = route_for(["same", "mixed"])
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"same": "claude-2", "mixed": {"*": GEMMA, "koala": FALCON}})
    analysis = analyze_run(engine, run_id, route)
    with Receiver() as rx:
        alerts = raise_alerts(engine, analysis, route, _webhook(rx.url), run_link=LINK, config_path="configs/prod.yaml")
    found = [(a.target, a.metric, a.slice, a.severity) for a in alerts]
    assert found == [("mixed", "quality", "task=koala", "critical")]
    alert = alerts[0]
    assert alert.effect_size < 0.97 and alert.ci_high < 0.97 and alert.run_id == run_id
    assert "task=koala" in alert.message and "promotion blocked" in alert.action
    bundle = alert.bundle
    assert bundle["run_link"] == LINK and bundle["slice"] == "task=koala"
    assert bundle["run_key"] == "r" and bundle["reproduce"] is None  # a run no cycle opened: nothing to rerun
    data = mini()
    example = bundle["examples"][0]
    prompt_id = next(p["id"] for p in data.prompts if p["instruction"] == example["prompt"])
    assert example["slice"] == "koala"
    assert example["incumbent_answer"].startswith(data.outputs[("claude-2", prompt_id)][:100])
    assert example["candidate_answer"].startswith(data.outputs[(FALCON, prompt_id)][:100])
    assert example["candidate_score"] < example["incumbent_score"]
    assert len(rx.requests) == 1 and rx.requests[0]["json"]["alert"]["id"] == alert.id
    assert get_alert(engine, alert.id).delivered["hook"]["status"] == "sent"


def test_recurrence_folds_into_the_open_alert_and_a_rerun_changes_nothing(engine):
    route = route_for(["mixed"])
    spec = {"mixed": {"*": GEMMA, "koala": FALCON}}
    first = analyze_run(engine, build_run(engine, run_key="r1", incumbent="claude-2", profiles=PROFILES,
                                          candidates=spec), route)
    with Receiver() as rx:
        sinks = _webhook(rx.url)
        [a1] = raise_alerts(engine, first, route, sinks)
        [again] = raise_alerts(engine, first, route, sinks)  # the same cycle rerun
        assert again.id == a1.id and again.occurrences == 1
        second = analyze_run(engine, build_run(engine, run_key="r2", incumbent="claude-2", profiles=PROFILES,
                                               candidates=spec, window=1, seed=1), route)
        [a2] = raise_alerts(engine, second, route, sinks)
        assert a2.id == a1.id and a2.occurrences == 2 and a2.run_id == second.run_id
        assert len(rx.requests) == 1  # the recurrence did not notify again
        acknowledge_alert(engine, a1.id, note="alice is on it")
        resolve_alert(engine, a1.id, sinks, note="candidate pulled")
        [rerun] = raise_alerts(engine, second, route, sinks)  # the run it last saw, again: already handled
        assert rerun.id == a1.id and rerun.status == "resolved" and len(rx.requests) == 2
        third = analyze_run(engine, build_run(engine, run_key="r3", incumbent="claude-2", profiles=PROFILES,
                                              candidates=spec, window=2, seed=2), route)
        [a3] = raise_alerts(engine, third, route, sinks)  # after resolution new evidence alerts afresh
    assert a3.id != a1.id and a3.status == "open"
    assert [e["event"] for e in get_alert(engine, a1.id).bundle["log"]] == ["acknowledged", "resolved"]
    assert [r["json"]["event"] for r in rx.requests] == ["trigger", "resolve", "trigger"]
    assert _count(engine) == 2


def test_a_recurrence_carries_its_own_severity_and_only_a_worse_one_notifies_again(engine):
    """A critical cause that comes back as a warning is a warning: the stored severity follows the evidence (it
    stayed critical, and a critical alert rolls the candidate back)."""
    from shadowjudge.alerts import records
    from shadowjudge.alerts.findings import Finding

    route = route_for(["c"])

    def finding(run: int, severity: str) -> Finding:
        return Finding("regression", severity, "chat", "c", "latency_p95", None, 1.3, 1.1, 1.5, f"run {run}", None,
                       None, f"run:{run}")

    with Receiver() as rx:
        sinks = _webhook(rx.url)
        [first] = records.raise_findings(engine, [finding(1, "critical")], route, sinks, None, None, 5)
        [calmer] = records.raise_findings(engine, [finding(2, "warning")], route, sinks, None, None, 5)
        assert calmer.id == first.id and calmer.severity == "warning" and len(rx.requests) == 1
        [worse] = records.raise_findings(engine, [finding(3, "critical")], route, sinks, None, None, 5)
        assert worse.severity == "critical" and len(rx.requests) == 2  # escalated again: news


def test_a_failing_sink_never_loses_the_alert_and_is_retried_on_the_next_call(engine):
    route = route_for(["bad", "same"])
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"bad": FALCON, "same": "claude-2"})
    analysis = analyze_run(engine, run_id, route)
    with Receiver(default=503) as down:
        alerts = raise_alerts(engine, analysis, route, _webhook(down.url, max_attempts=2))
    assert len(alerts) > 1 and all(a.delivered["hook"]["status"] == "failed" for a in alerts)
    assert alerts[0].delivered["hook"]["error"] == "sink 'hook': HTTP 503"
    # A sink whose retries all failed is not tried again in the same delivery: one retry schedule per cycle.
    assert len(down.requests) == 2
    assert all(a.delivered["hook"]["error"].startswith("not tried: the sink failed earlier") for a in alerts[1:])
    quiet = analyze_run(engine, run_id, route_for(["same"]))
    with Receiver() as up:
        assert raise_alerts(engine, quiet, route_for(["same"]), _webhook(up.url)) == []
    assert sorted(r["json"]["alert"]["id"] for r in up.requests) == sorted(a.id for a in alerts)
    assert all(a.delivered["hook"]["status"] == "sent" for a in list_alerts(engine))


def test_pagerduty_resolve_and_alert_errors(engine, monkeypatch):
    monkeypatch.setenv("PD_KEY", "routing-key")
    route = route_for(["bad"])
    analysis = analyze_run(engine, build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                                             candidates={"bad": FALCON}), route)
    with Receiver(default=202) as rx:
        sinks = build_sinks(AlertsConfig(sinks=[{"name": "pd", "kind": "pagerduty", "url": rx.url,
                                                 "routing_key_env": "PD_KEY"}]))
        [alert] = [a for a in raise_alerts(engine, analysis, route, sinks) if a.slice is None]
        resolved = resolve_alert(engine, alert.id, sinks)
    assert resolved.status == "resolved" and resolved.delivered["pd"]["event"] == "resolve"
    events = [(r["json"]["event_action"], r["json"]["dedup_key"]) for r in rx.requests]
    assert ("resolve", alert.fingerprint) in events and events.count(("trigger", alert.fingerprint)) == 1
    with pytest.raises(AlertError, match="already resolved"):
        acknowledge_alert(engine, alert.id)
    with pytest.raises(AlertError, match="alert 9999 does not exist"):
        resolve_alert(engine, 9999)
    with pytest.raises(AlertError, match="unknown status"):
        list_alerts(engine, status="closed")


def test_two_cycles_raising_the_same_cause_at_once_make_one_alert(engine):
    route = route_for(["bad"])
    analysis = analyze_run(engine, build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                                             candidates={"bad": FALCON}, datasets={"koala", "oasst"}), route)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            raise_alerts(engine, analysis, route, [])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert _count(engine) == len(regression_findings(analysis, route))
    assert all(a.occurrences == 1 for a in list_alerts(engine))


def test_real_output_drift_raises_a_drift_alert_with_examples(engine):
    """The candidate's answers turn into falcon-40b's in the second window: length and score drift alert."""
    data = mini()
    ids = [p["id"] for p in data.prompts]
    build_run(engine, run_key="w0", incumbent="claude-2", candidates={"cand": GEMMA}, window=0, prompt_ids=ids[:150])
    build_run(engine, run_key="w1", incumbent="claude-2", candidates={"cand": FALCON}, window=1, prompt_ids=ids[150:])
    route = route_for(["cand"])
    report = detect_drift(engine, route, TimeWindow(START, START + timedelta(days=1)),
                          TimeWindow(START + timedelta(days=1), START + timedelta(days=2)),
                          DriftConfig(min_samples=30, max_rate_delta=0.03))
    alerts = drift_alerts(engine, report, route, [], run_link=LINK)
    by_metric = {a.metric: a for a in alerts}
    assert {"output:length", "output:judge_score"} <= set(by_metric)
    assert all(a.kind == "drift" and a.target == "cand" and a.severity == "warning" for a in alerts)
    length = by_metric["output:length"]
    assert length.bundle["drift"]["details"]["current_median"] < length.bundle["drift"]["details"]["reference_median"]
    assert length.bundle["run_link"] == LINK and length.bundle["reproduce"] is None  # checked outside a cycle
    if "output:refusal_rate" in by_metric:
        assert by_metric["output:refusal_rate"].bundle["examples"]
    assert drift_alerts(engine, report, route, []) and _count(engine) == len(alerts)  # rerun: no duplicates


def test_a_failed_golden_set_blocks_promotion_with_a_critical_alert(engine):
    route = route_for(["cand"])
    cases = parse_golden_set([{"id": "refund", "prompt": "Refund window?", "must_contain": "30 days"}])
    assert golden_alerts(engine, run_golden_set(cases, {"refund": "30 days"}, target="cand"), route, []) == []
    [alert] = golden_alerts(engine, run_golden_set(cases, {"refund": "90 days"}, target="cand"), route, [])
    assert alert.severity == "critical" and alert.kind == "golden" and "refund" in alert.message
    assert alert.bundle["examples"][0]["case_id"] == "refund"


def test_a_golden_alert_carries_its_own_cases_and_slack_says_which_were_unanswered(engine):
    """The unanswered-cases warning showed the wrong answers' cases and 'Failures: -' for each unanswered one."""
    from shadowjudge.alerts.sinks import _slack_example

    route = route_for(["cand"])
    cases = parse_golden_set([{"id": "refund", "prompt": "Refund window?", "must_contain": "30 days"},
                              {"id": "capital", "prompt": "Capital of France?", "must_contain": "Paris"}])
    report = run_golden_set(cases, {"refund": "90 days"}, target="cand")  # capital never asked
    alerts = golden_alerts(engine, report, route, [])
    by_metric = {a.metric: [e["case_id"] for e in a.bundle["examples"]] for a in alerts}
    assert by_metric == {"golden_set": ["refund"], "golden_unanswered": ["capital"]}
    [unanswered] = [a for a in alerts if a.metric == "golden_unanswered"]
    assert "*Unanswered*: not_asked (the request failed" in _slack_example(unanswered.bundle["examples"][0])
