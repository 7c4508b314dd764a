"""Alerts leave the system (Slack, PagerDuty, webhooks): the PII a model echoes or makes up in its answers, stored
as the model returned it, is redacted in the triage bundle and the message, as stored and as sent by every sink."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from shadowjudge.alerts import build_sinks, drift_alerts, get_alert, golden_alerts, raise_alerts
from shadowjudge.alerts.cli import alerts_cli
from shadowjudge.alerts.triage import TEXT_LIMIT
from shadowjudge.analysis import analyze_run, is_refusal, parse_golden_set, run_golden_set
from shadowjudge.analysis.drift import DriftReport, OutputWindow, output_drift
from shadowjudge.config import AlertsConfig, DriftConfig, RedactionConfig
from shadowjudge.store import ShadowResult, TrafficSample, session_scope
from test_alerts_cli import _config
from test_alerts_sinks import Receiver
from test_analysis_alpaca_runs import PROFILES, build_run, route_for

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
API_KEY = "sk-proj-A1b2C3d4E5f6G7h8I9j0K1l2"
SSN = "123-45-6789"
CARD = "4111 1111 1111 1111"
TICKET = "TICKET-424242"  # a site-specific id only a configured extra pattern knows
PROMPT_EMAIL = "ops.desk@example.org"
# What must never leave: every finding whole, and the first digits of the card number (what a clip before redaction
# leaves of it: the clip cuts it after `4111 1`).
LEAKS = (EMAIL, PHONE, "7946", API_KEY, SSN, "4111", PROMPT_EMAIL)

runner = CliRunner(env={"COLUMNS": "200"})


def _candidate_answer(original: str) -> str:
    """PII up front, and a card number that straddles the triage clip (TEXT_LIMIT)."""
    head = f"Write to {EMAIL} or call {PHONE} (key {API_KEY}, ref {TICKET}). "
    filler = (original.replace("\n", " ") + " ") * (TEXT_LIMIT // max(len(original), 1) + 2)
    before_card = (head + filler)[:TEXT_LIMIT - 6] + " "
    return before_card + CARD + " is on file. " + original


def _leak_pii(engine, run_id: int) -> None:
    """Every answer of the run as a model could have written it: the candidate's with an e-mail, a phone, an API key,
    a ticket id and a card number across the clip, the replayed incumbent's with an SSN; and a prompt with an
    address an older ingestion let through."""
    with session_scope(engine) as s:
        rows = s.execute(select(ShadowResult.id, ShadowResult.target, ShadowResult.output_text)
                         .where(ShadowResult.run_id == run_id, ShadowResult.output_text.is_not(None))).all()
        for result_id, target, text in rows:
            leaked = f"Your SSN {SSN} is on file. {text}" if target == "incumbent" else _candidate_answer(text)
            s.execute(update(ShadowResult).where(ShadowResult.id == result_id).values(output_text=leaked))
        for sample_id, messages in s.execute(select(TrafficSample.id, TrafficSample.messages)).all():
            content = messages[0]["content"] + f" (reply to {PROMPT_EMAIL})"
            s.execute(update(TrafficSample).where(TrafficSample.id == sample_id)
                      .values(messages=[{**messages[0], "content": content}]))


def _leaky_run(engine):
    route = route_for(["bad"])
    run_id = build_run(engine, run_key="chat:c1", incumbent="claude-2", profiles=PROFILES,
                       candidates={"bad": "falcon-40b-instruct"}, datasets={"koala", "oasst", "helpful_base"})
    _leak_pii(engine, run_id)
    return route, analyze_run(engine, run_id, route)


def _assert_no_pii(text: str) -> None:
    found = [leak for leak in LEAKS if leak in text]
    assert not found, f"PII left in {text[:300]!r}...: {found}"


def _sinks(url: str):
    return build_sinks(AlertsConfig(sinks=[
        {"name": "hook", "kind": "webhook", "url": f"{url}/hook", "backoff_s": 0},
        {"name": "slack", "kind": "slack", "url": f"{url}/slack", "backoff_s": 0},
        {"name": "pd", "kind": "pagerduty", "url": f"{url}/pd", "routing_key_env": "PD_KEY", "backoff_s": 0}]))


def test_pii_in_stored_answers_is_redacted_in_every_sinks_payload_the_stored_bundle_and_alerts_show(
        engine, store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PD_KEY", "key")
    route, analysis = _leaky_run(engine)
    with Receiver(default=202) as rx:
        alerts = raise_alerts(engine, analysis, route, _sinks(rx.url), config_path="shadowjudge.yaml")
    assert alerts
    alert = next(a for a in alerts if a.metric == "quality" and a.slice is None)

    payloads = {path: [r["json"] for r in rx.requests if r["path"] == f"/{path}"] for path in ("hook", "slack", "pd")}
    assert all(payloads.values()), {path: len(sent) for path, sent in payloads.items()}
    for path, sent in payloads.items():
        text = json.dumps(sent)
        _assert_no_pii(text)
        # the examples went out, redacted: each sink shows the candidate's answer and the incumbent's replay
        assert "[EMAIL]" in text and "[PHONE]" in text and "[API_KEY]" in text and "[SSN]" in text, path
    examples = get_alert(engine, alert.id).bundle["examples"]
    assert examples and all(e["candidate_answer"].startswith("Write to [EMAIL] or call [PHONE] (key [API_KEY]")
                            for e in examples)
    assert all("(reply to [EMAIL])" in e["prompt"] for e in examples)
    assert all(e["incumbent_answer"].startswith("Your SSN [SSN] is on file.") for e in examples)
    # redacted before the clip: the card number the clip would have cut in two is a placeholder, and the clip holds
    assert all(len(e["candidate_answer"]) <= TEXT_LIMIT + len(" [...]") for e in examples)
    assert any("[CARD_NUMBER]" in e["candidate_answer"] for e in examples)
    # TICKET-... is no built-in kind: without an extra pattern it stays
    assert all(TICKET in e["candidate_answer"] for e in examples)

    config = _config(tmp_path, store_url)
    shown = runner.invoke(alerts_cli, ["show", str(alert.id), "--config", config])
    assert shown.exit_code == 0, shown.output
    assert "[EMAIL]" in shown.output and "candidate" in shown.output
    _assert_no_pii(shown.output)
    as_json = runner.invoke(alerts_cli, ["show", str(alert.id), "--json", "--config", config])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["bundle"]["examples"]
    _assert_no_pii(as_json.output)


@pytest.mark.parametrize("redaction", [RedactionConfig(enabled=False),
                                       RedactionConfig(extra_patterns={"ticket": r"TICKET-[0-9]{6}"})],
                         ids=["disabled", "extra-pattern"])
def test_the_configured_redaction_is_the_one_applied(engine, redaction):
    """`redaction.enabled: false` leaves the answers alone; an extra pattern is applied with the built-in kinds."""
    route, analysis = _leaky_run(engine)
    alerts = raise_alerts(engine, analysis, route, [], redaction=redaction)
    examples = [e for a in alerts for e in a.bundle["examples"] if e.get("candidate_answer")]
    assert examples
    if not redaction.enabled:
        assert all(EMAIL in e["candidate_answer"] and TICKET in e["candidate_answer"] for e in examples)
        assert all(e["incumbent_answer"].startswith(f"Your SSN {SSN}") for e in examples)
    else:
        for e in examples:
            assert e["candidate_answer"].startswith("Write to [EMAIL] or call [PHONE] (key [API_KEY], ref [TICKET])")
            _assert_no_pii(json.dumps(e))
            assert TICKET not in json.dumps(e)


def test_a_golden_failure_quoting_the_answer_is_redacted_in_the_message_the_bundle_and_slack(engine):
    """A JSON-schema failure quotes the answer's value: it reaches the alert's message, the bundle's examples and
    the report the bundle repeats."""
    route = route_for(["cand"])
    cases = parse_golden_set([{"id": "order", "prompt": "Order number as JSON?",
                               "json_schema": {"type": "object", "properties": {"order": {"type": "integer"}}}}])
    report = run_golden_set(cases, {"order": json.dumps({"order": f"mail {EMAIL}, card {CARD}"})}, target="cand")
    assert EMAIL in report.results[0].failures[0]  # what the old alert carried out
    with Receiver() as rx:
        sinks = build_sinks(AlertsConfig(sinks=[{"name": "slack", "kind": "slack", "url": rx.url, "backoff_s": 0}]))
        [alert] = golden_alerts(engine, report, route, sinks)
    assert alert.kind == "golden" and "order" in alert.message
    for text in (alert.message, json.dumps(alert.bundle), json.dumps(rx.requests[0]["json"])):
        _assert_no_pii(text)
        assert "[EMAIL]" in text and "[CARD_NUMBER]" in text
    assert alert.bundle["examples"][0]["case_id"] == "order"
    assert alert.bundle["golden"]["results"][0]["case_id"] == "order"


def test_drift_examples_of_a_models_answers_are_redacted_in_the_bundle_and_the_webhook(engine):
    """The refusals an output-drift alert shows are the candidate's answers as stored: raw model output."""
    refusal = f"I'm sorry, but I can't help with that. Write to {EMAIL} or call {PHONE} instead."
    assert is_refusal(refusal)
    reference = OutputWindow([f"Here is the answer, number {k}." for k in range(60)])
    current = OutputWindow([refusal] * 30 + [f"Here is the answer, number {k}." for k in range(30)])
    report = DriftReport("chat", output_drift(reference, current, DriftConfig(min_samples=30), "cand"), "ref", "cur")
    assert any(r.metric == "refusal_rate" for r in report.drifted)
    with Receiver() as rx:
        sinks = build_sinks(AlertsConfig(sinks=[{"name": "hook", "kind": "webhook", "url": rx.url, "backoff_s": 0}]))
        alerts = drift_alerts(engine, report, route_for(["cand"]), sinks)
    [refusals] = [a for a in alerts if a.metric == "output:refusal_rate"]
    assert refusals.bundle["examples"] and refusals.bundle["drift"]["details"]["examples"]
    assert all(e["text"].endswith("Write to [EMAIL] or call [PHONE] instead.") for e in refusals.bundle["examples"])
    [sent] = [r["json"] for r in rx.requests if r["json"]["alert"]["id"] == refusals.id]
    for text in (json.dumps(refusals.bundle), json.dumps(sent)):
        _assert_no_pii(text)
        assert "[EMAIL]" in text
