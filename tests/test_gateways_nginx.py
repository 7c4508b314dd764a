"""A real gateway: nginx weighted upstreams in front of two replay-server instances, split by pushed weights.

nginx runs as a foreground process with its own prefix and config in tmp, on a free loopback port; requests go
through it as a client would send them, and each answer names the replay server that produced it.
"""

import os
import signal
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from scipy.stats import chisquare

from shadowjudge.config import parse_config
from shadowjudge.gateways.nginx import NginxGateway, nginx_binary, upstream_name, weights_variable
from shadowjudge.routing import CandidateVerdict, route_history, step_route
from shadowjudge.routing.push import push_weights
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import get_engine

NGINX = nginx_binary()
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI: apt-get install -y nginx-light)")
RECORDINGS = Path(__file__).resolve().parents[1] / "shadowjudge" / "demo_data" / "recordings.jsonl.gz"
T0 = datetime(2025, 5, 1, 8, 0, tzinfo=timezone.utc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningNginx:
    """nginx in the foreground with a main config that includes the adapter's upstream file."""

    def __init__(self, prefix: Path, upstream_file: Path, route: str):
        self.prefix, self.port = prefix, free_port()
        self.conf = prefix / "nginx.conf"
        temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}worker_processes 2;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n    access_log off;\n" + temp +
            f"    include {upstream_file};\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port};\n"
            f"        location = /__shadowjudge/weights/{route} {{ default_type text/plain; "
            f"return 200 {weights_variable(route)}; }}\n"
            f"        location / {{ proxy_pass http://{upstream_name(route)}; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; }\n'
            "    }\n}\n")
        self.base = [NGINX, "-p", f"{prefix}/", "-c", str(self.conf), "-e", f"{prefix}/error.log"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reload_command(self) -> list[str]:
        return [*self.base, "-s", "reload"]

    def start(self) -> None:
        # Its own process group, so a forced stop also ends the workers (they would outlive a killed master).
        self.proc = subprocess.Popen([*self.base, "-g", "daemon off;"], stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                httpx.get(f"{self.url}/__shadowjudge/weights/none", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("nginx did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful; `nginx -s quit` would re-read a possibly broken file
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def gateway_setup(tmp_path):
    """Two replay servers (inc, cand) behind nginx; yields (route, gateway, nginx)."""
    with ReplayServer(RECORDINGS, name="inc", mode="thread") as inc, \
            ReplayServer(RECORDINGS, name="cand", mode="thread") as cand:
        cfg = parse_config({
            "sources": [{"name": "logs", "path": "x.jsonl"}],
            "routes": [{
                "name": "chat",
                "incumbent": {"name": "inc", "model": "claude-instant-1.2", "base_url": inc.base_url},
                "candidates": [{"name": "cand", "model": "Yi-34B-Chat", "base_url": cand.base_url}],
                "policy": {"steps": [10, 50, 100]},
                "gateway": {"kind": "nginx", "path": str(tmp_path / "upstreams.conf")},
            }],
        })
        route = cfg.routes[0]
        upstream_file = tmp_path / "upstreams.conf"
        assert push_weights(NginxGateway(route, upstream_file), {"inc": 100, "cand": 0}).ok  # before nginx starts
        server = RunningNginx(tmp_path, upstream_file, "chat")
        server.start()
        try:
            yield route, NginxGateway(route, upstream_file, server.reload_command(), status_url=server.url), server
        finally:
            server.stop()


def observed_split(url: str, n: int) -> dict[str, int]:
    """Send n chat completions through nginx; count which replay server answered each."""
    counts: dict[str, int] = {}
    body = {"model": "claude-instant-1.2", "messages": [{"role": "user", "content": "Name three prime numbers."}]}
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(n):
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"]
            name = answer.headers["x-replay-server"]
            counts[name] = counts.get(name, 0) + 1
    return counts


def assert_split_matches(counts: dict[str, int], weights: dict[str, int], n: int) -> None:
    for name, w in weights.items():
        if w == 0:
            assert counts.get(name, 0) == 0, f"{name} has weight 0 but answered {counts.get(name)}"
    live = [name for name, w in weights.items() if w > 0]
    if len(live) > 1:
        observed = [counts.get(name, 0) for name in live]
        expected = [n * weights[name] / 100 for name in live]
        assert chisquare(observed, expected).pvalue > 0.001, (counts, weights)
    assert sum(counts.values()) == n


@needs_nginx
def test_nginx_splits_real_traffic_by_the_weights_the_controller_pushes(gateway_setup, sqlite_url):
    route, gateway, server = gateway_setup
    engine = get_engine(sqlite_url)
    n = 200
    assert_split_matches(observed_split(server.url, n), {"inc": 100, "cand": 0}, n)
    for cycle, expected in enumerate(({"inc": 90, "cand": 10}, {"inc": 50, "cand": 50}, {"inc": 0, "cand": 100})):
        outcome = step_route(engine, route, [CandidateVerdict("cand", "pass", score=0.7, n=100)], gateway=gateway,
                             now=T0 + timedelta(hours=cycle))
        assert outcome.status == "applied" and outcome.weights_after == expected, outcome.reason
        assert httpx.get(f"{server.url}/__shadowjudge/weights/chat").text == f"inc={expected['inc']},cand={expected['cand']}"
        assert_split_matches(observed_split(server.url, n), expected, n)
    assert [h["decision"] for h in route_history(engine, "chat")] == ["promote", "advance", "advance"]


@needs_nginx
def test_a_config_nginx_rejects_is_never_written_and_traffic_keeps_its_split(gateway_setup):
    route, gateway, server = gateway_setup
    assert push_weights(gateway, {"inc": 75, "cand": 25}).ok
    upstream_file = Path(gateway.path)
    broken = upstream_file.read_text().replace("}\nmap", "    keepalive banana;\n}\nmap", 1)
    upstream_file.write_text(broken)  # someone added a bad directive by hand; nginx still runs the last good config
    result = push_weights(gateway, {"inc": 50, "cand": 50})
    assert not result.ok and result.error.startswith("GatewayRejected") and "nginx -t rejected" in result.error
    assert upstream_file.read_text() == broken
    assert_split_matches(observed_split(server.url, 100), {"inc": 75, "cand": 25}, 100)


@needs_nginx
def test_when_nginx_is_down_the_push_fails_and_the_file_is_put_back(gateway_setup):
    route, gateway, server = gateway_setup
    assert push_weights(gateway, {"inc": 90, "cand": 10}).ok
    before = Path(gateway.path).read_text()
    server.stop()
    result = push_weights(gateway, {"inc": 50, "cand": 50})
    assert not result.ok and result.error.startswith("GatewayRejected") and "reload command exited" in result.error
    assert Path(gateway.path).read_text() == before


@needs_nginx
def test_the_shipped_example_nginx_conf_is_valid_with_a_rendered_upstream_file(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cfg = parse_config({
        "sources": [{"name": "logs", "path": "x.jsonl"}],
        "routes": [{"name": "chat-default",
                    "incumbent": {"name": "claude-instant", "model": "m0", "base_url": "http://127.0.0.1:8401/v1"},
                    "candidates": [{"name": "yi-34b", "model": "m1", "base_url": "http://127.0.0.1:8402/v1"}]}],
    })
    upstreams = tmp_path / "upstreams.conf"
    assert push_weights(NginxGateway(cfg.routes[0], upstreams), {"claude-instant": 95, "yi-34b": 5}).ok
    conf = tmp_path / "nginx.conf"
    conf.write_text((repo / "configs" / "gateways" / "nginx" / "nginx.conf").read_text()
                    .replace("/etc/nginx/shadowjudge/upstreams.conf", str(upstreams)))
    check = subprocess.run([NGINX, "-t", "-q", "-e", "stderr", "-p", f"{tmp_path}/", "-c", str(conf),
                            "-g", f"pid {tmp_path}/nginx.pid;"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@needs_nginx
def test_two_routes_whose_names_map_to_one_upstream_are_refused_not_merged(tmp_path):
    def route(name: str):
        return parse_config({
            "sources": [{"name": "logs", "path": "x.jsonl"}],
            "routes": [{"name": name,
                        "incumbent": {"name": "inc", "model": "m0", "base_url": "http://127.0.0.1:8401/v1"},
                        "candidates": [{"name": "cand", "model": "m1", "base_url": "http://127.0.0.1:8402/v1"}]}],
        }).routes[0]

    upstreams = tmp_path / "upstreams.conf"
    assert push_weights(NginxGateway(route("chat-a"), upstreams), {"inc": 95, "cand": 5}).ok
    before = upstreams.read_text()
    clash = push_weights(NginxGateway(route("chat_a"), upstreams), {"inc": 50, "cand": 50})
    assert not clash.ok and "both map to the nginx upstream 'shadowjudge_chat_a'" in clash.error
    assert upstreams.read_text() == before


def test_a_push_keeps_each_servers_own_parameters_and_the_servers_of_no_target(tmp_path):
    """Every server line of the upstream used to be rewritten as `server addr weight=w;`, dropping max_fails,
    max_conns, ... and deleting a `down` server that is no target, which the parser accepts."""
    route = parse_config({
        "sources": [{"name": "logs", "path": "x.jsonl"}],
        "routes": [{"name": "chat",
                    "incumbent": {"name": "inc", "model": "m0", "base_url": "http://127.0.0.1:8401/v1"},
                    "candidates": [{"name": "cand", "model": "m1", "base_url": "http://127.0.0.1:8402/v1"}]}],
    }).routes[0]
    gw = NginxGateway(route, tmp_path / "upstreams.conf")
    text = ("upstream shadowjudge_chat {\n"
            "    server 127.0.0.1:8401 weight=100 max_fails=3 fail_timeout=30s;  # target=inc\n"
            "    server 127.0.0.1:8402 weight=1 down max_conns=50 backup;  # target=cand\n"
            "    server 10.9.9.9:80 down;\n"
            "    keepalive 32;\n"
            "}\n")
    ramped = gw.render_text(text, {"inc": 95, "cand": 5})
    assert "backup" not in ramped  # a backup target takes traffic only when the others are down: not a 5% split
    assert "server 127.0.0.1:8401 weight=95 max_fails=3 fail_timeout=30s;  # target=inc" in ramped
    assert "server 127.0.0.1:8402 weight=5 max_conns=50;  # target=cand" in ramped  # 0 → 5: no longer down
    assert "    server 10.9.9.9:80 down;\n" in ramped and "keepalive 32;" in ramped
    assert gw.parse_weights(ramped) == {"inc": 95, "cand": 5}
    back = gw.render_text(ramped, {"inc": 100, "cand": 0})
    assert "server 127.0.0.1:8402 weight=1 down max_conns=50;  # target=cand" in back
    assert gw.parse_weights(back) == {"inc": 100, "cand": 0} and "server 10.9.9.9:80 down;" in back
    if NGINX is not None:
        gw.check_rendered(ramped)
        gw.check_rendered(back)
