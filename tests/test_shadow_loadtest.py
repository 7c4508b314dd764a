"""The load test against the real replay server on loopback, logging to a real local MLflow store."""

from __future__ import annotations

import asyncio
import functools
import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from shadowjudge.config import ShadowConfig, TargetConfig
from shadowjudge.shadow import loadtest
from shadowjudge.shadow.endpoint import Completion
from shadowjudge.shadow.loadtest import (
    LoadStep,
    LoadTestError,
    LoadTestReport,
    Ramp,
    log_loadtest,
    loadtest_cli,
    prompts_from_jsonl,
    run_loadtest,
)
from shadowjudge.shadow.replay_server import ReplayServer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "shadowjudge" / "demo_data"
SHADOW = ShadowConfig(max_retries=0, timeout_s=2.0, max_tokens=16)
STUB_TARGET = TargetConfig(name="lt", model="m", base_url="http://127.0.0.1:9/v1")
STUB_PROMPTS = [[{"role": "user", "content": f"q{i}"}] for i in range(20)]


class SleepyEndpoint:
    """Answers every request after `service_s` and reports exactly that as its latency, so that a test controls
    the timing; records when each request was sent and answered."""

    def __init__(self, service_s: float):
        self.service_s = service_s
        self.sent: list[float] = []
        self.answered: list[float] = []

    async def complete(self, body: dict[str, Any], *, stream: bool, timeout_s: float) -> Completion:
        self.sent.append(time.perf_counter())
        await asyncio.sleep(self.service_s)
        self.answered.append(time.perf_counter())
        return Completion(text="x", latency_ms=self.service_s * 1000, ttft_ms=None, itl_ms=None, input_tokens=1,
                          output_tokens=1)

    async def aclose(self) -> None:
        pass


class PooledEndpoint(SleepyEndpoint):
    """A SleepyEndpoint behind a pool of as many connections as the load test sized the client for, counting the
    requests that had to wait for one (inside the real client that wait reads as the endpoint's latency)."""

    def __init__(self, service_s: float, connections: int):
        super().__init__(service_s)
        self.pool = asyncio.Semaphore(connections)
        self.connections = connections
        self.queued = 0

    async def complete(self, body: dict[str, Any], *, stream: bool, timeout_s: float) -> Completion:
        self.queued += self.pool.locked()
        async with self.pool:
            return await super().complete(body, stream=stream, timeout_s=timeout_s)


def run_on_stub(endpoint: SleepyEndpoint, **plan: Any) -> LoadTestReport:
    return run_loadtest(STUB_TARGET, STUB_PROMPTS, max_requests=1000, shadow=SHADOW,
                        endpoint_factory=lambda *_: endpoint, **plan)


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
    rows = [{"request": {"messages": [{"role": "user", "content": "a"}]}},
            {"messages": [{"role": "user", "content": "b"}]}]
    plain = tmp_path / "log.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "log.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, tmp_path / "log.jsonl.gz"):
        assert [m[0]["content"] for m in prompts_from_jsonl(path)] == ["a", "b"]
    plain.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"request": {"model": "x"}}) + "\n")
    with pytest.raises(LoadTestError, match="log.jsonl:2: no `messages`"):
        prompts_from_jsonl(plain)


def test_open_loop_latency_from_the_scheduled_arrival_counts_the_wait_for_a_free_slot(monkeypatch):
    """Six arrivals 50 ms apart, one slot, 200 ms per answer: arrival k can only leave at >= k * 200 ms, while its
    schedule says k * 50 ms. The endpoint's latency stays 200 ms; what a user arriving on schedule waits is the
    send lag plus that (the report used to time requests from the actual send only: coordinated omission)."""
    monkeypatch.setattr(loadtest, "MAX_IN_FLIGHT", 1)
    (step,) = run_on_stub(SleepyEndpoint(0.2), rate=20, duration_s=0.3).steps
    assert step.sent == step.ok == 6
    assert step.in_flight_capped == 5  # every arrival after the first found the one slot taken
    assert step.latency_ms["p50"] == step.latency_ms["p99"] == pytest.approx(200)  # the service time, as before
    assert step.send_lag_ms["count"] == 6 and step.send_lag_ms["p99"] > 500  # arrival 4 left >= 600 ms late
    assert step.response_ms["count"] == 6
    for key in ("p50", "p90", "p99"):  # each answer came >= 200 ms after its send, which was send-lag late
        assert step.response_ms[key] >= step.send_lag_ms[key] + 199


def test_a_fixed_rate_gets_a_connection_for_every_request_it_can_have_in_flight(prompts):
    """3.8 req/s against 350 ms answers with a 0.5 s timeout: two requests overlap, but the pool was sized
    int(3.8 * 0.5) = 1 connection, so the second waited for the first inside the client, that wait read as latency
    and TTFT, and requests ended as timeouts with in_flight_capped = 0."""
    profiles = {"models": {"Yi-34B-Chat": {"ttft_ms": 350, "token_ms": 0}}}
    with ReplayServer(DEMO / "recordings.jsonl.gz", profiles) as srv:
        target = TargetConfig(name="lt", model="Yi-34B-Chat", base_url=srv.base_url)
        shadow = ShadowConfig(stream=True, timeout_s=0.5, max_retries=0, max_tokens=8)
        (step,) = run_loadtest(target, prompts, rate=3.8, duration_s=1.1, shadow=shadow).steps
    assert step.errors == {} and step.ok == step.sent == 5
    assert step.in_flight_capped == 0 and step.latency_ms["p99"] < 450
    assert step.max_in_flight == loadtest.open_loop_slots(3.8, 0.5) >= 3


def test_arrivals_beyond_the_connections_wait_in_the_open_not_inside_the_client(monkeypatch):
    """The client has one connection per in-flight slot: an arrival never queues where its wait would be counted
    as the endpoint's latency; when the slots run out (here MAX_IN_FLIGHT = 2 against 4 requests in flight) the wait
    is an in-flight cap hit, in the send lag and in response_ms."""
    endpoints: list[PooledEndpoint] = []

    def pooled(target: TargetConfig, key: str, shadow: ShadowConfig) -> PooledEndpoint:
        endpoints.append(PooledEndpoint(0.09, target.concurrency))
        return endpoints[-1]

    plan = dict(max_requests=1000, shadow=ShadowConfig(max_retries=0, timeout_s=0.1, max_tokens=16),
                endpoint_factory=pooled)
    (step,) = run_loadtest(STUB_TARGET, STUB_PROMPTS, rate=25, duration_s=0.4, **plan).steps
    assert endpoints[0].queued == 0 and step.in_flight_capped == 0 and step.ok == 10
    monkeypatch.setattr(loadtest, "MAX_IN_FLIGHT", 2)
    (step,) = run_loadtest(STUB_TARGET, STUB_PROMPTS, rate=40, duration_s=0.2, **plan).steps
    assert endpoints[1].connections == step.max_in_flight == 2 and endpoints[1].queued == 0
    assert step.in_flight_capped > 0 and step.latency_ms["p99"] == pytest.approx(90)
    assert step.response_ms["p99"] >= step.send_lag_ms["p99"] + 89 and step.send_lag_ms["p99"] > 50


def test_a_closed_loop_has_no_schedule_so_response_time_is_latency():
    report = run_on_stub(SleepyEndpoint(0.02), ramp=Ramp(1, 1, 0.15, 2))
    for step in report.steps:
        assert step.ok == step.sent > 1
        assert step.send_lag_ms == {} and step.in_flight_capped == 0
        assert step.response_ms == step.latency_ms
        assert step.send_rps is not None and step.drain_s >= 0.019


def test_throughput_includes_the_drain_and_send_rps_is_the_arrival_rate():
    """Ten arrivals at 20/s answered in 0.5 s each: the step lasts ~0.95 s, so achieved_rps (successes over the whole
    step) reads ~10.5 req/s; send_rps says the arrivals ran at the rate asked, drain_s how long the tail took."""
    endpoint = SleepyEndpoint(0.5)
    (step,) = run_on_stub(endpoint, rate=20, duration_s=0.5).steps
    assert step.sent == step.ok == 10
    assert step.achieved_rps == pytest.approx(step.ok / step.duration_s, rel=0.01)
    assert step.achieved_rps <= 10 / 0.95 + 0.01  # the drain is in the denominator, whatever the machine's speed
    assert step.send_rps == pytest.approx(9 / (max(endpoint.sent) - min(endpoint.sent)), rel=0.01)
    assert step.send_rps > step.achieved_rps
    assert step.drain_s == pytest.approx(max(endpoint.answered) - max(endpoint.sent), abs=0.005)
    assert step.drain_s >= 0.49


def test_mlflow_gets_the_schedule_and_throughput_metrics_of_an_open_loop_step(monkeypatch, tmp_path):
    monkeypatch.setattr(loadtest, "MAX_IN_FLIGHT", 1)
    report = run_on_stub(SleepyEndpoint(0.1), rate=20, duration_s=0.2)
    (step,) = report.steps
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    metrics = MlflowClient(tracking_uri=uri).get_run(log_loadtest(report, uri, experiment="lt-test")).data.metrics
    expected = {"send_lag_p99_ms": step.send_lag_ms["p99"], "response_p99_ms": step.response_ms["p99"],
                "response_p50_ms": step.response_ms["p50"], "send_rps": step.send_rps, "drain_s": step.drain_s,
                "in_flight_capped": step.in_flight_capped, "latency_p99_ms": step.latency_ms["p99"]}
    assert {k: metrics.get(k) for k in expected} == pytest.approx(expected)
    assert step.in_flight_capped == 3


def test_cli_warns_when_the_client_fell_behind_its_schedule_or_hit_the_in_flight_cap(monkeypatch, tmp_path):
    """The table's latency is the service time; when sends left late the CLI must say where the real wait is."""
    monkeypatch.setattr(loadtest, "MAX_IN_FLIGHT", 1)
    monkeypatch.setattr(loadtest, "run_loadtest",
                        functools.partial(run_loadtest, endpoint_factory=lambda *_: SleepyEndpoint(0.2)))
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = CliRunner().invoke(loadtest_cli, ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--requests",
                                               str(requests), "--rate", "20", "--duration", "0.3"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "send lag p99" in result.output
    assert ("warning: step 0: the client fell behind its schedule (send lag p99 " in result.output
            and "latency from the scheduled arrival is in response_ms" in result.output), result.output
    assert "warning: step 0: 5 arrivals waited for a free slot: all 1 in-flight slots (one connection each) were " \
           "taken" in result.output, result.output


@pytest.mark.parametrize("name, content, message", [
    ("list.jsonl", b"[1, 2]\n", "list.jsonl:1: not a JSON object"),
    ("string.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n"just a string"\n',
     "string.jsonl:2: not a JSON object"),
    ("cut.jsonl.gz", gzip.compress(b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 50)[:-20],
     "cut.jsonl.gz: truncated gzip file"),
    ("latin1.jsonl", '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"),
     "latin1.jsonl: not UTF-8 text"),
], ids=["list", "string", "truncated-gzip", "latin-1"])
def test_cli_names_an_unreadable_request_log_and_exits_2(name, content, message, tmp_path):
    """These used to end in an AttributeError, a bare UnicodeDecodeError or click's 'Aborted' (the EOFError)."""
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(loadtest_cli, ["--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                               "--requests", str(path), "--rate", "1", "--duration", "1"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"error: {tmp_path}/{message}" in result.output and "Traceback" not in result.output


def test_bench_reports_a_ramp_step_without_a_success_instead_of_crashing(monkeypatch, capsys):
    """A step whose every request failed has no latency percentiles (None); the bench used to round(None)."""
    spec = importlib.util.spec_from_file_location("bench_loadtest", ROOT / "bench" / "loadtest_replay_server.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class NoServer:
        base_url = "http://127.0.0.1:9/v1"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> "NoServer":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    steps = [LoadStep(index=0, concurrency=4, target_rps=None, duration_s=1.0, sent=10, ok=10, errors={},
                      achieved_rps=10.0, error_rate=0.0, latency_ms={"p50": 5.123, "p99": 9.876}),
             LoadStep(index=1, concurrency=12, target_rps=None, duration_s=1.0, sent=10, ok=0,
                      errors={"server_error": 10}, achieved_rps=0.0, error_rate=1.0,
                      latency_ms={"p50": None, "p99": None})]
    report = LoadTestReport(model=bench.MODEL, base_url=NoServer.base_url, mode="ramp", steps=steps)
    monkeypatch.setattr(bench, "ReplayServer", NoServer)
    monkeypatch.setattr(bench, "run_loadtest", lambda *args, **kwargs: report)
    monkeypatch.setattr(sys, "argv", ["loadtest_replay_server.py"])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    assert [(s["latency_p50_ms"], s["latency_p99_ms"]) for s in out["steps"]] == [(5.12, 9.88), (None, None)]
    assert out["peak_rps"] == 10.0 and out["knee_concurrency"] == 12


def test_cli_exits_1_when_no_request_succeeded(server, tmp_path):
    """A wrong model or a dead endpoint printed a table of errors and exited 0, as if it had measured something."""
    result = CliRunner().invoke(loadtest_cli, [
        "--base-url", server.base_url, "--model", "no-such-model", "--requests", str(DEMO / "requests.jsonl.gz"),
        "--rate", "5", "--duration", "0.4", "--json"])
    assert result.exit_code == 1, result.output
    assert "error: none of the 2 requests to no-such-model succeeded (errors: not_found 2)" in result.output
    assert json.loads(result.output.splitlines()[0])["steps"][0]["ok"] == 0
