"""Alert dedup and delivery across cycles: resolves after escalations, reruns of counted runs, one delivery pass
per cycle, delivery attempts that are no change of the alert, sinks that take too long."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import func, select, update

from shadowjudge import cycle as stages
from shadowjudge.alerts import records
from shadowjudge.alerts.findings import Finding
from shadowjudge.alerts.sinks import DeliveryError
from shadowjudge.analysis import analyze_run, parse_golden_set, run_golden_set
from shadowjudge.analysis.drift import DriftReport
from shadowjudge.config import Config
from shadowjudge.store import Alert, ShadowRun, session_scope
from shadowjudge.store.models import utcnow
from cycle_configs import cycle_config
from test_alerts_sinks import Receiver
from test_analysis_alpaca_runs import build_run, route_for

ROUTE = route_for(["c"])


class RecordingSink:
    """A sink in memory: records what it was sent, or fails like an endpoint that is down (`fail`)."""

    def __init__(self, name: str = "pd", max_attempts: int = 1, backoff_s: float = 0.0,
                 delivery_budget_s: float = 60.0) -> None:
        self.name, self.min_severity, self.max_attempts, self.backoff_s = name, "info", max_attempts, backoff_s
        self.delivery_budget_s = delivery_budget_s
        self.fail: str | None = None
        self.sent: list[tuple[int, str]] = []
        self.calls = 0

    def send(self, alert, event: str) -> None:
        self.calls += 1
        if self.fail:
            raise DeliveryError(f"sink '{self.name}': {self.fail}", retryable=True)
        self.sent.append((alert["id"], event))


def finding(source: int, severity: str = "critical", run_id: int | None = None) -> Finding:
    """One cause (latency of candidate c) as found by run `source`."""
    return Finding("regression", severity, "chat", "c", "latency_p95", None, 1.0 + source / 10, 1.0, 2.0,
                   f"evidence of run {source}", None, run_id, f"run:{source}")


def raise_one(engine, f: Finding, sinks) -> Alert:
    [alert] = records.raise_findings(engine, [f], ROUTE, sinks, None, None, 5)
    return alert


def _count(engine) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(Alert))


def test_an_incident_triggered_before_a_failed_escalation_is_resolved(engine):
    sink = RecordingSink()
    alert = raise_one(engine, finding(1, "warning"), [sink])
    sink.fail = "HTTP 503"
    raise_one(engine, finding(2, "critical"), [sink])  # escalated: a new trigger, which fails
    sink.fail = None
    records.resolve_alert(engine, alert.id, [sink])
    assert sink.sent == [(alert.id, "trigger"), (alert.id, "resolve")]


def test_a_trigger_that_timed_out_is_resolved_and_one_never_sent_is_not(engine):
    """A timed-out trigger may have opened the incident: only a resolve closes it. One never tried opened none."""
    sink = RecordingSink()
    sink.fail = "ReadTimeout"
    drift = Finding("drift", "warning", "chat", "c", "input:x", None, 1.0, None, None, "m", None, None, "window:w")
    tried, not_tried = records.raise_findings(engine, [finding(1), drift], ROUTE, [sink], None, None, 5)
    assert tried.delivered["pd"]["attempts"] == 1 and not_tried.delivered["pd"]["attempts"] == 0
    sink.fail = None
    for alert in (tried, not_tried):
        records.resolve_alert(engine, alert.id, [sink])
    assert sink.sent == [(tried.id, "resolve")]


def test_reruns_of_counted_runs_are_not_recurrences_and_never_reopen_a_resolved_alert(engine):
    sink = RecordingSink()
    alert = raise_one(engine, finding(1), [sink])
    for source in (2, 1, 2, 1):  # run 2 found it too; then both cycles were rerun
        raise_one(engine, finding(source), [sink])
    alert = records.get_alert(engine, alert.id)
    assert alert.occurrences == 2 and alert.message == "evidence of run 2"
    assert alert.bundle["source_keys"] == ["run:1", "run:2"]
    records.resolve_alert(engine, alert.id, [sink])
    for source in (1, 2):
        assert raise_one(engine, finding(source), [sink]).id == alert.id
    assert _count(engine) == 1 and sink.sent == [(alert.id, "trigger"), (alert.id, "resolve")]


def test_a_late_older_run_counts_but_never_replaces_newer_evidence(engine):
    with session_scope(engine) as s:
        runs = [ShadowRun(run_key=f"chat:{k}", route="chat", config_hash="t") for k in range(3)]
        s.add_all(runs)
        s.flush()
        ids = [r.id for r in runs]
    alert = raise_one(engine, finding(1, run_id=ids[0]), [])
    raise_one(engine, finding(3, run_id=ids[2]), [])
    raise_one(engine, finding(2, "warning", run_id=ids[1]), [])  # cycle 2 resumed after cycle 3 finished
    alert = records.get_alert(engine, alert.id)
    assert alert.occurrences == 3 and alert.run_id == ids[2] and alert.message == "evidence of run 3"
    assert alert.severity == "critical" and alert.bundle["source_key"] == "run:3"


def test_a_delivery_attempt_leaves_updated_at_alone_so_a_failed_resolve_stops_after_the_window(engine):
    sink = RecordingSink()
    alert = raise_one(engine, finding(1), [sink])
    sink.fail = "HTTP 503"
    records.resolve_alert(engine, alert.id, [sink])
    resolved_at = utcnow() - records.RESOLVE_RETRY_WINDOW + timedelta(hours=1)
    with session_scope(engine) as s:
        s.execute(update(Alert).where(Alert.id == alert.id).values(updated_at=resolved_at))
    sink.fail = "HTTP 502"  # a status unlike the stored one: the row is written
    assert records.deliver_pending(engine, [sink]) == 1  # the resolve is retried inside the window, and fails
    updated_at = records.get_alert(engine, alert.id).updated_at  # naive on SQLite
    assert abs(updated_at.replace(tzinfo=None) - resolved_at.replace(tzinfo=None)) < timedelta(seconds=1)
    with session_scope(engine) as s:  # the window has passed
        s.execute(update(Alert).where(Alert.id == alert.id).values(updated_at=resolved_at - timedelta(hours=2)))
    calls = sink.calls
    assert records.deliver_pending(engine, [sink]) == 0 and sink.calls == calls


def test_a_sink_that_keeps_failing_stops_at_its_time_budget(engine, monkeypatch):
    slow = RecordingSink("slow", max_attempts=10, backoff_s=0.05, delivery_budget_s=0.5)  # a full schedule sleeps 25.6 s
    slow.fail = "HTTP 429"
    started = time.monotonic()
    first, second = records.raise_findings(engine, [finding(1), Finding(
        "drift", "critical", "chat", "c", "input:x", None, 1.0, None, None, "m", None, None, "window:w")],
        ROUTE, [slow], None, None, 5)
    assert time.monotonic() - started < 3
    assert 1 < slow.calls < 10
    assert second.delivered["slow"]["error"] == "not tried: the sink used its 0.5 s of this delivery"


def test_a_cycle_delivers_once_however_many_kinds_of_finding_it_checks(engine, tmp_path):
    """One route with two candidates whose golden sets pass and no drift: a dead sink gets one retry schedule."""
    route = route_for(["same", "other"])
    run_id = build_run(engine, run_key="chat:c1", incumbent="claude-2", candidates={"same": "claude-2",
                                                                                     "other": "claude-2"})
    cases = parse_golden_set([{"id": "refund", "prompt": "Refund window?", "must_contain": "30 days"}])
    analysis = {**analyze_run(engine, run_id, route).to_dict(),
                "golden": {t: run_golden_set(cases, {"refund": "30 days"}, target=t).to_dict()
                           for t in ("same", "other")},
                "drift": DriftReport("chat", []).to_dict()}
    pending = Finding("regression", "critical", "chat", "gone", "quality", None, 0.5, 0.4, 0.6, "earlier", None,
                      None, "run:0")
    with Receiver(default=503) as down:
        sink = {"name": "hook", "kind": "webhook", "url": down.url, "backoff_s": 0, "max_attempts": 2}
        config = Config.model_validate(cycle_config(tmp_path, "sqlite://", "http://127.0.0.1:9/v1",
                                                    alerts={"sinks": [sink]}))
        records.raise_findings(engine, [pending], route, [], None, None, 5)  # an earlier cycle's, undelivered
        handle = stages.RunHandle(run_id, "chat:c1", [], resumed=False)
        assert stages.alert(engine, config, route, handle, analysis, None, "c.yaml") == []
    assert len(down.requests) == 2


def test_each_sink_takes_its_delivery_budget_from_the_config():
    from shadowjudge.alerts.sinks import build_sinks
    from shadowjudge.config import AlertsConfig, AlertSinkConfig

    fast, default = build_sinks(AlertsConfig(sinks=[
        AlertSinkConfig(name="hook", kind="webhook", url="http://127.0.0.1:9/h", delivery_budget_s=5),
        AlertSinkConfig(name="other", kind="webhook", url="http://127.0.0.1:9/o")]))
    assert (fast.delivery_budget_s, default.delivery_budget_s) == (5, 60)
