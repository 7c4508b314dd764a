"""An HTTP tracking URI where nothing answers: commands fail at once with one clear line, before any work.

Two dead servers on loopback: a port nobody listens on (connection refused) and a socket that accepts connections
and never answers (a hung server or a black-holing proxy). MLflow's client would retry either for minutes
(7 retries with backoff, 120 s per attempt); the commands instead check the server first and exit 1 with a
message naming the URI (credentials redacted) and what to do, before any training, shadow call or load test.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import stop_process_group

from shadowjudge.demo import demo_config
from shadowjudge.errors import ShadowJudgeError
from shadowjudge.tracking import TrackingError, TrackingUnreachable, check_config_tracking, check_tracking_reachable

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "shadowjudge" / "demo_data" / "alpacaeval-mini"
SECRET = "tracking-secret-7f3a"
# Only a guard against a hang: the old code took minutes (refused) to an hour (silent) per command.
COMMAND_GUARD_S = 150


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SilentServer:
    """Accepts every connection on loopback and never sends a byte (until stopped)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.connections = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                outer.stopping.wait(600)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class CountingProvider:
    """Stands in for the model providers: counts the connections it gets (there must be none) and closes them."""

    def __init__(self) -> None:
        self.connections = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AnsweringServer:
    """Answers every GET with a fixed status and body, recording the paths asked for."""

    def __init__(self, status: int, body: bytes = b"OK") -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def provider() -> Iterator[CountingProvider]:
    server = CountingProvider()
    yield server
    server.stop()


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://sj-user:{SECRET}@", 1)


# --- the commands, as a user runs them -----------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: still running after COMMAND_GUARD_S
    stdout: str
    stderr: str


def _run(args: list[str]) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k not in ("SHADOWJUDGE_DEBUG", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "400"
    proc = subprocess.Popen([sys.executable, "-m", "shadowjudge.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=COMMAND_GUARD_S)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)  # with whatever it started (a cycle starts a Prefect server)
        stdout, stderr = proc.communicate()
        return Outcome(None, stdout, stderr)
    return Outcome(proc.returncode, stdout, stderr)


def _cycle_config(tmp: Path, provider: CountingProvider, tracking_uri: str, judge: dict, enabled: bool) -> str:
    data = demo_config(tmp, provider.base_url)
    data["judge"] = judge
    data["mlflow"] = {"tracking_uri": tracking_uri, "experiment_prefix": "shadowjudge", "enabled": enabled}
    path = tmp / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _commands(tmp: Path, dead: str, provider: CountingProvider) -> dict[str, list[str]]:
    """name -> arguments; every command's tracking URI is `dead`."""
    (tmp / "run-logs").mkdir()
    (tmp / "run-registry").mkdir()
    requests = tmp / "requests.jsonl"
    requests.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return {
        # logs the cycle to MLflow (judge: lexical, no registry)
        "run, logging to MLflow": ["run", "-c", _cycle_config(tmp / "run-logs", provider, with_credentials(dead),
                                                              {"evaluator": "lexical"}, True)],
        # MLflow logging off, but the judge comes from the registry at the tracking URI
        "run, judge from the registry": ["run", "-c", _cycle_config(
            tmp / "run-registry", provider, dead, {"evaluator": "small-judge"}, False)],
        "judge train": ["judge", "train", "--quick", "--data", str(MINI), "--tracking-uri", dead, "--cache-dir",
                        str(tmp / "cache"), "--no-progress"],
        "judge evaluate": ["judge", "evaluate", "--data", str(MINI), "--tracking-uri", with_credentials(dead),
                           "--no-progress"],
        "loadtest": ["loadtest", "--base-url", provider.base_url, "--model", "m", "--requests", str(requests),
                     "--rate", "2", "--duration", "1", "--tracking-uri", dead],
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, silent, provider) -> dict[tuple[str, str], tuple[str, Path, Outcome]]:
    """Every command against both dead servers, side by side (each costs seconds of interpreter start-up)."""
    runs = {}
    for kind, dead in (("refused", f"http://127.0.0.1:{closed_port()}"), ("silent", silent.url)):
        tmp = tmp_path_factory.mktemp(kind)
        for name, args in _commands(tmp, dead, provider).items():
            runs[(kind, name)] = (dead, tmp, args)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(runs, pool.map(_run, [args for _, _, args in runs.values()])))
    return {key: (dead, tmp, results[key]) for key, (dead, tmp, _) in runs.items()}


WITH_CREDENTIALS = {"run, logging to MLflow", "judge evaluate"}
COMMANDS = ["run, logging to MLflow", "run, judge from the registry", "judge train", "judge evaluate", "loadtest"]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_command_fails_at_once_with_one_clear_line(outcomes, provider, kind, name):
    dead, tmp, out = outcomes[(kind, name)]
    assert out.returncode is not None, f"still running after {COMMAND_GUARD_S} s: {out.stderr[-2000:]}"
    assert out.returncode == 1, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    message = " ".join(out.stderr.split())  # the console may wrap long lines
    shown = dead.replace("http://", "http://***@") if name in WITH_CREDENTIALS else dead
    assert f"MLflow tracking server at {shown} is unreachable" in message, out.stderr
    assert "point the tracking URI" in message, out.stderr  # and says what to do
    assert SECRET not in out.stderr + out.stdout
    # Nothing was done before the failure: no provider was called, no store, no embedding computed.
    assert provider.connections == 0
    if name.startswith("run"):
        assert not any((tmp / sub / "shadowjudge.db").exists() for sub in ("run-logs", "run-registry"))
    if name == "judge train":
        assert not any((tmp / "cache").rglob("*.*")), "training started: embeddings were cached"


# --- the check itself ---------------------------------------------------------------------------------------

def test_refused_and_silent_servers_are_unreachable_with_a_redacted_uri(silent):
    refused = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingUnreachable) as err:
        check_tracking_reachable(with_credentials(refused))
    assert f"MLflow tracking server at {refused.replace('http://', 'http://***@')} is unreachable" in str(err.value)
    assert "connection refused" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(TrackingUnreachable) as err:
        check_tracking_reachable(silent.url + "/", timeout_s=0.5)
    assert f"{silent.url}/ is unreachable: no answer to GET /health within 0.5 s" in str(err.value)
    # the project's error: the CLI prints it as one line and exits 1; a Prefect stage retries it (not bad input)
    assert isinstance(err.value, TrackingError) and isinstance(err.value, ShadowJudgeError)
    assert err.value.exit_code == 1


def test_the_track_stage_check_catches_a_server_that_accepts_but_never_answers(silent):
    from shadowjudge.cycle import check_tracking_server

    with pytest.raises(TrackingError) as err:
        check_tracking_server(silent.url, timeout_s=0.5)
    assert "unreachable" in str(err.value)


def test_a_healthy_server_passes_and_is_asked_once_per_process_when_told_so():
    server = AnsweringServer(200)
    try:
        uri = server.url + "/mlflow/"
        check_tracking_reachable(uri)
        assert server.paths == ["/mlflow/health"]  # beside the API, as `mlflow server --static-prefix` serves it
        check_tracking_reachable(uri, once=True)
        assert len(server.paths) == 1
        check_tracking_reachable(uri)
        assert len(server.paths) == 2
    finally:
        server.stop()


@pytest.mark.parametrize("status, fails", [(503, True), (500, True), (404, False), (401, False)])
def test_a_server_error_fails_but_an_answer_mlflow_reports_itself_passes(status, fails):
    server = AnsweringServer(status, b"<html>nope</html>")
    try:
        if fails:
            with pytest.raises(TrackingUnreachable, match=f"answered HTTP {status}"):
                check_tracking_reachable(server.url)
        else:  # a proxy or a managed service without /health: MLflow's own calls fail at once on these
            check_tracking_reachable(server.url)
    finally:
        server.stop()


@pytest.mark.parametrize("uri", ["sqlite:////nonexistent/dir/mlflow.db", "file:///nonexistent/mlruns",
                                 "postgresql://u:p@127.0.0.1:1/mlflow", "databricks", "/tmp/mlruns"])
def test_a_uri_that_is_not_http_is_not_probed(uri):
    check_tracking_reachable(uri)


def test_a_cycle_checks_the_uri_only_when_it_logs_or_loads_its_judge_from_the_registry(tmp_path):
    from shadowjudge.config import load_config

    dead = f"http://127.0.0.1:{closed_port()}"
    provider_url = "http://127.0.0.1:9/v1"

    def config(judge: dict, enabled: bool):
        data = demo_config(tmp_path, provider_url)
        data["judge"] = judge
        data["mlflow"] = {"tracking_uri": dead, "enabled": enabled}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path)

    check_config_tracking(config({"evaluator": "lexical"}, False))
    check_config_tracking(config({"evaluator": "small-judge", "model_uri": str(tmp_path)}, False))  # a directory
    for judge, enabled in (({"evaluator": "lexical"}, True), ({"evaluator": "small-judge"}, False),
                           ({"evaluator": "small-judge", "model_uri": "models:/j/3"}, False)):
        with pytest.raises(TrackingUnreachable):
            check_config_tracking(config(judge, enabled))


def test_the_registry_says_its_server_is_unreachable_without_mlflow_retrying(silent, monkeypatch):
    from evaluators import judge_registry as reg

    # Without the check MLflow would retry; with none left it fails at once, but with another message.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    for uri in (f"http://127.0.0.1:{closed_port()}", silent.url):
        with pytest.raises(reg.JudgeRegistryError, match=f"MLflow tracking server at {uri} is unreachable"):
            reg.find_alias(uri, "shadowjudge-judge")
