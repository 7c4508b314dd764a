"""The lease lock on a real store, SQLite and PostgreSQL: one winner among concurrent writers, expiry takeover."""

import threading
from datetime import datetime, timedelta, timezone

from shadowjudge.store.lease import LeaseLock
from shadowjudge.store import get_engine


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
