"""Fault injection across a whole cycle, on the real parts: the replay server with fault profiles, SQLite and
PostgreSQL stores, a file gateway with a reload command, an MLflow tracking server behind a loopback proxy.

After each fault, a rerun of the same cycle id completes the cycle: every sampled request has exactly one result,
every answer pair one judgment, no natural key is duplicated, and the gateway holds a valid config that matches
the route's recorded state.

The cycle is driven stage by stage here (`run_cycle`, the order flows/cycle.py uses) so that a fault surfaces
where it happens instead of behind Prefect's task retries; tests/test_reliability_kill.py runs the real flow.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import stop_process_group
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.exc import DBAPIError

from shadowjudge import cycle as stages
from shadowjudge.config import Config, RouteConfig, load_config
from shadowjudge.demo import DEMO_DATA
from shadowjudge.gateways import get_gateway
from shadowjudge.routing.step import load_rollout_state
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.shadow.writer import ResultStoreError
from shadowjudge.store import (
    Alert,
    Judgment,
    QuarantinedRecord,
    RouteWeightChange,
    ShadowResult,
    ShadowRun,
    TrafficSample,
    get_engine,
    session_scope,
    upgrade_database,
)
from shadowjudge.tracking.mlflow_tracking import TrackingError
from cycle_configs import cycle_config, save_config

ROUTE = "chat-default"
FAST = {"seed": 5, "default": {"ttft_ms": 1, "token_ms": 0}}


# --- the rig: config, cycle, invariants (tests/test_reliability_kill.py and test_security_leaks.py use it too) ---

def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp: Path, store_url: str, base_url: str, *, max_samples: int = 30, mlflow_uri: str | None = None,
                 log_path: Path | None = None, **sections: Any) -> Path:
    """The demo's config on this test's store, with the quick lexical judge; `sections` replace top-level keys."""
    data = cycle_config(tmp, store_url, base_url, max_samples=max_samples)
    data["shadow"].update(timeout_s=10, max_retries=1, retry_backoff_s=0.01)
    # Verdicts from quality and errors only: latency on this shared machine would make decisions vary run to run.
    data["routes"][0]["criteria"].update(bootstrap_resamples=200, weights={"quality": 60, "error_rate": 40})
    if mlflow_uri is None:
        data["mlflow"]["enabled"] = False
    else:
        data["mlflow"]["tracking_uri"] = mlflow_uri
    if log_path is not None:
        data["sources"][0]["path"] = str(log_path)
    data.update(sections)
    return save_config(tmp, data)


def run_cycle(config_path: Path, cycle_id: str) -> dict[str, dict[str, Any]]:
    """Every stage of one cycle in the order flows/cycle.py runs them, without Prefect around them."""
    config = load_config(config_path)
    upgrade_database(config.store.url)
    engine = get_engine(config.store.url)
    ingest_report = stages.ingest(engine, config)
    outcomes = {}
    for route in config.routes:
        handle = stages.open_run(engine, config, route, cycle_id)
        shadow_report = stages.shadow(engine, config, route, handle)
        score_report = stages.score(engine, config, route, handle)
        analysis = stages.analyse(engine, config, route, handle, score_report["evaluator"])
        reports = {"ingest": ingest_report, "shadow": shadow_report, "score": score_report}
        mlflow_run_id = stages.track(engine, config, route, handle, analysis, reports)
        alerts = stages.alert(engine, config, route, handle, analysis, mlflow_run_id, str(config_path))
        step = stages.update_routes(engine, config, route, handle, analysis, alerts, mlflow_run_id)
        outcomes[route.name] = {**stages.close_cycle(engine, config, route, handle, analysis, step, alerts,
                                                     mlflow_run_id), "ingest": ingest_report, "shadow": shadow_report}
    return outcomes


NATURAL_KEYS = {
    TrafficSample: ("request_id",),
    QuarantinedRecord: ("source", "position"),
    ShadowRun: ("run_key",),
    ShadowResult: ("run_id", "sample_id", "target", "attempt"),
    Judgment: ("run_id", "sample_id", "target", "evaluator"),
    RouteWeightChange: ("route", "revision"),
}


def duplicated_keys(engine) -> dict[str, int]:
    """Natural keys held by more than one row, per table (the schema forbids most; this checks it holds)."""
    out: dict[str, int] = {}
    with session_scope(engine) as s:
        for model, key in NATURAL_KEYS.items():
            cols = [getattr(model, k) for k in key]
            dupes = s.execute(select(*cols).group_by(*cols).having(func.count() > 1)).all()
            if dupes:
                out[model.__tablename__] = len(dupes)
        unresolved = s.execute(select(Alert.fingerprint).where(Alert.status != "resolved")
                               .group_by(Alert.fingerprint).having(func.count() > 1)).all()
        if unresolved:
            out["alerts (unresolved per cause)"] = len(unresolved)
        applied = s.execute(select(RouteWeightChange.run_id).where(RouteWeightChange.status == "applied",
                                                                   RouteWeightChange.run_id.is_not(None))
                            .group_by(RouteWeightChange.run_id).having(func.count() > 1)).all()
        if applied:
            out["route_weight_history (applied per run)"] = len(applied)
    return out


def assert_cycle_complete(engine, config: Config, route: RouteConfig, cycle_id: str) -> None:
    """The cycle's run is finished, each sampled request has one result per target, each usable pair one judgment,
    nothing is duplicated, no push is left pending, and the gateway holds the route's recorded weights."""
    targets = [t.name for t in route.targets]
    candidates = [c.name for c in route.candidates]
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == stages.cycle_run_key(route.name, cycle_id)))
        assert run is not None and run.status == "finished" and run.decision, f"run of {cycle_id} not finished"
        results = s.execute(select(ShadowResult.sample_id, ShadowResult.target, ShadowResult.output_text)
                            .where(ShadowResult.run_id == run.id)).all()
        judged = Counter(s.execute(select(Judgment.sample_id, Judgment.target).where(Judgment.run_id == run.id)).all())
        answered = {sid for sid, has in s.execute(select(TrafficSample.id, TrafficSample.response_text.is_not(None))
                                                   .where(TrafficSample.id.in_(run.sample_ids))).all() if has}
        pending = s.scalar(select(func.count()).select_from(RouteWeightChange)
                           .where(RouteWeightChange.route == route.name, RouteWeightChange.status == "pending"))
        sample_ids = list(run.sample_ids)
    per_request = Counter((r.sample_id, r.target) for r in results)
    assert set(per_request) == {(sid, t) for sid in sample_ids for t in targets}, "a sampled request has no result"
    assert set(per_request.values()) == {1}
    usable = {(r.sample_id, r.target) for r in results
              if r.target in candidates and r.output_text is not None and r.sample_id in answered}
    assert set(judged) == usable and set(judged.values()) <= {1}
    assert duplicated_keys(engine) == {}
    assert pending == 0, "a push was left pending"
    held = get_gateway(route.gateway, route).read_current().weights
    state = load_rollout_state(engine, route).weights
    assert held == state and sum(held.values()) == 100, (held, state)


def rows_and_state(engine, route: RouteConfig) -> tuple[dict[str, int], dict[str, int]]:
    return stages.count_rows(engine), load_rollout_state(engine, route).weights


# --- fixtures ---

@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from the test's folder: a local MLflow store puts its artifacts under the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


# --- providers: timeouts, 429/5xx, garbage streams, an endpoint that is down ---

FAULTY = {"seed": 11, "default": {"ttft_ms": 1, "token_ms": 0}, "models": {
    "Yi-34B-Chat": {"ttft_ms": 400, "ttft_jitter_ms": 400, "error_rate": 0.3,
                    "error_statuses": {429: 1, 500: 1, 503: 1}, "retry_after_s": 0},
    "llama-2-7b-chat-hf": {"ttft_ms": 1, "stall_rate": 0.2, "stall_after_tokens": 2, "stall_s": 30,
                           "malformed_rate": 0.2},
}}


def test_provider_faults_are_recorded_per_request_and_the_cycle_completes(in_tmp, store_url):
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAULTY) as server:
        path = write_config(in_tmp, store_url, server.base_url, max_samples=30)
        data = yaml.safe_load(path.read_text())
        data["shadow"]["timeout_s"] = 0.6  # Yi's first token comes after 0-800 ms: some attempts time out
        route = data["routes"][0]
        route["candidates"].append({"name": "offline", "model": "offline-model", "base_url":
                                    f"http://127.0.0.1:{closed_port()}/v1", "concurrency": 4})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        outcome = run_cycle(path, "faults")[ROUTE]
        served = server.stats()["models"]

    config = load_config(path)
    engine = get_engine(store_url)
    assert_cycle_complete(engine, config, config.route(ROUTE), "faults")
    errors = {t: r["errors"] for t, r in outcome["shadow"]["targets"].items()}
    # Refused connections are connection errors (the engine's HTTP/1.1 transport says so at once).
    assert errors["offline"] == {"connection_error": 30}
    assert errors["claude-instant"] == {}
    assert set(errors["llama-2-7b"]) <= {"stalled_stream", "malformed_response"} and errors["llama-2-7b"]
    assert set(errors["yi-34b"]) <= {"rate_limited", "server_error", "timeout"}
    # The faults were really served, and retried where a retry can help.
    assert served["llama-2-7b-chat-hf"]["stalled"] and served["llama-2-7b-chat-hf"]["malformed"]
    assert set(served["Yi-34B-Chat"]["errors"]) == {"429", "500", "503"}
    assert outcome["shadow"]["targets"]["yi-34b"]["retries"] > 0
    # Error examples name the fault but carry no request text.
    examples = json.dumps(outcome["shadow"]["error_examples"])
    assert "offline" in examples and "[EMAIL]" not in examples
    weights = load_rollout_state(engine, config.route(ROUTE)).weights
    assert weights.get("offline", 0) == 0  # an endpoint that never answered gets no traffic

    before = rows_and_state(engine, config.route(ROUTE))
    again = run_cycle(path, "faults")[ROUTE]  # the providers are gone now: nothing is replayed again
    assert again["shadow"]["replayed"] == 0 and rows_and_state(engine, config.route(ROUTE)) == before


# --- the database connection drops mid-write, at every stage in turn ---

class ConnectionDrop:
    """Drops the store connection when a statement starting with `prefix` runs for the `nth` time.

    PostgreSQL: another connection terminates the writer's backend (pg_terminate_backend). SQLite has no server to
    lose: the writer's driver connection is closed under it. Either way the statement fails in the driver, the
    open transaction is lost, and the pool has to notice the dead connection.
    """

    def __init__(self, url: str, prefix: str, nth: int = 1) -> None:
        self.url, self.prefix, self.nth = url, prefix, nth
        self.seen = 0
        self.fired = False
        self.engine = get_engine(url)

    def __enter__(self) -> ConnectionDrop:
        event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ARG002
        if self.fired or not statement.lstrip().startswith(self.prefix):
            return
        self.seen += 1
        if self.seen < self.nth:
            return
        self.fired = True
        if self.engine.dialect.name == "postgresql":
            admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
            with admin.connect() as other:
                assert other.execute(text("SELECT pg_terminate_backend(:pid)"),
                                     {"pid": cursor.connection.get_backend_pid()}).scalar()
            admin.dispose()
        else:
            cursor.connection.close()


DROPS = [  # (stage, statement prefix, nth statement): each cycle attempt loses its connection one stage later
    ("ingest", "INSERT INTO traffic_samples", 3),
    ("shadow", "INSERT INTO shadow_results", 2),
    ("score", "INSERT INTO judgments", 2),
    ("update-routes, after the push", "UPDATE route_weight_history", 1),
    ("close", "UPDATE shadow_runs SET status", 1),
]


@pytest.mark.slow
def test_a_connection_dropped_mid_write_at_each_stage_loses_and_duplicates_nothing(in_tmp, store_url, replay_server):
    log = in_tmp / "requests.jsonl"
    with gzip.open(DEMO_DATA / "requests.jsonl.gz", "rt") as src:
        log.write_text("".join(src.readlines()[:200]))
    path = write_config(in_tmp, store_url, replay_server.base_url, max_samples=40, log_path=log)
    data = yaml.safe_load(path.read_text())
    data["sources"][0]["batch_size"] = 40
    data["judge"]["batch_size"] = 8
    # A candidate must pass, so that a push (whose record the drop loses) happens: a loose quality margin.
    data["routes"][0]["criteria"]["min_quality_ratio"] = 0.5
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(path)
    route = config.route(ROUTE)
    engine = get_engine(store_url)

    for stage, prefix, nth in DROPS:
        with ConnectionDrop(store_url, prefix, nth) as drop, pytest.raises((DBAPIError, ResultStoreError)) as err:
            outcome = run_cycle(path, "c1")
            pytest.fail(f"{stage}: the cycle completed (fault fired: {drop.fired}): {outcome}")
        assert drop.fired, f"{stage}: the fault was never injected"
        # The driver's error, or the shadow writer's own error naming it; a dead connection is never reused.
        assert isinstance(err.value, ResultStoreError) or err.value.connection_invalidated, f"{stage}: {err.value}"
        assert duplicated_keys(engine) == {}, stage
        if stage == "ingest":  # each batch commits with its cursor: what is stored is a whole number of batches
            stored = stages.count_rows(engine)["traffic_samples"]
            assert stored == 80 and stages.count_rows(engine)["shadow_runs"] == 0
        if stage == "update-routes, after the push":  # the push went out; its record did not
            assert get_gateway(route.gateway, route).read_current().weights != load_rollout_state(engine, route).weights

    run_cycle(path, "c1")
    assert_cycle_complete(engine, config, route, "c1")
    rows = stages.count_rows(engine)
    assert rows["traffic_samples"] == 200 and rows["shadow_runs"] == 1
    assert rows["shadow_results"] == 40 * 3 and rows["judgments"] == 40 * 2
    with session_scope(engine) as s:  # the ladder moved once, not once per attempt
        applied = s.scalars(select(RouteWeightChange).where(RouteWeightChange.status == "applied")).all()
        assert len(applied) == 1 and applied[0].after == load_rollout_state(engine, route).weights

    before = rows_and_state(engine, route)
    run_cycle(path, "c1")
    assert rows_and_state(engine, route) == before


# --- the gateway refuses a push ---

@pytest.mark.slow
def test_a_push_the_gateway_rejects_keeps_its_config_and_a_rerun_applies_it(in_tmp, store_url, replay_server):
    marker = in_tmp / "gateway-rejects"
    path = write_config(in_tmp, store_url, replay_server.base_url, max_samples=40)
    data = yaml.safe_load(path.read_text())
    data["routes"][0]["gateway"]["reload_command"] = [
        "sh", "-c", f"if [ -e {marker} ]; then echo 'control plane: config refused' >&2; exit 3; fi"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(path)
    route = config.route(ROUTE)
    engine = get_engine(store_url)
    gateway_file = Path(route.gateway.path)

    first = run_cycle(path, "c1")[ROUTE]
    assert first["step_status"] == "applied"
    in_force = gateway_file.read_bytes()

    marker.touch()
    refused = run_cycle(path, "c2")[ROUTE]
    assert refused["step_status"] == "failed" and "control plane: config refused" in refused["reason"] + str(
        route_history_errors(engine))
    assert gateway_file.read_bytes() == in_force  # the previous config stays in force, byte for byte
    assert refused["weights_after"] == first["weights_after"]
    assert_cycle_complete(engine, config, route, "c2")
    still = run_cycle(path, "c2")[ROUTE]  # rerun while the gateway still refuses: refused again, nothing else
    assert still["step_status"] == "failed" and gateway_file.read_bytes() == in_force

    marker.unlink()
    retried = run_cycle(path, "c2")[ROUTE]  # the gateway accepts again: rerunning the cycle applies its step
    assert retried["step_status"] == "applied" and retried["weights_after"] != first["weights_after"]
    assert_cycle_complete(engine, config, route, "c2")
    before = rows_and_state(engine, route)
    assert run_cycle(path, "c2")[ROUTE]["weights_after"] == retried["weights_after"]
    assert rows_and_state(engine, route) == before


def route_history_errors(engine) -> list[str]:
    with session_scope(engine) as s:
        return [e for e in s.scalars(select(RouteWeightChange.error)) if e]


# --- bad log records among good ones ---

def _garbage_lines(n: int) -> list[bytes]:
    record = {"id": f"bad-{n}", "timestamp": "2026-11-22T00:00:00Z", "route": ROUTE,
              "request": {"model": ROUTE, "messages": [{"role": "user", "content": "call me at +1 415 555 0199"}]},
              "response": "ok"}
    return [
        b"this is not json, card 4111 1111 1111 1111\n",
        b"[1, 2, 3]\n",
        b"\xff\xfe\x00 binary noise\n",
        json.dumps({**record, "request": {"model": ROUTE, "messages": "not a list"}}).encode() + b"\n",
        json.dumps({**record, "id": f"late-{n}", "timestamp": "the day after tomorrow"}).encode() + b"\n",
        json.dumps({**record, "id": f"huge-{n}", "request": {"model": ROUTE, "messages": [
            {"role": "user", "content": "x" * 60_000}]}}).encode() + b"\n",
        b"{\"id\": \"cut-" + str(n).encode() + b"\", \"request\": {\"model\"\n",
    ]


@pytest.mark.slow
def test_bad_log_records_are_quarantined_without_their_text_and_the_cycles_go_on(in_tmp, store_url, replay_server):
    with gzip.open(DEMO_DATA / "requests.jsonl.gz", "rb") as src:
        good = src.readlines()
    log = in_tmp / "requests.jsonl"
    log.write_bytes(b"".join(good[:60]) + b"".join(_garbage_lines(1)) + good[0])  # the last line is a duplicate
    path = write_config(in_tmp, store_url, replay_server.base_url, max_samples=50, log_path=log)
    data = yaml.safe_load(path.read_text())
    data["sources"][0]["max_record_bytes"] = 20_000
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(path)
    engine = get_engine(store_url)

    first = run_cycle(path, "c1")[ROUTE]
    totals = first["ingest"]["totals"]
    assert totals["stored"] == 60 and totals["duplicates"] == 1 and totals["quarantined"] == 7
    assert totals["read"] == totals["stored"] + totals["duplicates"] + totals["quarantined"] + totals["filtered"]
    assert_cycle_complete(engine, config, config.route(ROUTE), "c1")
    with session_scope(engine) as s:
        reasons = " ".join(s.scalars(select(QuarantinedRecord.reason)))
    for raw in ("4111", "555 0199", "binary noise", "x" * 100, "not a list"):
        assert raw not in reasons

    with log.open("ab") as fh:  # new traffic arrives, with more garbage
        fh.write(b"".join(good[60:100]) + b"".join(_garbage_lines(2)))
    second = run_cycle(path, "c2")[ROUTE]
    assert second["ingest"]["totals"]["stored"] == 40 and second["ingest"]["totals"]["quarantined"] == 7
    assert_cycle_complete(engine, config, config.route(ROUTE), "c2")
    with session_scope(engine) as s:
        runs = s.scalars(select(ShadowRun).order_by(ShadowRun.id)).all()
        assert not set(runs[0].sample_ids) & set(runs[1].sample_ids)
        assert len(runs[0].sample_ids) + len(runs[1].sample_ids) == 100  # every good record is replayed once
    before = stages.count_rows(engine)
    run_cycle(path, "c2")
    assert stages.count_rows(engine) == before


# --- MLflow unreachable, then gone mid-log, then back ---

class MlflowProxy:
    """A loopback HTTP forwarder in front of a real MLflow server: the tracking URI the cycle uses.

    `start()` listens (on the same port each time) and forwards; `cut_after(n)` forwards n more requests and then
    drops every connection unanswered, as a server that goes away mid-log; `stop()` closes the port."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = closed_port()
        self.budget: int | None = None
        self.forwarded = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, n: int) -> None:
        self.budget = n

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                if proxy.budget is not None:
                    if proxy.budget <= 0:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    proxy.budget -= 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = httpx.request(self.command, proxy.upstream + self.path, headers=headers, content=body,
                                         timeout=60)
                proxy.forwarded += 1
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (SQLite backend, artifacts served by the server), stopped after the test."""
    port = closed_port()
    backend = tmp_path / "mlflow-server.db"
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{backend}", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1", "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (tmp_path / "mlflow-server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.slow
def test_mlflow_unreachable_fails_clearly_and_a_rerun_completes_the_log_without_duplicate_runs(
        in_tmp, sqlite_url, replay_server, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    proxy = MlflowProxy(mlflow_server)
    path = write_config(in_tmp, sqlite_url, replay_server.base_url, max_samples=30, mlflow_uri=proxy.url)
    config = load_config(path)
    route = config.route(ROUTE)
    engine = get_engine(sqlite_url)

    # 1. Nothing listens at the tracking URI: the cycle stops at its MLflow stage, quickly and saying why.
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        run_cycle(path, "c1")
    assert time.monotonic() - started < 60
    assert proxy.url in str(err.value) and "unreachable" in str(err.value)
    rows = stages.count_rows(engine)
    assert rows["shadow_results"] == 90 and rows["judgments"] == 60  # the stages before it kept their work
    with session_scope(engine) as s:
        assert s.scalar(select(ShadowRun.status)) == "running"

    # 2. MLflow answers, then goes away in the middle of the log.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy.cut_after(8)
    proxy.start()
    try:
        with pytest.raises(TrackingError):
            run_cycle(path, "c1")
        client = MlflowClient(mlflow_server)
        experiment = client.get_experiment_by_name(f"shadowjudge/{ROUTE}")
        assert experiment is not None
        assert len(client.search_runs([experiment.experiment_id])) < 3  # a partial log

        # 3. MLflow is back: the rerun completes the same runs.
        proxy.cut_after(10**9)
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        outcome = run_cycle(path, "c1")[ROUTE]
    finally:
        proxy.stop()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # one cycle run and one nested run per candidate, whatever the attempts
    assert sorted(r.data.tags["shadowjudge.target"] for r in runs) == ["__cycle__", "llama-2-7b", "yi-34b"]
    parent = next(r for r in runs if r.data.tags["shadowjudge.target"] == "__cycle__")
    assert outcome["mlflow_run_id"] == parent.info.run_id
    assert parent.data.params["sample_size"] == "30" and parent.data.tags["shadowjudge.decision"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"samples.json", "analysis.json", "plots"}
    assert_cycle_complete(engine, config, route, "c1")
