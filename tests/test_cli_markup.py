"""Stored text and error messages reach the terminal as written: a slice label from traffic metadata such as
'labels=[/internal]', or a golden case quoting '[/INST]', made Rich fail with a MarkupError (or restyle the output),
and the error printer then failed the same way, ending in a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from shadowjudge.alerts.cli import alerts_cli
from shadowjudge.cli import app
from shadowjudge.store import Alert, RouteState, ShadowRun, get_engine, session_scope

REPO = Path(__file__).resolve().parents[1]
SLICE = "labels=[/internal]"
runner = CliRunner(env={"COLUMNS": "400"})


def _config_with_markup_in_the_store(tmp_path: Path, store_url: str) -> str:
    with session_scope(get_engine(store_url)) as s:
        s.add(ShadowRun(run_key="chat:[/run]", route="chat", config_hash="x", status="done",
                        judge_version="[bold red]judge"))
        s.add(RouteState(route="chat", weights={"[red]inc": 100}, candidate="[/cand]"))
        s.add(Alert(fingerprint="f1", open_key="f1", severity="critical", kind="regression", route="chat",
                    target="[/c]", metric="quality", slice=SLICE, message=f"Candidate regresses on slice {SLICE}",
                    action="[/promotion blocked]", bundle={"reproduce": "shadowjudge run"},
                    delivered={"pd": {"event": "trigger", "status": "failed", "error": "HTTP 400: [/body]",
                                      "attempts": 1}}))
    path = tmp_path / "shadowjudge.yaml"
    route = {"name": "chat", "incumbent": {"name": "inc", "model": "m", "base_url": "http://127.0.0.1:9/v1"},
             "candidates": [{"name": "c", "model": "c", "base_url": "http://127.0.0.1:9/v1"}]}
    path.write_text(yaml.safe_dump({"store": {"url": store_url}, "judge": {"evaluator": "lexical"},
                                    "sources": [{"name": "logs", "kind": "jsonl", "path": "requests.jsonl"}],
                                    "routes": [route]}))
    return str(path)


def test_alerts_and_status_show_stored_text_verbatim(store_url, tmp_path):
    config = _config_with_markup_in_the_store(tmp_path, store_url)
    listed = runner.invoke(alerts_cli, ["list", "-c", config])
    assert listed.exit_code == 0, listed.output
    assert SLICE in listed.output and "[/c]" in listed.output
    shown = runner.invoke(alerts_cli, ["show", "1", "-c", config])
    assert shown.exit_code == 0, shown.output
    assert all(text in shown.output for text in (SLICE, "[/c]", "[/promotion blocked]", "[/body]"))
    status = runner.invoke(app, ["status", "-c", config])
    assert status.exit_code == 0, status.output
    assert all(text in status.output for text in (SLICE, "chat:[/run]", "[bold red]judge", "[red]inc=100", "[/cand]"))


def test_an_alerts_error_quoting_markup_is_printed_verbatim(tmp_path, sqlite_url):
    config = _config_with_markup_in_the_store(tmp_path, sqlite_url)
    failed = runner.invoke(alerts_cli, ["list", "--status", "[/x]", "-c", config])
    assert failed.exit_code == 2 and "[/x]" in failed.output, failed.output


def test_an_error_quoting_markup_ends_in_one_line_not_a_traceback(tmp_path, sqlite_url):
    """main()'s error printer read the message as markup, failed on it and let the traceback out."""
    config = _config_with_markup_in_the_store(tmp_path, sqlite_url)
    env = {k: v for k, v in os.environ.items() if k != "SHADOWJUDGE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "run", "-c", config, "--route", "[/INST]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "no route named '[/INST]'" in done.stderr, done.stderr


def test_run_says_when_the_route_step_or_calibration_failed(monkeypatch):
    """`run` printed 'decision advance' for a push the gateway refused, and nothing of a failed calibration: both
    were only in `routes history`, the logs and MLflow."""
    import io

    from rich.console import Console

    from shadowjudge import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=300))
    cli._print_cycle({"cycle_id": "c1", "ingest": {"totals": {}}, "routes": {"chat": {
        "decision": "advance", "weights_before": {"inc": 100}, "weights_after": {"inc": 100}, "verdicts": [],
        "step_status": "failed", "reason": "push failed (previous config kept) GatewayUnavailable: [/x] gone",
        "calibration_failed": "LlmJudgeError: judge model 'teacher' failed: APIConnectionError"}}})
    text = out.getvalue()
    assert "route step failed: push failed (previous config kept) GatewayUnavailable: [/x] gone" in text
    assert "calibration failed, the cycle went on without it: LlmJudgeError" in text
