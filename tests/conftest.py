"""Shared fixtures: migrated stores on SQLite and (when SHADOWJUDGE_TEST_PG_URL is set) PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

from shadowjudge.store import get_engine, upgrade_database  # noqa: E402
from pg_databases import throwaway_pg_database  # noqa: E402

PG_URL = os.environ.get("SHADOWJUDGE_TEST_PG_URL")



def stop_process_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM a server started with start_new_session=True (and its children), SIGKILL if it lingers."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh, throwaway database on the PostgreSQL server, dropped after the session."""
    if not PG_URL:
        pytest.skip("SHADOWJUDGE_TEST_PG_URL is not set")
    with throwaway_pg_database(PG_URL, "sj_test_") as url:
        yield url


def _fresh_pg_schema(server_url: str) -> str:
    """A new schema-less database per test so tests never see each other's rows."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"sj_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store_url(request, tmp_path) -> Iterator[str]:
    """A migrated, empty store; every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
    else:
        url = _fresh_pg_schema(request.getfixturevalue("pg_server_url"))
    upgrade_database(url)
    yield url
    engine = get_engine(url)
    engine.dispose()
    if request.param == "postgresql":
        admin = create_engine(request.getfixturevalue("pg_server_url"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/store.db"
    upgrade_database(url)
    return url


@pytest.fixture
def engine(store_url):
    return get_engine(store_url)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (a temporary API and database) for the whole session: it costs 10-15 s to start.

    Prefect sets its logging up on the first flow run and its console handlers keep the stderr they find then: in
    a test using capfd, a stream pytest closes when that test ends, after which every Prefect log line failed and,
    with log_prints on, its error report recursed (test_security_leaks.py run alone failed its second case). So it
    is set up here and its handlers pointed at the process's stderr, which fd-level capture (and capfd) still see."""
    import logging
    import sys

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler
    from prefect.testing.utilities import prefect_test_harness

    ensure_logging_setup()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]
    for handler in {h for logger in loggers for h in getattr(logger, "handlers", ())}:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setStream(sys.__stderr__)
            handler.console.file = sys.__stderr__
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Prefect server on loopback with its own PREFECT_HOME (analytics off, scheduler service off: tests
    schedule runs at explicit times). Yields the environment a client, worker or CLI subprocess needs."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    log = open(home / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield env
    finally:
        stop_process_group(server)
        log.close()


@pytest.fixture
def prefect_client(prefect_server):
    """A sync client of the real Prefect server (not of the harness, which may also be running)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture
def wait_final():
    """wait(client, flow_run_id, timeout_s) polls a flow run run by another process until its state is final."""
    import time

    def wait(client, flow_run_id, timeout_s: float = 300):
        deadline = time.monotonic() + timeout_s
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name if run.state else None}"
            time.sleep(1)

    return wait


@pytest.fixture
def background(tmp_path):
    """start(name, command, env) runs a process in its own group with its output in tmp_path/<name>.log (returned);
    every process started is stopped (TERM, then KILL) when the test ends."""
    import signal
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    started = []

    def start(name: str, command: list[str], env: dict[str, str]):
        log = open(tmp_path / f"{name}.log", "wb")
        started.append((subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True), log))
        return tmp_path / f"{name}.log"

    yield start
    for process, _ in started:
        os.killpg(process.pid, signal.SIGTERM)  # all at once, then wait: workers stop while the server does
    for process, log in started:
        stop_process_group(process, 20)
        log.close()
