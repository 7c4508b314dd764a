"""`shadowjudge serve` against a real Prefect server: the schedules of prefect.yaml are served from one process, a
cycle scheduled a few seconds ahead runs, the store holds it, and its summary artifact is on the flow run."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from prefect.exceptions import ObjectNotFound
from sqlalchemy import select

from shadowjudge.cycle import count_rows, default_cycle_id
from shadowjudge.demo import DEMO_DATA, demo_config
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import ShadowRun, get_engine, session_scope

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}


def _served(client, name: str, timeout_s: float = 240):
    """The deployment once a serving process registered it (served deployments have no work pool)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            deployment = client.read_deployment_by_name(name)
            if deployment.work_pool_name is None:
                return deployment
        except ObjectNotFound:
            pass
        assert time.monotonic() < deadline, f"{name} was not served within {timeout_s} s"
        time.sleep(1)


@pytest.mark.slow
def test_serve_runs_a_scheduled_cycle_and_publishes_its_summary(tmp_path, sqlite_url, prefect_server, prefect_client,
                                                                background, wait_final):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.states import Scheduled

    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as replay:
        data = demo_config(tmp_path, replay.base_url)
        data["store"]["url"] = sqlite_url
        data["judge"] = {"evaluator": "lexical"}
        data["shadow"]["max_samples"] = 40
        config_path = tmp_path / "shadowjudge.yaml"
        config_path.write_text(yaml.safe_dump(data))
        log = background("serve", [sys.executable, "-m", "shadowjudge.cli", "serve", "-c", str(config_path),
                                   "--only", "evaluation-cycle", "--replace"], prefect_server)
        deployment = _served(prefect_client, "evaluation-cycle/evaluation-cycle")
        assert [s.schedule.cron for s in deployment.schedules] == ["*/30 * * * *"]
        assert deployment.parameters == {"config_path": str(config_path.resolve())}
        when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
        run = prefect_client.create_flow_run_from_deployment(deployment.id, state=Scheduled(scheduled_time=when))
        finished = wait_final(prefect_client, run.id)
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))

    assert finished.state.is_completed(), f"{finished.state.message}\n{log.read_text()[-3000:]}"
    assert prefect_client.read_concurrency_limit_by_tag("provider-calls").concurrency_limit == 4  # the default
    run_key = f"chat-default:{default_cycle_id(when)}"
    engine = get_engine(sqlite_url)
    with session_scope(engine) as s:
        stored = s.scalar(select(ShadowRun))
        assert (stored.run_key, stored.status) == (run_key, "finished")
    assert count_rows(engine)["judgments"] == 80
    [summary] = artifacts
    assert summary.key == "cycle-chat-default" and summary.type == "markdown"
    assert f"# Cycle `{run_key}`" in summary.data and f"**Decision:** {stored.decision}" in summary.data
