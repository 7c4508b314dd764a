"""Throwaway PostgreSQL databases for tests (the session's store server, stores a test needs empty) and for the
benches that measure the store on PostgreSQL (bench/store_queries.py, bench/soak.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

from shadowjudge.store import dispose_engines


@contextmanager
def pg_database(server_url: str, name: str) -> Iterator[str]:
    """The URL of a new, empty database `name` on the PostgreSQL server of `server_url` (one of that name left by a
    killed run is dropped first), dropped with its connections afterwards, also when the caller fails."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def throwaway_pg_database(server_url: str, prefix: str) -> Iterator[str]:
    """`pg_database` under a new name starting with `prefix`: test sessions running side by side never share one."""
    return pg_database(server_url, f"{prefix}{uuid.uuid4().hex[:12]}")
