"""A cycle started without a cycle id (scheduled, `shadowjudge run` without --cycle-id) finishes the route's newest
run when that run failed, instead of opening a new run past its samples, which then no cycle ever evaluated.

The failure is real: the cycle's judge (an LLM judge on the replay server) is out of reach, so scoring fails after
the shadow test stored every answer; the judge comes back (a replay server started on its port) and the next cycle
resumes the failed run, paying for no answer again.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prefect import flow
from sqlalchemy import func, select
from typer.testing import CliRunner

import flows.stages
from flows.cycle import RoutesFailed, evaluation_cycle
from flows.stages import load
from shadowjudge import cycle
from shadowjudge.cli import app
from shadowjudge.config import load_config
from shadowjudge.demo import DEMO_DATA
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, get_engine, session_scope
from shadowjudge.store.lease import LeaseLock
from shadowjudge.store.models import utcnow
from cycle_configs import cycle_config, save_config
from test_reliability_faults import closed_port, duplicated_keys

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}
ROUTE = "chat-default"
INCUMBENT_MODEL = "claude-instant-1.2"


@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


def judge_back_on(port: int) -> ReplayServer:
    """The LLM judge's provider answering again, on the port the config names."""
    return ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST, port=port)


def write_config(tmp_path, store_url: str, base_url: str, judge_port: int, *, mlflow: bool = False,
                 **sections) -> str:
    """The demo route on the replay server, judged by an LLM judge at `judge_port` (a recorded model answers)."""
    data = cycle_config(tmp_path, store_url, base_url, max_samples=12, drift={"enabled": False}, **sections)
    data["judge"] = {"evaluator": "llm-judge", "teacher": {
        "name": "judge", "model": "Yi-34B-Chat", "base_url": f"http://127.0.0.1:{judge_port}/v1", "concurrency": 8}}
    data["mlflow"]["enabled"] = mlflow
    return str(save_config(tmp_path, data))


@flow
def route_cycle(config_path: str, cycle_id: str, cycle_id_given: bool) -> dict:
    """One route's cycle as evaluation_cycle runs it, with the cycle id a schedule would have chosen."""
    config = load(config_path)
    return flows.stages.run_route_cycle(config, config.route(ROUTE), cycle_id, {}, config_path,
                                        cycle_id_given=cycle_id_given)


def runs(engine) -> list[ShadowRun]:
    with session_scope(engine) as s:
        found = s.scalars(select(ShadowRun).order_by(ShadowRun.id)).all()
        s.expunge_all()
    return list(found)


def rows(engine, model, run_id: int) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(model).where(model.run_id == run_id)) or 0


def incumbent_requests(server: ReplayServer) -> int:
    """Shadow requests the incumbent's provider has served (golden cases go to the candidates only)."""
    return server.stats()["models"].get(INCUMBENT_MODEL, {}).get("requests", 0)


def test_the_next_cycle_without_a_cycle_id_finishes_the_failed_run_and_the_one_after_opens_a_new_run(
        tmp_path, store_url, replay_server, prefect_harness):
    judge_port = closed_port()
    config_path = write_config(tmp_path, store_url, replay_server.base_url, judge_port, mlflow=True)
    engine = get_engine(store_url)

    with pytest.raises(RoutesFailed, match=r"route chat-default: judge model 'Yi-34B-Chat' failed"):
        evaluation_cycle(config_path=config_path, cycle_id="c1")
    [failed] = runs(engine)
    assert (failed.run_key, failed.status) == (f"{ROUTE}:c1", "failed")
    answers = rows(engine, ShadowResult, failed.id)
    assert answers == 12 * 3 and rows(engine, Judgment, failed.id) == 0
    shown = CliRunner().invoke(app, ["status", "-c", config_path])
    assert shown.exit_code == 0, shown.output
    assert (f"--route {ROUTE} --cycle-id c1 (or the route's next cycle started without --cycle-id resumes it: "
            "automatic resume 1 of 2)") in " ".join(shown.output.split())
    replayed = incumbent_requests(replay_server)

    with judge_back_on(judge_port):
        resumed = CliRunner().invoke(app, ["run", "-c", config_path])  # no --cycle-id: what a schedule runs
    assert resumed.exit_code == 0, resumed.output
    assert "resumed failed cycle c1 (automatic resume 1 of 2) instead of starting cycle " in resumed.output
    [finished] = runs(engine)  # the failed run, finished: no new run took newer samples beside it
    assert (finished.id, finished.status, finished.decision is not None) == (failed.id, "finished", True)
    assert finished.sample_ids == failed.sample_ids and "error" not in finished.summary
    assert finished.summary["auto_resumes"] == 1 and len(finished.summary["auto_resumed_by"]) == 1
    assert rows(engine, ShadowResult, failed.id) == answers  # stored answers reused, none paid for again
    assert incumbent_requests(replay_server) == replayed
    assert rows(engine, Judgment, failed.id) > 0 and duplicated_keys(engine) == {}

    with judge_back_on(judge_port):
        # the same slot again (a retried flow run is the same cycle): it goes on with c1, now finished
        slot = resumed.output.split("instead of starting cycle ")[1].split()[0]
        same_slot = route_cycle(config_path, slot, cycle_id_given=False)
        assert (same_slot["cycle_id"], same_slot["resumed_failed_cycle_id"]) == ("c1", "c1")
        assert len(runs(engine)) == 1
        outcome = route_cycle(config_path, "next-slot", cycle_id_given=False)  # the next one: a new run, as usual
    assert "resumed_failed_cycle_id" not in outcome and "note" not in outcome
    first, second = runs(engine)
    assert (first.id, second.run_key) == (failed.id, f"{ROUTE}:next-slot") and second.status == "finished"
    assert min(second.sample_ids) > first.summary["max_sample_id"]  # the samples after the resumed run's
    assert first.summary["auto_resumes"] == 1 and duplicated_keys(engine) == {}


def test_a_failed_run_is_resumed_at_most_resume_failed_runs_times_then_given_up(
        tmp_path, sqlite_url, replay_server, prefect_harness, capfd):
    judge_port = closed_port()
    config_path = write_config(tmp_path, sqlite_url, replay_server.base_url, judge_port,
                               orchestration={"resume_failed_runs": 1})
    engine = get_engine(sqlite_url)
    flows.stages.ingest_and_sample(config_path)
    with pytest.raises(Exception, match="judge model 'Yi-34B-Chat' failed"):
        route_cycle(config_path, "c1", cycle_id_given=True)
    with pytest.raises(Exception, match="judge model 'Yi-34B-Chat' failed"):
        route_cycle(config_path, "s1", cycle_id_given=False)  # resumes c1, whose judge is still away
    [c1] = runs(engine)
    assert (c1.run_key, c1.status, c1.summary["auto_resumes"], c1.summary["auto_resumed_by"]) == (
        f"{ROUTE}:c1", "failed", 1, ["s1"])
    assert "resumed failed cycle c1 (automatic resume 1 of 1) instead of starting cycle s1" in capfd.readouterr().err
    shown = " ".join(CliRunner().invoke(app, ["status", "-c", config_path]).output.split())
    assert (f"--route {ROUTE} --cycle-id c1 (its 1 automatic resume(s) are used up: the next cycle started without "
            "--cycle-id gives it up)") in shown

    with judge_back_on(judge_port):
        outcome = route_cycle(config_path, "s2", cycle_id_given=False)
    assert outcome["cycle_id"] == "s2" and outcome["gave_up_cycle_id"] == "c1"
    assert outcome["note"].startswith("gave up on failed cycle c1, its automatic resumes used up "
                                      "(orchestration.resume_failed_runs: 1), and started cycle s2")
    assert "route chat-default: gave up on failed cycle c1" in capfd.readouterr().err  # the cycle's warning
    c1, s2 = runs(engine)
    assert (c1.status, c1.summary["auto_resumes"], c1.summary["auto_resume_given_up"]) == (
        "failed", 1, {"by_cycle": "s2", "after_resumes": 1})
    assert (s2.run_key, s2.status) == (f"{ROUTE}:s2", "finished")
    assert min(s2.sample_ids) > c1.summary["max_sample_id"] and duplicated_keys(engine) == {}

    shown = CliRunner().invoke(app, ["status", "-c", config_path])
    said = " ".join(shown.output.split())
    assert (f"--route {ROUTE} --cycle-id c1 (automatic resumes given up after 1: cycle s2 started a new run "
            "instead)") in said
    with judge_back_on(judge_port):
        route_cycle(config_path, "s3", cycle_id_given=False)  # s2 finished: a new run, c1 is not looked at again
    assert [r.run_key for r in runs(engine)] == [f"{ROUTE}:c1", f"{ROUTE}:s2", f"{ROUTE}:s3"]
    assert runs(engine)[0].summary["auto_resume_given_up"] == {"by_cycle": "s2", "after_resumes": 1}


def test_a_given_cycle_id_is_never_redirected_to_the_failed_run(tmp_path, sqlite_url, replay_server,
                                                                prefect_harness):
    judge_port = closed_port()
    config_path = write_config(tmp_path, sqlite_url, replay_server.base_url, judge_port)
    engine = get_engine(sqlite_url)
    with pytest.raises(RoutesFailed, match="judge model 'Yi-34B-Chat' failed"):
        evaluation_cycle(config_path=config_path, cycle_id="c1")
    with judge_back_on(judge_port):
        outcome = evaluation_cycle(config_path=config_path, cycle_id="c2")["routes"][ROUTE]
    assert outcome["cycle_id"] == "c2" and "resumed_failed_cycle_id" not in outcome
    c1, c2 = runs(engine)
    assert (c1.status, c2.run_key, c2.status) == ("failed", f"{ROUTE}:c2", "finished")
    assert "auto_resumes" not in c1.summary and min(c2.sample_ids) > c1.summary["max_sample_id"]
    shown = " ".join(CliRunner().invoke(app, ["status", "-c", config_path]).output.split())
    assert f"--route {ROUTE} --cycle-id c1" in shown and "automatic resume" not in shown  # c2 is newer


# --- the decision itself, on the real store ---

def _store_with_runs(tmp_path, store_url: str, **sections):
    config = load_config(save_config(tmp_path, cycle_config(tmp_path, store_url, "http://127.0.0.1:9/v1",
                                                            **sections)))
    engine = get_engine(store_url)
    with session_scope(engine) as s:
        s.add_all([TrafficSample(request_id=f"r{k}", source="s", source_position=str(k), route=ROUTE,
                                 incumbent_model=INCUMBENT_MODEL, messages=[], request_ts=utcnow())
                   for k in range(4)])
    return config, engine


def _mark(engine, run_id: int, status: str) -> None:
    with session_scope(engine) as s:
        s.get(ShadowRun, run_id).status = status


def _choose(engine, config, cycle_id: str, *, given: bool = False) -> cycle.CycleRunChoice:
    with cycle.cycle_lease(engine, ROUTE, cycle_id) as lease:
        return cycle.choose_cycle_run(engine, config, config.route(ROUTE), cycle_id, lease, cycle_id_given=given)


def test_only_a_failed_newest_run_is_resumed_and_only_by_a_cycle_without_a_cycle_id(tmp_path, store_url):
    config, engine = _store_with_runs(tmp_path, store_url)
    route = config.route(ROUTE)
    assert _choose(engine, config, "s0") == cycle.CycleRunChoice("s0", "s0")  # no run yet
    run = cycle.open_run(engine, config, route, "c1")
    assert _choose(engine, config, "s1").cycle_id == "s1"  # running: a stage-by-stage cycle keeps it open
    _mark(engine, run.run_id, "finished")
    assert _choose(engine, config, "s1").cycle_id == "s1"
    _mark(engine, run.run_id, "failed")
    assert _choose(engine, config, "s1", given=True).cycle_id == "s1"  # a given cycle id is never redirected
    assert _choose(engine, config, "c1") == cycle.CycleRunChoice("c1", "c1")  # its own slot retried: no count
    choice = _choose(engine, config, "s1")
    assert (choice.cycle_id, choice.started_as, choice.resume_attempt, choice.resume_limit) == ("c1", "s1", 1, 2)
    assert choice.outcome() == {"cycle_id": "c1", "resumed_failed_cycle_id": "c1", "started_as_cycle_id": "s1",
                                "resume_attempt": 1, "resume_limit": 2, "note": choice.note}
    assert _choose(engine, config, "s2").resume_attempt == 2
    given_up = _choose(engine, config, "s3")
    assert (given_up.cycle_id, given_up.given_up_cycle_id, given_up.resumed) == ("s3", "c1", False)
    with session_scope(engine) as s:
        summary = s.get(ShadowRun, run.run_id).summary
    assert (summary["auto_resumes"], summary["auto_resumed_by"], summary["auto_resume_given_up"]) == (
        2, ["s1", "s2"], {"by_cycle": "s3", "after_resumes": 2})


def test_a_retried_slot_goes_on_with_the_run_it_resumed_counting_no_new_resume(tmp_path, store_url):
    """Prefect's retry of a flow run reruns the same slot: it found the failed run finished (by itself) and opened a
    run of its own on fresh samples, stepping the route a second time for one slot."""
    config, engine = _store_with_runs(tmp_path, store_url)
    run = cycle.open_run(engine, config, config.route(ROUTE), "c1")
    _mark(engine, run.run_id, "failed")
    assert _choose(engine, config, "s1").cycle_id == "c1"
    for status in ("failed", "finished"):  # the resume failed again, or it went through before the retry
        _mark(engine, run.run_id, status)
        again = _choose(engine, config, "s1")
        assert (again.cycle_id, again.started_as, again.resume_attempt) == ("c1", "s1", 1)
    with session_scope(engine) as s:
        summary = s.get(ShadowRun, run.run_id).summary
    assert (summary["auto_resumes"], summary["auto_resumed_by"]) == (1, ["s1"])
    assert _choose(engine, config, "s2") == cycle.CycleRunChoice("s2", "s2")  # c1 finished: the next slot's own run


def test_a_failed_run_taken_up_again_is_running_with_its_error_kept_as_the_last_one(tmp_path, store_url):
    """A resumed run stayed `failed` with its old error while it ran: `status` told a person to rerun a cycle that
    was running, and a route step found busy meanwhile left it looking failed for the old reason."""
    config, engine = _store_with_runs(tmp_path, store_url)
    run = cycle.open_run(engine, config, config.route(ROUTE), "c1")
    cycle.fail_run(engine, run.run_id, RuntimeError("judge away"))
    again = cycle.open_run(engine, config, config.route(ROUTE), "c1")
    assert (again.run_id, again.resumed) == (run.run_id, True)
    with session_scope(engine) as s:
        taken_up = s.get(ShadowRun, run.run_id)
        assert taken_up.status == "running" and "error" not in taken_up.summary
        assert taken_up.summary["last_error"] == "RuntimeError: judge away"

def test_resume_failed_runs_0_turns_it_off(tmp_path, sqlite_url):
    config, engine = _store_with_runs(tmp_path, sqlite_url, orchestration={"resume_failed_runs": 0})
    run = cycle.open_run(engine, config, config.route(ROUTE), "c1")
    _mark(engine, run.run_id, "failed")
    assert _choose(engine, config, "s1") == cycle.CycleRunChoice("s1", "s1")
    with session_scope(engine) as s:
        assert "auto_resumes" not in s.get(ShadowRun, run.run_id).summary


def test_a_cycle_whose_lease_was_taken_over_decides_nothing(tmp_path, store_url):
    """The count is written only while the deciding cycle still holds the route's lease: two cycles never both
    resume one failed run."""
    config, engine = _store_with_runs(tmp_path, store_url)
    run = cycle.open_run(engine, config, config.route(ROUTE), "c1")
    _mark(engine, run.run_id, "failed")
    ours = LeaseLock(engine, f"cycle:{ROUTE}", ttl_s=60)
    assert ours.acquire()
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    theirs = LeaseLock(engine, f"cycle:{ROUTE}", ttl_s=60, clock=lambda: later)
    assert theirs.acquire()  # ours expired unrenewed (a stalled process): another cycle took the route over
    with pytest.raises(cycle.CycleLeaseLost, match="lost the lease 'cycle:chat-default'"):
        cycle.choose_cycle_run(engine, config, config.route(ROUTE), "s1", ours, cycle_id_given=False)
    with session_scope(engine) as s:
        assert "auto_resumes" not in s.get(ShadowRun, run.run_id).summary
    choice = cycle.choose_cycle_run(engine, config, config.route(ROUTE), "s2", theirs, cycle_id_given=False)
    assert (choice.cycle_id, choice.resume_attempt) == ("c1", 1)
