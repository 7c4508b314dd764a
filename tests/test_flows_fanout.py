"""Scoring fan-out past its timeout under Prefect's test harness: a retried score task re-attaches to the batch runs
it started, and giving up cancels them instead of leaving them queued for a worker to score later."""

from __future__ import annotations

import uuid

from prefect import flow, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
from prefect.states import Failed

import flows.stages
from flows.stages import ScoreFanOutError, load, score_task, transient_fault
from shadowjudge.cycle import RunHandle
from cycle_configs import write_cycle_config

ROUTE = "chat-default"


def test_a_fan_out_retried_then_timed_out_starts_each_batch_once_and_cancels_it(tmp_path, sqlite_url,
                                                                                prefect_harness, monkeypatch):
    name = f"fanout-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:  # a deployment no worker polls: its runs stay scheduled
        flow_id = client.create_flow_from_name("score-batch")
        deployment_id = client.create_deployment(flow_id=flow_id, name=name, entrypoint="flows/stages.py:score_batch")
    config_path = write_cycle_config(tmp_path, sqlite_url, "http://127.0.0.1:9/v1", orchestration={
        "score_batches": 2, "score_deployment": f"score-batch/{name}", "score_batch_timeout_s": 0.5})
    real_wait, waits = flows.stages.wait_for_flow_runs, []

    def lose_the_api_once_then_wait(flow_run_ids, timeout_s, poll_s=2.0):
        waits.append(list(flow_run_ids))
        if len(waits) == 1:
            raise ConnectionError("Prefect API connection reset")  # transient: the task is retried
        return real_wait(flow_run_ids, timeout_s, poll_s=0.2)

    monkeypatch.setattr(flows.stages, "wait_for_flow_runs", lose_the_api_once_then_wait)

    @flow
    def score_fanned_out(path: str) -> dict:
        config = load(path)
        handle = RunHandle(run_id=1, run_key=f"{ROUTE}:fanout", sample_ids=list(range(1, 11)), resumed=False)
        return score_task.with_options(retries=3, retry_delay_seconds=0)(config, config.route(ROUTE), handle, path)

    state = score_fanned_out(config_path, return_state=True)
    try:
        with get_client(sync_client=True) as client:
            batches = client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment_id])))
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)

    assert sorted(b.name for b in batches) == [f"{ROUTE}:fanout samples 1-5", f"{ROUTE}:fanout samples 6-10"]
    assert state.is_failed()
    assert len(waits) == 2 and waits[0] == waits[1]  # the retry waited on the runs the first attempt started
    assert {b.state.type.value for b in batches} == {"CANCELLED"}
    [score_run] = [t for t in task_runs if t.task_key.startswith("score_task")]  # not the batches' placeholders
    assert score_run.run_count == 2  # the timeout is not retried


def test_a_fan_out_that_gave_up_is_not_retried():
    assert transient_fault(None, None, Failed(data=ScoreFanOutError("batches still unfinished"))) is False
