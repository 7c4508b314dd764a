"""Alert sinks behind one small protocol: a generic JSON webhook, a Slack-compatible webhook, PagerDuty Events v2.

A sink sends one event ("trigger" or "resolve") for one alert, as a plain dict (`alert_to_dict`). `deliver` wraps
any sink with retries and exponential backoff and returns a delivery status; it never raises, because the alert is
already stored and a failed delivery is retried on the next call. URLs and keys are read from the environment when
a send happens, so a missing secret is a failed delivery (recorded, retried), not a lost alert; they never appear in
a status or log message (webhook URLs such as Slack's carry their secret in the path).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx

from shadowjudge.config import AlertsConfig, AlertSinkConfig

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
_SLACK_TEXT_LIMIT = 2900  # Slack's section text limit is 3000 characters


class DeliveryError(Exception):
    """A send that failed; `retryable` says whether trying again can help (network, 429, 5xx), `retry_after` how
    many seconds the receiver asked to wait first (its Retry-After header)."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class AlertSink(Protocol):
    name: str
    min_severity: str
    max_attempts: int
    backoff_s: float
    delivery_budget_s: float  # per delivery pass: a slow or rate-limiting sink cannot hold a cycle for minutes

    def send(self, alert: Mapping[str, Any], event: str) -> None:
        """Send one event for one alert; raise DeliveryError on failure."""
        ...


def wants(sink: AlertSink, severity: str) -> bool:
    return SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK.get(sink.min_severity, 0)


def deliver(sink: AlertSink, alert: Mapping[str, Any], event: str, sleep: Callable[[float], None] = time.sleep,
            deadline: float | None = None) -> dict[str, Any]:
    """Send with retries; the status (sent/failed, attempts, error) is what `Alert.delivered[sink]` stores.

    A receiver's Retry-After is waited for, up to the schedule's longest backoff. Retries end at `deadline` (a
    `time.monotonic()` value): a wait past it is cut short to it, for one last try.
    """
    error = None
    attempts = 0
    longest_backoff = sink.backoff_s * 2 ** max(sink.max_attempts - 2, 0)
    for attempts in range(1, sink.max_attempts + 1):
        try:
            sink.send(alert, event)
            error = None
            break
        except DeliveryError as exc:
            error = str(exc)
            if not exc.retryable or attempts == sink.max_attempts:
                break
            wait = sink.backoff_s * 2 ** (attempts - 1)
            if exc.retry_after is not None:
                wait = min(max(wait, exc.retry_after), longest_backoff)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            sleep(wait)
        except Exception as exc:  # a sink's bug must not take the other sinks (or the cycle) down with it
            error = f"sink '{sink.name}': {type(exc).__name__}"
            break
    return {"event": event, "status": "failed" if error else "sent", "attempts": attempts, "error": error,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _env(name: str | None, what: str, sink: str) -> str:
    value = os.environ.get(name or "")
    if not value:
        raise DeliveryError(f"sink '{sink}': env var {name} ({what}) is not set", retryable=False)
    return value


class _HttpSink:
    """One POST of a JSON body per send; the payload is the subclass's business."""

    def __init__(self, config: AlertSinkConfig, transport: httpx.BaseTransport | None = None) -> None:
        self.name = config.name
        self.min_severity = config.min_severity
        self.max_attempts = config.max_attempts
        self.backoff_s = config.backoff_s
        self.delivery_budget_s = config.delivery_budget_s
        self._config = config
        self._transport = transport

    def _url(self) -> str:
        if self._config.url:
            return self._config.url
        if self._config.url_env:
            return _env(self._config.url_env, "URL", self.name)
        return PAGERDUTY_EVENTS_URL

    def payload(self, alert: Mapping[str, Any], event: str) -> dict[str, Any]:
        raise NotImplementedError

    def send(self, alert: Mapping[str, Any], event: str) -> None:
        body = self.payload(alert, event)
        try:
            with httpx.Client(timeout=self._config.timeout_s, transport=self._transport) as client:
                response = client.post(self._url(), json=body)
        except httpx.HTTPError as exc:  # the message of a transport error can hold the URL: keep only its kind
            raise DeliveryError(f"sink '{self.name}': {type(exc).__name__}", retryable=True) from None
        if response.status_code >= 300:
            retryable = response.status_code == 429 or response.status_code >= 500
            raise DeliveryError(f"sink '{self.name}': HTTP {response.status_code}", retryable=retryable,
                                retry_after=_retry_after(response.headers.get("Retry-After")))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def _headline(alert: Mapping[str, Any]) -> str:
    where = alert["route"] + (f" / {alert['target']}" if alert.get("target") else "")
    sl = f" [{alert['slice']}]" if alert.get("slice") else ""
    return f"[{alert['severity'].upper()}] {alert['kind']} on {where}: {alert['metric']}{sl}"


class WebhookSink(_HttpSink):
    """Generic JSON: the event name and the whole alert, bundle included."""

    def payload(self, alert: Mapping[str, Any], event: str) -> dict[str, Any]:
        return {"event": event, "source": "shadowjudge", "summary": _headline(alert), "alert": dict(alert)}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class SlackSink(_HttpSink):
    """Slack incoming-webhook format: `text` (the notification line) and Block Kit blocks with the triage bundle."""

    def payload(self, alert: Mapping[str, Any], event: str) -> dict[str, Any]:
        bundle = alert.get("bundle") or {}
        headline = ("RESOLVED " if event == "resolve" else "") + _headline(alert)
        effect = alert.get("effect_size")
        interval = (f" [{alert['ci_low']:.3g}, {alert['ci_high']:.3g}]"
                    if alert.get("ci_low") is not None and alert.get("ci_high") is not None else "")
        fields = [("Target", alert.get("target") or "-"), ("Metric", alert["metric"]),
                  ("Slice", alert.get("slice") or "all traffic"),
                  ("Effect", f"{effect:.3g}{interval}" if effect is not None else "-"),
                  ("Occurrences", str(alert.get("occurrences", 1))), ("Action", alert.get("action") or "-")]
        # Everything but the header (plain text) is mrkdwn: text from data goes through _mrkdwn
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": _clip(headline, 150)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(alert["message"], _SLACK_TEXT_LIMIT)}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{_mrkdwn(v, 500)}"} for k, v in fields]},
        ]
        for example in (bundle.get("examples") or [])[:2]:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _slack_example(example)}})
        context = []
        if bundle.get("run_link"):
            context.append(f"<{_mrkdwn(bundle['run_link'], 1000)}|MLflow run>")
        if bundle.get("reproduce"):
            note = f" ({_mrkdwn(bundle['reproduce_note'], 600)})" if bundle.get("reproduce_note") else ""
            context.append(f"reproduce: `{_mrkdwn(bundle['reproduce'], 1000)}`{note}")
        context.append(f"alert #{alert.get('id')} \u00b7 `shadowjudge alerts show {alert.get('id')}`")
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " \u00b7 ".join(context)}]})
        return {"text": _mrkdwn(headline, _SLACK_TEXT_LIMIT), "blocks": blocks}


_PARTIAL_ENTITY = re.compile(r"&[a-z]{0,3}$")  # after escaping, every '&' starts an entity


def _mrkdwn(text: str, limit: int) -> str:
    """Text from data (prompts, answers, slice labels) shown literally in mrkdwn: &, < and > escaped, so
    '<!channel>' pings no one and '<https://x|label>' links nowhere; clipped without cutting an entity."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if len(escaped) <= limit:
        return escaped
    return _PARTIAL_ENTITY.sub("", escaped[: limit - 1]) + "\u2026"


def _slack_example(example: Mapping[str, Any]) -> str:
    def score(key: str) -> str:
        value = example.get(key)
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    if "case_id" in example:  # a failed golden case
        failures = "; ".join(str(f) for f in example.get("failures") or []) or "-"
        lines = [f"*Golden case* {_mrkdwn(str(example['case_id']), 200)} (score {score('score')})",
                 f"*Unanswered*: {_mrkdwn(str(example['unanswered']), 200)} (the request failed: not a wrong answer)"
                 if example.get("unanswered") else f"*Failures*: {_mrkdwn(failures, 1200)}"]
        if example.get("incident"):
            lines.append(f"*Incident*: {_mrkdwn(str(example['incident']), 400)}")
    elif "prompt" not in example and example.get("text"):  # a drift example
        lines = [f"*Example*: {_mrkdwn(example['text'], 800)}"]
    else:
        lines = [f"*Prompt*: {_mrkdwn(example.get('prompt') or '', 400)}",
                 f"*Incumbent* ({score('incumbent_score')}): {_mrkdwn(example.get('incumbent_answer') or '-', 600)}",
                 f"*Candidate* ({score('candidate_score')}): "
                 f"{_mrkdwn(example.get('candidate_answer') or example.get('candidate_error') or '-', 600)}"]
        if "candidate_failed_checks" in example:  # a `checks` regression: which checks each side failed
            lines.insert(1, f"*Checks failed*: candidate {_check_names(example['candidate_failed_checks'])}, "
                            f"incumbent {_check_names(example.get('incumbent_failed_checks'))}")
    return "\n".join(lines)


def _check_names(names: list[str] | None) -> str:
    return _mrkdwn(", ".join(names), 300) if names else "none"


class PagerDutySink(_HttpSink):
    """PagerDuty Events API v2: trigger and resolve, deduplicated by the alert's fingerprint."""

    def payload(self, alert: Mapping[str, Any], event: str) -> dict[str, Any]:
        key = _env(self._config.routing_key_env, "routing key", self.name)
        body: dict[str, Any] = {"routing_key": key, "event_action": event, "dedup_key": alert["fingerprint"]}
        if event == "resolve":
            return body
        bundle = alert.get("bundle") or {}
        body["payload"] = {
            "summary": _clip(_headline(alert) + " \u2014 " + alert["message"], 1024),
            "source": f"shadowjudge/{alert['route']}",
            "severity": alert["severity"] if alert["severity"] in ("critical", "warning", "info") else "error",
            "component": alert.get("target") or alert["route"],
            "group": alert["route"],
            "class": alert["metric"],
            "custom_details": {k: alert.get(k) for k in ("id", "kind", "slice", "effect_size", "ci_low", "ci_high",
                                                         "action", "occurrences")}
            | {"reproduce": bundle.get("reproduce"), "reproduce_note": bundle.get("reproduce_note"),
               "worst_examples": (bundle.get("examples") or [])[:3]},
        }
        body["client"] = "ShadowJudge"
        if bundle.get("run_link"):
            body["links"] = [{"href": bundle["run_link"], "text": "MLflow run"}]
        return body


_SINKS: dict[str, type[_HttpSink]] = {"webhook": WebhookSink, "slack": SlackSink, "pagerduty": PagerDutySink}


def build_sinks(config: AlertsConfig, transport: httpx.BaseTransport | None = None) -> list[AlertSink]:
    """The configured sinks; secrets are looked up at send time."""
    return [_SINKS[s.kind](s, transport) for s in config.sinks]
