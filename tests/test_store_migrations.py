"""Upgrading the store: all or nothing, one upgrader at a time, foreign keys intact, revisions checked."""

from __future__ import annotations

import multiprocessing
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.operations import Operations
from sqlalchemy import func, inspect, select, text

from shadowjudge.store import (
    Alert,
    Judgment,
    ShadowResult,
    ShadowRun,
    TrafficSample,
    current_revision,
    get_engine,
    initialised_engine,
    session_scope,
    upgrade_database,
)
from shadowjudge.errors import ShadowJudgeError
from shadowjudge.store import database
from shadowjudge.store.database import has_schema
from shadowjudge.store.models import utcnow
from pg_databases import throwaway_pg_database
from tests.test_store_text import add_run_and_sample

HEAD = "0002"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def empty_store_url(request, tmp_path) -> Iterator[str]:
    """A store with no schema yet, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    with throwaway_pg_database(request.getfixturevalue("pg_server_url"), "sj_m_") as url:
        yield url


def with_migration(tmp_path: Path, monkeypatch, upgrade_body: str) -> None:
    """The project's migrations plus a throwaway 0003 whose upgrade() is `upgrade_body`."""
    folder = tmp_path / "migrations"
    shutil.copytree(database.migrations_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / "0003_throwaway.py").write_text(
        "from alembic import op\nimport sqlalchemy as sa\n"
        "revision = '0003'\ndown_revision = '0002'\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade():\n{upgrade_body}\n\n\ndef downgrade():\n    pass\n")
    monkeypatch.setattr(database, "migrations_dir", lambda: folder)


def add_run_with_children(url: str) -> None:
    run_id, sample_id = add_run_and_sample(url)
    with session_scope(get_engine(url)) as s:
        s.add(ShadowResult(run_id=run_id, sample_id=sample_id, target="t", model="m", output_text="o"))
        s.add(Judgment(run_id=run_id, sample_id=sample_id, target="t", evaluator="e", preference=0.5))
        s.add(Alert(fingerprint="f", severity="high", kind="k", route="chat", metric="m", message="x", run_id=run_id))


def children(url: str) -> dict[str, int | None]:
    with session_scope(get_engine(url)) as s:
        counts = {model.__tablename__: s.scalar(select(func.count()).select_from(model))
                  for model in (ShadowRun, ShadowResult, Judgment)}
        return counts | {"alerts.run_id": s.scalar(select(Alert.run_id))}


def test_a_batch_migration_rebuilding_a_parent_table_keeps_its_children(empty_store_url, tmp_path, monkeypatch):
    """On SQLite a batch migration copies the table, DROPs it and renames the copy; with foreign keys on, the DROP
    deleted every result and judgment of every run and unlinked every alert."""
    with_migration(tmp_path, monkeypatch, (
        "    with op.batch_alter_table('shadow_runs') as batch_op:\n"
        "        batch_op.alter_column('status', existing_type=sa.String(32), type_=sa.String(64),\n"
        "                              existing_nullable=False)"))
    upgrade_database(empty_store_url, HEAD)
    add_run_with_children(empty_store_url)
    before = children(empty_store_url)
    assert upgrade_database(empty_store_url) == "0003"
    assert children(empty_store_url) == before == {"shadow_runs": 1, "shadow_results": 1, "judgments": 1,
                                                   "alerts.run_id": 1}


def test_a_migration_leaving_dangling_foreign_keys_is_rolled_back(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/store.db"
    with_migration(tmp_path, monkeypatch, "    op.execute('DELETE FROM shadow_runs')")
    upgrade_database(url, HEAD)
    add_run_with_children(url)
    with pytest.raises(ShadowJudgeError, match="rows whose foreign key points nowhere .*it was rolled back"):
        upgrade_database(url)
    assert current_revision(url) == HEAD
    assert children(url) == {"shadow_runs": 1, "shadow_results": 1, "judgments": 1, "alerts.run_id": 1}


def test_a_failed_migration_leaves_nothing_half_done(empty_store_url, tmp_path, monkeypatch):
    """SQLite committed each DDL statement on its own: the table created before the failing step stayed, and the
    next upgrade failed on it instead of on the data that needs fixing."""
    with_migration(tmp_path, monkeypatch, (
        "    op.create_table('new_table', sa.Column('id', sa.Integer, primary_key=True))\n"
        "    op.create_index('ux_position', 'traffic_samples', ['source', 'source_position'], unique=True)"))
    upgrade_database(empty_store_url, HEAD)
    with session_scope(get_engine(empty_store_url)) as s:
        s.add_all(TrafficSample(request_id=f"r{i}", source="s", source_position="dup", route="chat",
                                incumbent_model="m", messages=[], request_ts=utcnow()) for i in range(2))
    for _ in range(2):
        with pytest.raises(Exception, match="UNIQUE constraint failed|could not create unique index"):
            upgrade_database(empty_store_url)
        assert current_revision(empty_store_url) == HEAD
        assert not inspect(get_engine(empty_store_url)).has_table("new_table")


def test_an_interrupted_init_leaves_an_empty_store_that_init_sets_up(empty_store_url, monkeypatch):
    """Ctrl-C in the middle of the first `shadowjudge init` on SQLite left six tables and no revision: every
    later init failed on 'table ... already exists' and the store had to be deleted by hand."""
    create_table = Operations.create_table
    created = []

    def interrupted(self, name, *args, **kwargs):
        if len(created) == 6:
            raise KeyboardInterrupt
        created.append(name)
        return create_table(self, name, *args, **kwargs)

    monkeypatch.setattr(Operations, "create_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        upgrade_database(empty_store_url)
    assert inspect(get_engine(empty_store_url)).get_table_names() == []
    monkeypatch.setattr(Operations, "create_table", create_table)
    assert upgrade_database(empty_store_url) == HEAD


def _upgrade_in_step(url: str, barrier: threading.Barrier, outcomes: multiprocessing.Queue) -> None:
    """A flow's start: upgrade the store, with this process's first DDL held until every process has reached its
    own (they all found the store empty), so the upgrades overlap unless one waits for another."""
    create_table = Operations.create_table

    def create_in_step(self, *args, **kwargs):
        if not barrier.broken:
            try:
                barrier.wait(timeout=5)  # the others never arrive while one upgrade holds the lock
            except threading.BrokenBarrierError:
                pass
        return create_table(self, *args, **kwargs)

    Operations.create_table = create_in_step
    try:
        outcomes.put(f"ok {upgrade_database(url)}")
    except Exception as exc:
        outcomes.put(f"failed {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def test_flows_starting_together_all_find_the_store_upgraded(empty_store_url):
    """Every flow upgrades the store as it starts; four starting together on a fresh store raced each other's DDL
    ('table alembic_version already exists', UniqueViolation on pg_type) and most of them failed."""
    fork = multiprocessing.get_context("fork")
    barrier, outcomes = fork.Barrier(4), fork.Queue()
    processes = [fork.Process(target=_upgrade_in_step, args=(empty_store_url, barrier, outcomes)) for _ in range(4)]
    for process in processes:
        process.start()
    results = sorted(outcomes.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(30)
    assert results == [f"ok {HEAD}"] * 4


def test_a_store_at_head_is_not_upgraded_again(store_url, monkeypatch):
    """Every flow start checks the store: at head that is one read, no migration transaction nor lock."""
    def no_migration(*args, **kwargs):
        raise AssertionError("ran the migrations on a store already at head")

    monkeypatch.setattr(command, "upgrade", no_migration)
    assert upgrade_database(store_url) == HEAD


def test_a_store_at_a_revision_this_release_does_not_know_is_refused(store_url):
    """A newer shadowjudge upgraded the store: `status` and every command used it silently, `init` failed with
    Alembic's "Can't locate revision"."""
    with get_engine(store_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0003'"))
    message = re.escape("the store is at revision 0003, which this shadowjudge does not know (newer release?): "
                        "upgrade shadowjudge")
    with pytest.raises(ShadowJudgeError, match=message):
        initialised_engine(store_url)
    with pytest.raises(ShadowJudgeError, match=message):
        upgrade_database(store_url)


def test_an_older_store_is_sent_to_init(empty_store_url):
    upgrade_database(empty_store_url, "0001")
    with pytest.raises(ShadowJudgeError, match="revision 0001, older than this shadowjudge's 0002: run `shadowjudge"):
        initialised_engine(empty_store_url)
    assert upgrade_database(empty_store_url) == HEAD
    assert initialised_engine(empty_store_url) is get_engine(empty_store_url)


def test_a_store_whose_tables_exist_without_a_revision_is_not_set_up(store_url):
    """Tables alone may be what an init cut short left: the revision says whether a migration finished."""
    with get_engine(store_url).begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    assert not has_schema(get_engine(store_url))
    with pytest.raises(ShadowJudgeError, match="no schema yet"):
        initialised_engine(store_url)


def test_cli_status_on_a_newer_store_says_to_upgrade_shadowjudge(store_url, monkeypatch, capsys):
    from shadowjudge import cli

    with get_engine(store_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0003'"))
    monkeypatch.setenv("SHADOWJUDGE__STORE__URL", store_url)
    for subcommand in ("status", "init"):
        monkeypatch.setattr("sys.argv", ["shadowjudge", subcommand, "-c", "configs/shadowjudge.yaml"])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 1
        assert "does not know (newer release?): upgrade shadowjudge" in " ".join(capsys.readouterr().err.split())
