"""End to end: all three sources into a real store (SQLite and PostgreSQL), reruns, crashes, backfills, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from shadowjudge.config import Config, parse_config
from shadowjudge.store import QuarantinedRecord, SourceCursor, TrafficSample, get_engine, session_scope, upgrade_database
from shadowjudge.traffic import ingest_sources, load_cursor, traffic_cli
from shadowjudge.traffic import ingest as ingest_module

FIXTURES = Path(__file__).parent / "fixtures" / "traffic"
PII: dict[str, list[str]] = json.loads((FIXTURES / "pii.json").read_text())
ROUTE = {"name": "chat-default", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}
ROOT = Path(__file__).resolve().parent.parent


def make_config(store_url: str, sources: list[dict], sampling: dict | None = None, **extra) -> Config:
    return parse_config({"store": {"url": store_url}, "sources": sources, "sampling": sampling or {},
                         "routes": [ROUTE], **extra}, environ={})


def litellm_rows() -> list[dict]:
    rows = []
    for line in (FIXTURES / "litellm_spend_logs.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("startTime", "endTime", "completionStartTime"):
            row[key] = datetime.fromisoformat(row[key])
        rows.append(row)
    return rows


def create_litellm_table(url: str, rows: list[dict]) -> None:
    """LiteLLM_SpendLogs as LiteLLM's Prisma migration creates it (types mapped for SQLite), filled with rows."""
    engine = get_engine(url)
    pg = engine.dialect.name == "postgresql"
    ts, js, real = ("TIMESTAMP(3)", "JSONB", "DOUBLE PRECISION") if pg else ("DATETIME", "JSON", "REAL")
    ddl = f'''CREATE TABLE "LiteLLM_SpendLogs" (
        "request_id" TEXT NOT NULL, "call_type" TEXT NOT NULL, "api_key" TEXT NOT NULL DEFAULT '',
        "spend" {real} NOT NULL DEFAULT 0.0, "total_tokens" INTEGER NOT NULL DEFAULT 0,
        "prompt_tokens" INTEGER NOT NULL DEFAULT 0, "completion_tokens" INTEGER NOT NULL DEFAULT 0,
        "startTime" {ts} NOT NULL, "endTime" {ts} NOT NULL, "request_duration_ms" INTEGER,
        "completionStartTime" {ts}, "model" TEXT NOT NULL DEFAULT '', "model_id" TEXT DEFAULT '',
        "model_group" TEXT DEFAULT '', "custom_llm_provider" TEXT DEFAULT '', "api_base" TEXT DEFAULT '',
        "user" TEXT DEFAULT '', "metadata" {js} DEFAULT '{{}}', "cache_hit" TEXT DEFAULT '', "cache_key" TEXT DEFAULT '',
        "request_tags" {js} DEFAULT '[]', "team_id" TEXT, "organization_id" TEXT, "end_user" TEXT,
        "requester_ip_address" TEXT, "messages" {js} DEFAULT '{{}}', "response" {js} DEFAULT '{{}}',
        "session_id" TEXT, "status" TEXT, "mcp_namespaced_tool_name" TEXT, "agent_id" TEXT,
        "proxy_server_request" {js} DEFAULT '{{}}',
        CONSTRAINT "LiteLLM_SpendLogs_pkey" PRIMARY KEY ("request_id"))'''
    with engine.begin() as conn:
        conn.execute(text(ddl))
        conn.execute(text('CREATE INDEX "LiteLLM_SpendLogs_startTime_request_id_idx" '
                          'ON "LiteLLM_SpendLogs" ("startTime", "request_id")'))
    insert_litellm_rows(url, rows)


def insert_litellm_rows(url: str, rows: list[dict]) -> None:
    from sqlalchemy import MetaData, Table

    if not rows:
        return
    engine = get_engine(url)
    table = Table("LiteLLM_SpendLogs", MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)


def all_sources(tmp_path: Path, store_url: str) -> list[dict]:
    gateway = tmp_path / "gateway"
    shutil.copytree(FIXTURES / "gateway", gateway)
    return [{"name": "gateway", "kind": "jsonl", "path": str(gateway), "batch_size": 16},
            {"name": "otel", "kind": "otel", "path": str(FIXTURES / "otel" / "export.jsonl"), "batch_size": 16},
            {"name": "litellm", "kind": "sql", "url": store_url, "mapping": "litellm", "batch_size": 16}]


def dump_samples(url: str) -> str:
    with get_engine(url).connect() as conn:
        rows = conn.execute(select(TrafficSample)).mappings().all()
    return json.dumps([dict(r) for r in rows], default=str, ensure_ascii=False)


def sample_ids(url: str) -> list[str]:
    with session_scope(get_engine(url)) as s:
        return list(s.scalars(select(TrafficSample.request_id)))


def test_all_three_sources_ingest_realistic_traffic_with_pii_redacted(store_url, tmp_path):
    create_litellm_table(store_url, litellm_rows())
    config = make_config(store_url, all_sources(tmp_path, store_url))
    report = ingest_sources(get_engine(store_url), config)

    by_source = {s.source: s for s in report.sources}
    assert report.ok
    assert (by_source["gateway"].read, by_source["gateway"].stored) == (60, 60)
    assert (by_source["otel"].read, by_source["otel"].stored) == (30, 30)  # the HTTP spans are not requests
    litellm = by_source["litellm"]
    assert (litellm.read, litellm.stored, litellm.quarantined) == (30, 27, 3)
    for s in report.sources:
        assert s.read == s.stored + s.duplicates + s.quarantined + s.filtered
    assert report.totals["stored"] == 117

    # No seeded PII, no hashed LiteLLM key, in any stored column; every kind was counted.
    dump = dump_samples(store_url)
    for kind, values in PII.items():
        for value in values:
            assert value not in dump, f"{kind} {value!r} reached the store"
        assert report.totals["redactions"].get(kind, 0) > 0, kind
    assert "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b" not in dump
    assert report.totals["redactions"]["SECRET"] >= 27

    with session_scope(get_engine(store_url)) as s:
        reasons = set(s.scalars(select(QuarantinedRecord.reason).where(QuarantinedRecord.source == "litellm")))
        assert any("store_prompts_in_spend_logs" in r for r in reasons)
        row = s.scalars(select(TrafficSample).where(TrafficSample.source == "litellm")
                        .order_by(TrafficSample.request_ts)).first()
        assert row.route == "chat-default" and row.incumbent_model == "claude-instant-1.2"
        assert row.latency_ms == pytest.approx(3500) and row.ttft_ms == pytest.approx(310)
        assert row.cache_hit is True and row.input_tokens > 0 and row.cost_usd > 0
        assert row.params == {"temperature": 0.7} and row.meta["team_id"] == "team-b"
        otel = s.scalars(select(TrafficSample).where(TrafficSample.source == "otel")).first()
        assert otel.response_text and otel.latency_ms > 1000 and otel.params["max_tokens"] == 1024
        assert otel.meta["service"] == "chat-gateway" and otel.stratum is None
        flat = s.scalars(select(TrafficSample).where(TrafficSample.request_id == "req-5649ddeaff8d")).one()
        assert flat.params == {"temperature": 0.2} and flat.request_ts.replace(tzinfo=timezone.utc) == \
            datetime(2026, 11, 22, 0, 40, tzinfo=timezone.utc)


def test_rerun_reads_only_what_is_new(store_url, tmp_path):
    sources = all_sources(tmp_path, store_url)
    create_litellm_table(store_url, litellm_rows()[:20])
    config = make_config(store_url, sources)
    engine = get_engine(store_url)
    first = ingest_sources(engine, config)
    assert first.totals["read"] == 60 + 30 + 20

    again = ingest_sources(engine, config)
    assert again.totals["read"] == 0 and again.totals["stored"] == 0

    # New lines appended to the live file, new rows in the table: only those are read.
    current = tmp_path / "gateway" / "2026-11-22.jsonl"
    lines = current.read_text().splitlines()
    extra = [json.loads(lines[0]), json.loads(lines[1])]
    extra[0]["id"], extra[1]["id"] = "req-new-1", "req-new-2"
    with open(current, "a") as fh:
        fh.write(json.dumps(extra[0]) + "\n" + json.dumps(extra[1]) + "\n")
    insert_litellm_rows(store_url, litellm_rows()[20:])
    third = ingest_sources(engine, config)
    by_source = {s.source: s for s in third.sources}
    assert (by_source["gateway"].read, by_source["gateway"].stored) == (2, 2)
    assert by_source["otel"].read == 0
    assert (by_source["litellm"].read, by_source["litellm"].stored + by_source["litellm"].quarantined) == (10, 10)
    ids = sample_ids(store_url)
    assert len(ids) == len(set(ids)) == first.totals["stored"] + 2 + by_source["litellm"].stored


def _expected_ids(tmp_path: Path, sources: list[dict]) -> set[str]:
    """What a clean, uninterrupted run stores, in a separate SQLite store."""
    url = f"sqlite:///{tmp_path}/reference.db"
    upgrade_database(url)
    ingest_sources(get_engine(url), make_config(url, sources))
    return set(sample_ids(url))


def test_crash_inside_the_batch_loop_resumes_with_nothing_lost_or_doubled(store_url, tmp_path, monkeypatch):
    sources = all_sources(tmp_path, store_url)[:2]
    for s in sources:
        s["batch_size"] = 7
    expected = _expected_ids(tmp_path, sources)
    config = make_config(store_url, sources)
    engine = get_engine(store_url)

    real_insert = ingest_module.insert_samples
    calls = {"n": 0}

    def failing_insert(session, rows):
        calls["n"] += 1
        inserted = real_insert(session, rows)  # the rows are written, then the transaction dies
        if calls["n"] == 4:
            raise RuntimeError("killed mid-batch")
        return inserted

    monkeypatch.setattr(ingest_module, "insert_samples", failing_insert)
    with pytest.raises(RuntimeError, match="killed mid-batch"):
        ingest_sources(engine, config)
    assert len(sample_ids(store_url)) == 21  # three committed batches of 7; the fourth rolled back
    assert load_cursor(engine, "gateway") is not None

    monkeypatch.setattr(ingest_module, "insert_samples", real_insert)
    resumed = ingest_sources(engine, config)
    assert resumed.totals["duplicates"] == 0
    ids = sample_ids(store_url)
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_crash_while_reading_the_source_resumes_exactly(store_url, tmp_path, monkeypatch):
    sources = all_sources(tmp_path, store_url)[1:2]  # OTel: the cursor sits inside an export line
    sources[0]["batch_size"] = 4
    expected = _expected_ids(tmp_path, sources)
    config = make_config(store_url, sources)
    engine = get_engine(store_url)

    from shadowjudge.traffic.sources import otel

    real_read = otel.OtelSource.read

    def dying_read(self, cursor, window):
        for i, step in enumerate(real_read(self, cursor, window)):
            if i == 10:
                raise KeyboardInterrupt  # e.g. Ctrl-C or a worker being stopped
            yield step

    monkeypatch.setattr(otel.OtelSource, "read", dying_read)
    with pytest.raises(KeyboardInterrupt):
        ingest_sources(engine, config)
    cursor = load_cursor(engine, "otel")
    assert cursor["span"] > 0  # resumes in the middle of a multi-span export

    monkeypatch.setattr(otel.OtelSource, "read", real_read)
    ingest_sources(engine, config)
    ids = sample_ids(store_url)
    assert len(ids) == len(set(ids)) and set(ids) == expected


KILLER = """
import os, signal, sys
from shadowjudge.config import load_config
from shadowjudge.store import get_engine
from shadowjudge.traffic import ingest as ingest_module
real = ingest_module._store_batch
calls = []
def store_then_die(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
ingest_module._store_batch = store_then_die
config = load_config(sys.argv[1])
ingest_module.ingest_sources(get_engine(config.store.url), config)
"""


def test_killed_process_resumes_with_nothing_lost_or_doubled(store_url, tmp_path):
    sources = all_sources(tmp_path, store_url)[:1]
    sources[0]["batch_size"] = 5
    expected = _expected_ids(tmp_path, sources)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps({"store": {"url": store_url}, "sources": sources, "routes": [ROUTE]}))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(config_path)], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(sample_ids(store_url)) == 15

    engine = get_engine(store_url)
    report = ingest_sources(engine, make_config(store_url, sources))
    assert report.totals["read"] == 45 and report.totals["duplicates"] == 0
    ids = sample_ids(store_url)
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_backfill_stores_the_window_and_leaves_the_live_cursor_alone(store_url, tmp_path):
    sources = all_sources(tmp_path, store_url)
    create_litellm_table(store_url, litellm_rows())
    config = make_config(store_url, sources)
    engine = get_engine(store_url)

    day1 = ingest_sources(engine, config, since=datetime(2026, 11, 21, tzinfo=timezone.utc),
                          until=datetime(2026, 11, 22, tzinfo=timezone.utc))
    by_source = {s.source: s for s in day1.sources}
    assert by_source["gateway"].stored == 30 and by_source["gateway"].filtered_by == {"outside_window": 30}
    assert by_source["otel"].stored == 0 and by_source["litellm"].read == 0  # SQL pushes the window down
    assert all(s.backfill and s.cursor is None for s in day1.sources)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(SourceCursor)) == 0

    live = ingest_sources(engine, config)
    by_source = {s.source: s for s in live.sources}
    assert (by_source["gateway"].read, by_source["gateway"].duplicates, by_source["gateway"].stored) == (60, 30, 30)
    cursor_after_live = load_cursor(engine, "gateway")

    ingest_sources(engine, config, since=datetime(2026, 11, 22, tzinfo=timezone.utc))  # a second backfill
    assert load_cursor(engine, "gateway") == cursor_after_live
    ids = sample_ids(store_url)
    assert len(ids) == len(set(ids)) == 60 + 30 + 27


def _write_bad_inputs(folder: Path) -> tuple[int, str]:
    """A log folder holding every kind of bad input next to good records; returns (good records outside the
    truncated gzip, a secret that appears only inside bad lines)."""
    folder.mkdir()
    good = [json.loads(line) for line in (FIXTURES / "gateway" / "2026-11-22.jsonl").read_text().splitlines()[:6]]
    secret = "leak-me-4111111111111111"
    lines = [json.dumps(good[0]), f'{{"id": "x", "messages": [{secret}', json.dumps([1, 2, 3]),
             json.dumps({"timestamp": "2026-11-22T00:00:00Z", "request": {"model": "m", "messages": []}}),
             json.dumps({**good[1], "timestamp": secret}), json.dumps(good[2]), "   ",
             json.dumps({**good[3], "metadata": {"note": "x" * 5000}}), json.dumps({**good[4], "latency_ms": -4}),
             json.dumps(good[5])]
    raw = [line.encode() for line in lines] + [b'\xff\xfe{"not": "utf-8"}']
    (folder / "a.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as gz:
        for row in good[:3]:
            gz.write((json.dumps({**row, "id": row["id"] + "-gz"}) + "\n").encode())
    data = (folder / "b.jsonl.gz").read_bytes()
    (folder / "b.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated in transfer
    (folder / "c.jsonl").write_text(json.dumps({**good[0], "id": "req-after"}) + "\n")
    return 4, secret


def test_bad_input_is_quarantined_counted_and_the_rest_goes_on(store_url, tmp_path):
    good, secret = _write_bad_inputs(tmp_path / "logs")
    config = make_config(store_url, [{"name": "logs", "kind": "jsonl", "path": str(tmp_path / "logs"),
                                      "max_record_bytes": 4000, "batch_size": 3}])
    report = ingest_sources(get_engine(store_url), config).sources[0]

    assert report.stored >= good  # the good lines of a.jsonl and c.jsonl, any the gzip still gave
    assert report.read == report.stored + report.duplicates + report.quarantined + report.filtered
    with session_scope(get_engine(store_url)) as s:
        quarantined = {q.position: q.reason for q in s.scalars(select(QuarantinedRecord))}
    reasons = list(quarantined.values())
    assert report.quarantined == len(quarantined) == 8
    assert any(r.startswith("invalid JSON") for r in reasons)
    assert any("must be a JSON object" in r for r in reasons)
    assert any("non-empty list of messages" in r for r in reasons)
    assert any("'timestamp'" in r for r in reasons)
    assert any("exceeds max_record_bytes=4000" in r for r in reasons)
    assert any("'latency_ms'" in r for r in reasons)
    assert any(p.startswith("b.jsonl.gz:") and "gzip" in r for p, r in quarantined.items())
    assert all(secret not in r and "4111" not in r for r in reasons)  # reasons never quote the input
    assert "req-after" in sample_ids(store_url)

    again = ingest_sources(get_engine(store_url), config).sources[0]  # the broken gzip is not retried
    assert again.read == 0


def test_a_record_the_store_cannot_take_is_quarantined_not_a_stuck_source(store_url, tmp_path):
    """Records that parse but that orjson, PostgreSQL or the sampler's day windows cannot take used to fail their
    whole batch on every run: the cursor never moved past them."""
    def line(**change):
        return json.dumps({"id": "ok", "timestamp": "2026-11-22T10:00:00Z", "route": "chat",
                           "request": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                           **change})

    deep: dict = {}
    for _ in range(300):
        deep = {"a": deep}
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.jsonl").write_text("\n".join([
        line(id="before"),
        line(id="too-deep", metadata={"k": deep}),
        line(id="far-future", timestamp="9999-12-31T12:00:00Z"),
        line(id="nul\u0000inside"),
        line(id="after"),
    ]) + "\n")
    config = make_config(store_url, [{"name": "logs", "kind": "jsonl", "path": str(logs), "batch_size": 100}])
    report = ingest_sources(get_engine(store_url), config).sources[0]
    assert report.quarantined == 2 and report.stored == 3, report.to_dict()
    with session_scope(get_engine(store_url)) as s:
        reasons = sorted(q.reason for q in s.scalars(select(QuarantinedRecord)))
    assert reasons == ["'metadata' cannot be stored as JSON (Recursion limit reached)", "'timestamp' is out of range"]
    ids = sample_ids(store_url)
    assert {"before", "after"} <= set(ids) and any(i.startswith("sha256:") for i in ids)  # the NUL id, hashed
    assert ingest_sources(get_engine(store_url), config).sources[0].read == 0  # the cursor moved past them


record_like = st.fixed_dictionaries(
    {"timestamp": st.one_of(st.just("2026-11-22T10:00:00Z"), st.integers(), st.text(max_size=5), st.none()),
     "request": st.one_of(st.fixed_dictionaries({"model": st.one_of(st.text(max_size=8), st.none()),
                                                 "messages": st.one_of(
                                                     st.lists(st.fixed_dictionaries(
                                                         {"role": st.sampled_from(["user", "system", 3]),
                                                          "content": st.one_of(st.text(max_size=40), st.none(),
                                                                               st.integers())}), max_size=3),
                                                     st.text(max_size=5))}),
                          st.text(max_size=5))},
    optional={"id": st.one_of(st.text(max_size=140), st.integers(), st.lists(st.integers(), max_size=2)),
              "route": st.one_of(st.text(max_size=300), st.none()),
              "response": st.one_of(st.text(max_size=30), st.dictionaries(st.text(max_size=8), st.integers())),
              "metadata": st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=8)), st.integers()),
              "latency_ms": st.one_of(st.floats(allow_nan=False), st.text(max_size=4), st.booleans()),
              "cache_hit": st.one_of(st.booleans(), st.text(max_size=4))})
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=12)
fuzz_line = st.one_of(st.binary(max_size=120), json_values.map(lambda v: json.dumps(v).encode()),
                      record_like.map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory) -> Path:
    """A migrated SQLite file to copy: cheaper than running the migrations for every fuzz example."""
    path = tmp_path_factory.mktemp("template") / "store.db"
    upgrade_database(f"sqlite:///{path}")
    get_engine(f"sqlite:///{path}").dispose()
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(fuzz_line, min_size=1, max_size=12), gzipped=st.booleans())
def test_fuzzed_input_never_crashes_and_every_record_is_accounted_for(tmp_path, migrated_sqlite, lines, gzipped):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copy(migrated_sqlite, work / "store.db")
    url = f"sqlite:///{work}/store.db"
    payload = b"\n".join(lines) + b"\n"
    assume(gzipped or not payload.startswith(b"\x1f\x8b"))  # a plain file starting with gzip's magic is read as gzip
    path = work / ("fuzz.jsonl.gz" if gzipped else "fuzz.jsonl")
    path.write_bytes(gzip.compress(payload) if gzipped else payload)
    config = make_config(url, [{"name": "fuzz", "kind": "jsonl", "path": str(path), "max_record_bytes": 150,
                                "batch_size": 4}], sampling={"rate": 0.7, "stratify_by": "k", "min_per_stratum": 1})
    report = ingest_sources(get_engine(url), config).sources[0]

    non_blank = sum(1 for segment in payload.split(b"\n")[:-1] if segment.strip())
    assert report.read == non_blank
    assert report.read == report.stored + report.duplicates + report.quarantined + report.filtered
    with session_scope(get_engine(url)) as s:
        assert s.scalar(select(func.count()).select_from(TrafficSample)) == report.stored
        assert s.scalar(select(func.count()).select_from(QuarantinedRecord)) == report.quarantined
    get_engine(url).dispose()


def test_hostile_strings_are_stored_safely(store_url, tmp_path):
    record = json.loads((FIXTURES / "gateway" / "2026-11-22.jsonl").read_text().splitlines()[0])
    record["request"]["messages"][1]["content"] = "nul\u0000byte \u202e rtl \U0001F600 emoji " + "é" * 50
    record["response"]["choices"][0]["message"]["content"] = "answer with\u0000nul"
    record["metadata"] = {"deep": {"er": [1, {"x": "y\u0000"}]}, "task": "t\u0000"}
    path = tmp_path / "hostile.jsonl"
    path.write_text(json.dumps(record) + "\n")
    config = make_config(store_url, [{"name": "h", "kind": "jsonl", "path": str(path)}],
                         sampling={"stratify_by": "task"})
    report = ingest_sources(get_engine(store_url), config).sources[0]
    assert report.stored == 1
    with session_scope(get_engine(store_url)) as s:
        row = s.scalars(select(TrafficSample)).one()
        assert "emoji" in row.messages[1]["content"] and "\x00" not in (row.response_text or "")


def test_an_unreadable_source_is_reported_and_the_others_go_on(store_url, tmp_path):
    sources = [{"name": "missing", "kind": "jsonl", "path": str(tmp_path / "nope")},
               {"name": "db", "kind": "sql", "url": "postgresql+psycopg2://u:hunter2secret@127.0.0.1:1/x",
                "mapping": "litellm"},
               all_sources(tmp_path, store_url)[0]]
    report = ingest_sources(get_engine(store_url), make_config(store_url, sources))
    by_source = {s.source: s for s in report.sources}
    assert not report.ok and report.totals["errors"] == 2
    assert "does not exist" in by_source["missing"].error
    assert "hunter2secret" not in by_source["db"].error and "cannot read" in by_source["db"].error
    assert by_source["gateway"].stored == 60


def test_cli_ingest_backfill_and_quarantine(store_url, tmp_path):
    _write_bad_inputs(tmp_path / "logs")
    config_path = tmp_path / "shadowjudge.yaml"
    config_path.write_text(json.dumps({"store": {"url": store_url}, "routes": [ROUTE], "sources": [
        {"name": "logs", "kind": "jsonl", "path": str(tmp_path / "logs"), "max_record_bytes": 4000}]}))
    runner = CliRunner()

    result = runner.invoke(traffic_cli, ["ingest", "-c", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["totals"]["quarantined"] == 8

    result = runner.invoke(traffic_cli, ["ingest", "-c", str(config_path), "--since", "2026-11-22",
                                         "--until", "2026-11-23"])
    assert result.exit_code == 0 and "backfill" in result.output

    result = runner.invoke(traffic_cli, ["quarantine", "-c", str(config_path), "--json"])
    assert result.exit_code == 0
    entries = [json.loads(line) for line in result.output.splitlines()]
    assert len(entries) == 8 and all(e["source"] == "logs" and e["reason"] for e in entries)

    bad_window = runner.invoke(traffic_cli, ["ingest", "-c", str(config_path), "--since", "2026-11-23",
                                             "--until", "2026-11-22"])
    assert bad_window.exit_code != 0 and "must be before" in str(bad_window.exception)
    unknown = runner.invoke(traffic_cli, ["ingest", "-c", str(config_path), "--source", "nope"])
    assert unknown.exit_code != 0 and "no source named nope" in str(unknown.exception)


def test_cli_refuses_a_store_without_schema(tmp_path):
    config_path = tmp_path / "shadowjudge.yaml"
    config_path.write_text(json.dumps({"store": {"url": f"sqlite:///{tmp_path}/empty.db"}, "routes": [ROUTE],
                                       "sources": [{"name": "g", "kind": "jsonl", "path": str(FIXTURES)}]}))
    result = CliRunner().invoke(traffic_cli, ["ingest", "-c", str(config_path)])
    assert result.exit_code != 0 and "no schema" in str(result.exception)


def test_log_rotation_between_runs_loses_nothing_and_stores_nothing_twice(store_url, tmp_path):
    """Lines appended after a run, then `requests.jsonl` rotated to a dated name (sorting before it) and
    compressed: the next run stores those lines from the rotated file, and no record or quarantine row twice."""
    folder = tmp_path / "logs"
    folder.mkdir()
    live = folder / "requests.jsonl"
    records = [json.loads(line) for line in gzip.decompress(
        (FIXTURES / "gateway" / "2026-11-21.jsonl.gz").read_bytes()).decode().splitlines()][:30]
    assert len({r["id"] for r in records}) == 30

    def lines(chunk) -> str:
        return "".join(json.dumps(r) + "\n" for r in chunk)

    live.write_text(lines(records[:10]) + "{broken one\n")
    config = make_config(store_url, [{"name": "gw", "kind": "jsonl", "path": str(folder), "batch_size": 4}])
    engine = get_engine(store_url)
    first = ingest_sources(engine, config)
    assert (first.totals["stored"], first.totals["quarantined"]) == (10, 1)

    live.write_text(live.read_text() + lines(records[10:20]) + "{broken two\n")
    (folder / "requests-2026-11-24.jsonl.gz").write_bytes(gzip.compress(live.read_bytes()))
    live.write_text(lines(records[20:]))
    second = ingest_sources(engine, config)
    assert (second.totals["stored"], second.totals["quarantined"]) == (20, 1)
    assert ingest_sources(engine, config).totals["read"] == 0
    assert sorted(sample_ids(store_url)) == sorted(r["id"] for r in records)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(QuarantinedRecord)) == 2


def test_an_ingest_that_lost_its_lease_stops_before_its_next_batch_commits(store_url, tmp_path, monkeypatch):
    """An ingest paused past its lease while another took it over went on writing beside the new holder (both
    cursors, both daily caps): it must stop before its next batch commits, keeping what it had committed."""
    from datetime import timedelta

    from sqlalchemy import delete, update

    from shadowjudge.store import Lock
    from shadowjudge.store.lease import LeaseLock

    records = [json.loads(line) for line in gzip.decompress(
        (FIXTURES / "gateway" / "2026-11-21.jsonl.gz").read_bytes()).decode().splitlines()]
    assert len(records) == 30
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = make_config(store_url, [{"name": "gw", "kind": "jsonl", "path": str(tmp_path), "batch_size": 10}])
    engine = get_engine(store_url)
    real_store_batch = ingest_module._store_batch
    stored_batches = []

    def store_batch_then_lose_the_lease(*args, **kwargs):
        real_store_batch(*args, **kwargs)
        stored_batches.append(len(stored_batches) + 1)
        if len(stored_batches) == 1:  # our lease runs out (a long pause) and another ingest takes it over
            with session_scope(engine) as s:
                s.execute(update(Lock).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
            assert LeaseLock(engine, ingest_module.INGEST_LOCK, holder="otherhost:1234:abcd").acquire()

    monkeypatch.setattr(ingest_module, "_store_batch", store_batch_then_lose_the_lease)
    with pytest.raises(ingest_module.IngestBusy, match="otherhost:1234:abcd"):
        ingest_sources(engine, config)
    assert len(sample_ids(store_url)) == 10 and stored_batches == [1]
    with session_scope(engine) as s:
        assert s.scalar(select(Lock.holder)) == "otherhost:1234:abcd"  # the new holder's lease is left alone
        s.execute(delete(Lock))  # the other ingest finishes

    monkeypatch.setattr(ingest_module, "_store_batch", real_store_batch)
    resumed = ingest_sources(engine, config)  # from the cursor the committed batch left
    assert (resumed.totals["read"], resumed.totals["duplicates"]) == (20, 0)
    assert sorted(sample_ids(store_url)) == sorted(r["id"] for r in records)
