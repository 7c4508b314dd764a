"""Engines, sessions and migrations for the store (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from shadowjudge.errors import InputError, ShadowJudgeError

_ENGINES: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def get_engine(url: str) -> Engine:
    """One engine per URL per process; SQLite gets WAL and a busy timeout so flows and the CLI can share it."""
    engine = _ENGINES.get(url)
    if engine is None:
        if url.startswith("sqlite"):
            path = sqlite_path(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        _ENGINES[url] = engine
    return engine


def dispose_engines() -> None:
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back if it raises."""
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_ignoring_duplicates(session: Session, model: type, rows: list[dict[str, Any]], keys: list[str]) -> int:
    """INSERT rows, skipping those whose unique `keys` already exist; returns how many were new."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    table = model.__table__  # type: ignore[attr-defined]
    stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(table).values(rows)
    stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    result = session.execute(stmt)
    return result.rowcount or 0


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str):  # -> alembic.config.Config
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class StoreVersionError(ShadowJudgeError):
    """The store's schema revision does not fit this shadowjudge: the message says what to run."""


class MigrationFailed(ShadowJudgeError):
    """An upgrade broke the store's integrity; it was rolled back."""


# Held (pg_advisory_xact_lock) by whoever upgrades a PostgreSQL store; any constant no other tool on the database uses.
MIGRATION_LOCK_KEY = 0x5348_4A55_4447_4501


@contextmanager
def migration_transaction(url: str) -> Iterator[Connection]:
    """One transaction for a whole upgrade, holding the store's migration lock: an interrupted or failed upgrade
    leaves nothing half-done, and upgraders that start together (flows) wait for it, then find the work done."""
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":
        with _sqlite_migration_transaction(engine) as conn:
            yield conn
        return
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        yield conn


@contextmanager
def _sqlite_migration_transaction(engine: Engine) -> Iterator[Connection]:
    """SQLAlchemy's pysqlite recipe for transactional DDL: pysqlite only BEGINs before DML, so each CREATE committed
    on its own; with its handling off we BEGIN IMMEDIATE (the write lock at once: a concurrent upgrader waits for
    it). Foreign keys off meanwhile, as SQLite's ALTER TABLE procedure asks: a batch migration rebuilds a table by
    copy, DROP and rename, and the DROP would cascade to the table's children; they are checked before the commit."""
    with engine.connect() as conn:
        dbapi_conn = conn.connection.dbapi_connection
        isolation_level = dbapi_conn.isolation_level
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set before the BEGIN
        event.listen(conn, "begin", _begin_immediate)
        try:
            with conn.begin():
                yield conn
                dangling = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if dangling:
                    table, rowid, parent, _ = dangling[0]
                    raise MigrationFailed(f"the upgrade left {len(dangling)} rows whose foreign key points nowhere "
                                          f"(first: {table} row {rowid} -> {parent}); it was rolled back")
        finally:
            dbapi_conn.execute("PRAGMA foreign_keys=ON")
            dbapi_conn.isolation_level = isolation_level


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class StoreUrlError(InputError):
    """store.url names no database the store can live in; the message names its scheme, never the whole URL."""


STORE_SCHEMES = ("sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg2")


def check_store_url(url: str) -> None:
    """Refuse a store URL of a scheme the store does not support with a message naming it and those it does;
    SQLAlchemy's own errors (NoSuchModuleError, a missing driver) named neither."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        scheme = make_url(url).drivername
    except ArgumentError:
        raise StoreUrlError(f"store.url is not a database URL (supported: {', '.join(STORE_SCHEMES)}, e.g. "
                            "sqlite:///.shadowjudge/shadowjudge.db)") from None
    if scheme not in STORE_SCHEMES:
        raise StoreUrlError(f"store.url: scheme '{scheme}' is not supported (supported: "
                            f"{', '.join(STORE_SCHEMES)})")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite store URL; None for another database, an in-memory one or a `file:` URI."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") or parsed.query.get("uri"):
        return None
    return Path(parsed.database)


def store_revisions(url: str) -> tuple[str | None, str]:
    """The store's revision (None until a first migration has run to its end) and this shadowjudge's head;
    StoreVersionError for a revision the migrations do not know (a newer shadowjudge upgraded the store)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    check_store_url(url)
    scripts = ScriptDirectory.from_config(alembic_config(url))
    current = current_revision(url)
    if current is not None:
        try:
            scripts.get_revision(current)
        except CommandError:
            raise StoreVersionError(f"the store is at revision {current}, which this shadowjudge does not know "
                                    "(newer release?): upgrade shadowjudge") from None
    return current, scripts.get_current_head() or "base"


def upgrade_database(url: str, revision: str = "head") -> str:
    """Create or upgrade the schema through Alembic; returns the revision now in force. A store already at head
    costs one read; an upgrade runs in `migration_transaction`."""
    from alembic import command

    current, head = store_revisions(url)
    if revision == "head" and current == head:
        return head
    cfg = alembic_config(url)
    with migration_transaction(url) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(url) or "base"


def current_revision(url: str) -> str | None:
    return _revision(get_engine(url))


def _revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def has_schema(engine: Engine) -> bool:
    """True once a migration has run to its end (its revision is recorded): tables alone may be an init cut short."""
    return _revision(engine) is not None


def initialised_engine(url: str) -> Engine:
    """The engine of a store `shadowjudge init` has brought to this shadowjudge's schema; commands that only read or
    add rows start here, so any other store gets one message saying what to run (exit 1), not a failing query.
    A SQLite file that is not there is not created: connecting would leave an empty store behind."""
    check_store_url(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise StoreVersionError(f"the store has no schema yet (no file {path}): run `shadowjudge init --config ...` "
                                "first")
    current, head = store_revisions(url)
    if current is None:
        raise StoreVersionError("the store has no schema yet: run `shadowjudge init --config ...` first")
    if current != head:
        raise StoreVersionError(f"the store is at revision {current}, older than this shadowjudge's {head}: "
                                "run `shadowjudge init --config ...` to upgrade it")
    return get_engine(url)
