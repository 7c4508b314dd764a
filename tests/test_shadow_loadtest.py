"""The load test against the real replay server on loopback, logging to a real local MLflow store."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from shadowjudge.config import ShadowConfig, TargetConfig
from shadowjudge.shadow.loadtest import (
    LoadTestError,
    Ramp,
    log_loadtest,
    loadtest_cli,
    prompts_from_jsonl,
    run_loadtest,
)
from shadowjudge.shadow.replay_server import ReplayServer

DEMO = Path(__file__).resolve().parents[1] / "shadowjudge" / "demo_data"
SHADOW = ShadowConfig(max_retries=0, timeout_s=2.0, max_tokens=16)


@pytest.fixture(scope="module")
def prompts():
    return prompts_from_jsonl(DEMO / "requests.jsonl.gz", limit=50)


@pytest.fixture(scope="module")
def server():
    profiles = {"models": {"Yi-34B-Chat": {"ttft_ms": 5, "error_rate": 0.2, "error_statuses": {500: 1, 429: 1}}}}
    with ReplayServer(DEMO / "recordings.jsonl.gz", profiles) as srv:
        yield srv


def test_a_concurrency_ramp_reports_every_step_and_accounts_for_every_request(server, prompts):
    target = TargetConfig(name="lt", model="Yi-34B-Chat", base_url=server.base_url)
    before = server.stats()["models"].get("Yi-34B-Chat", {}).get("requests", 0)
    report = run_loadtest(target, prompts, ramp=Ramp(1, 2, 0.3, 5), max_requests=2000, shadow=SHADOW)
    after = server.stats()["models"]["Yi-34B-Chat"]["requests"]
    assert [s.concurrency for s in report.steps] == [1, 3, 5]
    for step in report.steps:
        assert step.sent > 0 and step.ok + sum(step.errors.values()) == step.sent
        assert set(step.errors) <= {"server_error", "rate_limited"}
        assert step.error_rate == pytest.approx((step.sent - step.ok) / step.sent)
        assert step.latency_ms["count"] == step.ok and step.ttft_ms["p50"] >= 5
    total = sum(s.sent for s in report.steps)
    assert after - before == total  # nothing sent that was not counted, nothing counted that was not sent
    errors = sum(sum(s.errors.values()) for s in report.steps)
    assert 0.05 < errors / total < 0.4  # about the injected 20%


def test_a_fixed_rate_is_bounded_by_the_request_cap(server, prompts):
    target = TargetConfig(name="lt", model="claude-instant-1.2", base_url=server.base_url)
    report = run_loadtest(target, prompts, rate=200, duration_s=5.0, max_requests=40, shadow=SHADOW)
    (step,) = report.steps
    assert step.sent == 40 and report.capped and step.target_rps == 200
    assert step.ok == 40 and step.errors == {}


def test_a_plan_that_ends_exactly_at_the_cap_was_not_capped(server, prompts):
    """10 requests at 10/s for 1 s under max_requests=10: the plan ended, nothing was held back (the report used
    to say 'stopped early')."""
    target = TargetConfig(name="lt", model="Yi-34B-Chat", base_url=server.base_url)
    report = run_loadtest(target, prompts, rate=10, duration_s=1.0, max_requests=10, shadow=SHADOW)
    assert report.steps[0].sent == 10 and not report.capped


def test_mlflow_gets_per_step_metrics_the_plot_and_the_report(server, prompts, tmp_path):
    target = TargetConfig(name="lt", model="claude-instant-1.2", base_url=server.base_url)
    # A cap well above what three 0.2 s steps can send, so that a fast client still reaches every step.
    report = run_loadtest(target, prompts, ramp=Ramp(1, 1, 0.2, 3), max_requests=5000, shadow=SHADOW)
    assert not report.capped
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_loadtest(report, uri, experiment="lt-test")
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "achieved_rps")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([s.achieved_rps for s in report.steps])
    assert {a.path for a in client.list_artifacts(run_id)} == {"loadtest.png", "loadtest.json"}
    png = Path(client.download_artifacts(run_id, "loadtest.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_a_json_report(server, tmp_path):
    result = CliRunner().invoke(loadtest_cli, [
        "--base-url", server.base_url, "--model", "claude-instant-1.2", "--requests", str(DEMO / "requests.jsonl.gz"),
        "--ramp", "1:1:0.2:2", "--max-tokens", "8", "--json", "--plot", str(tmp_path / "lt.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["concurrency"] for s in report["steps"]] == [1, 2]
    assert all(s["ok"] == s["sent"] > 0 for s in report["steps"])
    assert (tmp_path / "lt.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--ramp", "1:x:1:4"], "--ramp must be start:step:hold_s:max"),
    (["--ramp", "4:1:1:2"], "max >= start"),
    ([], "either a target rate or a concurrency ramp"),
    (["--rate", "5", "--ramp", "1:1:1:2"], "either a target rate or a concurrency ramp"),
])
def test_cli_rejects_bad_plans_without_a_traceback(args, message, tmp_path):
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = CliRunner().invoke(loadtest_cli, ["--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                               "--requests", str(requests), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_request_logs_are_read_plain_or_gzipped_and_bad_lines_are_named(tmp_path):
    rows = [{"request": {"messages": [{"role": "user", "content": "a"}]}}, {"messages": [{"role": "user", "content": "b"}]}]
    plain = tmp_path / "log.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "log.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, tmp_path / "log.jsonl.gz"):
        assert [m[0]["content"] for m in prompts_from_jsonl(path)] == ["a", "b"]
    plain.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"request": {"model": "x"}}) + "\n")
    with pytest.raises(LoadTestError, match="log.jsonl:2: no `messages`"):
        prompts_from_jsonl(plain)
