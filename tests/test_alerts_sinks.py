"""Alert sinks against a real HTTP receiver on loopback: payload formats, retries, failures, secrets."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shadowjudge.alerts.sinks import PagerDutySink, SlackSink, WebhookSink, build_sinks, deliver, wants
from shadowjudge.config import AlertsConfig, AlertSinkConfig


class Receiver:
    """A tiny HTTP server on 127.0.0.1 that records JSON posts and answers with scripted status codes."""

    def __init__(self, statuses: list[int] | None = None, default: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        self.default = default
        self.headers = headers or {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                          "json": json.loads(body)})
                status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALERT = {
    "id": 7, "fingerprint": "f" * 32, "status": "open", "severity": "critical", "kind": "regression",
    "route": "chat", "target": "mixed", "metric": "quality", "slice": "task=koala", "effect_size": 0.23,
    "ci_low": 0.005, "ci_high": 0.53, "action": "promotion blocked", "message": "Candidate mixed regresses " * 300,
    "occurrences": 1, "run_id": 3, "delivered": {},
    "bundle": {"run_link": "http://mlflow.local/#/experiments/1/runs/abc",
               "reproduce": "shadowjudge run --config c.yaml --route chat",
               "examples": [{"prompt": "How do I cook salmon?", "incumbent_answer": "Heat the pan...",
                             "candidate_answer": "As an AI language model...", "candidate_score": 0.01,
                             "incumbent_score": 0.4}]},
}


def _sink(cls, **kw):
    return cls(AlertSinkConfig(name=kw.pop("name", "s"), kind=kw.pop("kind"), **kw))


def test_webhook_posts_the_whole_alert_as_json():
    with Receiver() as rx:
        status = deliver(_sink(WebhookSink, kind="webhook", url=rx.url + "/hook"), ALERT, "trigger")
    assert status["status"] == "sent" and status["attempts"] == 1
    [req] = rx.requests
    assert req["path"] == "/hook" and req["content_type"] == "application/json"
    assert req["json"]["event"] == "trigger" and req["json"]["alert"]["bundle"]["examples"][0]["prompt"]


def test_slack_payload_has_text_and_blocks_within_slack_limits(monkeypatch):
    with Receiver() as rx:
        monkeypatch.setenv("SLACK_HOOK_URL", rx.url + "/services/T000/B000/XXXX")
        status = deliver(_sink(SlackSink, kind="slack", url_env="SLACK_HOOK_URL"), ALERT, "trigger")
    assert status["status"] == "sent"
    body = rx.requests[0]["json"]
    assert body["text"].startswith("[CRITICAL] regression on chat / mixed: quality [task=koala]")
    kinds = [b["type"] for b in body["blocks"]]
    assert kinds[0] == "header" and kinds[-1] == "context"
    assert len(body["blocks"][0]["text"]["text"]) <= 150
    assert all(len(b["text"]["text"]) <= 3000 for b in body["blocks"] if b["type"] == "section" and "text" in b)
    flat = json.dumps(body)
    assert "How do I cook salmon?" in flat and "mlflow.local" in flat and "shadowjudge run --config" in flat


def test_pagerduty_trigger_and_resolve_events(monkeypatch):
    monkeypatch.setenv("PD_ROUTING_KEY", "R0UT1NGKEY")
    with Receiver(default=202) as rx:
        sink = _sink(PagerDutySink, kind="pagerduty", url=rx.url + "/v2/enqueue", routing_key_env="PD_ROUTING_KEY")
        assert deliver(sink, ALERT, "trigger")["status"] == "sent"
        assert deliver(sink, {**ALERT, "status": "resolved"}, "resolve")["status"] == "sent"
    trigger, resolve = (r["json"] for r in rx.requests)
    assert trigger["routing_key"] == "R0UT1NGKEY" and trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == ALERT["fingerprint"]
    assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["source"] == "shadowjudge/chat"
    assert len(trigger["payload"]["summary"]) <= 1024
    assert trigger["links"][0]["href"] == ALERT["bundle"]["run_link"]
    assert trigger["payload"]["custom_details"]["worst_examples"][0]["prompt"] == "How do I cook salmon?"
    assert resolve == {"routing_key": "R0UT1NGKEY", "event_action": "resolve", "dedup_key": ALERT["fingerprint"]}


def test_transient_failures_are_retried_with_backoff():
    sleeps: list[float] = []
    with Receiver(statuses=[500, 429]) as rx:
        sink = _sink(WebhookSink, kind="webhook", url=rx.url, max_attempts=4, backoff_s=0.2)
        status = deliver(sink, ALERT, "trigger", sleep=sleeps.append)
    assert status["status"] == "sent" and status["attempts"] == 3 and len(rx.requests) == 3
    assert sleeps == [0.2, 0.4]


def test_permanent_failures_stop_and_never_reveal_the_secret_url(monkeypatch):
    with Receiver(default=400) as rx:
        status = deliver(_sink(WebhookSink, kind="webhook", url=rx.url, max_attempts=4), ALERT, "trigger",
                         sleep=lambda s: None)
    assert status["status"] == "failed" and status["attempts"] == 1 and status["error"] == "sink 's': HTTP 400"

    monkeypatch.setenv("HOOK", f"http://127.0.0.1:{closed_port()}/hooks/SECRET-TOKEN-123")
    down = deliver(_sink(WebhookSink, kind="webhook", url_env="HOOK", max_attempts=2), ALERT, "trigger",
                   sleep=lambda s: None)
    assert down["status"] == "failed" and down["attempts"] == 2 and "ConnectError" in down["error"]
    assert "SECRET" not in json.dumps(down)

    monkeypatch.delenv("PD_KEY", raising=False)
    missing = deliver(_sink(PagerDutySink, kind="pagerduty", url="http://127.0.0.1:1", routing_key_env="PD_KEY"),
                      ALERT, "trigger", sleep=lambda s: None)
    assert missing["status"] == "failed" and missing["attempts"] == 1 and "env var PD_KEY" in missing["error"]


def test_sink_config_and_severity_filter():
    sinks = build_sinks(AlertsConfig(sinks=[
        {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:1", "min_severity": "critical"},
        {"name": "pd", "kind": "pagerduty", "routing_key_env": "K"}]))
    assert [s.name for s in sinks] == ["hook", "pd"]
    assert not wants(sinks[0], "warning") and wants(sinks[0], "critical") and wants(sinks[1], "warning")
    with pytest.raises(ValueError, match="needs 'url' or 'url_env'"):
        AlertSinkConfig(name="x", kind="slack")
    with pytest.raises(ValueError, match="pagerduty needs 'routing_key_env'"):
        AlertSinkConfig(name="x", kind="pagerduty")
    with pytest.raises(ValueError, match="sink names must be unique"):
        AlertsConfig(sinks=[{"name": "a", "kind": "webhook", "url": "http://x"}] * 2)


def test_retry_after_is_waited_for_up_to_the_longest_backoff():
    for retry_after, waits in (("3", [3.0, 3.0]), ("120", [4.0, 4.0])):
        sleeps: list[float] = []
        with Receiver(statuses=[429, 429], headers={"Retry-After": retry_after}) as rx:
            sink = _sink(WebhookSink, kind="webhook", url=rx.url, max_attempts=4, backoff_s=1.0)
            status = deliver(sink, ALERT, "trigger", sleep=sleeps.append)
        assert status["status"] == "sent" and status["attempts"] == 3
        assert sleeps == waits  # the schedule alone waits 1 s, then 2 s; its longest wait is 4 s


def test_slack_shows_text_from_traffic_literally():
    """A prompt is traffic: '<!channel>' in it must not ping the channel, nor '<url|label>' render as a link."""
    prompt = "hi <!channel> see <https://evil.example|MLflow run> & more"
    alert = {**ALERT, "slice": "task=<!here>", "message": "Candidate regresses on <!everyone>",
             "bundle": {**ALERT["bundle"], "examples": [{**ALERT["bundle"]["examples"][0], "prompt": prompt}]}}
    body = _sink(SlackSink, kind="slack", url="http://127.0.0.1:9").payload(alert, "trigger")
    texts = [body["text"]] + [b["text"]["text"] for b in body["blocks"] if b["type"] == "section" and "text" in b]
    texts += [f["text"] for b in body["blocks"] for f in b.get("fields", [])]
    assert not any("<!" in t or "<https://evil" in t for t in texts)
    lines = [line for t in texts for line in t.splitlines()]
    assert "*Prompt*: hi &lt;!channel&gt; see &lt;https://evil.example|MLflow run&gt; &amp; more" in lines
    assert "*Slice*\ntask=&lt;!here&gt;" in texts
    context = body["blocks"][-1]["elements"][0]["text"]
    assert context.startswith("<http://mlflow.local/#/experiments/1/runs/abc|MLflow run>")


def test_slack_shows_a_failed_golden_case_with_its_failures_and_incident():
    example = {"case_id": "refund-42", "passed": False, "failures": ["missing required text '30 days'", "too long"],
               "score": 0.2, "incident": "INC-42 <refund policy>"}
    alert = {**ALERT, "kind": "golden", "metric": "golden_set", "bundle": {"examples": [example]}}
    body = _sink(SlackSink, kind="slack", url="http://127.0.0.1:9").payload(alert, "trigger")
    assert body["blocks"][3]["text"]["text"] == (
        "*Golden case* refund-42 (score 0.20)\n*Failures*: missing required text '30 days'; too long\n"
        "*Incident*: INC-42 &lt;refund policy&gt;")
