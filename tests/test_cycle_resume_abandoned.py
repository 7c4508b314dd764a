"""A full cycle killed outright (SIGKILL, OOM, its host lost) never marks its run failed: the run stayed `running`
for ever, and the next cycle opened a new run past its samples, which no cycle then evaluated. A full cycle's run
still `running` while the route's cycle lease is free is interrupted, and the next cycle started without a cycle id
resumes it as it resumes a failed run (same count and limit); a run driven stage by stage is `running` between its
stage flows and is never taken over. The shadow-test stage started without a cycle id resumes such runs too, and
says which cycle id it worked on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

import flows.stages
from flows.stages import analyse, ingest_and_sample, score, shadow_test, update_routes
from shadowjudge import cycle
from shadowjudge.cli import app
from shadowjudge.config import load_config
from shadowjudge.demo import DEMO_DATA
from shadowjudge.routing import RouteBusy
from shadowjudge.routing.step import lock_name
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import (
    Judgment,
    Lock,
    RouteState,
    RouteWeightChange,
    ShadowResult,
    ShadowRun,
    get_engine,
    session_scope,
)
from shadowjudge.store.lease import LeaseLock, pid_namespace
from cycle_configs import cycle_config, save_config, write_cycle_config
from test_cycle_resume_failed import (
    FAST,
    ROUTE,
    _choose,
    _mark,
    _store_with_runs,
    incumbent_requests,
    route_cycle,
    rows,
    runs,
)
from test_reliability_faults import duplicated_keys

REPO = Path(__file__).resolve().parents[1]
SLOW = {"seed": 2, "default": {"ttft_ms": 5, "token_ms": 2.5}}  # about 0.5 s an answer: a kill lands mid-test
SAMPLES = 12


def _status(config_path) -> str:
    shown = CliRunner().invoke(app, ["status", "-c", str(config_path)])
    assert shown.exit_code == 0, shown.output
    return " ".join(shown.output.split())


def _summary(engine, run_id: int) -> dict:
    with session_scope(engine) as s:
        return dict(s.get(ShadowRun, run_id).summary)


def _weight_changes(engine) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(RouteWeightChange)) or 0


def _last_stepped_run(engine) -> int | None:
    with session_scope(engine) as s:
        state = s.get(RouteState, ROUTE)
        return None if state is None else state.last_run_id


def _kill_mid_shadow_test(command: list[str], env: dict[str, str], engine, log: Path) -> int:
    """Run the cycle command and SIGKILL it once some but not all of its answers are stored; the answers then."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                with session_scope(engine) as s:
                    stored = s.scalar(select(func.count()).select_from(ShadowResult)) or 0
                if 6 <= stored < SAMPLES * 3:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return stored
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    raise AssertionError(f"the cycle ended (status {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_full_cycle_killed_outright_is_resumed_by_the_next_cycle_and_its_samples_are_evaluated_once(
        tmp_path, sqlite_url, prefect_harness, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    engine = get_engine(sqlite_url)
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", SLOW) as server:
        data = cycle_config(tmp_path, sqlite_url, server.base_url, max_samples=SAMPLES, drift={"enabled": False})
        data["mlflow"]["enabled"] = False
        for target in [data["routes"][0]["incumbent"], *data["routes"][0]["candidates"]]:
            target["concurrency"] = 3
        config_path = str(save_config(tmp_path, data))
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        _kill_mid_shadow_test([sys.executable, "-m", "shadowjudge.cli", "run", "-c", config_path, "--cycle-id", "k1"],
                              env, engine, tmp_path / "cycle.log")
        [killed] = runs(engine)
        assert (killed.run_key, killed.status, killed.summary["driven_by"]) == (f"{ROUTE}:k1", "running", "cycle")
        assert (f"run {killed.id} ({ROUTE}:k1) was interrupted: the cycle running it stopped without closing or "
                "failing it") in _status(config_path)
        assert (f"--route {ROUTE} --cycle-id k1 (or the route's next cycle started without --cycle-id resumes it: "
                "automatic resume 1 of 2)") in _status(config_path)

        holders: list[str] = []
        real_shadow = cycle.shadow

        def shadow_noting_the_lease_holder(engine, config, route, handle, progress=False):
            holders.append(LeaseLock(engine, cycle.cycle_lease_name(ROUTE)).current_holder()[0])
            return real_shadow(engine, config, route, handle, progress=progress)

        monkeypatch.setattr(cycle, "shadow", shadow_noting_the_lease_holder)
        outcome = route_cycle(config_path, "s1", cycle_id_given=False)  # what the next scheduled cycle runs
        assert (outcome["cycle_id"], outcome["resumed_interrupted_cycle_id"], outcome["started_as_cycle_id"]) == (
            "k1", "k1", "s1")
        assert outcome["note"] == "resumed interrupted cycle k1 (automatic resume 1 of 2) instead of starting cycle s1"
        assert holders[0].endswith(":cycle k1 (resumed by cycle s1)")  # the lease names the run worked on
        [finished] = runs(engine)  # no new run took the samples after it
        assert (finished.id, finished.status, finished.sample_ids) == (killed.id, "finished", killed.sample_ids)
        assert (finished.summary["auto_resumes"], finished.summary["auto_resumed_interrupted_by"]) == (1, ["s1"])
        assert rows(engine, ShadowResult, killed.id) == 3 * SAMPLES and rows(engine, Judgment, killed.id) == 2 * SAMPLES
        assert "was interrupted" not in _status(config_path)

        outcome = route_cycle(config_path, "s2", cycle_id_given=False)  # the next one: its own run, as usual
    assert outcome["cycle_id"] == "s2" and "note" not in outcome
    first, second = runs(engine)
    assert (first.id, second.run_key, second.status) == (killed.id, f"{ROUTE}:s2", "finished")
    assert min(second.sample_ids) > first.summary["max_sample_id"]
    with session_scope(engine) as s:  # each of the killed run's samples judged once per candidate, by one run
        judged = s.scalar(select(func.count()).select_from(Judgment)
                          .where(Judgment.sample_id.in_(killed.sample_ids))) or 0
    assert judged == 2 * SAMPLES and duplicated_keys(engine) == {}


def test_a_full_cycles_run_left_running_is_resumed_as_a_failed_one_is_and_given_up_after_the_limit(
        tmp_path, store_url):
    config, engine = _store_with_runs(tmp_path, store_url)
    route = config.route(ROUTE)
    run = cycle.open_run(engine, config, route, "c1", cycle.FULL_CYCLE)  # its cycle killed before closing it
    choice = _choose(engine, config, "s1")
    assert (choice.cycle_id, choice.started_as, choice.resume_attempt, choice.left_as) == ("c1", "s1", 1,
                                                                                           "interrupted")
    assert choice.outcome() == {"cycle_id": "c1", "resumed_interrupted_cycle_id": "c1", "started_as_cycle_id": "s1",
                                "resume_attempt": 1, "resume_limit": 2, "note": choice.note}
    assert choice.lease_label == "cycle c1 (resumed by cycle s1)"
    assert _choose(engine, config, "s1") == choice  # a retried slot goes on with it, counting no new resume
    assert _choose(engine, config, "s1", given=True).cycle_id == "s1"  # a given cycle id is never redirected
    assert _choose(engine, config, "c1") == cycle.CycleRunChoice("c1", "c1")  # its own slot: open_run resumes it

    cycle.open_run(engine, config, route, "c1", cycle.FULL_CYCLE)  # s1 takes it up, and fails: one count for both
    cycle.fail_run(engine, run.run_id, RuntimeError("judge away"))
    second = _choose(engine, config, "s2")
    assert (second.cycle_id, second.resume_attempt, second.left_as) == ("c1", 2, "failed")
    cycle.open_run(engine, config, route, "c1", cycle.FULL_CYCLE)  # s2 takes it up, and is killed
    given_up = _choose(engine, config, "s3")
    assert (given_up.cycle_id, given_up.given_up_cycle_id, given_up.resumed) == ("s3", "c1", False)
    assert given_up.note.startswith("gave up on interrupted cycle c1, its automatic resumes used up "
                                    "(orchestration.resume_failed_runs: 2), and started cycle s3")
    summary = _summary(engine, run.run_id)
    assert (summary["auto_resumes"], summary["auto_resumed_by"], summary["auto_resumed_interrupted_by"]) == (
        2, ["s1", "s2"], ["s1"])
    assert summary["auto_resume_given_up"] == {"by_cycle": "s3", "after_resumes": 2}
    own = cycle.open_run(engine, config, route, "s3", cycle.FULL_CYCLE)  # s3 opens its own run and finishes it
    _mark(engine, own.run_id, "finished")
    assert _choose(engine, config, "s4") == cycle.CycleRunChoice("s4", "s4")  # c1 is not the newest any more


def test_a_run_driven_stage_by_stage_or_stored_before_drivers_were_recorded_is_not_taken_over(tmp_path, store_url):
    config, engine = _store_with_runs(tmp_path, store_url)
    route = config.route(ROUTE)
    staged = cycle.open_run(engine, config, route, "t1", cycle.STAGE_FLOWS)  # the shadow-test stage opened it
    assert _choose(engine, config, "s1") == cycle.CycleRunChoice("s1", "s1")
    _mark(engine, staged.run_id, "finished")
    legacy = cycle.open_run(engine, config, route, "old")  # no driver recorded: left alone as before
    assert "driven_by" not in _summary(engine, legacy.run_id)
    assert _choose(engine, config, "s2") == cycle.CycleRunChoice("s2", "s2")
    _mark(engine, legacy.run_id, "finished")
    full = cycle.open_run(engine, config, route, "k1", cycle.FULL_CYCLE)
    cycle.find_run(engine, full.run_key, cycle.STAGE_FLOWS)  # a stage flow took it up (score --cycle-id k1)
    assert _choose(engine, config, "s3") == cycle.CycleRunChoice("s3", "s3")
    assert _summary(engine, full.run_id)["driven_by"] == "stages"
    _mark(engine, full.run_id, "finished")
    cycle.find_run(engine, full.run_key, cycle.FULL_CYCLE)  # a finished run is not marked again
    assert _summary(engine, full.run_id)["driven_by"] == "stages"


def test_status_shows_an_interrupted_run_only_while_no_cycle_holds_the_route(tmp_path, store_url):
    config, engine = _store_with_runs(tmp_path, store_url)
    [config_path] = tmp_path.glob("shadowjudge-*.yaml")
    route = config.route(ROUTE)
    staged = cycle.open_run(engine, config, route, "t1", cycle.STAGE_FLOWS)
    assert "interrupted" not in _status(config_path)  # between two of its stage flows
    _mark(engine, staged.run_id, "finished")
    run = cycle.open_run(engine, config, route, "c1", cycle.FULL_CYCLE)
    with cycle.cycle_lease(engine, ROUTE, "c1"):  # its cycle still running
        assert "interrupted" not in _status(config_path)
    said = _status(config_path)
    assert "│ interrupted │" in said  # the status column of the table
    assert (f"run {run.run_id} ({ROUTE}:c1) was interrupted: the cycle running it stopped without closing or failing "
            f"it (killed, its host lost, stalled past its lease, or its route step found the weights busy), and no "
            f"cycle works on it now; "
            f"its {len(run.sample_ids)} samples are evaluated by no later run until it is rerun: shadowjudge run -c "
            f"{config_path} --route {ROUTE} --cycle-id c1 (or the route's next cycle started without --cycle-id "
            "resumes it: automatic resume 1 of 2)") in said
    _choose(engine, config, "s1")
    _choose(engine, config, "s2")
    assert "(its 2 automatic resume(s) are used up: the next cycle started without --cycle-id gives it up)" in \
        _status(config_path)


def test_the_lease_is_relabelled_with_the_run_worked_on_and_stays_renewed(sqlite_url):
    engine = get_engine(sqlite_url)
    with cycle.cycle_lease(engine, ROUTE, "s1", ttl_s=0.04) as lease:  # renewed every 10 ms by its thread
        for k in range(30):  # each rename races the renewer: a renewal by the old name would lose the lease
            lease.relabel(f"cycle c{k} (resumed by cycle s1)")
            cycle.ensure_lease(lease)
        assert lease.current_holder()[0] == lease.holder and lease.holder.endswith(":cycle c29 (resumed by cycle s1)")
        with pytest.raises(cycle.RouteBeingEvaluated, match=r"being evaluated by \S+:cycle c29 \(resumed by cycle "
                                                            r"s1\) \(lease until"):
            with cycle.cycle_lease(engine, ROUTE, "s2"):
                pass
    assert lease.current_holder() is None  # released under its new name
    with cycle.cycle_lease(engine, ROUTE, "s3") as lease:
        with session_scope(engine) as s:  # another host took the lease over (ours went unrenewed)
            s.get(Lock, cycle.cycle_lease_name(ROUTE)).holder = "elsewhere:1:beef:cycle other"
        with pytest.raises(cycle.CycleLeaseLost, match="to elsewhere:1:beef:cycle other"):
            lease.relabel("cycle c1 (resumed by cycle s3)")
        assert lease.current_holder()[0] == "elsewhere:1:beef:cycle other"  # not renamed over the new holder


def test_one_function_gives_a_runs_cycle_id():
    assert cycle.cycle_id_of(ROUTE, f"{ROUTE}:20260101T1030Z") == "20260101T1030Z"
    assert cycle.cycle_id_of(ROUTE, cycle.cycle_run_key(ROUTE, "a:b")) == "a:b"


# --- through the flows ---

@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


def test_a_cycle_stopped_on_a_busy_route_step_is_resumed_and_steps_the_route_once(
        tmp_path, sqlite_url, replay_server, prefect_harness, monkeypatch):
    """RouteBusy leaves the run open for a rerun of its route step; the next cycle without a cycle id is that rerun
    (rather than stranding it behind a new run whose verdicts would be applied instead)."""
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url, max_samples=12)
    engine = get_engine(sqlite_url)
    ingest_and_sample(config_path)
    monkeypatch.setattr(flows.stages, "route_task", flows.stages.route_task.with_options(retry_delay_seconds=0))
    other_writer = LeaseLock(engine, lock_name(ROUTE), holder="elsewhere:1:beef")
    assert other_writer.acquire()
    try:
        with pytest.raises(RouteBusy):
            route_cycle(config_path, "c1", cycle_id_given=True)
    finally:
        other_writer.release()
    [left_open] = runs(engine)
    assert (left_open.status, _last_stepped_run(engine)) == ("running", None)
    assert f"run {left_open.id} ({ROUTE}:c1) was interrupted" in _status(config_path)

    outcome = route_cycle(config_path, "s1", cycle_id_given=False)
    assert outcome["resumed_interrupted_cycle_id"] == "c1" and outcome["step_status"] != "busy"
    [closed] = runs(engine)
    assert (closed.id, closed.status, _last_stepped_run(engine)) == (left_open.id, "finished", left_open.id)
    changes = _weight_changes(engine)
    again = update_routes(config_path, ROUTE, "c1")  # the rerun the RouteBusy message named, come too late
    assert again["weights_after"] == outcome["weights_after"] and _weight_changes(engine) == changes


def test_the_shadow_test_stage_without_a_cycle_id_resumes_a_failed_or_interrupted_run_and_names_it(
        tmp_path, sqlite_url, replay_server, prefect_harness, monkeypatch):
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url, max_samples=12)
    engine = get_engine(sqlite_url)
    ingest_and_sample(config_path)
    slots = iter(["slot1", "slot2"])  # the scheduled minutes of two runs of the deployment (one minute is one slot)
    monkeypatch.setattr(flows.stages, "current_cycle_id", lambda cycle_id: cycle_id or next(slots))
    first = shadow_test(config_path, ROUTE, "c1")
    cycle.fail_run(engine, first["run_id"], RuntimeError("judge away"))  # as a full cycle of c1 failing would

    resumed = shadow_test(config_path, ROUTE)  # a scheduled shadow-test
    assert (resumed["cycle_id"], resumed["run_key"], resumed["resumed_failed_cycle_id"]) == ("c1", f"{ROUTE}:c1", "c1")
    assert resumed["note"] == "resumed failed cycle c1 (automatic resume 1 of 2) instead of starting cycle slot1"
    assert (resumed["replayed"], len(runs(engine))) == (0, 1)  # its stored answers reused, no run opened beside it
    assert score(config_path, ROUTE, resumed["cycle_id"])["judged"] == 24  # the later stages take the cycle id given
    analyse(config_path, ROUTE, resumed["cycle_id"])
    assert runs(engine)[0].status == "running"  # between stages: a full cycle meanwhile does not take it over
    assert route_cycle(config_path, "s1", cycle_id_given=False)["cycle_id"] == "s1"
    update_routes(config_path, ROUTE, "c1")
    c1, s1 = runs(engine)
    assert (c1.status, c1.summary["driven_by"], s1.status) == ("finished", "stages", "finished")

    config = load_config(config_path)
    killed = cycle.open_run(engine, config, config.route(ROUTE), "k1", cycle.FULL_CYCLE)  # its cycle then killed
    taken_up = shadow_test(config_path, ROUTE)
    assert (taken_up["cycle_id"], taken_up["resumed_interrupted_cycle_id"]) == ("k1", "k1")
    assert taken_up["run_id"] == killed.run_id and len(runs(engine)) == 3
    assert _summary(engine, killed.run_id)["driven_by"] == "stages"  # now driven stage by stage: left to them
    assert route_cycle(config_path, "s2", cycle_id_given=False)["cycle_id"] == "s2"
    assert duplicated_keys(engine) == {}



# --- a cycle whose route lease ran out while it lives on ---

def _lapse(engine, lease_name: str) -> None:
    """The lease ran out unrenewed: as after its whole length with the process stalled or the store out of reach."""
    with session_scope(engine) as s:
        s.get(Lock, lease_name).expires_at = datetime(2000, 1, 1, tzinfo=timezone.utc)


def test_a_live_cycle_whose_route_lease_ran_out_keeps_its_run_and_the_next_cycle_does_not_start_beside_it(
        tmp_path, sqlite_url, prefect_harness, monkeypatch):
    """Its lease expired unrenewed while its process lived on, busy with its shadow test (it checks the lease only
    between stages): the next scheduled cycle took the lease over, found its run `running` and resumed it as
    interrupted, so both replayed (and paid for) the same samples. It now fails, naming the live cycle; the live
    cycle stops before its next stage, and the cycle after resumes the run, replaying nothing again."""
    engine = get_engine(sqlite_url)
    real_shadow = cycle.shadow
    stalled, go_on = threading.Event(), threading.Event()

    def shadow_stalled_past_its_lease(engine, config, route, handle, progress=False):
        if handle.run_key.endswith(":k1") and not stalled.is_set():
            _lapse(engine, cycle.cycle_lease_name(ROUTE))
            stalled.set()
            assert go_on.wait(120)
        return real_shadow(engine, config, route, handle, progress=progress)

    monkeypatch.setattr(cycle, "shadow", shadow_stalled_past_its_lease)
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        config_path = write_cycle_config(tmp_path, sqlite_url, server.base_url, max_samples=SAMPLES)
        ingest_and_sample(config_path)
        first: list = []
        live = threading.Thread(target=lambda: first.append(route_cycle(config_path, "k1", cycle_id_given=True,
                                                                        return_state=True)))
        live.start()
        try:
            assert stalled.wait(120)
            [run] = runs(engine)
            with pytest.raises(cycle.RouteBeingEvaluated,
                               match=rf"route {ROUTE}: run {ROUTE}:k1 is still being worked on by \S+ \(its lease on "
                                     r"the run until [^)]+\), a cycle that lost the route's lease but has not stopped: "
                                     r"not starting cycle s1 beside it"):
                route_cycle(config_path, "s1", cycle_id_given=False)  # the next scheduled cycle
            assert "auto_resumes" not in _summary(engine, run.id) and len(runs(engine)) == 1
            assert "interrupted" not in _status(config_path)  # no cycle holds the route, but it still drives the run
        finally:
            go_on.set()
            live.join(120)
        with pytest.raises(cycle.CycleLeaseLost):  # it finished its shadow test, then stopped
            first[0].result()
        [left] = runs(engine)
        assert (left.status, rows(engine, ShadowResult, run.id)) == ("running", 3 * SAMPLES)
        assert f"run {run.id} ({ROUTE}:k1) was interrupted" in _status(config_path)

        outcome = route_cycle(config_path, "s2", cycle_id_given=False)  # it has stopped: its run is resumed
        assert outcome["resumed_interrupted_cycle_id"] == "k1"
        assert incumbent_requests(server) == SAMPLES  # each sample replayed once, by the live cycle
    [finished] = runs(engine)
    assert (finished.id, finished.status, rows(engine, ShadowResult, run.id)) == (run.id, "finished", 3 * SAMPLES)
    assert duplicated_keys(engine) == {}


def test_a_run_whose_cycle_gave_no_sign_of_life_for_its_driver_lease_is_resumed(tmp_path, store_url):
    """A cycle not dead on this host (another host's, or stalled) whose run's driver lease, two route leases long,
    ran out unrenewed is taken for gone; a cycle that comes back to life then finds its run taken."""
    config, engine = _store_with_runs(tmp_path, store_url)
    [config_path] = tmp_path.glob("shadowjudge-*.yaml")
    with cycle.cycle_lease(engine, ROUTE, "k1") as stalled:  # this process: alive on this host
        stalled.drive(ROUTE, f"{ROUTE}:k1", "k1")
        run = cycle.open_run(engine, config, config.route(ROUTE), "k1", cycle.FULL_CYCLE)
        _lapse(engine, cycle.cycle_lease_name(ROUTE))
        with pytest.raises(cycle.RouteBeingEvaluated, match=rf"run {ROUTE}:k1 is still being worked on by "
                                                            rf"{stalled.identity} "):
            _choose(engine, config, "s1")
        assert "interrupted" not in _status(config_path)
        _lapse(engine, cycle.run_driver_lease_name(run.run_key))  # silent for its driver lease too
        assert f"run {run.run_id} ({ROUTE}:k1) was interrupted" in _status(config_path)
        choice = _choose(engine, config, "s2")
        assert (choice.cycle_id, choice.resume_attempt, choice.left_as) == ("k1", 1, "interrupted")
        assert not stalled.renew() and not stalled.driving  # come back, it finds the run taken from it
    assert _summary(engine, run.run_id)["auto_resumed_interrupted_by"] == ["s2"]


def test_a_run_whose_cycle_was_killed_on_this_host_is_resumed_at_once(tmp_path, store_url):
    config, engine = _store_with_runs(tmp_path, store_url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    run = cycle.open_run(engine, config, config.route(ROUTE), "k1", cycle.FULL_CYCLE)
    with session_scope(engine) as s:  # its driver lease still runs for hours, but its process is gone
        s.add(Lock(name=cycle.run_driver_lease_name(run.run_key), expires_at=datetime(2999, 1, 1, tzinfo=timezone.utc),
                   holder=f"{socket.gethostname()}:{dead}:0:{pid_namespace()}"))
    assert _choose(engine, config, "s1").left_as == "interrupted"
    assert LeaseLock(engine, cycle.run_driver_lease_name(run.run_key)).current_holder() is None  # cleared


def test_a_cycle_given_the_cycle_id_of_a_run_a_live_cycle_still_works_on_does_not_start(tmp_path, store_url):
    config, engine = _store_with_runs(tmp_path, store_url)
    with cycle.cycle_lease(engine, ROUTE, "k1") as live:
        live.drive(ROUTE, f"{ROUTE}:k1", "k1")
        _lapse(engine, cycle.cycle_lease_name(ROUTE))
        with cycle.cycle_lease(engine, ROUTE, "k1") as rerun:  # `shadowjudge run --cycle-id k1`
            with pytest.raises(cycle.RouteBeingEvaluated, match=r"not starting cycle k1 beside it"):
                rerun.drive(ROUTE, f"{ROUTE}:k1", "k1")
    with cycle.cycle_lease(engine, ROUTE, "k1") as rerun:  # the live one stopped: its driver lease released
        rerun.drive(ROUTE, f"{ROUTE}:k1", "k1")
        assert cycle.run_driver(engine, f"{ROUTE}:k1") == rerun.identity
    assert cycle.run_driver(engine, f"{ROUTE}:k1") is None


def test_a_stage_flow_does_not_take_over_a_run_a_live_full_cycle_still_drives(tmp_path, store_url):
    """A stage flow given the cycle id of a run whose full cycle lost the route's lease mid-stage, but lives on, took
    the run: it replayed the samples beside the live cycle, and relabelled the run `stages`, so once that cycle
    stopped no cycle ever resumed it."""
    config, engine = _store_with_runs(tmp_path, store_url)
    route = config.route(ROUTE)
    handle = cycle.open_run(engine, config, route, "d1", cycle.FULL_CYCLE)
    with cycle.cycle_lease(engine, ROUTE, "d1") as live:
        live.drive(ROUTE, handle.run_key, "d1")
        _lapse(engine, cycle.cycle_lease_name(ROUTE))
        with pytest.raises(cycle.RouteBeingEvaluated, match="not starting this stage flow beside it"):
            cycle.open_run(engine, config, route, "d1", cycle.STAGE_FLOWS)  # the shadow-test stage
        with pytest.raises(cycle.RouteBeingEvaluated, match="not starting this stage flow beside it"):
            cycle.find_run(engine, handle.run_key, cycle.STAGE_FLOWS)  # score, analyse, update-routes
        assert runs(engine)[-1].summary["driven_by"] == cycle.FULL_CYCLE
    # that cycle stopped (its lease on the run released): a person may finish the run stage by stage
    assert cycle.find_run(engine, handle.run_key, cycle.STAGE_FLOWS).run_id == handle.run_id
    assert runs(engine)[-1].summary["driven_by"] == cycle.STAGE_FLOWS
