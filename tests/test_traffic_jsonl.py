"""JSONL request logs: the record schema and its variants, and the resumable line reader's edge cases."""

from __future__ import annotations

import gzip
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from shadowjudge.traffic import Rejected, SourceUnavailable, TimeWindow, TrafficRecord
from shadowjudge.traffic.lines import read_lines
from shadowjudge.traffic.records import RecordError
from shadowjudge.traffic.sources.jsonl import SUFFIXES, JsonlSource, normalise_openai_log

BASE = {"id": "req-1", "timestamp": "2026-11-22T10:00:00Z", "route": "chat",
        "request": {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3,
                    "user": "jane@example.com", "metadata": {"x": 1}},
        "response": {"id": "chatcmpl-9", "model": "gpt-x",
                     "choices": [{"message": {"role": "assistant", "content": "hello"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        "latency_ms": 12.5, "ttft_ms": "3", "cost_usd": 0.001, "cache_hit": "true", "metadata": {"task": "qa"}}


def test_the_documented_schema():
    r = normalise_openai_log(BASE, "f:0")
    assert (r.request_id, r.route, r.incumbent_model, r.response_text) == ("req-1", "chat", "gpt-x", "hello")
    assert r.timestamp == datetime(2026, 11, 22, 10, tzinfo=timezone.utc)
    assert r.params == {"temperature": 0.3}  # identity and bookkeeping keys are not replay parameters
    assert (r.input_tokens, r.output_tokens, r.latency_ms, r.ttft_ms, r.cost_usd, r.cache_hit) == \
        (3, 2, 12.5, 3.0, 0.001, True)
    assert r.metadata == {"task": "qa"} and r.position == "f:0"


def test_variants():
    flat = {"timestamp": 1795341600123, "model": "chat", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.1, "params": {"max_tokens": 5}, "response": "plain text answer"}
    r = normalise_openai_log(flat, "p")
    assert r.route == r.incumbent_model == "chat" and r.params == {"temperature": 0.1, "max_tokens": 5}
    assert r.timestamp.year == 2026 and r.response_text == "plain text answer"
    assert r.request_id.startswith("sha256:")  # no id anywhere: a hash of when, where and what
    assert normalise_openai_log(flat, "q").request_id == r.request_id

    legacy = {"ts": "2026-11-22 10:00:00", "request": {"model": "m", "prompt": "Complete this"},
              "response": {"id": "cmpl-1", "choices": [{"text": "done"}]}, "usage": {"input_tokens": 4}}
    r = normalise_openai_log(legacy, "l")
    assert r.messages == [{"role": "user", "content": "Complete this"}] and r.response_text == "done"
    assert r.request_id == "cmpl-1" and r.input_tokens == 4 and r.timestamp.tzinfo is not None

    parts = dict(BASE, response={"choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}}]})
    assert normalise_openai_log(parts, "x").response_text == "ab"
    assert len(normalise_openai_log(dict(BASE, id="x" * 500), "x").request_id) <= 128


@pytest.mark.parametrize("change, message", [
    ({"request": "nope"}, "'request' must be an object"),
    ({"request": {"model": "m"}}, "no 'messages'"),
    ({"request": {"model": "m", "messages": [{"content": "x"}]}}, "role"),
    ({"request": {"model": "m", "messages": [{"role": "user", "content": 5}]}}, "content"),
    ({"timestamp": "yesterday jane@example.com"}, "'timestamp' is not an ISO 8601"),
    ({"timestamp": None}, "missing 'timestamp'"),
    ({"latency_ms": "fast"}, "'latency_ms' must be a number"),
    ({"cost_usd": -1}, "'cost_usd' must be a finite number >= 0"),
    ({"metadata": [1]}, "'metadata' must be an object"),
    ({"cache_hit": "maybe"}, "'cache_hit' must be a boolean"),
    ({"route": None, "request": {"messages": [{"role": "user", "content": "x"}]}}, "no route"),
    ({"response": {"choices": "x"}}, "'response.choices' must be a list"),
])
def test_bad_records_say_which_field_and_never_quote_it(change, message):
    with pytest.raises(RecordError) as info:
        normalise_openai_log({**BASE, **change}, "f:0")
    assert message in str(info.value) and "jane@example.com" not in str(info.value)


def lines_of(path: Path, cursor=None, limit=1000):
    return list(read_lines(path, cursor, limit, SUFFIXES))


def test_partial_last_line_waits_for_the_writer(tmp_path):
    log = tmp_path / "live.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": ')
    first = lines_of(log)
    assert [line.data for line in first] == [b'{"a": 1}\n']
    log.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    rest = lines_of(log, first[-1].cursor)
    assert [line.data for line in rest] == [b'{"b": 2}\n'] and rest[0].offset == 9


def test_a_partial_line_in_an_older_file_is_read_as_final(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"a": 1}\n{"a": 2}')
    (tmp_path / "b.jsonl").write_bytes(b'{"b": 1}\n')
    (tmp_path / "notes.txt").write_text("not a log")
    data = [line.data for line in lines_of(tmp_path)]
    assert data == [b'{"a": 1}\n', b'{"a": 2}', b'{"b": 1}\n']


def test_files_are_read_in_name_order_and_earlier_ones_skipped_on_resume(tmp_path):
    for name in ("2026-11-22.jsonl", "2026-11-20.jsonl", "2026-11-21.jsonl.gz"):
        body = f'{{"f": "{name}"}}\n'.encode()
        (tmp_path / name).write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    steps = lines_of(tmp_path)
    assert [s.file for s in steps if s.data] == ["2026-11-20.jsonl", "2026-11-21.jsonl.gz", "2026-11-22.jsonl"]
    gz_done = next(s for s in steps if s.data is None)
    assert gz_done.cursor == {"file": "2026-11-21.jsonl.gz", "offset": len(b'{"f": "2026-11-21.jsonl.gz"}\n'),
                              "finished": True}
    assert [s.file for s in lines_of(tmp_path, gz_done.cursor)] == ["2026-11-22.jsonl"]


def test_truncated_or_corrupt_gzip_is_reported_where_it_broke(tmp_path):
    body = b"".join(json.dumps({"i": i, "pad": "x" * 200}).encode() + b"\n" for i in range(200))
    packed = gzip.compress(body)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    steps = lines_of(tmp_path / "cut.jsonl.gz")
    good = [s for s in steps if s.data]
    assert 0 < len(good) < 200
    assert steps[-1].error == "truncated gzip stream" and steps[-1].cursor["finished"]
    assert steps[-1].offset == sum(len(s.data) for s in good)

    (tmp_path / "junk.jsonl.gz").write_bytes(b"\x1f\x8b" + b"\x00garbage" * 10)
    steps = lines_of(tmp_path / "junk.jsonl.gz")
    assert steps[-1].error.startswith("corrupt gzip stream")


def test_oversized_lines_are_skipped_without_reading_them_whole(tmp_path):
    log = tmp_path / "big.jsonl"
    log.write_bytes(b'{"ok": 1}\n' + b"x" * 300_000 + b"\n" + b'{"ok": 2}\n')
    steps = lines_of(log, limit=1000)
    assert [s.data for s in steps if s.data] == [b'{"ok": 1}\n', b'{"ok": 2}\n']
    assert steps[1].error == "record of 300000 bytes exceeds max_record_bytes=1000"
    assert steps[2].offset == 10 + 300_001


def test_a_truncated_or_replaced_file_is_read_again(tmp_path):
    log = tmp_path / "app.jsonl"
    log.write_bytes(b'{"a": 1}\n{"a": 2}\n')
    cursor = lines_of(log)[-1].cursor
    log.write_bytes(b'{"new": 1}\n')  # copytruncate rotation
    assert [s.data for s in lines_of(log, cursor)] == [b'{"new": 1}\n']


@pytest.mark.parametrize("first_size", [30, 3000])  # a cursor before and past the hashed head
def test_a_replaced_file_longer_than_the_old_offset_is_read_from_its_start(tmp_path, first_size):
    """copytruncate, then more writes before the next run: the file is longer than the cursor's offset again, and
    resuming there started mid-line and lost the new file's first records."""
    log = tmp_path / "app.jsonl"
    old = b"".join(b'{"old": %d}\n' % i for i in range(first_size // 12 + 1))
    log.write_bytes(old)
    cursor = lines_of(log)[-1].cursor
    assert "head" in cursor
    new = b"".join(b'{"replacement": %d}\n' % i for i in range(len(old) // 10))
    log.write_bytes(new)
    assert [s.data for s in lines_of(log, cursor)] == new.splitlines(keepends=True)
    log.write_bytes(new + b'{"appended": 1}\n')  # the same file grown: resumed, not re-read
    assert [s.data for s in lines_of(log, lines_of(log, cursor)[-2].cursor)] == [b'{"appended": 1}\n']


def test_a_missing_path_is_an_unavailable_source(tmp_path):
    with pytest.raises(SourceUnavailable, match="does not exist"):
        lines_of(tmp_path / "nope")


def test_the_source_pairs_each_record_with_the_cursor_just_past_it(tmp_path):
    log = tmp_path / "g.jsonl"
    log.write_text(json.dumps(BASE) + "\n\n" + "{broken\n" + json.dumps({**BASE, "id": "req-2"}) + "\n")
    steps = list(JsonlSource("g", str(log), 10_000).read(None, TimeWindow()))
    kinds = [type(s.item).__name__ for s in steps]
    assert kinds == ["TrafficRecord", "NoneType", "Rejected", "TrafficRecord"]
    assert isinstance(steps[2].item, Rejected) and steps[2].item.reason.startswith("invalid JSON")
    resumed = list(JsonlSource("g", str(log), 10_000).read(steps[2].cursor, TimeWindow()))
    assert len(resumed) == 1 and isinstance(resumed[0].item, TrafficRecord) and resumed[0].item.request_id == "req-2"


def _records(prefix: str, n: int) -> bytes:
    return b"".join(b'{"%s": %d}\n' % (prefix.encode(), i) for i in range(n))


def _data(steps) -> list[bytes]:
    return [s.data for s in steps if s.data is not None]


@pytest.mark.parametrize("rotated_name, compress", [
    ("requests-2026-11-24.jsonl", False),  # a dated name, sorting before the live file
    ("requests-2026-11-24.jsonl", True),  # ... then compressed before the next run
    ("requests.jsonl.1", False),  # logrotate's default, outside the listed suffixes
    ("requests.jsonl-20261124.gz", True),  # logrotate dateext + compress
])
@pytest.mark.parametrize("read_before", [30, 3000])  # a cursor before and past the hashed head
def test_lines_written_before_a_rotation_are_read_from_the_rotated_file(tmp_path, rotated_name, compress,
                                                                      read_before):
    """The writer appended after the last run, then the log was rotated: those lines live only in the rotated
    file, which sorts before the cursor's file (or is not listed at all) and used to be skipped: lost."""
    live = tmp_path / "requests.jsonl"
    first = _records("old", read_before // 10 + 1)
    live.write_bytes(first)
    cursor = lines_of(tmp_path)[-1].cursor
    tail = _records("tail", 3)
    live.write_bytes(first + tail)
    rotated = tmp_path / rotated_name
    if compress:
        rotated.write_bytes(gzip.compress(first + tail))
        live.unlink()
    else:
        live.rename(rotated)
    fresh = _records("fresh", 2)
    live.write_bytes(fresh)

    steps = lines_of(tmp_path, cursor)
    assert _data(steps) == tail.splitlines(keepends=True) + fresh.splitlines(keepends=True)
    assert steps[-1].cursor["file"] == "requests.jsonl"
    assert _data(lines_of(tmp_path, steps[-1].cursor)) == []

    # a run stopped inside the rotated file's tail resumes there, then reads the new file whole
    middle = [s for s in steps if s.data == tail.splitlines(keepends=True)[0]][0].cursor
    assert _data(lines_of(tmp_path, middle)) == tail.splitlines(keepends=True)[1:] + fresh.splitlines(keepends=True)


def test_copytruncate_rotation_reads_the_tail_from_the_copy(tmp_path):
    live = tmp_path / "requests.jsonl"
    first, tail = _records("old", 5), _records("tail", 2)
    live.write_bytes(first)
    cursor = lines_of(live)[-1].cursor
    live.write_bytes(first + tail)
    (tmp_path / "requests.jsonl.1").write_bytes(first + tail)  # logrotate copytruncate: copy, then truncate
    live.write_bytes(_records("fresh", 1))
    assert _data(lines_of(live, cursor)) == tail.splitlines(keepends=True) + [b'{"fresh": 0}\n']


def test_a_live_file_renamed_before_its_successor_exists(tmp_path):
    live = tmp_path / "requests.jsonl"
    first, tail = _records("old", 5), _records("tail", 2)
    live.write_bytes(first)
    cursor = lines_of(tmp_path)[-1].cursor
    live.write_bytes(first + tail)
    live.rename(tmp_path / "requests-2026-11-24.jsonl")
    steps = lines_of(tmp_path, cursor)
    assert _data(steps) == tail.splitlines(keepends=True)
    live.write_bytes(_records("fresh", 1))
    assert _data(lines_of(tmp_path, steps[-1].cursor)) == [b'{"fresh": 0}\n']


def test_a_rotated_file_compressed_after_it_was_read_is_not_read_again(tmp_path):
    """The cursor sits at the end of a rotated file that is then compressed in place: its name sorts after the
    cursor's, so it used to be read again from the start (its quarantine rows stored twice)."""
    rotated = tmp_path / "requests-2026-11-24.jsonl"
    rotated.write_bytes(_records("old", 4) + b"{broken\n")
    cursor = lines_of(tmp_path)[-1].cursor
    (tmp_path / "requests-2026-11-24.jsonl.gz").write_bytes(gzip.compress(rotated.read_bytes()))
    rotated.unlink()
    steps = lines_of(tmp_path, cursor)
    assert _data(steps) == [] and not [s for s in steps if s.error]
    assert steps[-1].cursor == {"file": "requests-2026-11-24.jsonl.gz", "offset": len(_records("old", 4)) + 8,
                                "finished": True, "rotated_from": "requests-2026-11-24.jsonl"}
    assert lines_of(tmp_path, steps[-1].cursor) == []


def test_a_file_that_merely_starts_alike_is_never_resumed_mid_way(tmp_path):
    """Only files the reader would otherwise skip are searched for the rotated file: a new file sorting after the
    cursor's is read whole even when its first bytes match."""
    live = tmp_path / "a.jsonl"
    live.write_bytes(b'{"same": 0}\n{"x": 1}\n')
    cursor = lines_of(tmp_path)[-1].cursor
    live.rename(tmp_path / "b.jsonl")
    assert _data(lines_of(tmp_path, cursor)) == [b'{"same": 0}\n', b'{"x": 1}\n']


def test_a_file_whose_name_is_not_utf8_is_skipped_with_a_warning(tmp_path):
    """Its name would go into the cursor and quarantine positions, which the store keeps as text: the ingest
    failed with a UnicodeEncodeError on every run."""
    import logging

    (tmp_path / "a.jsonl").write_bytes(b'{"a": 1}\n')
    (tmp_path / os.fsdecode(b"caf\xe9.jsonl")).write_bytes(b'{"b": 1}\n')
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("shadowjudge.traffic.lines")  # other tests may stop it propagating to caplog's root
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        steps = lines_of(tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert _data(steps) == [b'{"a": 1}\n']
    assert any("not valid UTF-8" in w and "caf\\udce9.jsonl" in w for w in warnings), warnings


def test_an_answer_that_calls_tools_keeps_its_calls_as_the_replayed_answer_shows_them():
    """Ingest kept only message.content: a tool-calling incumbent was stored as no answer (content null, the pair
    skipped as an error) or an empty one (judged against a candidate making the same call), while a replayed
    candidate's calls are part of its answer."""
    from shadowjudge.shadow.endpoint import _with_tool_calls

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    for content in (None, "", "Let me check."):
        logged = dict(BASE, response={"choices": [{"message": {"role": "assistant", "content": content,
                                                               "tool_calls": [call]}}]})
        text = normalise_openai_log(logged, "t").response_text
        assert text == _with_tool_calls(content or "", [{"name": "get_weather", "arguments": '{"city":"Paris"}'}])
    decoded = dict(BASE, response={"choices": [{"message": {"content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": {"x": 1}}}, "junk"]}}]})
    assert normalise_openai_log(decoded, "t").response_text == '[{"name":"f","arguments":"{\\"x\\":1}"}]'


@pytest.mark.parametrize("scheme, as_file", [  # a folder source, or a source that is the one file
    ("dated", False), ("numbered", False), ("dated", True), ("numbered", True),
    ("underscore-dated", True),  # a folder source lists `requests_2026-11-23.jsonl` as a file of its own
])
def test_two_rotations_between_runs_lose_neither_file(tmp_path, scheme, as_file):
    """The ingest was down for two rotations: the cursor's file went first, another whole file after it. Only
    the first was found; the second sorts before the live name (or is hidden from the listing) and was lost."""
    import os as _os

    live = tmp_path / "requests.jsonl"
    source = live if as_file else tmp_path
    first, tail, second, fresh = _records("a", 3), _records("tail", 2), _records("b", 3), _records("c", 1)
    live.write_bytes(first)
    cursor = lines_of(source)[-1].cursor
    names = {"dated": ["requests-2026-11-23.jsonl", "requests-2026-11-24.jsonl"],
             "underscore-dated": ["requests_2026-11-23.jsonl", "requests_2026-11-24.jsonl"],
             "numbered": ["requests.jsonl.2", "requests.jsonl.1"]}[scheme]
    (tmp_path / names[0]).write_bytes(first + tail)
    _os.utime(tmp_path / names[0], (1_800_000_000, 1_800_000_000))
    (tmp_path / names[1]).write_bytes(second)
    _os.utime(tmp_path / names[1], (1_800_000_600, 1_800_000_600))
    live.write_bytes(fresh)
    steps = lines_of(source, cursor)
    expected = (tail + second + fresh).splitlines(keepends=True)
    assert _data(steps) == expected
    assert _data(lines_of(source, steps[-1].cursor)) == []
    for i, step in enumerate(s for s in steps if s.data):  # stopped anywhere, it goes on where it stopped
        assert _data(lines_of(source, step.cursor)) == expected[i + 1:]
    gz = tmp_path / (names[0] + ".gz")  # the first rotation compressed (mtime kept), its cursor finished
    gz.write_bytes(gzip.compress(first + tail))
    _os.utime(gz, (1_800_000_000, 1_800_000_000))
    (tmp_path / names[0]).unlink()
    done = {"file": gz.name, "offset": len(first + tail), "finished": True, "rotated_from": "requests.jsonl"}
    assert _data(lines_of(source, done)) == (second + fresh).splitlines(keepends=True)
