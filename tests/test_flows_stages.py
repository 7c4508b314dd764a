"""Stage flows under Prefect's test harness: a cycle run stage by stage, reruns and retries that write nothing twice,
bad input that fails once with a clear message, and scoring fan-out that names what is missing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.states import Failed
from sqlalchemy import func, select

from flows.stages import (
    analyse,
    find_run_task,
    ingest_and_sample,
    load,
    score,
    score_task,
    shadow_test,
    transient_fault,
    update_routes,
)
from shadowjudge import cycle
from shadowjudge.config import ConfigError
from shadowjudge.cycle import RunNotFound, count_rows, sample_ranges
from shadowjudge.demo import DEMO_DATA
from shadowjudge.errors import InputError
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Judgment, ShadowRun, get_engine, session_scope
from cycle_configs import write_cycle_config

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}
ROUTE = "chat-default"


@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


def _artifacts_of(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _task_runs_of(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_stage_flows_run_one_cycle_stage_by_stage_and_reruns_add_nothing(tmp_path, store_url, replay_server,
                                                                        prefect_harness):
    config_path = write_cycle_config(tmp_path, store_url, replay_server.base_url)
    engine = get_engine(store_url)

    assert ingest_and_sample(config_path)["totals"]["stored"] == 300
    shadow = shadow_test(config_path, ROUTE, "s1")
    assert shadow["run_key"] == "chat-default:s1"
    assert {t: r["requests"] for t, r in shadow["targets"].items()} == {"claude-instant": 40, "yi-34b": 40,
                                                                         "llama-2-7b": 40}
    scored = score(config_path, ROUTE, "s1")
    assert (scored["evaluator"], scored["judged"]) == ("lexical:1", 80)
    analysed = analyse(config_path, ROUTE, "s1")
    assert set(analysed["verdicts"]) == {"yi-34b", "llama-2-7b"} and analysed["mlflow_run_id"]

    state = update_routes(config_path, ROUTE, "s1", return_state=True)
    outcome = state.result()
    assert sum(outcome["weights_after"].values()) == 100
    rows = count_rows(engine)
    assert (rows["shadow_runs"], rows["shadow_results"], rows["judgments"]) == (1, 120, 80)
    assert rows["route_weight_history"] >= 1
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun))
        assert (run.status, run.decision, run.mlflow_run_id) == ("finished", outcome["decision"],
                                                                 analysed["mlflow_run_id"])
    artifacts = _artifacts_of(state.state_details.flow_run_id)
    assert [a.key for a in artifacts] == ["cycle-chat-default"]
    assert "# Cycle `chat-default:s1`" in artifacts[0].data and outcome["decision"] in artifacts[0].data

    # Every stage again: nothing new in the store, the same MLflow run, the ladder not stepped twice.
    assert shadow_test(config_path, ROUTE, "s1")["run_key"] == "chat-default:s1"
    assert score(config_path, ROUTE, "s1")["judged"] == 0
    again = update_routes(config_path, ROUTE, "s1")
    assert count_rows(engine) == rows
    assert again["weights_after"] == outcome["weights_after"] and again["mlflow_run_id"] == analysed["mlflow_run_id"]
    mlflow_run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(analysed["mlflow_run_id"])
    assert mlflow_run.data.tags["shadowjudge.decision"] == outcome["decision"]


def test_a_stage_of_a_cycle_never_opened_fails_once_with_a_clear_message(tmp_path, sqlite_url, replay_server,
                                                                         prefect_harness):
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    state = score(config_path, ROUTE, "never-opened", return_state=True)
    assert state.is_failed()
    with pytest.raises(RunNotFound, match="no run 'chat-default:never-opened'.*shadow test"):
        state.result()
    [find_run] = _task_runs_of(state.state_details.flow_run_id)
    assert find_run.name.startswith("find-run") and find_run.run_count == 1  # bad input is not retried
    with pytest.raises(ConfigError, match="no route named 'nope'"):
        shadow_test(config_path, "nope", "c1")
    with pytest.raises(InputError, match="first_sample_id 9 is after last_sample_id 3"):
        from flows.stages import score_batch

        score_batch(config_path, ROUTE, "c1", 9, 3)


def test_a_retried_task_after_a_transient_fault_writes_nothing_twice(tmp_path, sqlite_url, replay_server,
                                                                     prefect_harness, monkeypatch):
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    ingest_and_sample(config_path)
    shadow_test(config_path, ROUTE, "r1")
    real_score, reports = cycle.score, []

    def score_then_lose_the_connection(engine, config, route, handle, progress=False):
        reports.append(real_score(engine, config, route, handle, progress=progress))  # every judgment stored
        if len(reports) == 1:
            raise ConnectionError("connection reset while reporting back")
        return reports[-1]

    monkeypatch.setattr(cycle, "score", score_then_lose_the_connection)

    @flow
    def score_with_quick_retry(path: str) -> dict:
        config = load(path)
        rc = config.route(ROUTE)
        return score_task.with_options(retry_delay_seconds=0)(config, rc, find_run_task(config, rc, "r1"), path)

    report = score_with_quick_retry(config_path)
    assert [r["judged"] for r in reports] == [80, 0] and report["already_judged"] == 80
    with session_scope(get_engine(sqlite_url)) as s:
        assert s.scalar(select(func.count()).select_from(Judgment)) == 80


def test_scoring_fan_out_without_its_deployment_says_what_to_do(tmp_path, sqlite_url, replay_server, prefect_harness):
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url, orchestration={"score_batches": 3})
    ingest_and_sample(config_path)
    shadow_test(config_path, ROUTE, "f1")
    with pytest.raises(InputError, match="no deployment 'score-batch/score-batch': run `shadowjudge deploy`"):
        score(config_path, ROUTE, "f1")


def test_only_bad_input_is_not_retried():
    assert transient_fault(None, None, Failed(data=ConnectionError("reset"))) is True
    assert transient_fault(None, None, Failed(data=RuntimeError("MLflow answered 503"))) is True
    assert transient_fault(None, None, Failed(data=ConfigError("shadowjudge.yaml: invalid config"))) is False
    assert transient_fault(None, None, Failed(data=RunNotFound("no run 'r:c'"))) is False


@given(st.sets(st.integers(1, 10_000), max_size=300), st.integers(1, 20))
def test_sample_ranges_split_a_run_into_near_equal_contiguous_batches(ids, parts):
    ranges = sample_ranges(list(ids), parts)
    ordered = sorted(ids)
    batches = [[i for i in ordered if first <= i <= last] for first, last in ranges]
    assert [i for batch in batches for i in batch] == ordered  # every sample in exactly one batch, in order
    assert len(ranges) == min(parts, len(ids))
    if batches:
        assert max(map(len, batches)) - min(map(len, batches)) <= 1
        assert all(first <= last for first, last in ranges)


def _cycle_with_a_failing_stage(tmp_path, sqlite_url, replay_server, monkeypatch, stage: str, task: str,
                                error: Exception, cycle_id: str):
    """A route-cycle flow whose `stage` (cycle function; its Prefect `task` not retried) raises `error`, and the
    run keys the cycle's alert stage saw."""
    import flows.stages

    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    ingest_and_sample(config_path)
    alerted: list[str] = []
    real_alert = cycle.alert

    def failing(*args, **kwargs):
        raise error

    def recording_alert(engine, config, route, handle, *args, **kwargs):
        alerted.append(handle.run_key)
        return real_alert(engine, config, route, handle, *args, **kwargs)

    monkeypatch.setattr(cycle, stage, failing)
    monkeypatch.setattr(cycle, "alert", recording_alert)
    monkeypatch.setattr(flows.stages, task, getattr(flows.stages, task).with_options(retries=0))

    @flow
    def route_cycle(path: str) -> dict:
        config = load(path)
        return flows.stages.run_route_cycle(config, config.route(ROUTE), cycle_id, {}, path)

    return config_path, route_cycle, alerted


def test_an_mlflow_outage_does_not_hold_back_the_cycles_alerts_and_route_step(tmp_path, sqlite_url, replay_server,
                                                                           prefect_harness, monkeypatch):
    """MLflow went down mid-cycle: the log task's failure ended the route's cycle before its alerts and route step,
    so a regression found in that cycle was neither alerted nor rolled back. Now they go ahead and the cycle fails
    afterwards with the logging error (a rerun of the cycle logs it)."""
    from shadowjudge.tracking import TrackingUnreachable

    config_path, route_cycle, alerted = _cycle_with_a_failing_stage(
        tmp_path, sqlite_url, replay_server, monkeypatch, "track", "track_task",
        TrackingUnreachable("MLflow tracking server at http://127.0.0.1:1 is unreachable: connection refused"), "m1")

    with pytest.raises(TrackingUnreachable, match="unreachable"):
        route_cycle(config_path)
    assert alerted == [f"{ROUTE}:m1"]
    with session_scope(get_engine(sqlite_url)) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == f"{ROUTE}:m1"))
        assert run.status == "finished" and run.decision is not None


def test_a_failed_calibration_does_not_hold_back_the_cycles_analysis_alerts_and_route_step(
        tmp_path, sqlite_url, replay_server, prefect_harness, monkeypatch):
    """The teacher failing (down, a revoked key) failed the calibrate task and with it the route's cycle, before its
    analysis, alerts and route step, on every rerun: a regression found meanwhile was neither alerted nor rolled
    back. Calibration measures the judge; its failure is now a warning the cycle's result records."""
    from evaluators.llm_judge import LlmJudgeError

    config_path, route_cycle, alerted = _cycle_with_a_failing_stage(
        tmp_path, sqlite_url, replay_server, monkeypatch, "calibrate", "calibrate_task",
        LlmJudgeError("judge model 'gpt-4-judge' failed: AuthenticationError (HTTP 401)"), "t1")

    outcome = route_cycle(config_path)
    assert outcome["calibration_failed"] == ("LlmJudgeError: judge model 'gpt-4-judge' failed: "
                                             "AuthenticationError (HTTP 401)")
    assert alerted == [f"{ROUTE}:t1"] and outcome["decision"] is not None
    with session_scope(get_engine(sqlite_url)) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == f"{ROUTE}:t1"))
        assert run.status == "finished" and run.decision is not None
        mlflow_run_id = run.mlflow_run_id
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(load(config_path).mlflow.tracking_uri).get_run(mlflow_run_id).data
    assert logged.tags["shadowjudge.calibration_failed"] == outcome["calibration_failed"]
    assert logged.metrics["samples.served_by_candidates"] == 0  # every logged answer here is the incumbent's
