from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from shadowjudge.store import Base, SourceCursor, TrafficSample, current_revision, get_engine, insert_ignoring_duplicates, session_scope, upgrade_database
from shadowjudge.store.models import utcnow


def test_migrations_create_every_table_and_match_the_models(store_url):
    engine = get_engine(store_url)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_upgrade_is_idempotent(store_url):
    first = current_revision(store_url)
    assert upgrade_database(store_url) == first


def _sample(i: int) -> dict:
    return dict(request_id=f"req-{i}", source="s", source_position=str(i), route="chat", incumbent_model="m",
                messages=[{"role": "user", "content": "hi"}], params={}, meta={}, redactions={},
                request_ts=utcnow(), ingested_at=utcnow(), cache_hit=False)


def test_insert_ignoring_duplicates_never_duplicates(store_url):
    engine = get_engine(store_url)
    with session_scope(engine) as s:
        assert insert_ignoring_duplicates(s, TrafficSample, [_sample(1), _sample(2)], ["request_id"]) == 2
    with session_scope(engine) as s:
        assert insert_ignoring_duplicates(s, TrafficSample, [_sample(2), _sample(3)], ["request_id"]) == 1
        assert s.scalar(select(func.count()).select_from(TrafficSample)) == 3


def test_session_scope_rolls_back_on_error(store_url):
    engine = get_engine(store_url)
    try:
        with session_scope(engine) as s:
            s.add(SourceCursor(source="x", position={"offset": 1}))
            s.flush()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with session_scope(engine) as s:
        assert s.get(SourceCursor, "x") is None


def test_status_counts_small_tables_exactly_and_estimates_large_ones(store_url, monkeypatch):
    from shadowjudge import cli

    engine = get_engine(store_url)
    with session_scope(engine) as s:
        insert_ignoring_duplicates(s, TrafficSample, [_sample(i) for i in range(5)], ["request_id"])
    assert cli.status_row_counts(engine)["traffic_samples"] == 5
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:  # the planner's estimate comes from ANALYZE
            conn.exec_driver_sql("ANALYZE traffic_samples")
            conn.commit()
    monkeypatch.setattr(cli, "EXACT_COUNT_BELOW", 3)
    counts = cli.status_row_counts(engine)
    assert counts["traffic_samples"] == "~5"
    assert counts["alerts"] == 0


def test_every_stored_datetime_comes_back_as_the_same_instant_in_utc(store_url):
    """SQLite keeps no zone: it stored a +02:00 time's wall clock and handed back naive values, so alert payloads
    and listings read differently there and on PostgreSQL."""
    from datetime import datetime, timedelta, timezone

    from shadowjudge.alerts.records import alert_to_dict
    from shadowjudge.store import Alert

    engine = get_engine(store_url)
    at = datetime(2026, 11, 25, 6, 0, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(engine) as s:
        s.add(TrafficSample(**{**_sample(9), "request_ts": at}))
        s.add(Alert(fingerprint="f", status="open", severity="warning", kind="regression", route="chat",
                    target="c", metric="m", message="m", created_at=at, updated_at=at))
    with session_scope(engine) as s:
        stored = s.scalar(select(TrafficSample.request_ts).where(TrafficSample.request_id == "req-9"))
        before = s.scalar(select(func.count()).select_from(TrafficSample)
                          .where(TrafficSample.request_ts < datetime(2026, 11, 25, 4, 30, tzinfo=timezone.utc)))
        payload = alert_to_dict(s.scalars(select(Alert)).one())
    assert stored == at and stored.utcoffset() == timedelta(0)
    assert before == 1  # 04:00 UTC, compared as an instant
    assert payload["created_at"] == payload["updated_at"] == "2026-11-25T04:00:00+00:00"
