"""A cycle process killed with SIGKILL between (and inside) stages, then the same cycle id run again.

`shadowjudge run` runs in a subprocess against the session's Prefect API; the test watches the store and kills it
once a stage's output is there. Each kill resumes the cycle from the last one; the last run (the Prefect flow, in
this process) must complete it with every row written once, one MLflow run per cycle and candidate, and the gateway
file matching the route's state. The process may die holding the route's lease: the rerun takes it over.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sqlalchemy import func, select
from test_reliability_faults import ROUTE, assert_cycle_complete, write_config

from shadowjudge.cycle import count_rows
from shadowjudge.demo import DEMO_DATA
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import RouteWeightChange, ShadowResult, ShadowRun, get_engine, session_scope

REPO = Path(__file__).resolve().parents[1]
# Slow enough streams (about 0.5 s an answer, 3 at a time per target) that the watcher catches the shadow stage.
SLOW = {"seed": 2, "default": {"ttft_ms": 5, "token_ms": 2.5}}
SAMPLES = 30


def _store_state(engine) -> dict[str, object]:
    with session_scope(engine) as s:
        return {
            "results": s.scalar(select(func.count()).select_from(ShadowResult)) or 0,
            "mlflow_run_id": s.scalar(select(ShadowRun.mlflow_run_id)),
            "pushed": s.scalar(select(func.count()).select_from(RouteWeightChange)
                               .where(RouteWeightChange.status == "applied")) or 0,
        }


KILL_POINTS: list[tuple[str, Callable[[dict], bool]]] = [
    ("in the middle of the shadow test", lambda st: 20 <= st["results"] < SAMPLES * 3),
    ("after logging to MLflow", lambda st: st["mlflow_run_id"] is not None),
    ("after the gateway push", lambda st: st["pushed"] >= 1),
]


def _kill_when(args: list[str], env: dict[str, str], cwd: Path, engine, ready: Callable[[dict], bool],
               log: Path) -> str:
    """Start the command, SIGKILL it as soon as the store shows `ready`; returns what the store showed then."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                state = _store_state(engine)
                if ready(state):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return str(state)
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    raise AssertionError(f"the cycle ended (status {proc.returncode}) before the kill point:\n"
                         f"{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised MLflow SQLite store, copied per test: creating one costs about ten seconds here."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.mark.slow
def test_a_cycle_killed_at_any_point_is_completed_by_a_rerun_of_the_same_cycle(
        tmp_path, sqlite_url, prefect_harness, mlflow_template, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.cycle import evaluation_cycle

    monkeypatch.chdir(tmp_path)
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    engine = get_engine(sqlite_url)
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", SLOW) as server:
        path = write_config(tmp_path, sqlite_url, server.base_url, max_samples=SAMPLES,
                            mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        data = yaml.safe_load(path.read_text())
        for target in [data["routes"][0]["incumbent"], *data["routes"][0]["candidates"]]:
            target["concurrency"] = 3
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", "shadowjudge.cli", "run", "-c", str(path), "--cycle-id", "k1"]
        seen = {}
        for name, ready in KILL_POINTS:
            seen[name] = _kill_when(command, env, tmp_path, engine, ready, tmp_path / "cycle.log")

        result = evaluation_cycle(config_path=str(path), cycle_id="k1")

    from shadowjudge.config import load_config

    config = load_config(path)
    outcome = result["routes"][ROUTE]
    assert outcome["step_status"] in ("applied", "unchanged"), outcome
    assert_cycle_complete(engine, config, config.route(ROUTE), "k1")
    rows = count_rows(engine)
    assert rows["shadow_runs"] == 1 and rows["shadow_results"] == SAMPLES * 3 and rows["judgments"] == SAMPLES * 2
    with session_scope(engine) as s:
        applied = s.scalars(select(RouteWeightChange).where(RouteWeightChange.status == "applied")).all()
        assert len(applied) == 1, seen  # killed after its push, the cycle did not push again
        run = s.scalar(select(ShadowRun))
        assert run.mlflow_run_id == outcome["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"shadowjudge/{ROUTE}")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["shadowjudge.target"] for r in runs) == ["__cycle__", "llama-2-7b", "yi-34b"]
    assert next(r for r in runs if r.info.run_id == run.mlflow_run_id).data.tags["shadowjudge.decision"]


def test_a_lease_held_by_a_killed_process_is_taken_over_at_once_and_a_live_one_is_not(store_url):
    from shadowjudge.store.lease import LeaseLock

    code = ("import os, sys\nfrom shadowjudge.store.lease import LeaseLock\nfrom shadowjudge.store import get_engine\n"
            "lock = LeaseLock(get_engine(sys.argv[1]), 'route:chat', ttl_s=3600)\nassert lock.acquire()\n"
            "print(lock.holder, flush=True)\nos.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", code, store_url], env=env, capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead_holder = proc.stdout.strip()
    engine = get_engine(store_url)
    assert LeaseLock(engine, "route:chat").current_holder()[0] == dead_holder  # the lease outlived its holder

    live = LeaseLock(engine, "route:other", holder=f"{dead_holder.split(':')[0]}:{os.getppid()}:x", ttl_s=3600)
    assert live.acquire()
    assert not LeaseLock(engine, "route:other").acquire()  # its holder is alive: the lease stands
    taker = LeaseLock(engine, "route:chat")
    assert taker.acquire() and taker.current_holder()[0] == taker.holder  # no hour-long wait for a dead holder
