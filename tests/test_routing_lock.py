"""The lease lock on a real store, SQLite and PostgreSQL: one winner among concurrent writers, expiry takeover."""

import socket
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest

from shadowjudge.store import get_engine, lease as lease_module
from shadowjudge.store.lease import LeaseLock, pid_namespace

ON_POSTGRESQL = pytest.mark.parametrize("store_url", [pytest.param("postgresql", marks=pytest.mark.pg)],
                                        indirect=True)


def test_exactly_one_of_many_concurrent_writers_gets_the_lock(store_url):
    engine = get_engine(store_url)
    barrier = threading.Barrier(6)
    won: list[str] = []
    errors: list[BaseException] = []

    def contend(i: int) -> None:
        lock = LeaseLock(engine, "route:chat", holder=f"writer-{i}")
        try:
            barrier.wait()
            if lock.acquire():
                won.append(lock.holder)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(won) == 1
    holder = LeaseLock(engine, "route:chat").current_holder()
    assert holder is not None and holder[0] == won[0]


def test_a_lease_is_released_by_its_holder_only_and_expired_leases_are_taken_over(store_url):
    engine = get_engine(store_url)
    first = LeaseLock(engine, "route:chat", holder="first", ttl_s=60)
    assert first.acquire()
    second = LeaseLock(engine, "route:chat", holder="second", ttl_s=60)
    assert not second.acquire()
    second.release()  # not held: releasing is a no-op and must not free the first writer's lease
    assert not LeaseLock(engine, "route:chat", holder="third").acquire()

    later = datetime.now(timezone.utc) + timedelta(seconds=120)  # the first holder died without releasing
    taker = LeaseLock(engine, "route:chat", holder="taker", clock=lambda: later)
    assert taker.acquire()
    assert taker.current_holder()[0] == "taker"
    first.release()  # the dead holder coming back does not free the new holder's lease
    assert taker.current_holder()[0] == "taker"
    taker.release()
    assert taker.current_holder() is None
    with LeaseLock(engine, "route:chat") as lock:
        assert lock.held
    assert LeaseLock(engine, "route:chat").current_holder() is None


def test_locks_are_per_route(store_url):
    engine = get_engine(store_url)
    with LeaseLock(engine, "route:a") as a, LeaseLock(engine, "route:b") as b:
        assert a.held and b.held


def host_clock_off_by(monkeypatch: pytest.MonkeyPatch, minutes: float) -> None:
    """This host's clock, as the lease module reads it, runs `minutes` off real time."""
    class SkewedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=minutes)

    monkeypatch.setattr(lease_module, "datetime", SkewedDatetime)


@ON_POSTGRESQL
@pytest.mark.parametrize("host", ["fast", "slow"])
def test_on_postgresql_a_host_whose_clock_is_off_neither_takes_a_live_lease_nor_writes_an_expired_one(
        store_url, monkeypatch, host):
    """Leases on a shared store run on the database server's clock, not on each host's own."""
    engine = get_engine(store_url)
    if host == "fast":
        assert LeaseLock(engine, "route:chat", holder="host-a:1:a", ttl_s=300).acquire()
        host_clock_off_by(monkeypatch, 6)
        assert not LeaseLock(engine, "route:chat", holder="host-fast:1:b", ttl_s=300).acquire()
    else:
        host_clock_off_by(monkeypatch, -6)
        slow = LeaseLock(engine, "route:chat", holder="host-slow:1:c", ttl_s=300)
        assert slow.acquire() and slow.renew()
        monkeypatch.undo()
        assert slow.current_holder()[1] > datetime.now(timezone.utc) + timedelta(minutes=4)
        assert not LeaseLock(engine, "route:chat", holder="host-d:1:d", ttl_s=300).acquire()


def exited_pid() -> int:
    """A pid no process has here now: that of a child that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("namespace", ["another", "unsaid"])
def test_a_lease_of_a_pid_missing_here_stands_unless_the_holder_says_it_ran_in_our_pid_namespace(
        store_url, namespace):
    """Containers with host networking share our hostname but not our pids: a pid missing here may be alive there,
    and a holder written before holders named their namespace may be one of them."""
    engine = get_engine(store_url)
    holder = f"{socket.gethostname()}:{exited_pid()}:x"
    if namespace == "another":
        holder += ":4026530000.000000000000"
    assert LeaseLock(engine, "route:chat", holder=holder, ttl_s=3600).acquire()
    assert not LeaseLock(engine, "route:chat").acquire()  # waits out the lease


def test_a_lease_of_a_pid_gone_from_our_pid_namespace_is_taken_over_at_once(store_url):
    if pid_namespace() is None:
        pytest.skip("no /proc: this host cannot tell its pid namespace")
    engine = get_engine(store_url)
    dead = f"{socket.gethostname()}:{exited_pid()}:x:{pid_namespace()}:cycle c1"
    assert LeaseLock(engine, "route:chat", holder=dead, ttl_s=3600).acquire()
    taker = LeaseLock(engine, "route:chat")
    assert taker.acquire() and taker.current_holder()[0] == taker.holder
