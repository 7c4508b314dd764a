"""A route's cycles beside each other: a run opened while another is still open (its stages run one by one) takes
none of its samples, the stage flows hold the route's cycle lease, a cycle whose lease another host took over stops
before its next stage, and a route step that finds the route's weights locked leaves the run open for a retry
instead of closing it on the old weights."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from prefect import flow
from prefect.states import Failed
from sqlalchemy import select, update
from typer.testing import CliRunner

import flows.stages
from flows.stages import analyse, ingest_and_sample, load, score, score_batch, shadow_test, update_routes
from shadowjudge import cycle
from shadowjudge.cli import app
from shadowjudge.config import load_config
from shadowjudge.demo import DEMO_DATA
from shadowjudge.gateways import get_gateway
from shadowjudge.routing import CandidateVerdict, RouteBusy, step_route
from shadowjudge.routing.step import lock_name
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Lock, RouteState, ShadowRun, TrafficSample, get_engine, session_scope
from shadowjudge.store.lease import LeaseLock
from cycle_configs import write_cycle_config

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}
ROUTE = "chat-default"
ELSEWHERE = "elsewhere:1:beef:cycle other"  # a holder on another host: never judged dead


@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


@flow
def route_cycle(config_path: str, cycle_id: str) -> dict:
    """One route's cycle after ingest, as `shadowjudge run` and the scheduled evaluation-cycle run it."""
    config = load(config_path)
    return flows.stages.run_route_cycle(config, config.route(ROUTE), cycle_id, {}, config_path)


def _add_samples(engine, first: int, count: int) -> None:
    with session_scope(engine) as s:
        for i in range(first, first + count):
            s.add(TrafficSample(request_id=f"r{i}", source="logs", source_position=str(i), route=ROUTE,
                                incumbent_model="m", messages=[{"role": "user", "content": "hi"}],
                                request_ts=datetime.now(timezone.utc)))


def _run(engine, run_key: str) -> ShadowRun:
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == run_key))
        s.expunge(run)
    return run


def _last_stepped_run(engine) -> int | None:
    """The run whose verdicts last stepped the route, None before any did."""
    with session_scope(engine) as s:
        return s.scalar(select(RouteState.last_run_id).where(RouteState.route == ROUTE))


def _task_runs_of(state) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))


def _cycle_lease_holder(engine) -> str | None:
    holder = LeaseLock(engine, f"cycle:{ROUTE}").current_holder()
    return holder[0] if holder else None


def test_a_run_opened_while_another_is_still_open_takes_none_of_its_samples(tmp_path, store_url):
    """The shadow-test stage leaves its run open until a later update-routes closes it; a cycle opened in between
    took the same samples (after the last *finished* run) and stepped the route a second time on them."""
    config = load_config(write_cycle_config(tmp_path, store_url, "http://127.0.0.1:9/v1"))
    route, engine = config.route(ROUTE), get_engine(store_url)
    _add_samples(engine, 0, 5)
    staged = cycle.open_run(engine, config, route, "c1")  # opened by the shadow-test stage, not closed yet
    _add_samples(engine, 5, 3)
    scheduled = cycle.open_run(engine, config, route, "c2")
    assert set(staged.sample_ids) & set(scheduled.sample_ids) == set()
    assert (len(staged.sample_ids), len(scheduled.sample_ids)) == (5, 3)
    cycle.finish_run(engine, staged.run_id, "hold", {})  # the staged cycle closes after the scheduled one opened
    assert cycle.open_run(engine, config, route, "c3").sample_ids == []


def test_the_score_analyse_and_update_routes_stage_flows_hold_the_routes_cycle_lease(
        tmp_path, sqlite_url, replay_server, prefect_harness, monkeypatch):
    """Only shadow-test held the lease: between a cycle's stage flows a scheduled cycle could step the route."""
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    engine = get_engine(sqlite_url)
    ingest_and_sample(config_path)
    shadow_test(config_path, ROUTE, "s1")
    holders: dict[str, str | None] = {}

    def spy(name: str):
        real = getattr(cycle, name)

        def stage(*args, **kwargs):
            holders.setdefault(name, _cycle_lease_holder(engine))
            return real(*args, **kwargs)
        monkeypatch.setattr(cycle, name, stage)

    for name in ("score", "analyse", "update_routes"):
        spy(name)
    score(config_path, ROUTE, "s1")
    analyse(config_path, ROUTE, "s1")
    update_routes(config_path, ROUTE, "s1")
    assert {name: (holder or "").endswith(":cycle s1") for name, holder in holders.items()} == \
        {"score": True, "analyse": True, "update_routes": True}, holders
    assert _cycle_lease_holder(engine) is None  # freed when each stage flow ended
    # score-batch runs on other workers while the score stage that fanned it out holds the lease
    run = _run(engine, f"{ROUTE}:s1")
    with cycle.cycle_lease(engine, ROUTE, "s1"):
        assert score_batch(config_path, ROUTE, "s1", min(run.sample_ids), max(run.sample_ids))["judged"] == 0


def _take_the_cycle_lease_over(engine) -> None:
    """What another host does once our lease went unrenewed for its whole length (the store away, a stall)."""
    with session_scope(engine) as s:
        s.execute(update(Lock).where(Lock.name == f"cycle:{ROUTE}").values(holder=ELSEWHERE))


@pytest.mark.parametrize("lost_during", ["shadow", "alert"])
def test_a_cycle_that_lost_its_lease_stops_before_its_next_stage(tmp_path, sqlite_url, replay_server,
                                                                 prefect_harness, monkeypatch, lost_during):
    """Losing the lease was only logged: scoring, alerts, the route step and the close went on beside the new
    holder."""
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    engine = get_engine(sqlite_url)
    ingest_and_sample(config_path)
    real = getattr(cycle, lost_during)

    def stage_during_which_the_lease_is_lost(*args, **kwargs):
        result = real(*args, **kwargs)
        _take_the_cycle_lease_over(engine)
        return result

    monkeypatch.setattr(cycle, lost_during, stage_during_which_the_lease_is_lost)
    state = route_cycle(config_path, "c1", return_state=True)
    run = _run(engine, f"{ROUTE}:c1")
    assert (_last_stepped_run(engine), run.status, run.decision) == (None, "running", None)  # not stepped, not closed
    with pytest.raises(cycle.CycleLeaseLost, match=rf"lost the lease 'cycle:{ROUTE}' to {ELSEWHERE}: .*"
                                                   r":cycle c1 stopped before its next stage"):
        state.result()
    assert _cycle_lease_holder(engine) == ELSEWHERE  # ours, lost, is not released over the new holder's


def test_a_busy_route_step_leaves_the_run_open_and_fails_the_stage_for_a_retry(tmp_path, sqlite_url, replay_server,
                                                                              prefect_harness, monkeypatch):
    """A step that found the route's lock held still closed the run: decision 'busy', the old weights, verdicts never
    applied although the reason said 'retried next cycle'."""
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    engine = get_engine(sqlite_url)
    ingest_and_sample(config_path)
    monkeypatch.setattr(flows.stages, "route_task", flows.stages.route_task.with_options(retry_delay_seconds=0))
    other_writer = LeaseLock(engine, lock_name(ROUTE), holder="elsewhere:1:beef")  # `routes approve`, a push...
    assert other_writer.acquire()
    try:
        state = route_cycle(config_path, "c1", return_state=True)
    finally:
        other_writer.release()
    run = _run(engine, f"{ROUTE}:c1")
    assert (_last_stepped_run(engine), run.status, run.decision) == (None, "running", None)
    assert [t.run_count for t in _task_runs_of(state) if t.name.startswith("update-routes")] == [3]  # retried
    with pytest.raises(RouteBusy, match=rf"the weights of route {ROUTE} are being changed by another writer "
                                        r"\(busy: elsewhere:1:beef .*\); run chat-default:c1 stays open .* rerun the "
                                        r"update-routes stage of cycle c1"):
        state.result()

    outcome = update_routes(config_path, ROUTE, "c1")  # the rerun the message names, once the writer is done
    run = _run(engine, f"{ROUTE}:c1")
    assert outcome["step_status"] != "busy" and (run.status, run.decision) == ("finished", outcome["decision"])
    assert _last_stepped_run(engine) == run.id


def test_closing_a_run_on_a_busy_step_never_overwrites_the_applied_outcome(tmp_path, store_url):
    """Two update-routes of one cycle: the one that found the lock busy closed the run after the one that stepped
    it, recording 'busy' and the old weights over the applied decision."""
    config = load_config(write_cycle_config(tmp_path, store_url, "http://127.0.0.1:9/v1"))
    route, engine = config.route(ROUTE), get_engine(store_url)
    _add_samples(engine, 0, 1)
    handle = cycle.open_run(engine, config, route, "c1")
    gateway = get_gateway(route.gateway, route)
    verdicts = [CandidateVerdict(route.candidates[0].name, "pass", score=0.7, n=1)]
    writer = LeaseLock(engine, lock_name(ROUTE))
    assert writer.acquire()
    busy = step_route(engine, route, verdicts, gateway=gateway, now=datetime.now(timezone.utc),
                      run_id=handle.run_id).to_dict()
    writer.release()
    stepped = step_route(engine, route, verdicts, gateway=gateway, now=datetime.now(timezone.utc),
                         run_id=handle.run_id).to_dict()
    assert (busy["status"], stepped["status"]) == ("busy", "applied")
    cycle.close_cycle(engine, config, route, handle, {"candidates": []}, stepped, [], None)
    with pytest.raises(RouteBusy, match=f"the weights of route {ROUTE} are being changed by another writer"):
        cycle.close_cycle(engine, config, route, handle, {"candidates": []}, busy, [], None)
    run = _run(engine, handle.run_key)
    assert (run.status, run.decision, run.summary["weights_after"]) == ("finished", stepped["decision"],
                                                                        stepped["weights_after"])


def test_a_busy_route_step_is_retried_and_a_lost_lease_is_not():
    busy = RouteBusy("the weights of route chat-default are being changed by another writer")
    assert flows.stages.transient_fault(None, None, Failed(data=busy)) is True
    lost = cycle.CycleLeaseLost("lost the lease 'cycle:chat-default'")
    assert flows.stages.transient_fault(None, None, Failed(data=lost)) is False


def test_a_cycle_that_fails_marks_its_run_failed_and_a_rerun_finishes_it(tmp_path, sqlite_url, replay_server,
                                                                         prefect_harness, monkeypatch):
    """A failed cycle left its run 'running' for ever in `shadowjudge status`."""
    from shadowjudge.errors import InputError

    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url)
    engine = get_engine(sqlite_url)
    ingest_and_sample(config_path)
    real_analyse = cycle.analyse

    def analysis_refused(*args, **kwargs):
        raise InputError("the analysis config is wrong")

    monkeypatch.setattr(cycle, "analyse", analysis_refused)
    with pytest.raises(InputError, match="the analysis config is wrong"):
        route_cycle(config_path, "f1")
    run = _run(engine, f"{ROUTE}:f1")
    assert (run.status, run.summary["error"]) == ("failed", "InputError: the analysis config is wrong")
    shown = CliRunner().invoke(app, ["status", "-c", config_path])
    assert shown.exit_code == 0, shown.output
    assert (f"run {run.id} ({ROUTE}:f1) failed: InputError: the analysis config is wrong; its "
            f"{len(run.sample_ids)} samples are evaluated by no later run until it is rerun: shadowjudge run -c "
            f"{config_path} --route {ROUTE} --cycle-id f1") in shown.output

    monkeypatch.setattr(cycle, "analyse", real_analyse)
    route_cycle(config_path, "f1")  # the rerun resumes the same run
    run = _run(engine, f"{ROUTE}:f1")
    assert run.status == "finished" and "error" not in run.summary and run.finished_at is not None
    finished_at = run.finished_at
    route_cycle(config_path, "f1")
    assert _run(engine, f"{ROUTE}:f1").finished_at == finished_at  # a rerun changes no row
