"""Alerts in the store: raised from findings, deduplicated by cause, delivered to sinks, acknowledged, resolved.

Stored first, delivered second: a sink that is down never loses an alert, and every call retries what is still
undelivered. One unresolved alert per cause is enforced by the database (`open_key` is unique and holds the
fingerprint until the alert is resolved), so two cycles raising the same cause at once still make one alert;
a recurrence bumps `occurrences` instead of notifying again (unless its severity rises), and a rerun of a run (or
window) the alert counted already changes nothing. Delivery is at-least-once: PagerDuty deduplicates by the
fingerprint.

What is stored is what may leave the system: a bundle's free texts and the message (a golden case's failures can
quote the answer) are redacted before the alert is written, by the configured Redactor (`redaction`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select, update

from shadowjudge.alerts.findings import Finding, drift_findings, golden_findings, regression_findings
from shadowjudge.alerts.sinks import SEVERITY_RANK, AlertSink, deliver, wants
from shadowjudge.alerts.triage import build_bundle
from shadowjudge.analysis.drift import DriftReport
from shadowjudge.analysis.golden import GoldenReport
from shadowjudge.analysis.regression import RunAnalysis, json_safe
from shadowjudge.config import RedactionConfig, RouteConfig
from shadowjudge.errors import InputError
from shadowjudge.store import Alert, insert_ignoring_duplicates, session_scope
from shadowjudge.store.models import fit_column, utcnow
from shadowjudge.traffic.redaction import Redactor

STATUSES = ("open", "acknowledged", "resolved")
RESOLVE_RETRY_WINDOW = timedelta(days=7)
SEEN_SOURCES = 50  # the source keys (runs, windows) an alert remembers: a rerun of any of them is not news


class AlertError(InputError):
    """An alert operation that cannot be done (unknown id, resolved alert); the message says which."""


def alert_to_dict(alert: Alert) -> dict[str, Any]:
    """The alert as valid JSON (an infinite effect, e.g. cost per outcome with no accepted answer, becomes null)."""
    return json_safe({
        "id": alert.id, "fingerprint": alert.fingerprint, "status": alert.status, "severity": alert.severity,
        "kind": alert.kind, "route": alert.route, "target": alert.target, "metric": alert.metric,
        "slice": alert.slice, "effect_size": alert.effect_size, "ci_low": alert.ci_low, "ci_high": alert.ci_high,
        "action": alert.action, "message": alert.message, "bundle": alert.bundle, "run_id": alert.run_id,
        "occurrences": alert.occurrences, "delivered": alert.delivered,
        "created_at": alert.created_at.isoformat() if alert.created_at else None,
        "updated_at": alert.updated_at.isoformat() if alert.updated_at else None,
    })


def _sources(bundle: dict[str, Any] | None) -> list[str]:
    """The source keys an alert has counted, oldest first (alerts stored before `source_keys` hold only the last)."""
    bundle = bundle or {}
    return list(bundle.get("source_keys") or ([bundle["source_key"]] if bundle.get("source_key") else []))


def _trigger_attempted(state: dict[str, Any]) -> bool:
    """Whether a trigger went out to a sink, before an escalation included: even one that failed (a timeout) may
    have opened an incident there, which only a resolve closes."""
    return bool(state.get("triggered")) or (state.get("event") == "trigger" and state.get("attempts", 0) > 0)


def _record(session, finding: Finding, bundle: dict[str, Any]) -> int:
    """Insert the finding as a new open alert, or fold it into the unresolved alert of the same cause."""
    fp = finding.fingerprint
    now = utcnow()
    # Labels from data (a slice is a metadata value) cut to their columns: one too long fails the transaction that
    # holds every finding of the cycle. The fingerprint hashes them whole, so two causes never merge.
    action = fit_column(Alert.action, finding.action)
    row = dict(fingerprint=fp, open_key=fp, status="open", severity=finding.severity, kind=finding.kind,
               route=finding.route, target=finding.target, metric=fit_column(Alert.metric, finding.metric),
               slice=fit_column(Alert.slice, finding.slice), effect_size=finding.effect_size, ci_low=finding.ci_low,
               ci_high=finding.ci_high, action=action, message=finding.message,
               bundle={**bundle, "source_keys": [finding.source_key]}, run_id=finding.run_id, occurrences=1,
               delivered={}, created_at=now, updated_at=now)
    settled = session.execute(select(Alert.id, Alert.bundle).where(Alert.fingerprint == fp, Alert.status == "resolved")
                              .order_by(Alert.id.desc()).limit(20)).all()
    for earlier in settled:  # a rerun of a run (or window) a resolved alert counted: already handled, not news
        if finding.source_key in _sources(earlier.bundle):
            return earlier.id
    for _ in range(2):  # a second try covers an alert resolved between our insert and our read
        if insert_ignoring_duplicates(session, Alert, [row], ["open_key"]):
            return session.scalar(select(Alert.id).where(Alert.open_key == fp))
        existing = session.execute(select(Alert.id, Alert.severity, Alert.bundle, Alert.run_id, Alert.delivered)
                                   .where(Alert.open_key == fp)).first()
        if existing is None:
            continue
        seen = _sources(existing.bundle)
        if finding.source_key in seen:
            return existing.id  # a run or window it counted already, rerun: not a recurrence
        sources = [*seen, finding.source_key][-SEEN_SOURCES:]
        if finding.run_id is not None and existing.run_id is not None and finding.run_id < existing.run_id:
            # a run older than the evidence held (a late resume): it counts, but never rolls the evidence back
            session.execute(update(Alert).where(Alert.id == existing.id).values(
                occurrences=Alert.occurrences + 1, bundle={**(existing.bundle or {}), "source_keys": sources},
                updated_at=now))
            return existing.id
        escalated = SEVERITY_RANK[finding.severity] > SEVERITY_RANK.get(existing.severity, 0)
        values: dict[str, Any] = dict(
            occurrences=Alert.occurrences + 1, effect_size=finding.effect_size, ci_low=finding.ci_low,
            ci_high=finding.ci_high, message=finding.message, action=action, run_id=finding.run_id,
            severity=finding.severity,  # the latest evidence: a critical cause now only a warning no longer rolls back
            bundle={**bundle, "log": (existing.bundle or {}).get("log", []), "source_keys": sources}, updated_at=now)
        if escalated:  # a worse cause is news: notify again, remembering where a trigger went (it needs a resolve)
            values |= dict(delivered={name: {"triggered": True} for name, state in (existing.delivered or {}).items()
                                      if _trigger_attempted(state)})
        session.execute(update(Alert).where(Alert.id == existing.id).values(**values))
        return existing.id
    raise RuntimeError(f"alert for cause {fp} could be neither inserted nor found")


def _pending_event(alert: Alert, state: dict[str, Any]) -> str | None:
    """The event a sink whose delivery state is `state` still needs for this alert, if any."""
    if alert.status == "resolved":
        if state.get("event") == "resolve":
            return "resolve" if state.get("status") == "failed" else None
        # PagerDuty ignores a resolve for an incident it never opened, but an orphaned incident stays open forever
        return "resolve" if _trigger_attempted(state) else None
    if state.get("event") == "trigger" and state.get("status") in ("sent", "skipped"):
        return None
    return "trigger"


def deliver_pending(engine: Engine, sinks: Sequence[AlertSink], alert_ids: Sequence[int] | None = None) -> int:
    """Send every event a sink has not received yet (new triggers, escalations, resolves, earlier failures).

    Network calls happen outside any transaction; each result is merged into `delivered` per sink. Returns the
    number of sends that failed (they stay pending for the next call). A sink whose retries all failed, or that
    used its `delivery_budget_s`, is not tried again in this call: a dead or slow endpoint costs one retry schedule
    per cycle, not one per pending alert.
    """
    if not sinks:
        return 0
    with session_scope(engine) as s:
        query = select(Alert).where(
            (Alert.status != "resolved") | (Alert.updated_at >= utcnow() - RESOLVE_RETRY_WINDOW))
        if alert_ids is not None:
            query = query.where(Alert.id.in_(list(alert_ids)))
        alerts = list(s.scalars(query.order_by(Alert.id)))
        s.expunge_all()
    failures = 0
    down: dict[str, str] = {}  # sink name -> why it is not tried again in this call
    spent: dict[str, float] = {}  # sink name -> seconds its sends took in this call
    for alert in alerts:
        payload = alert_to_dict(alert)
        updates: dict[str, Any] = {}
        for sink in sinks:
            state = (alert.delivered or {}).get(sink.name) or {}
            event = _pending_event(alert, state)
            if event is None:
                continue
            if event == "trigger" and not wants(sink, alert.severity):
                status = {"event": "trigger", "status": "skipped", "attempts": 0,
                          "error": f"severity {alert.severity} below {sink.min_severity}"}
            elif sink.name in down:
                status = {"event": event, "status": "failed", "attempts": 0, "error": f"not tried: {down[sink.name]}"}
                failures += 1
            else:
                started = time.monotonic()
                status = deliver(sink, payload, event,
                                 deadline=started + sink.delivery_budget_s - spent.get(sink.name, 0.0))
                spent[sink.name] = spent.get(sink.name, 0.0) + time.monotonic() - started
                if status["status"] == "failed":
                    failures += 1
                    if status.get("attempts", 0) >= sink.max_attempts:  # retries spent: the endpoint, not the payload
                        down[sink.name] = (f"the sink failed earlier in this delivery "
                                           f"({str(status.get('error') or 'failed')[:200]})")
                if sink.name not in down and spent[sink.name] >= sink.delivery_budget_s:
                    down[sink.name] = f"the sink used its {sink.delivery_budget_s:g} s of this delivery"
            if event == "trigger" and (_trigger_attempted(state) or _trigger_attempted(status)):
                status["triggered"] = True
            updates[sink.name] = status
        if updates:
            with session_scope(engine) as s:
                delivered = s.scalar(select(Alert.delivered).where(Alert.id == alert.id)) or {}
                # updated_at is the alert's last change, not its last delivery attempt (and it starts the window
                # in which a failed resolve is retried)
                s.execute(update(Alert).where(Alert.id == alert.id)
                          .values(delivered={**delivered, **updates}, updated_at=Alert.updated_at))
    return failures


def raise_findings(engine: Engine, findings: list[Finding], route: RouteConfig, sinks: Sequence[AlertSink],
                   run_link: str | None, config_path: str | None, max_examples: int, *,
                   redaction: RedactionConfig | None = None) -> list[Alert]:
    """Store every finding as an alert (new or recurred), then make one delivery pass over all pending alerts.

    A cycle passes all its findings at once: each pass may wait out a dead sink's retry schedule. `redaction` is the
    config's (None: the built-in detectors, as for a config without a `redaction` section); messages and bundles are
    redacted with it before they are stored.
    """
    redactor = Redactor.from_config(redaction or RedactionConfig())
    findings = [replace(f, message=redactor.redact(f.message, {})) for f in findings]
    bundles = [build_bundle(engine, f, route, run_link, config_path, max_examples, redactor) for f in findings]
    with session_scope(engine) as s:
        ids = [_record(s, f, b) for f, b in zip(findings, bundles, strict=True)]
    deliver_pending(engine, sinks)  # these alerts, and whatever an earlier call could not deliver
    if not ids:
        return []
    with session_scope(engine) as s:
        alerts = list(s.scalars(select(Alert).where(Alert.id.in_(ids)).order_by(Alert.id)))
        s.expunge_all()
    return alerts


def raise_alerts(engine: Engine, analysis: RunAnalysis, route: RouteConfig, sinks: Sequence[AlertSink],
                 run_link: str | None = None, *, config_path: str | None = None, max_examples: int = 5,
                 action: str | None = None, redaction: RedactionConfig | None = None) -> list[Alert]:
    """Store and send an alert for every regression the analysis found (failed metrics, failing slices).

    `run_link` is the MLflow run; `action` says what the controller did (default: derived from the verdict);
    `config_path` goes into the reproduce command; `redaction` redacts what is stored and sent (`raise_findings`).
    Returns the alerts raised or recurred by this analysis.
    """
    return raise_findings(engine, regression_findings(analysis, route, action), route, sinks, run_link, config_path,
                          max_examples, redaction=redaction)


def drift_alerts(engine: Engine, report: DriftReport, route: RouteConfig, sinks: Sequence[AlertSink],
                 run_link: str | None = None, *, run_id: int | None = None, config_path: str | None = None,
                 max_examples: int = 5, redaction: RedactionConfig | None = None) -> list[Alert]:
    """Store and send an alert for every drift check that alarmed."""
    return raise_findings(engine, drift_findings(report, route, run_id), route, sinks, run_link, config_path,
                          max_examples, redaction=redaction)


def golden_alerts(engine: Engine, report: GoldenReport, route: RouteConfig, sinks: Sequence[AlertSink],
                  run_link: str | None = None, *, run_id: int | None = None, config_path: str | None = None,
                  max_examples: int = 5, redaction: RedactionConfig | None = None) -> list[Alert]:
    """Store and send an alert when a candidate fails its golden regression set."""
    return raise_findings(engine, golden_findings(report, route, run_id), route, sinks, run_link, config_path,
                          max_examples, redaction=redaction)


def _get(session, alert_id: int) -> Alert:
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise AlertError(f"alert {alert_id} does not exist")
    return alert


def _log(alert: Alert, event: str, note: str | None) -> None:
    entry = {"at": utcnow().isoformat(timespec="seconds"), "event": event}
    if note:
        entry["note"] = note
    bundle = dict(alert.bundle or {})
    bundle["log"] = [*bundle.get("log", []), entry]
    alert.bundle = bundle


def get_alert(engine: Engine, alert_id: int) -> Alert:
    with session_scope(engine) as s:
        alert = _get(s, alert_id)
        s.expunge(alert)
    return alert


def list_alerts(engine: Engine, status: str = "unresolved", route: str | None = None, limit: int = 50) -> list[Alert]:
    """`status` is one of open, acknowledged, resolved, unresolved (open or acknowledged) or all."""
    if status not in (*STATUSES, "unresolved", "all"):
        raise AlertError(f"unknown status '{status}': use one of {', '.join((*STATUSES, 'unresolved', 'all'))}")
    query = select(Alert)
    if status == "unresolved":
        query = query.where(Alert.status != "resolved")
    elif status != "all":
        query = query.where(Alert.status == status)
    if route:
        query = query.where(Alert.route == route)
    with session_scope(engine) as s:
        alerts = list(s.scalars(query.order_by(Alert.id.desc()).limit(limit)))
        s.expunge_all()
    return alerts


def acknowledge_alert(engine: Engine, alert_id: int, note: str | None = None) -> Alert:
    """Someone is on it: it stays unresolved (a recurrence still folds into it) but is marked as seen."""
    with session_scope(engine) as s:
        alert = _get(s, alert_id)
        if alert.status == "resolved":
            raise AlertError(f"alert {alert_id} is already resolved")
        alert.status = "acknowledged"
        _log(alert, "acknowledged", note)
        alert.updated_at = utcnow()
        s.flush()
        s.expunge(alert)
    return alert


def resolve_alert(engine: Engine, alert_id: int, sinks: Sequence[AlertSink] = (), note: str | None = None) -> Alert:
    """Close the alert (the same cause may alert again afterwards) and send the resolve events."""
    with session_scope(engine) as s:
        alert = _get(s, alert_id)
        if alert.status != "resolved":
            alert.status = "resolved"
            alert.open_key = None
            _log(alert, "resolved", note)
            alert.updated_at = utcnow()
    deliver_pending(engine, sinks, [alert_id])
    return get_alert(engine, alert_id)
