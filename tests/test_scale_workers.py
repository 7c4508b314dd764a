"""Past one machine, on existing engines: PostgreSQL as the store, a Prefect process work pool with two workers, and
the cycle's judge scoring split by sample-id ranges into score-batch runs that either worker takes.

`shadowjudge deploy` creates the pool, the provider-calls limit and the deployments on a real Prefect server; the
cycle is a run scheduled a few seconds ahead (the way the cron schedule creates them), executed by a worker."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, func, select, text

from shadowjudge import cycle as stages
from shadowjudge.config import load_config
from shadowjudge.demo import DEMO_DATA, demo_config
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Judgment, ShadowRun, get_engine, session_scope, upgrade_database

ROOT = Path(__file__).resolve().parent.parent
FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}
ROUTE = "chat-default"


@pytest.fixture
def pg_store(pg_server_url):
    """A fresh, migrated PostgreSQL database for this test."""
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    name = f"sj_scale_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_server_url.rsplit("/", 1)[0] + "/" + name
    upgrade_database(url)
    yield url
    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _config(tmp_path: Path, store_url: str, base_url: str, **sections) -> Path:
    data = demo_config(tmp_path, base_url)
    data["store"]["url"] = store_url
    data["judge"] = {"evaluator": "lexical"}
    data["shadow"]["max_samples"] = 40
    data.update(sections)
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_a_scheduled_cycle_fans_scoring_out_to_two_workers_on_postgresql(tmp_path, pg_store, prefect_server,
                                                                          prefect_client, background, wait_final):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Scheduled

    client = prefect_client
    env = {**prefect_server, "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    workers = ("worker-a", "worker-b")
    logs = {w: background(w, [sys.executable, "-m", "prefect", "worker", "start", "--pool", "shadowjudge", "--type",
                              "process", "--name", w, "--limit", "2"], env) for w in workers}
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as replay:
        config_path = _config(tmp_path, pg_store, replay.base_url,
                              orchestration={"score_batches": 3, "provider_calls_limit": 3})
        deploy = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "deploy", "-c", str(config_path)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300, check=False)
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        assert "evaluation-cycle/evaluation-cycle pool shadowjudge: cron */30 * * * * (UTC)" in deploy.stdout
        assert client.read_work_pool("shadowjudge").type == "process"
        assert client.read_concurrency_limit_by_tag("provider-calls").concurrency_limit == 3
        deployment = client.read_deployment_by_name("evaluation-cycle/evaluation-cycle")
        assert [s.schedule.cron for s in deployment.schedules] == ["*/30 * * * *"]
        assert deployment.parameters == {"config_path": str(config_path.resolve())}
        batch_deployment = client.read_deployment_by_name("score-batch/score-batch")
        when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=5)
        run = client.create_flow_run_from_deployment(deployment.id, state=Scheduled(scheduled_time=when))
        finished = wait_final(client, run.id, 420)
        batches = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[batch_deployment.id])))
        artifacts = client.read_artifacts()
    executed = {w: re.findall(r"Flow run '([^']+)' submitted to infrastructure", logs[w].read_text()) for w in workers}

    assert finished.state.is_completed(), finished.state.message
    cycle_id = stages.default_cycle_id(when)  # the cycle is keyed by its scheduled minute
    run_key = f"{ROUTE}:{cycle_id}"
    assert sorted(b.name for b in batches) == sorted(f"{run_key} samples {lo}-{hi}" for lo, hi in
                                                     stages.sample_ranges(list(range(1, 41)), 3))
    assert all(b.state.is_completed() for b in batches)
    batch_workers = {w for w, names in executed.items() for name in names if name.startswith(run_key)}
    assert batch_workers == set(workers)  # both workers scored part of the run
    assert sum(name.startswith(run_key) for names in executed.values() for name in names) == 3  # each batch once
    engine = get_engine(pg_store)
    with session_scope(engine) as s:
        stored = s.scalar(select(ShadowRun).where(ShadowRun.run_key == run_key))
        assert stored.status == "finished" and stored.decision and stored.judge_version == "lexical:1"
        pairs = s.execute(select(Judgment.sample_id, Judgment.target)).all()
    assert len(pairs) == len(set(pairs)) == 80
    assert any(a.key == "cycle-chat-default" and a.flow_run_id == run.id for a in artifacts)


def test_overlapping_score_batches_written_at_once_store_each_judgment_once(tmp_path, store_url):
    """Concurrent writers on the same run (a retried batch, overlapping ranges) rely on the judgments' unique key."""
    from evaluators import load_evaluator
    from shadowjudge.scoring import score_run

    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as replay:
        config = load_config(_config(tmp_path, store_url, replay.base_url))
        engine = get_engine(store_url)
        route = config.route(ROUTE)
        stages.ingest(engine, config)
        handle = stages.open_run(engine, config, route, "overlap")
        stages.shadow(engine, config, route, handle)
    ranges = [*stages.sample_ranges(handle.sample_ids, 3), (min(handle.sample_ids), max(handle.sample_ids))]
    evaluator = load_evaluator(config.judge, config.mlflow.tracking_uri)
    candidates = [c.name for c in route.candidates]
    with ThreadPoolExecutor(len(ranges)) as pool:
        reports = list(pool.map(lambda r: score_run(engine, handle.run_id, evaluator, candidates, batch_size=8,
                                                     sample_range=r), ranges))
    with session_scope(engine) as s:
        pairs = s.execute(select(Judgment.sample_id, Judgment.target).where(Judgment.run_id == handle.run_id)).all()
        incumbent = s.execute(select(Judgment.sample_id, func.count(func.distinct(Judgment.incumbent_score)))
                              .group_by(Judgment.sample_id)).all()
    assert len(pairs) == len(set(pairs)) == 80
    assert sum(r.judged for r in reports) >= 80  # overlapping writers each judged; the store kept one row per pair
    assert all(n == 1 for _, n in incumbent)  # both candidates of a sample compare against one incumbent score
