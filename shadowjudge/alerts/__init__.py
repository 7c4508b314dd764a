"""Alerts: findings from analyses and drift checks, stored and deduplicated by cause, sent to sinks, triaged."""

from shadowjudge.alerts.findings import Finding, drift_findings, golden_findings, regression_findings
from shadowjudge.alerts.records import (
    AlertError,
    acknowledge_alert,
    alert_to_dict,
    deliver_pending,
    drift_alerts,
    get_alert,
    golden_alerts,
    list_alerts,
    raise_alerts,
    resolve_alert,
)
from shadowjudge.alerts.sinks import AlertSink, PagerDutySink, SlackSink, WebhookSink, build_sinks, deliver

__all__ = [
    "AlertError", "AlertSink", "Finding", "PagerDutySink", "SlackSink", "WebhookSink", "acknowledge_alert",
    "alert_to_dict", "build_sinks", "deliver", "deliver_pending", "drift_alerts", "drift_findings", "get_alert",
    "golden_alerts", "golden_findings", "list_alerts", "raise_alerts", "regression_findings", "resolve_alert",
]
