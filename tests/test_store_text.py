"""Text the store takes on SQLite but PostgreSQL refused: NUL characters anywhere, values longer than a column."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.runtime.migration import MigrationContext
from sqlalchemy import String, create_engine, select
from sqlalchemy.engine import Connection

from shadowjudge.alerts.findings import Finding
from shadowjudge.alerts.records import _record
from shadowjudge.shadow.writer import ResultStoreError, ResultWriter
from shadowjudge.store import Alert, Base, ShadowResult, ShadowRun, TrafficSample, get_engine, session_scope
from shadowjudge.store.models import utcnow


def add_run_and_sample(url: str) -> tuple[int, int]:
    """A stored sample and a shadow run: what results, judgments and alerts refer to."""
    with session_scope(get_engine(url)) as s:
        sample = TrafficSample(request_id="r1", source="s", source_position="1", route="chat", incumbent_model="m",
                               messages=[], request_ts=utcnow())
        run = ShadowRun(run_key="chat:c1", route="chat", config_hash="x", sample_ids=[1])
        s.add_all([sample, run])
        s.flush()
        return run.id, sample.id


def _write_results(url: str, rows: list[dict]) -> dict[str, ShadowResult]:
    run_id, sample_id = add_run_and_sample(url)
    writer = ResultWriter(get_engine(url))
    for row in rows:
        writer.add({"run_id": run_id, "sample_id": sample_id, "attempt": 0, "retries": 0, "model": "m", **row})
    asyncio.run(writer.flush())
    with session_scope(get_engine(url)) as s:
        return {r.target: r for r in s.scalars(select(ShadowResult))}


def test_a_nul_in_a_candidate_answer_is_stored_as_a_replacement_character(store_url):
    """psycopg2 refused it with a ValueError that escaped the writer: the batch of paid results was lost, and a
    resume replayed and lost it again."""
    stored = _write_results(store_url, [{"target": "a", "output_text": "fine"},
                                        {"target": "b", "output_text": "bad\x00answer"},
                                        {"target": "c", "output_text": "fine too"}])
    assert {t: r.output_text for t, r in stored.items()} == {"a": "fine", "b": "bad\ufffdanswer", "c": "fine too"}
    with session_scope(get_engine(store_url)) as s:  # queries bind alike, so the stored text is found
        assert s.scalar(select(ShadowResult.target).where(ShadowResult.output_text == "bad\x00answer")) == "b"


def test_a_model_name_longer_than_its_column_is_stored_cut(store_url):
    stored = _write_results(store_url, [{"target": "a", "model": "m" * 300, "output_text": "x"}])
    assert stored["a"].model == "m" * 256


def _write_results_without_setup(url: str) -> None:
    writer = ResultWriter(get_engine(url))
    writer.add({"run_id": 1, "sample_id": 1, "target": "a", "model": "m", "attempt": 0, "retries": 0})
    asyncio.run(writer.flush())


def test_a_value_the_driver_refuses_is_a_result_store_error(store_url, monkeypatch):
    """Drivers refuse some values with ValueError or TypeError, not a database error."""
    def refuse(*args, **kwargs):
        raise ValueError("A string literal cannot contain NUL (0x00) characters.")

    monkeypatch.setattr(Connection, "execute", refuse)
    with pytest.raises(ResultStoreError, match="cannot store 1 shadow results: ValueError: A string literal"):
        _write_results_without_setup(store_url)


def _finding(slice_label: str | None, metric: str = "win_rate") -> Finding:
    return Finding("regression", "critical", "chat", "cand", metric, slice_label, -0.2, -0.3, -0.1,
                   f"regresses on slice {slice_label}", "blocked", None, "run:1")


def test_a_long_or_nul_slice_label_loses_no_alert_of_the_cycle(store_url):
    """A cycle's findings are written in one transaction: one slice label over 256 characters (a metadata value)
    or holding NUL failed the insert on PostgreSQL, and every alert of the cycle with it."""
    long_a, long_b = "task=" + "y" * 300 + "a", "task=" + "y" * 300 + "b"
    with session_scope(get_engine(store_url)) as s:
        ids = [_record(s, _finding(label, metric), {}) for label, metric in
               ((None, "overall_score"), (long_a, "win_rate"), (long_b, "win_rate"), ("task=a\x00b", "win_rate"))]
    with session_scope(get_engine(store_url)) as s:
        alerts = {a.id: a for a in s.scalars(select(Alert))}
    assert sorted(alerts) == sorted(ids) and len(set(ids)) == 4  # two labels alike when cut are still two causes
    assert alerts[ids[1]].slice == long_a[:256] and alerts[ids[2]].slice == long_b[:256]
    assert alerts[ids[3]].slice == "task=a\ufffdb"


def test_every_text_column_binds_storable_text():
    from shadowjudge.store.models import StoredString

    plain = [f"{table.name}.{column.name}" for table in Base.metadata.tables.values() for column in table.columns
             if isinstance(column.type, String) and not isinstance(column.type, StoredString)]
    assert plain == []


def test_a_new_migration_names_plain_sqlalchemy_types(tmp_path):
    """The store's text types are plain VARCHAR/TEXT in the schema: an autogenerated migration must not import
    shadowjudge to say so."""
    from shadowjudge.store.models import render_stored_type

    engine = create_engine(f"sqlite:///{tmp_path}/empty.db")
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": Base.metadata})
        code = render_python_code(produce_migrations(context, Base.metadata).upgrade_ops,
                                  render_item=render_stored_type)
    engine.dispose()
    assert "shadowjudge" not in code and "Stored" not in code
    assert "sa.Column('run_key', sa.String(length=128)" in code and "sa.Column('message', sa.Text()" in code
