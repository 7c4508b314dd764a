"""`alerts list|show|ack|resolve` through typer's runner, on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from shadowjudge.alerts import build_sinks, raise_alerts
from shadowjudge.alerts.cli import alerts_cli
from shadowjudge.analysis import analyze_run
from shadowjudge.config import load_config
from test_alerts_sinks import Receiver
from test_analysis_alpaca_runs import PROFILES, build_run, route_for

runner = CliRunner(env={"COLUMNS": "200"})


def _config(tmp_path, store_url: str, pd_url: str | None = None):
    data = {"store": {"url": store_url}, "sources": [{"name": "logs", "kind": "jsonl", "path": "requests.jsonl"}],
            "routes": [route_for(["bad"]).model_dump(mode="json")]}
    if pd_url:
        data["alerts"] = {"sinks": [{"name": "pd", "kind": "pagerduty", "url": pd_url, "routing_key_env": "PD_KEY",
                                     "backoff_s": 0}]}
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_list_show_ack_resolve(engine, store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PD_KEY", "key")
    route = route_for(["bad"])
    analysis = analyze_run(engine, build_run(engine, run_key="chat:c1", incumbent="claude-2", profiles=PROFILES,
                                             candidates={"bad": "falcon-40b-instruct"},
                                             datasets={"koala", "oasst", "helpful_base"}), route)
    with Receiver(default=202) as pd:
        config = _config(tmp_path, store_url, pd.url)
        sinks = build_sinks(load_config(config).alerts)
        alerts = raise_alerts(engine, analysis, route, sinks, run_link="http://mlflow.local/run/1",
                              config_path="shadowjudge.yaml")
        alert = next(a for a in alerts if a.metric == "quality" and a.slice is None)

        listed = runner.invoke(alerts_cli, ["list", "--config", config])
        assert listed.exit_code == 0, listed.output
        assert "critical" in listed.output and "quality" in listed.output

        shown = runner.invoke(alerts_cli, ["show", str(alert.id), "--config", config])
        assert shown.exit_code == 0, shown.output
        for text in ("http://mlflow.local/run/1",
                     "shadowjudge run --config shadowjudge.yaml --route chat --cycle-id c1", "reruns this cycle",
                     "example 1", "prompt", "candidate"):
            assert text in shown.output
        as_json = json.loads(runner.invoke(alerts_cli, ["show", str(alert.id), "--json", "-c", config]).output)
        assert as_json["bundle"]["examples"] and as_json["fingerprint"] == alert.fingerprint

        acked = runner.invoke(alerts_cli, ["ack", str(alert.id), "--config", config, "--note", "on it"])
        assert acked.exit_code == 0 and "acknowledged" in acked.output
        assert "acknowledged" in runner.invoke(alerts_cli, ["list", "--config", config]).output

        resolved = runner.invoke(alerts_cli, ["resolve", str(alert.id), "--config", config])
        assert resolved.exit_code == 0 and f"alert {alert.id} resolved" in resolved.output
    mine = [r["json"]["event_action"] for r in pd.requests if r["json"]["dedup_key"] == alert.fingerprint]
    assert mine == ["trigger", "resolve"]
    assert str(alert.id) not in runner.invoke(alerts_cli, ["list", "--config", config]).output.split()
    assert str(alert.id) in runner.invoke(alerts_cli, ["list", "--status", "resolved", "--config", config]).output


def test_errors_are_messages_not_tracebacks(store_url, tmp_path):
    config = _config(tmp_path, store_url)
    missing = runner.invoke(alerts_cli, ["show", "4242", "--config", config])
    assert missing.exit_code == 2 and "alert 4242 does not exist" in missing.output
    assert missing.exception is None or isinstance(missing.exception, SystemExit)
    bad_status = runner.invoke(alerts_cli, ["list", "--status", "closed", "--config", config])
    assert bad_status.exit_code == 2 and "unknown status 'closed'" in bad_status.output
    no_config = runner.invoke(alerts_cli, ["list", "--config", str(tmp_path / "nope.yaml")])
    assert no_config.exit_code == 2 and "cannot read config" in no_config.output
    fresh = _config(tmp_path, f"sqlite:///{tmp_path}/empty.db")
    unmigrated = runner.invoke(alerts_cli, ["list", "--config", fresh])
    assert unmigrated.exit_code == 1 and "shadowjudge init" in unmigrated.output
