"""Two cycles of one route at once: the second fails at once, naming the cycle that holds the route, instead of opening
a run on the same samples and shadow-testing (paying for) them again; the lease is renewed while a cycle runs, freed
when it ends, and a holder killed on this host does not block the route."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from prefect import flow
from sqlalchemy import select

import flows.stages
from flows.stages import ingest_and_sample, load, shadow_test
from shadowjudge import cycle
from shadowjudge.demo import DEMO_DATA
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Lock, ShadowRun, get_engine, session_scope
from shadowjudge.store.lease import LeaseLock, pid_namespace
from cycle_configs import write_cycle_config

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}
ROUTE = "chat-default"


def _runs(engine) -> dict[str, list[int]]:
    with session_scope(engine) as s:
        return {r.run_key: list(r.sample_ids) for r in s.scalars(select(ShadowRun))}


@flow
def route_cycle(config_path: str, cycle_id: str) -> dict:
    config = load(config_path)
    return flows.stages.run_route_cycle(config, config.route(ROUTE), cycle_id, {}, config_path)


def test_a_cycle_of_a_route_under_evaluation_fails_at_once_and_opens_no_run(tmp_path, store_url, prefect_harness,
                                                                             monkeypatch):
    engine = get_engine(store_url)
    real_shadow, testing, finish = cycle.shadow, threading.Event(), threading.Event()

    def shadow_that_takes_a_while(engine, config, route, handle, progress=False):
        if handle.run_key.endswith(":c1"):  # cycle c1 is still shadow-testing while the others start
            testing.set()
            assert finish.wait(60)
        return real_shadow(engine, config, route, handle, progress=progress)

    monkeypatch.setattr(cycle, "shadow", shadow_that_takes_a_while)
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as replay:
        config_path = write_cycle_config(tmp_path, store_url, replay.base_url)
        ingest_and_sample(config_path)
        first = threading.Thread(target=shadow_test, args=(config_path, ROUTE, "c1"))
        first.start()
        try:
            assert testing.wait(60)
            second = shadow_test(config_path, ROUTE, "c2", return_state=True)  # the shadow-test stage deployment
            cycle_flow = route_cycle(config_path, "c3", return_state=True)  # a cycle (`shadowjudge run`)
        finally:
            finish.set()
            first.join(120)
    assert second.is_failed()  # it did not replay c1's samples beside it
    for state in (second, cycle_flow):
        with pytest.raises(cycle.RouteBeingEvaluated, match=r"route chat-default is being evaluated by \S+:cycle c1 "):
            state.result()
    assert list(_runs(engine)) == ["chat-default:c1"]  # nothing opened beside it, so no sample is replayed twice
    with session_scope(engine) as s:
        assert s.scalar(select(Lock).where(Lock.name == "cycle:chat-default")) is None  # freed when c1 ended


def test_the_lease_is_renewed_while_the_cycle_runs_and_freed_after(sqlite_url):
    engine = get_engine(sqlite_url)
    with cycle.cycle_lease(engine, ROUTE, "r1", ttl_s=0.4) as lease:
        time.sleep(1.2)  # three lease lengths: only renewals keep it
        holder, expires = lease.current_holder()
        assert holder.endswith(":cycle r1") and expires > datetime.now(timezone.utc)
        assert not LeaseLock(engine, "cycle:chat-default").acquire()
    assert lease.current_holder() is None


def test_a_cycle_killed_on_this_host_does_not_hold_the_route(sqlite_url):
    engine = get_engine(sqlite_url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with session_scope(engine) as s:
        s.add(Lock(name="cycle:chat-default", holder=f"{socket.gethostname()}:{dead}:0:{pid_namespace()}:cycle k1",
                   expires_at=datetime(2999, 1, 1, tzinfo=timezone.utc)))
    with cycle.cycle_lease(engine, ROUTE, "k2") as lease:
        assert lease.held


def test_the_evaluation_cycle_flow_does_not_start_a_route_another_cycle_holds(tmp_path, sqlite_url, prefect_harness):
    """`shadowjudge run` and the scheduled evaluation-cycle go through the same per-route sequence."""
    from flows.cycle import RoutesFailed, evaluation_cycle

    engine = get_engine(sqlite_url)
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as replay:
        config_path = write_cycle_config(tmp_path, sqlite_url, replay.base_url)
        with cycle.cycle_lease(engine, ROUTE, "held"):
            with pytest.raises(RoutesFailed, match=r"route chat-default is being evaluated by \S+:cycle held"):
                evaluation_cycle(config_path=config_path, route=ROUTE, cycle_id="c9")
    assert _runs(engine) == {}


def test_a_cycle_that_lost_the_routes_lease_goes_on_renewing_its_runs_driver_lease_until_it_stops(sqlite_url):
    """It works on its run until its current stage ends: no cycle may take that run for interrupted meanwhile."""
    engine = get_engine(sqlite_url)
    with cycle.cycle_lease(engine, ROUTE, "k1", ttl_s=0.2) as lease:  # the driver lease lasts 0.4 s
        lease.drive(ROUTE, f"{ROUTE}:k1", "k1")
        with session_scope(engine) as s:  # another host took the route's lease over (ours went unrenewed)
            s.get(Lock, cycle.cycle_lease_name(ROUTE)).holder = "elsewhere:1:beef:cycle other"
        time.sleep(1.2)  # three driver lease lengths: only renewals by the thread keep it
        assert not lease.held and cycle.run_driver(engine, f"{ROUTE}:k1") == lease.identity
        with pytest.raises(cycle.CycleLeaseLost):
            cycle.ensure_lease(lease)
    assert cycle.run_driver(engine, f"{ROUTE}:k1") is None  # released when it stopped
    assert LeaseLock(engine, cycle.cycle_lease_name(ROUTE)).current_holder()[0] == "elsewhere:1:beef:cycle other"


@pytest.mark.parametrize("store_url", [pytest.param("postgresql", marks=pytest.mark.pg)], indirect=True)
def test_status_judges_a_cycles_lease_by_the_stores_clock_not_this_hosts(tmp_path, store_url, monkeypatch):
    """A host whose clock runs ahead of PostgreSQL's took a live cycle's lease for expired, and showed its run as
    interrupted (a SQLite store is this host's file: its clock is the store's)."""
    from typer.testing import CliRunner

    import shadowjudge.store.lease
    from shadowjudge.cli import app
    from shadowjudge.config import load_config

    config_path = write_cycle_config(tmp_path, store_url, "http://127.0.0.1:9/v1")
    config, engine = load_config(config_path), get_engine(store_url)

    class AheadOfTheStore(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(hours=1)

    with cycle.cycle_lease(engine, ROUTE, "c1"):  # a cycle working on its run
        run = cycle.open_run(engine, config, config.route(ROUTE), "c1", cycle.FULL_CYCLE)
        monkeypatch.setattr(cycle, "datetime", AheadOfTheStore)
        monkeypatch.setattr(shadowjudge.store.lease, "wall_clock", lambda: AheadOfTheStore.now(timezone.utc))
        shown = CliRunner().invoke(app, ["status", "-c", str(config_path)])
        assert shown.exit_code == 0, shown.output
        assert f"run {run.run_id} ({ROUTE}:c1) was interrupted" not in " ".join(shown.output.split())
        assert cycle.cycle_lease_holder(engine, ROUTE).endswith(":cycle c1")
