"""Rotated logs, from a review's proofs: a source that is one file, backfills of logrotate's files, an OTel cursor
inside a file's first export, a folder that cannot be listed, a byte order mark, the cursor of a run with nothing
new. Real files in tmp_path, real gzip, rotation by rename or copytruncate."""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from shadowjudge.config import Config, parse_config
from shadowjudge.store import get_engine
from shadowjudge.traffic import (
    Rejected,
    SourceUnavailable,
    TimeWindow,
    TrafficRecord,
    ingest_sources,
    load_cursor,
)
from shadowjudge.traffic.lines import read_lines
from shadowjudge.traffic.sources.jsonl import SUFFIXES, JsonlSource
from shadowjudge.traffic.sources.otel import OtelSource

ROUTE = {"name": "chat-default", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}
LIVE = TimeWindow()


def make_config(store_url: str, sources: list[dict]) -> Config:
    return parse_config({"store": {"url": store_url}, "sources": sources, "routes": [ROUTE]}, environ={})


def request_line(request_id: str, day: int = 24) -> bytes:
    return json.dumps({"id": request_id, "timestamp": f"2026-11-{day}T10:00:00Z",
                       "request": {"model": "chat-default",
                                   "messages": [{"role": "user", "content": f"q {request_id}"}]}}).encode() + b"\n"


def requests(*ids: str, day: int = 24) -> bytes:
    return b"".join(request_line(i, day) for i in ids)


def ids_read(source, cursor=None, window: TimeWindow = LIVE) -> list[str]:
    return [s.item.request_id for s in source.read(cursor, window) if isinstance(s.item, TrafficRecord)]


def last_cursor(source, cursor=None) -> dict:
    return list(source.read(cursor, LIVE))[-1].cursor


def set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


def rotate_after_a_tail(live: Path) -> None:
    """The log gets one more line ("tail0") after the cursor was saved, then logrotate moves it to `<name>.1`."""
    live.write_bytes(requests("old0", "tail0"))
    rotated = live.with_name(live.name + ".1")
    live.rename(rotated)
    set_mtime(rotated, 1_800_000_000)


@contextmanager
def lines_warnings() -> Iterator[list[str]]:
    """The reader's warnings, from a handler on its own logger: other tests' logging setups may keep records
    from reaching caplog's."""
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("shadowjudge.traffic.lines")
    level, disabled = logger.level, logger.disabled
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    try:
        yield warnings
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


# --- a source that is one file ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rotated_name, compress", [
    ("requests-2026-11-24.jsonl", False),  # the README's example
    ("requests-2026-11-24.jsonl.gz", True),  # ... compressed before the next run
    ("requests.20261124.jsonl", False),
    ("requests.jsonl.1", False),  # logrotate's names were found already
    ("requests_2026-11-24.jsonl", False),  # `_` sorts after `.`: the name was never looked at
    ("requests_20261124T10.jsonl.gz", True),
])
@pytest.mark.parametrize("read_before", [3, 40, 600])  # a cursor before and past 1 KiB, past the 64 KiB head
def test_a_file_source_reads_the_lines_written_before_it_was_rotated_to_a_dated_name(tmp_path, rotated_name,
                                                                                    compress, read_before):
    """`path: logs/requests.jsonl`, rotated to `requests-2026-11-24.jsonl`: only the folder's listing was searched
    for the rotated file, a file source's listing holds the file alone, and the lines written since the last run
    were lost with exit 0."""
    live = tmp_path / "requests.jsonl"
    first = requests(*(f"old{i}" for i in range(read_before)))
    live.write_bytes(first)
    source = JsonlSource("s", str(live), 100_000)
    cursor = last_cursor(source)
    live.write_bytes(first + requests("tail0", "tail1"))
    if compress:
        (tmp_path / rotated_name).write_bytes(gzip.compress(live.read_bytes()))
        live.unlink()
    else:
        live.rename(tmp_path / rotated_name)
    live.write_bytes(requests("fresh0"))

    assert ids_read(source, cursor) == ["tail0", "tail1", "fresh0"]
    assert ids_read(source, last_cursor(source, cursor)) == []


def test_a_file_source_never_takes_another_log_in_its_folder_for_a_rotation(tmp_path):
    """The folder of a file source holds other logs: only the file's own dated names (its stem, a date or number,
    its extension) are rotations; another service's log, or an operator's copy, is not read even when it starts
    with the same bytes or was modified after the rotation."""
    live = tmp_path / "requests.jsonl"
    first = requests("old0", "old1")
    live.write_bytes(first)
    source = JsonlSource("s", str(live), 100_000)
    cursor = last_cursor(source)
    live.write_bytes(first + requests("tail0"))
    live.rename(tmp_path / "requests-2026-11-24.jsonl")
    set_mtime(tmp_path / "requests-2026-11-24.jsonl", 1_800_000_000)
    others = {"payments-2026-11-24.jsonl": requests("pay0"), "requests-internal.jsonl": requests("internal0"),
              "requests.jsonl.bak": requests("backup0"), "auth.jsonl": first + requests("auth0"),
              "requests-2026-11-24.log": requests("otherext0")}
    for name, body in others.items():
        (tmp_path / name).write_bytes(body)
        set_mtime(tmp_path / name, 1_800_000_600)  # after the rotation
    live.write_bytes(requests("fresh0"))
    assert ids_read(source, cursor) == ["tail0", "fresh0"]


def test_logrotates_other_files_are_not_rotations_either(tmp_path):
    """A folder source: `requests.jsonl.bak` (not logrotate's name: no number, no date) modified after the
    rotation was read whole as a later rotation of the cursor's file."""
    live = tmp_path / "requests.jsonl"
    live.write_bytes(requests("old0"))
    source = JsonlSource("s", str(tmp_path), 100_000)
    cursor = last_cursor(source)
    rotate_after_a_tail(live)
    (tmp_path / "requests.jsonl.bak").write_bytes(requests("backup0"))
    set_mtime(tmp_path / "requests.jsonl.bak", 1_800_000_600)
    live.write_bytes(requests("fresh0"))
    assert ids_read(source, cursor) == ["tail0", "fresh0"]


# Siblings of a file source `requests.jsonl` that name other logs: a worker, a shard, a pod, a port, a year.
WORKERS_LOGS = ("requests-1.jsonl", "requests-2.jsonl", "requests_3.jsonl", "requests.8080.jsonl",
                "requests-2026.jsonl", "requests-99999.jsonl.gz")


def _write_workers_logs(folder: Path, modified: int) -> None:
    for number, name in enumerate(WORKERS_LOGS):
        body = requests(f"worker{number}")
        (folder / name).write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
        set_mtime(folder / name, modified)


def test_other_workers_logs_beside_a_file_source_are_never_read_as_its_rotations(tmp_path):
    """`requests-2.jsonl` (a worker's, a shard's, a pod's log) matched the dated-name rule (stem, separator,
    number, extension): a backfill of `requests.jsonl` read the other logs as its own, and after every rotation
    of `requests.jsonl` a live run read them whole again as "rotations made later". Only a date names a
    rotation between the stem and the extension; a number alone only after the full name (`requests.jsonl.1`)."""
    live = tmp_path / "requests.jsonl"
    (tmp_path / "requests-2026-11-23.jsonl").write_bytes(requests("d23"))
    _write_workers_logs(tmp_path, 1_700_000_000)
    live.write_bytes(requests("old0"))
    source = JsonlSource("s", str(live), 100_000)
    window = TimeWindow(datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert ids_read(source, None, window) == ["d23", "old0"]

    cursor = last_cursor(source)
    rotate_after_a_tail(live)
    _write_workers_logs(tmp_path, 1_800_000_600)  # the workers went on writing after the rotation
    live.write_bytes(requests("fresh0"))
    assert ids_read(source, cursor) == ["tail0", "fresh0"]


def test_a_dated_file_beside_a_log_that_logrotate_rotates_is_not_read_as_a_later_rotation(tmp_path):
    """The log went to `requests.jsonl.1`: a `requests-2026-11-24.jsonl` written after that (an export, another
    program's file) is not this log's later rotation; it is named in a warning, not read. Rotations named like
    the one the log went to still are (two dated rotations between runs lose neither)."""
    live = tmp_path / "requests.jsonl"
    live.write_bytes(requests("old0"))
    source = JsonlSource("s", str(live), 100_000)
    cursor = last_cursor(source)
    rotate_after_a_tail(live)
    (tmp_path / "requests-2026-11-24.jsonl").write_bytes(requests("export0"))
    set_mtime(tmp_path / "requests-2026-11-24.jsonl", 1_800_000_600)
    live.write_bytes(requests("fresh0"))
    with lines_warnings() as warnings:
        assert ids_read(source, cursor) == ["tail0", "fresh0"]
    assert any("requests-2026-11-24.jsonl is dated like a rotation of requests.jsonl" in w for w in warnings), \
        warnings

    for name in ("requests.jsonl.1", "requests-2026-11-24.jsonl"):
        (tmp_path / name).unlink()
    cursor = last_cursor(source)  # now rotated to dated names, twice between runs
    live.write_bytes(requests("fresh0", "tail1"))
    live.rename(tmp_path / "requests-2026-11-25.jsonl")
    set_mtime(tmp_path / "requests-2026-11-25.jsonl", 1_800_001_000)
    (tmp_path / "requests-2026-11-26.jsonl").write_bytes(requests("d26"))
    set_mtime(tmp_path / "requests-2026-11-26.jsonl", 1_800_002_000)
    (tmp_path / "requests_2026-11-26.jsonl").write_bytes(requests("other"))  # named otherwise: not read
    set_mtime(tmp_path / "requests_2026-11-26.jsonl", 1_800_002_000)
    live.write_bytes(requests("fresh1"))
    assert ids_read(source, cursor) == ["tail1", "d26", "fresh1"]


def test_a_cursor_saved_with_a_1_kib_head_still_resumes_its_file(tmp_path):
    """Cursors stored before `head_bytes` existed hashed up to the first 1 KiB: the file they name is still the
    same file, resumed where they point, not re-read as a replacement (nor its rotation missed)."""
    import hashlib

    live = tmp_path / "requests.jsonl"
    for count in (2, 40):
        first = requests(*(f"old{count}-{i}" for i in range(count)))
        live.write_bytes(first)
        legacy = {"file": live.name, "offset": len(first),
                  "head": hashlib.blake2b(first[:1024], digest_size=8).hexdigest()}
        source = JsonlSource("s", str(tmp_path), 100_000)
        live.write_bytes(first + requests("new0"))
        assert ids_read(source, legacy) == ["new0"]
        live.rename(tmp_path / "requests.jsonl.1")
        live.write_bytes(requests("fresh0"))
        assert ids_read(source, legacy) == ["new0", "fresh0"]
        (tmp_path / "requests.jsonl.1").unlink()


# --- backfills --------------------------------------------------------------------------------------------------

def _logrotate_folder(folder: Path) -> None:
    """Three days of one log as logrotate leaves them (numbered, delaycompress): .2.gz, .1, then the live file."""
    folder.mkdir(exist_ok=True)
    (folder / "requests.jsonl").write_bytes(requests("d23-0", "d23-1", day=23))
    (folder / "requests.jsonl.1").write_bytes(requests("d22-0", "d22-1", day=22))
    (folder / "requests.jsonl.2.gz").write_bytes(gzip.compress(requests("d21-0", "d21-1", day=21)))


@pytest.mark.parametrize("as_file", [False, True])
def test_a_backfill_reads_logrotates_rotated_files_oldest_first(tmp_path, as_file):
    """`--since/--until` of a past day read only the names ending in the source's suffixes: the day's lines, in
    `requests.jsonl.1` or `.2.gz`, were never read (read=3 stored=0, exit 0)."""
    folder = tmp_path / "logs"
    _logrotate_folder(folder)
    (folder / "other.jsonl").write_bytes(requests("other0", day=22))
    source = JsonlSource("s", str(folder / "requests.jsonl" if as_file else folder), 100_000)
    window = TimeWindow(datetime(2026, 11, 1, tzinfo=timezone.utc), datetime(2026, 12, 1, tzinfo=timezone.utc))
    got = ids_read(source, None, window)
    days = ["d21-0", "d21-1", "d22-0", "d22-1", "d23-0", "d23-1"]
    assert got == (days if as_file else ["other0", *days])
    assert ids_read(source) == (["d23-0", "d23-1"] if as_file else ["other0", "d23-0", "d23-1"])  # a live run


def test_a_backfill_orders_dated_rotations_by_date_and_reads_a_file_being_compressed_once(tmp_path):
    """logrotate's dateext names go oldest date first; a name and its `.gz` both there (gzip still writing)
    are one file: read once. A file source's own dated names are read too, before it."""
    (tmp_path / "requests.jsonl").write_bytes(requests("live"))
    (tmp_path / "requests.jsonl-20261123").write_bytes(requests("d23"))
    (tmp_path / "requests.jsonl-20261123.gz").write_bytes(gzip.compress(requests("d23")))
    (tmp_path / "requests.jsonl-20261122.gz").write_bytes(gzip.compress(requests("d22")))
    (tmp_path / "requests-2026-11-20.jsonl").write_bytes(requests("d20"))
    (tmp_path / "requests_2026-11-21.jsonl.gz").write_bytes(gzip.compress(requests("d21")))
    (tmp_path / "unrelated-2026-11-19.jsonl").write_bytes(requests("unrelated"))
    window = TimeWindow(datetime(2026, 11, 1, tzinfo=timezone.utc))
    steps = list(read_lines(tmp_path / "requests.jsonl", None, 100_000, SUFFIXES, backfill=True))
    assert [s.file for s in steps if s.data] == ["requests-2026-11-20.jsonl", "requests_2026-11-21.jsonl.gz",
                                                 "requests.jsonl-20261122.gz", "requests.jsonl-20261123",
                                                 "requests.jsonl"]
    assert ids_read(JsonlSource("s", str(tmp_path / "requests.jsonl"), 100_000), None, window) == \
        ["d20", "d21", "d22", "d23", "live"]


def test_a_backfill_through_the_ingest_stores_the_day_from_the_rotated_files(sqlite_url, tmp_path):
    folder = tmp_path / "logs"
    _logrotate_folder(folder)
    config = make_config(sqlite_url, [{"name": "gw", "kind": "jsonl", "path": str(folder)}])
    report = ingest_sources(get_engine(sqlite_url), config, since=datetime(2026, 11, 22, tzinfo=timezone.utc),
                            until=datetime(2026, 11, 23, tzinfo=timezone.utc)).sources[0]
    assert (report.read, report.stored, report.filtered_by) == (6, 2, {"outside_window": 4})
    assert load_cursor(get_engine(sqlite_url), "gw") is None


# --- large folders --------------------------------------------------------------------------------------------

def _count_name_reads(monkeypatch, folder: Path) -> Counter:
    """How often the reader looks at each name listed in `folder`: its entries come back as paths that count
    every read of their `name`."""
    reads: Counter = Counter()

    class CountingPath(type(folder)):  # type: ignore[misc]
        @property
        def name(self) -> str:
            reads[super().name] += 1
            return super().name

    real = Path.iterdir

    def iterdir(self):
        for entry in real(self):
            yield CountingPath(entry) if self == folder else entry

    monkeypatch.setattr(Path, "iterdir", iterdir)
    return reads


def _hourly_logs(folder: Path, hours: int) -> None:
    """`hours` hourly logs, each with a checksum beside it and every third one's logrotate leftover."""
    folder.mkdir()
    for hour in range(hours):
        name = f"gw-{hour:05d}.jsonl"
        (folder / name).write_bytes(requests(f"h{hour}"))
        (folder / f"{name}.md5").write_bytes(b"0" * 32)
        if hour % 3 == 0:
            (folder / f"{name}.1").write_bytes(requests(f"h{hour}-rotated"))


@pytest.mark.parametrize("as_file", [False, True])
def test_a_backfill_reads_each_name_in_a_large_folder_a_fixed_number_of_times(tmp_path, monkeypatch, as_file):
    """A backfill matched every name in the folder against every listed log's rotation names (a pattern built
    per log): 8000 hourly logs with checksums took 45 s instead of 0.1 s. How often a name is looked at must
    not grow with the folder (this counts, it does not time)."""
    most_reads = []
    for hours in (12, 48):
        folder = tmp_path / f"h{hours}"
        _hourly_logs(folder, hours)
        reads = _count_name_reads(monkeypatch, folder)
        source = JsonlSource("s", str(folder / "gw-00000.jsonl" if as_file else folder), 100_000)
        got = ids_read(source, None, TimeWindow(datetime(2026, 11, 1, tzinfo=timezone.utc)))
        expected = [[f"h{h}-rotated"] * (h % 3 == 0) + [f"h{h}"] for h in range(hours)]
        assert got == (expected[0] if as_file else [i for ids in expected for i in ids])
        most_reads.append(max(count for name, count in reads.items() if name.endswith(".md5")))
        monkeypatch.undo()
    assert most_reads[1] == most_reads[0], most_reads


def test_a_live_run_after_a_rotation_in_a_large_folder_reads_each_name_a_fixed_number_of_times(tmp_path,
                                                                                              monkeypatch):
    """The live path looks for the cursor's rotated file once per run, not once per listed file."""
    most_reads = []
    for hours in (12, 48):
        folder = tmp_path / f"h{hours}"
        _hourly_logs(folder, hours)
        last = folder / f"gw-{hours - 1:05d}.jsonl"
        source = JsonlSource("s", str(folder), 100_000)
        cursor = last_cursor(source)
        last.write_bytes(requests(f"h{hours - 1}", "tail"))
        last.rename(folder / f"{last.name}.1")
        last.write_bytes(requests("fresh"))
        reads = _count_name_reads(monkeypatch, folder)
        assert ids_read(source, cursor) == ["tail", "fresh"]
        most_reads.append(max(count for name, count in reads.items() if name.endswith(".md5")))
        monkeypatch.undo()
    assert most_reads[1] == most_reads[0], most_reads


# --- an OTel cursor inside a file's first export ----------------------------------------------------------------

def _span(n: int) -> dict:
    return {"traceId": f"{n:032x}", "spanId": f"{n:016x}", "name": "chat", "startTimeUnixNano": "1795341600000000000",
            "endTimeUnixNano": "1795341601000000000",
            "attributes": [{"key": "gen_ai.request.model", "value": {"stringValue": "chat-default"}},
                           {"key": "gen_ai.prompt.0.content", "value": {"stringValue": f"q{n}"}}]}


def _export(*numbers: int, pad: int = 0) -> bytes:
    """One export line with the given spans; `pad` makes it longer than the 1 KiB head."""
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": "gw" + "x" * pad}}]}
    return json.dumps({"resourceSpans": [{"resource": resource, "scopeSpans": [
        {"spans": [_span(n) for n in numbers]}]}]}).encode() + b"\n"


def _span_ids(source: OtelSource, cursor: dict | None) -> list[int]:
    return [int(r.split("-")[0], 16) for r in ids_read(source, cursor)]


@pytest.mark.parametrize("pad", [0, 2000])  # a first export shorter and longer than the hashed head
@pytest.mark.parametrize("rotation", ["create", "copytruncate", "none"])
def test_an_otel_cursor_inside_the_first_export_survives_a_rotation(tmp_path, pad, rotation):
    """A run stopped inside the file's first export (offset 0), then the exporter rotated the file: the cursor
    kept no head there, so the rotated file was not found (24 of 28 spans lost) and the new file's first export
    lost its first spans instead."""
    live = tmp_path / "traces.jsonl"
    live.write_bytes(_export(1, 2, 3, 4, pad=pad))
    source = OtelSource("o", str(tmp_path), 1_000_000, {})
    steps = list(source.read(None, LIVE))
    cursor = steps[1].cursor
    assert cursor["offset"] == 0 and cursor["span"] == 2
    with open(live, "ab") as fh:
        fh.write(_export(5, 6, pad=pad))  # written before the rotation
    if rotation == "create":
        live.rename(tmp_path / "traces.jsonl.1")
    elif rotation == "copytruncate":
        (tmp_path / "traces.jsonl.1").write_bytes(live.read_bytes())
        live.write_bytes(b"")
    with open(live, "ab") as fh:
        fh.write(_export(7, 8, 9, pad=pad))  # the new file's first export
    assert _span_ids(source, cursor) == [3, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("pad", [0, 2000])
def test_an_otel_cursor_inside_a_replaced_files_first_export_skips_none_of_the_new_spans(tmp_path, pad):
    """copytruncate to a name the reader does not see: the file under the cursor's name is another one, whose
    first export is read whole (it used to lose as many spans as the cursor had consumed of the old one)."""
    live = tmp_path / "traces.jsonl"
    live.write_bytes(_export(1, 2, 3, pad=pad))
    source = OtelSource("o", str(live), 1_000_000, {})
    cursor = list(source.read(None, LIVE))[1].cursor
    assert cursor["span"] == 2
    live.write_bytes(_export(10, 11, 12, 13, pad=pad))
    assert _span_ids(source, cursor) == [10, 11, 12, 13]
    gz = tmp_path / "traces.jsonl.gz"  # a gzip cursor (no head) inside the first export resumes as before
    gz.write_bytes(gzip.compress(_export(20, 21, 22)))
    gz_source = OtelSource("o", str(gz), 1_000_000, {})
    assert _span_ids(gz_source, list(gz_source.read(None, LIVE))[0].cursor) == [21, 22]


# --- a folder that cannot be listed -----------------------------------------------------------------------------

def _deny_listing(monkeypatch, folder: Path) -> None:
    """The test runs as root, for whom a 0700 folder of another user is still listable: deny that one folder."""
    real = Path.iterdir

    def iterdir(self):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_a_folder_that_cannot_be_listed_is_an_unavailable_source_and_the_others_go_on(sqlite_url, tmp_path,
                                                                                     monkeypatch):
    """A PermissionError from listing the folder ended the whole ingest (exit 1): the README promises the source
    an `error` and the other sources their ingest."""
    locked, logs = tmp_path / "locked", tmp_path / "logs"
    for folder in (locked, logs):
        folder.mkdir()
        (folder / "requests.jsonl").write_bytes(requests(f"{folder.name}0", f"{folder.name}1"))
    _deny_listing(monkeypatch, locked)
    with pytest.raises(SourceUnavailable, match="cannot list traffic path .*locked: Permission denied"):
        list(read_lines(locked, None, 1000, SUFFIXES))
    config = make_config(sqlite_url, [{"name": "locked", "kind": "jsonl", "path": str(locked)},
                                      {"name": "gw", "kind": "jsonl", "path": str(logs)}])
    report = ingest_sources(get_engine(sqlite_url), config)
    by_source = {s.source: s for s in report.sources}
    assert not report.ok and "Permission denied" in by_source["locked"].error
    assert by_source["gw"].stored == 2 and by_source["gw"].error is None


def test_a_file_source_whose_folder_cannot_be_listed_is_still_read(tmp_path, monkeypatch):
    """Its rotations cannot be looked for (a warning says so), but the file itself is readable."""
    live = tmp_path / "requests.jsonl"
    live.write_bytes(requests("a0"))
    source = JsonlSource("s", str(live), 100_000)
    cursor = last_cursor(source)
    live.write_bytes(requests("a0", "a1"))
    _deny_listing(monkeypatch, tmp_path)
    assert ids_read(source, cursor) == ["a1"]
    window = TimeWindow(datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert ids_read(source, None, window) == ["a0", "a1"]


# --- a byte order mark ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_a_byte_order_mark_opening_a_file_is_not_part_of_its_first_record(tmp_path, compress):
    """A file saved by an editor that writes a BOM: its first record was quarantined as invalid JSON."""
    body = b"\xef\xbb\xbf" + requests("first", "second")
    path = tmp_path / ("a.jsonl.gz" if compress else "a.jsonl")
    path.write_bytes(gzip.compress(body) if compress else body)
    source = JsonlSource("s", str(tmp_path), 100_000)
    steps = list(source.read(None, LIVE))
    assert not [s for s in steps if isinstance(s.item, Rejected)]
    assert [s.item.request_id for s in steps if isinstance(s.item, TrafficRecord)] == ["first", "second"]
    assert steps[0].item.position == f"{path.name}:0"
    assert steps[0].cursor["offset"] == 3 + len(request_line("first"))  # offsets count the BOM's bytes
    assert steps[1].item.position == f"{path.name}:{3 + len(request_line('first'))}"
    assert ids_read(source, steps[0].cursor) == ["second"]


# --- the cursor a run reports -----------------------------------------------------------------------------------

def test_a_run_with_nothing_new_reports_the_stored_cursor(sqlite_url, tmp_path):
    """The report's `cursor` was null when nothing new was read, although a cursor was stored."""
    (tmp_path / "requests.jsonl").write_bytes(requests("a0", "a1"))
    engine = get_engine(sqlite_url)
    config = make_config(sqlite_url, [{"name": "gw", "kind": "jsonl", "path": str(tmp_path)}])
    first = ingest_sources(engine, config).sources[0]
    stored = load_cursor(engine, "gw")
    assert first.stored == 2 and stored is not None and first.cursor == stored
    again = ingest_sources(engine, config).sources[0]
    assert again.read == 0 and again.cursor == stored
    assert again.to_dict()["cursor"] == first.cursor
