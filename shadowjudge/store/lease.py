"""A lease lock in the store, so only one writer at a time pushes a route's weights, or ingests traffic (SQLite and
PostgreSQL).

Acquiring is an INSERT of the lock's row, which the primary key lets only one writer win; a lease whose holder
died is taken over by an UPDATE that only matches while the lease is expired (or, in the same pid namespace of the
same host, while its holder's process is gone: a killed `shadowjudge run` does not block the route for a whole
lease), which again only one writer wins.
Leases expire on real time (not the controller's simulated clock): they guard real processes. On PostgreSQL that
is the database server's clock, which every host shares, so a host whose own clock is off neither takes over a live
lease nor writes one that has already expired; a SQLite store is one host's file, and that host's clock serves.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType

from sqlalchemy import ColumnElement, Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shadowjudge.store import Lock, session_scope
from shadowjudge.store.models import as_utc


def wall_clock() -> datetime:
    return datetime.now(timezone.utc)


@functools.cache
def pid_namespace() -> str | None:
    """This process's pid namespace, as `<inode>.<boot id>`: processes that share a hostname (containers with host
    networking) may still not see each other's pids. The boot id tells hosts apart, since the initial namespace has
    the same inode on every Linux host. None on a Linux without /proc (no pid can be judged); "host" where there are
    no pid namespaces (macOS): the hostname alone then names the pid space."""
    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None if sys.platform.startswith("linux") else "host"
    return f"{inode}.{boot_id.replace('-', '')[:12]}"


def default_holder() -> str:
    """`host:pid:token:pid-namespace` (the namespace left out where it is unknown, so the holder reads as alive)."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    namespace = pid_namespace()
    return holder if namespace is None else f"{holder}:{namespace}"


def holder_is_dead(holder: str) -> bool:
    """True when the holder was a process of our host and pid namespace that no longer exists: it was killed before
    it released.

    Only a definite answer counts: another host's or pid namespace's process, a holder that does not say its
    namespace (written by an older version), a pid we may not signal, or a pid reused by a live process all read as
    alive, and such a lease is only taken over once it expires.
    """
    host, pid, _token, namespace, *_ = holder.split(":") + ["", "", ""]
    ours = pid_namespace()
    if host != socket.gethostname() or ours is None or namespace != ours:
        return False
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _abandoned(holder: str | None, now: datetime) -> ColumnElement[bool]:
    """Where a lease's row may be taken over: it expired, or its holder (read as `holder`) died on this host, so
    there is no need to wait its lease out."""
    takeover = Lock.expires_at < now
    if holder is not None and holder_is_dead(holder):
        takeover = takeover | (Lock.holder == holder)
    return takeover


class LeaseLock:
    """`with LeaseLock(engine, "route:chat") as lock: if lock.held: ...`; released on exit, expires if we die."""

    def __init__(self, engine: Engine, name: str, *, holder: str | None = None, ttl_s: float = 300.0,
                 clock: Callable[[], datetime] | None = None) -> None:
        """`clock` overrides the time leases are measured in (tests); by default the store's (`_now_in`)."""
        self.engine = engine
        self.name = name
        self.holder = holder or default_holder()
        self.ttl = timedelta(seconds=ttl_s)
        self.clock = clock
        self.held = False

    def _now_in(self, session: Session) -> datetime:
        """The time leases are measured in: the injected clock, else PostgreSQL's clock (one for every host, however
        far their own clocks drift), else this host's (a SQLite store is one host's file)."""
        if self.clock is not None:
            return as_utc(self.clock())
        if self.engine.dialect.name == "postgresql":
            return as_utc(session.scalar(select(func.clock_timestamp())))
        return wall_clock()

    def acquire(self) -> bool:
        try:
            with session_scope(self.engine) as s:
                s.add(Lock(name=self.name, holder=self.holder, expires_at=self._now_in(s) + self.ttl))
                s.flush()
            self.held = True
            return True
        except IntegrityError:
            pass
        with session_scope(self.engine) as s:
            now = self._now_in(s)
            holder = s.scalar(select(Lock.holder).where(Lock.name == self.name))
            taken = s.execute(
                update(Lock).where(Lock.name == self.name, _abandoned(holder, now))
                .values(holder=self.holder, expires_at=now + self.ttl)
            )
            self.held = taken.rowcount == 1
        return self.held

    def clear_if_abandoned_in(self, session: Session) -> bool:
        """In the caller's transaction, delete the lease's row if it is abandoned (what `acquire` would take over);
        True when no one holds the lease now: it was free, or abandoned. The delete only matches a row still
        abandoned, so a holder that renews meanwhile keeps its lease (False)."""
        now = self._now_in(session)
        holder = session.scalar(select(Lock.holder).where(Lock.name == self.name))
        if holder is None:
            return True
        return session.execute(delete(Lock).where(Lock.name == self.name, _abandoned(holder, now))).rowcount == 1

    def live_holder(self) -> tuple[str, datetime] | None:
        """The holder and expiry while the lease holds; None when it is free or abandoned (expired by the store's
        clock, not this host's, or held by a process of this host that is gone), as `acquire` judges it."""
        with session_scope(self.engine) as s:
            row = s.execute(select(Lock.holder, Lock.expires_at).where(Lock.name == self.name)).first()
            if row is None or as_utc(row.expires_at) < self._now_in(s) or holder_is_dead(row.holder):
                return None
            return row.holder, as_utc(row.expires_at)

    def renew(self) -> bool:
        """Extend a held lease by its ttl from now; False when it was lost (it expired and another took it over)."""
        if not self.held:
            return False
        with session_scope(self.engine) as s:
            return self.renew_in(s)

    def renew_in(self, session: Session) -> bool:
        """`renew` inside the caller's transaction, so what it writes commits only while the lease is still ours:
        the row stays locked until the commit, and a takeover meanwhile waits and then finds the lease extended."""
        kept = session.execute(update(Lock).where(Lock.name == self.name, Lock.holder == self.holder)
                               .values(expires_at=self._now_in(session) + self.ttl))
        self.held = kept.rowcount == 1
        return self.held

    def release(self) -> None:
        if not self.held:
            return
        with session_scope(self.engine) as s:
            s.execute(delete(Lock).where(Lock.name == self.name, Lock.holder == self.holder))
        self.held = False

    def current_holder(self) -> tuple[str, datetime] | None:
        with session_scope(self.engine) as s:
            row = s.get(Lock, self.name)
            return None if row is None else (row.holder, row.expires_at)

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class LockSet:
    """Several leases taken all-or-nothing, in a fixed order, without waiting (so two sets never deadlock)."""

    def __init__(self, locks: list[LeaseLock]) -> None:
        self.locks = locks

    def acquire(self) -> LeaseLock | None:
        """None when every lease is held now; otherwise the one that is busy (and none is held)."""
        for i, lock in enumerate(self.locks):
            if not lock.acquire():
                for taken in self.locks[:i]:
                    taken.release()
                return lock
        return None

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
