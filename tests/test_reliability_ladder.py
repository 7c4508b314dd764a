"""Issue 8's "done when", in one run: simulated cycles step a route whose gateway is a real nginx.

Three replay servers (incumbent, a candidate that regresses, a better one) sit behind nginx weighted upstreams. Each
cycle's verdicts come from simulated judge preferences; the controller pushes the weights through the nginx adapter
named in the config (file, `nginx -s reload`, status URL), and after every push real requests through nginx must
split within statistical tolerance of the pushed weights (chi-square, p > 0.001; a weight of 0 gets no request).
The worse candidate is rolled back to 0, the better one climbs 10 -> 50 -> 100, and the whole history reads back
through the `shadowjudge routes history` command, run as a subprocess. SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_gateways_nginx import (
    NGINX,
    RECORDINGS,
    RunningNginx,
    assert_split_matches,
    observed_split,
)
from test_routing_step import simulated_verdict

from shadowjudge.config import load_config
from shadowjudge.gateways import get_gateway
from shadowjudge.gateways.nginx import NginxGateway
from shadowjudge.routing import load_rollout_state, step_route
from shadowjudge.routing.push import push_weights
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import get_engine

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI: apt-get install -y nginx-light)")]
ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)
REQUESTS_PER_STEP = 200


def write_config(tmp_path: Path, store_url: str, servers: dict[str, ReplayServer], nginx: RunningNginx) -> Path:
    target = lambda name: {"name": name, "model": "claude-instant-1.2", "base_url": servers[name].base_url}
    doc = {
        "store": {"url": store_url},
        "sources": [{"name": "logs", "path": "requests.jsonl"}],
        "routes": [{
            "name": "chat",
            "incumbent": target("inc"),
            "candidates": [target("worse"), target("better")],
            "policy": {"kind": "ladder", "steps": [10, 50, 100], "min_dwell_s": 0, "min_samples_per_step": 0},
            "gateway": {"kind": "nginx", "path": str(tmp_path / "upstreams.conf"), "url": nginx.url,
                        "reload_command": nginx.reload_command()},
        }],
    }
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_simulated_cycles_promote_the_better_candidate_roll_back_the_worse_and_nginx_splits_as_pushed(
        store_url, tmp_path):
    with ReplayServer(RECORDINGS, name="inc", mode="thread") as inc, \
            ReplayServer(RECORDINGS, name="worse", mode="thread") as worse, \
            ReplayServer(RECORDINGS, name="better", mode="thread") as better:
        nginx = RunningNginx(tmp_path, tmp_path / "upstreams.conf", "chat")
        cfg_path = write_config(tmp_path, store_url, {"inc": inc, "worse": worse, "better": better}, nginx)
        route = load_config(cfg_path).route("chat")
        # nginx needs the upstream file to start: the first render goes in before it runs (no reload, no status).
        assert push_weights(NginxGateway(route, tmp_path / "upstreams.conf"),
                            {"inc": 100, "worse": 0, "better": 0}).ok
        nginx.start()
        try:
            gateway = get_gateway(route.gateway, route)
            engine = get_engine(store_url)
            rng = np.random.default_rng(11)
            assert_split_matches(observed_split(nginx.url, REQUESTS_PER_STEP), {"inc": 100, "worse": 0, "better": 0},
                                 REQUESTS_PER_STEP)
            decisions = []
            for cycle in range(6):
                worse_p = 0.62 if cycle == 0 else 0.2  # looks fine at 10%, then regresses
                verdicts = [simulated_verdict("worse", worse_p, 150, rng), simulated_verdict("better", 0.68, 150, rng)]
                outcome = step_route(engine, route, verdicts, gateway=gateway, now=T0 + timedelta(minutes=30 * cycle),
                                     analysis_link=f"http://mlflow.local/#/runs/cycle-{cycle}")
                assert outcome.status in ("applied", "unchanged"), (outcome.reason, outcome.error)
                pushed = dict(outcome.weights_after)
                decisions.append((outcome.decision, pushed["worse"], pushed["better"]))
                served = nginx_weights(nginx.url)
                assert served == pushed, (cycle, served, pushed)
                assert_split_matches(observed_split(nginx.url, REQUESTS_PER_STEP), pushed, REQUESTS_PER_STEP)
        finally:
            nginx.stop()

    assert decisions == [("advance", 10, 0), ("rollback", 0, 0), ("advance", 0, 10), ("advance", 0, 50),
                         ("promote", 0, 100), ("hold", 0, 100)]
    state = load_rollout_state(engine, route)
    assert state.serving == "better" and state.phase == "promoted" and "worse" in state.failed

    history = routes_history_cli(cfg_path)
    assert [(r["decision"], r["after"]["worse"], r["after"]["better"]) for r in reversed(history)] == \
        [d for d in decisions if d[0] != "hold"]
    assert all(r["status"] == "applied" and r["gateway"] for r in history)
    rollback = next(r for r in history if r["decision"] == "rollback")
    assert rollback["before"] == {"inc": 90, "worse": 10, "better": 0}
    assert rollback["analysis_link"] == "http://mlflow.local/#/runs/cycle-1" and "worse" in rollback["reason"]


def nginx_weights(url: str) -> dict[str, int]:
    """The weights nginx itself serves (the adapter renders them into its config beside the upstream)."""
    import httpx

    text = httpx.get(f"{url}/__shadowjudge/weights/chat", timeout=5).text
    return {name: int(weight) for name, weight in (pair.split("=") for pair in text.split(","))}


def routes_history_cli(cfg_path: Path) -> list[dict]:
    """`shadowjudge routes history chat --json` as an operator runs it: a separate process, the real entry point."""
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "routes", "history", "chat", "-c", str(cfg_path),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
