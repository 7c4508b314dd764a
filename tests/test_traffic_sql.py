"""SQL tables: the LiteLLM_SpendLogs preset against a real table (SQLite and PostgreSQL), keyset cursor, settle
time, mapping validation, and secrets kept out of errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from shadowjudge.config import ConfigError, SourceConfig
from shadowjudge.store import get_engine, upgrade_database
from shadowjudge.traffic import TimeWindow, TrafficError, TrafficRecord, ingest_sources, load_cursor
from shadowjudge.traffic.sources.sql import open_source, resolve_mapping, row_record
from tests.test_traffic_ingest import create_litellm_table, insert_litellm_rows, litellm_rows, make_config

LITELLM = {"name": "litellm", "kind": "sql", "mapping": "litellm", "batch_size": 4}


def test_keyset_cursor_handles_equal_timestamps_and_late_pages(store_url):
    rows = litellm_rows()
    same_time = rows[3]["startTime"]
    for row in rows[4:8]:  # several rows share one startTime: the id breaks the tie
        row["startTime"] = same_time
    create_litellm_table(store_url, rows[:6])
    config = make_config(store_url, [{**LITELLM, "url": store_url}])
    engine = get_engine(store_url)
    first = ingest_sources(engine, config).sources[0]
    assert first.read == 6 and first.cursor["id"] == max(r["request_id"] for r in rows[3:6])

    insert_litellm_rows(store_url, rows[6:])
    second = ingest_sources(engine, config).sources[0]
    assert second.read == 24 and second.duplicates == 0
    assert ingest_sources(engine, config).sources[0].read == 0


def test_settle_time_leaves_recent_rows_for_a_later_run(store_url):
    rows = litellm_rows()[:10]
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for i, row in enumerate(rows):
        row["startTime"] = now - timedelta(minutes=19 - 2 * i)  # the last five are under ten minutes old
        row["endTime"] = row["startTime"] + timedelta(seconds=2)
        row["completionStartTime"] = None
    create_litellm_table(store_url, rows)
    engine = get_engine(store_url)
    settled = make_config(store_url, [{**LITELLM, "url": store_url, "settle_s": 600}])
    assert ingest_sources(engine, settled).sources[0].read == 5
    immediate = make_config(store_url, [{**LITELLM, "url": store_url}])
    assert ingest_sources(engine, immediate).sources[0].read == 5  # the rest, from the same cursor


def test_row_mapping_details():
    row = litellm_rows()[0]
    mapping = resolve_mapping(SourceConfig(name="l", kind="sql", url="sqlite://", mapping="litellm"))
    r = row_record(row, mapping, "t:1")
    assert r.request_id == row["request_id"] and r.route == "chat-default" and r.incumbent_model == row["model"]
    assert r.params == {"temperature": 0.7}  # litellm_* and metadata keys of the request body dropped
    assert r.metadata["task"] and r.metadata["request_tags"] == ["prod"] and "requester_ip_address" not in r.metadata
    assert r.latency_ms == pytest.approx(3500) and r.ttft_ms == pytest.approx(310)

    as_text = {**row, "messages": '[{"role": "user", "content": "hi"}]', "metadata": "", "response": "plain",
               "cache_hit": ""}
    r = row_record(as_text, mapping, "t:2")  # JSON stored as text (e.g. SQLite TEXT columns)
    assert r.messages == [{"role": "user", "content": "hi"}] and r.response_text == "plain" and not r.cache_hit

    no_prompts = {**row, "messages": {}, "proxy_server_request": {}}
    with pytest.raises(ValueError, match="store_prompts_in_spend_logs"):
        row_record(no_prompts, mapping, "t:3")


def test_custom_mapping_and_preset_overrides():
    config = SourceConfig(name="c", kind="sql", url="sqlite://", table="requests",
                          mapping={"request_id": "rid", "timestamp": "created", "messages": "msgs",
                                   "model": "model_name", "metadata.tenant": "tenant"})
    assert resolve_mapping(config)["table"] == "requests"
    overridden = resolve_mapping(SourceConfig(name="o", kind="sql", url="sqlite://",
                                              mapping={"preset": "litellm", "route": "model"}))
    assert overridden["route"] == "model" and overridden["table"] == "LiteLLM_SpendLogs"


@pytest.mark.parametrize("mapping, message", [
    ("nope", "unknown mapping preset 'nope'"),
    ({"preset": "litelm"}, "unknown mapping preset 'litelm'; did you mean 'litellm'?"),
    ({"preset": "litellm", "end_tme": "x"}, "unknown mapping keys ['end_tme']; did you mean 'end_time'?"),
    ({"preset": "litellm", "colour": "x"}, "unknown mapping keys ['colour']"),
    ({"table": "t", "request_id": "id"}, "needs timestamp, messages (or request), model (or route)"),
])
def test_mapping_errors_are_clear(mapping, message):
    with pytest.raises(TrafficError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        open_source(SourceConfig(name="s", kind="sql", url="sqlite://", mapping=mapping))


def test_a_mapping_typo_in_a_loaded_config_is_a_config_error_not_an_ingest_failure(store_url):
    """`init` and config loading accepted `preset: litelm`; the ingest then failed with exit 1."""
    with pytest.raises(ConfigError, match="sources: source 'c': unknown mapping preset 'litelm'; did you mean"):
        make_config(store_url, [{"name": "c", "kind": "sql", "url": store_url, "mapping": {"preset": "litelm"}}])


def test_missing_table_or_columns_are_reported_not_raised(store_url):
    engine = get_engine(store_url)
    report = ingest_sources(engine, make_config(store_url, [{**LITELLM, "url": store_url}])).sources[0]
    assert "no table 'LiteLLM_SpendLogs'" in report.error

    create_litellm_table(store_url, [])
    config = make_config(store_url, [{"name": "c", "kind": "sql", "url": store_url,
                                      "mapping": {"preset": "litellm", "route": "route_col"}}])
    report = ingest_sources(engine, config).sources[0]
    assert "has no column(s) ['route_col']" in report.error


@pytest.mark.parametrize("column_type", ["INTEGER", "TEXT"])
def test_a_timestamp_column_that_is_not_a_date_time_is_refused_up_front(tmp_path, column_type):
    """Epoch integers or ISO text parse row by row, but the cursor and backfill windows compare in the query:
    the second run stuck on the cursor (INTEGER) or every run re-read every row (TEXT)."""
    url = f"sqlite:///{tmp_path}/logs.db"
    upgrade_database(url)  # the store and the gateway's table in one file, as in the other tests
    with get_engine(url).begin() as conn:
        conn.execute(text(f'CREATE TABLE calls (id TEXT, ts {column_type}, model TEXT, messages TEXT)'))
    config = make_config(url, [{"name": "c", "kind": "sql", "url": url, "mapping": {
        "table": "calls", "request_id": "id", "timestamp": "ts", "route": "model", "messages": "messages"}}])
    report = ingest_sources(get_engine(url), config).sources[0]
    assert f"column 'ts' is {column_type}, not a date-time" in report.error


def test_a_backfill_pushes_the_window_into_the_query(store_url):
    rows = litellm_rows()
    create_litellm_table(store_url, rows)
    since = rows[10]["startTime"].replace(tzinfo=timezone.utc)
    until = rows[20]["startTime"].replace(tzinfo=timezone.utc)
    source = open_source(SourceConfig(name="l", kind="sql", url=store_url, mapping="litellm", batch_size=3))
    got = [s.item for s in source.read(None, TimeWindow(since, until))]
    assert len(got) == 10
    assert [r.request_id for r in got if isinstance(r, TrafficRecord)] == \
        [r["request_id"] for r in rows[10:20] if r["messages"]]
    engine = get_engine(store_url)
    ingest_sources(engine, make_config(store_url, [{**LITELLM, "url": store_url}]), since=since, until=until)
    assert load_cursor(engine, "litellm") is None


@pytest.mark.parametrize("layout", ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f+00:00"])
def test_a_sqlite_table_whose_date_times_are_text_in_another_layout_is_read_once(tmp_path, layout):
    """SQLite keeps DATETIME as text in the writer's layout; compared as text with SQLAlchemy's own layout, an
    ISO 'T' made one read loop over the same page forever and seconds-only values lost rows sharing a second
    across a page boundary."""
    import itertools
    import json

    source_url = f"sqlite:///{tmp_path}/source.db"
    with get_engine(source_url).begin() as conn:
        conn.execute(text("CREATE TABLE requests (rid TEXT, created DATETIME, msgs TEXT, model TEXT)"))
        for i in range(7):
            at = datetime(2026, 11, 22, 10, 0, i // 2)  # pairs of rows share a second
            conn.execute(text("INSERT INTO requests VALUES (:r, :t, :m, 'm1')"),
                         {"r": f"r{i}", "t": at.strftime(layout),
                          "m": json.dumps([{"role": "user", "content": f"q{i}"}])})
    source = {"name": "t", "kind": "sql", "url": source_url, "table": "requests", "batch_size": 2,
              "mapping": {"request_id": "rid", "timestamp": "created", "messages": "msgs", "model": "model"}}
    config = make_config(f"sqlite:///{tmp_path}/store.db", [source])
    steps = list(itertools.islice(open_source(config.sources[0]).read(None, TimeWindow()), 50))
    assert [s.cursor["id"] for s in steps] == [f"r{i}" for i in range(7)]
    resumed = list(itertools.islice(open_source(config.sources[0]).read(steps[2].cursor, TimeWindow()), 50))
    assert [s.cursor["id"] for s in resumed] == [f"r{i}" for i in range(3, 7)]
    window = TimeWindow(since=datetime(2026, 11, 22, 10, 0, 1, tzinfo=timezone.utc),
                        until=datetime(2026, 11, 22, 10, 0, 3, tzinfo=timezone.utc))
    inside = list(open_source(config.sources[0]).read(None, window))
    assert [s.cursor["id"] for s in inside] == ["r2", "r3", "r4", "r5"]


def test_julianday_is_used_only_for_a_sqlite_column_in_another_layout(tmp_path):
    """julianday() keeps SQLite from using an index on the column (a full scan and sort per page): a column in
    SQLAlchemy's own layout is compared as it is."""
    from sqlalchemy import Column, DateTime, MetaData, String, Table

    from shadowjudge.traffic.sources.sql import _sqlalchemy_layout

    engine = get_engine(f"sqlite:///{tmp_path}/t.db")
    table = Table("t", MetaData(), Column("rid", String), Column("ts", DateTime))
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"rid": "a", "ts": datetime(2026, 11, 22, 10)}])
        assert _sqlalchemy_layout(engine, table.c.ts)
        conn.execute(text("INSERT INTO t VALUES ('b', '2026-11-22T11:00:00')"))
    assert not _sqlalchemy_layout(engine, table.c.ts)


def test_numeric_columns_are_numbers_not_quarantined_records(store_url):
    """NUMERIC columns come back as Decimal: a cost in one quarantined every row, as metadata too."""
    with get_engine(store_url).begin() as conn:
        conn.execute(text("CREATE TABLE priced (rid TEXT, created TIMESTAMP, msgs TEXT, model TEXT, "
                          "cost NUMERIC(12, 6), score NUMERIC(5, 2))"))
        for i in range(3):
            conn.execute(text("INSERT INTO priced VALUES (:r, :t, :m, 'm1', :c, :s)"),
                         {"r": f"p{i}", "t": datetime(2026, 11, 22, 10, i), "c": "0.001250", "s": "7.50",
                          "m": '[{"role": "user", "content": "q"}]'})
    source = {"name": "priced", "kind": "sql", "url": store_url, "table": "priced",
              "mapping": {"request_id": "rid", "timestamp": "created", "messages": "msgs", "model": "model",
                          "cost_usd": "cost", "metadata.score": "score"}}
    report = ingest_sources(get_engine(store_url), make_config(store_url, [source])).sources[0]
    assert (report.stored, report.quarantined) == (3, 0)
    steps = list(open_source(make_config(store_url, [source]).sources[0]).read(None, TimeWindow()))
    assert steps[0].item.cost_usd == pytest.approx(0.00125) and steps[0].item.metadata == {"score": 7.5}


def test_a_litellm_request_that_ran_longer_than_the_settle_time_is_still_read(store_url):
    """LiteLLM writes a spend-log row when its request ends; following startTime, a request that ran longer than
    settle_s was written behind the cursor and never read."""
    rows = litellm_rows()[:6]
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for i, row in enumerate(rows):
        row["startTime"] = now - timedelta(minutes=30 - i)
        row["endTime"] = row["startTime"] + timedelta(seconds=3)
        row["completionStartTime"] = None
    long_request = rows.pop(0)
    long_request["endTime"] = now - timedelta(minutes=6)  # started first, ran 24 minutes
    create_litellm_table(store_url, rows)
    engine = get_engine(store_url)
    config = make_config(store_url, [{**LITELLM, "url": store_url, "settle_s": 300}])
    assert ingest_sources(engine, config).sources[0].read == 5
    insert_litellm_rows(store_url, [long_request])  # written when it ended, after the others were read
    second = ingest_sources(engine, config).sources[0]
    assert (second.read, second.stored) == (1, 1)
    assert ingest_sources(engine, config).sources[0].read == 0


def test_integer_request_ids_of_two_sources_do_not_collide(tmp_path):
    """An autoincrement id is unique only in its table: two sources both had a request 1, and the store kept the
    first source's and dropped the other's as a duplicate."""
    import json

    sources = []
    for name in ("east", "west"):
        url = f"sqlite:///{tmp_path}/{name}.db"
        with get_engine(url).begin() as conn:
            conn.execute(text("CREATE TABLE requests (id INTEGER PRIMARY KEY, created DATETIME, msgs TEXT, "
                              "model TEXT)"))
            for i in range(3):
                conn.execute(text("INSERT INTO requests (created, msgs, model) VALUES (:t, :m, 'm1')"),
                             {"t": datetime(2026, 11, 22, 10, i),
                              "m": json.dumps([{"role": "user", "content": f"{name} q{i}"}])})
        sources.append({"name": name, "kind": "sql", "url": url, "table": "requests",
                        "mapping": {"request_id": "id", "timestamp": "created", "messages": "msgs",
                                    "model": "model"}})
    store_url = f"sqlite:///{tmp_path}/store.db"
    upgrade_database(store_url)
    engine = get_engine(store_url)
    reports = ingest_sources(engine, make_config(store_url, sources)).sources
    assert [(r.stored, r.duplicates) for r in reports] == [(3, 0), (3, 0)]
    with engine.connect() as conn:
        ids = sorted(conn.execute(text("SELECT request_id FROM traffic_samples")).scalars())
    assert ids == ["east:1", "east:2", "east:3", "west:1", "west:2", "west:3"]
    assert [r.read for r in ingest_sources(engine, make_config(store_url, sources)).sources] == [0, 0]


def test_a_litellm_ttft_is_stored_as_logged_and_read_by_what_the_request_said(store_url):
    """LiteLLM sets completionStartTime = endTime for a request that was not streamed: its "TTFT" is the whole
    latency. The store keeps what was logged, `stream` included; the analysis (`logged_ttft_ms`) drops it unless the
    request said `stream: true`, as a one-chunk streamed answer can end in the millisecond its first token came."""
    from sqlalchemy import select

    from shadowjudge.analysis.run_data import logged_ttft_ms
    from shadowjudge.store import TrafficSample, session_scope

    rows = litellm_rows()[:5]
    unstreamed, unsaid, streamed_at_end, streamed_as_text, streamed = rows
    unstreamed["proxy_server_request"] = {**unstreamed["proxy_server_request"], "stream": False}
    for row in (unstreamed, unsaid, streamed_at_end, streamed_as_text):
        row["completionStartTime"] = row["endTime"]
    streamed_at_end["proxy_server_request"] = {**streamed_at_end["proxy_server_request"], "stream": True}
    streamed_as_text["proxy_server_request"] = {**streamed_as_text["proxy_server_request"], "stream": "true"}
    streamed["proxy_server_request"] = {**streamed["proxy_server_request"], "stream": True}
    create_litellm_table(store_url, rows)
    engine = get_engine(store_url)
    assert ingest_sources(engine, make_config(store_url, [{**LITELLM, "url": store_url}])).sources[0].stored == 5
    with session_scope(engine) as s:
        stored = {request_id: (ttft, latency, params) for request_id, ttft, latency, params in s.execute(
            select(TrafficSample.request_id, TrafficSample.ttft_ms, TrafficSample.latency_ms, TrafficSample.params))}
    assert all(latency == pytest.approx(3500) for _, latency, _ in stored.values())
    for row in (unstreamed, unsaid, streamed_at_end, streamed_as_text):
        assert stored[row["request_id"]][0] == pytest.approx(3500)  # as logged, nothing lost at ingest
    read = {request_id: logged_ttft_ms(*values) for request_id, values in stored.items()}
    assert read[unstreamed["request_id"]] is None and read[unsaid["request_id"]] is None
    assert read[streamed_at_end["request_id"]] == read[streamed_as_text["request_id"]] == pytest.approx(3500)
    assert read[streamed["request_id"]] == pytest.approx(310)
