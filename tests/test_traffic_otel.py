"""OpenTelemetry GenAI spans from OTLP JSON: the content conventions, value decoding, span-level resume, bad spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shadowjudge.config import SourceConfig
from shadowjudge.traffic import Rejected, TimeWindow, TrafficError, TrafficRecord
from shadowjudge.traffic.records import RecordError
from shadowjudge.traffic.sources.otel import OtelSource, any_value, open_source, span_record

FIXTURE = Path(__file__).parent / "fixtures" / "traffic" / "otel" / "export.jsonl"


def attr(key, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def span(attrs, events=(), trace="ab" * 16, span_id="cd" * 8):
    return {"traceId": trace, "spanId": span_id, "name": "chat m", "startTimeUnixNano": "1795341600000000000",
            "endTimeUnixNano": "1795341601500000000", "attributes": attrs, "events": list(events)}


def test_any_value_decodes_every_otlp_type():
    assert any_value({"intValue": "42"}) == 42 and any_value({"doubleValue": 0.5}) == 0.5
    assert any_value({"boolValue": True}) is True and any_value({"bytesValue": "AQI="}) == "0102"
    assert any_value({"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": 1}]}}) == ["a", 1]
    assert any_value({"kvlistValue": {"values": [{"key": "k", "value": {"stringValue": "v"}}]}}) == {"k": "v"}
    assert any_value({}) is None
    with pytest.raises(RecordError):
        any_value({"intValue": "x"})


def test_current_semconv_messages_with_parts_and_system_instructions():
    attrs = [attr("gen_ai.operation.name", "chat"), attr("gen_ai.request.model", "chat-default"),
             attr("gen_ai.response.model", "gpt-x"), attr("gen_ai.usage.input_tokens", 7),
             attr("gen_ai.system_instructions", json.dumps([{"type": "text", "content": "Be brief."}])),
             attr("gen_ai.input.messages", json.dumps([
                 {"role": "user", "parts": [{"type": "text", "content": "Weather?"}]},
                 {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "weather",
                                                  "arguments": {"city": "Paris"}}]},
                 {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "rainy"}]}])),
             attr("gen_ai.output.messages", json.dumps([{"role": "assistant", "finish_reason": "stop",
                                                         "parts": [{"type": "text", "content": "Rainy, 14C."}]}])),
             attr("server.address", "api.openai.com")]
    r = span_record(span(attrs), {"service.name": "svc"}, "f:0#0", {})
    assert r.messages[0] == {"role": "system", "content": "Be brief."}
    assert r.messages[1] == {"role": "user", "content": "Weather?"}
    assert r.messages[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city":"Paris"}'}
    assert r.messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "rainy"}
    assert r.response_text == "Rainy, 14C." and (r.route, r.incumbent_model) == ("chat-default", "gpt-x")
    assert r.latency_ms == pytest.approx(1500) and r.input_tokens == 7
    assert r.metadata == {"service": "svc", "operation": "chat", "server.address": "api.openai.com"}
    assert r.request_id == f"{'ab' * 16}-{'cd' * 8}"


def test_older_conventions_events_and_flattened_attributes():
    events = [{"name": "gen_ai.content.prompt", "attributes": [attr("gen_ai.prompt", json.dumps(
                  [{"role": "user", "content": "Hi"}]))]},
              {"name": "gen_ai.content.completion", "attributes": [attr("gen_ai.completion", json.dumps(
                  [{"role": "assistant", "content": "Hello!"}]))]}]
    r = span_record(span([attr("gen_ai.request.model", "m")], events), {}, "p", {})
    assert r.messages == [{"role": "user", "content": "Hi"}] and r.response_text == "Hello!"

    flat = [attr("gen_ai.request.model", "m"), attr("gen_ai.prompt.0.role", "system"),
            attr("gen_ai.prompt.0.content", "Be nice"), attr("gen_ai.prompt.1.role", "user"),
            attr("gen_ai.prompt.1.content", "Hi"), attr("gen_ai.completion.0.content", "Hey")]
    r = span_record(span(flat), {}, "p", {})
    assert [m["role"] for m in r.messages] == ["system", "user"] and r.response_text == "Hey"


def test_non_model_spans_are_skipped_and_mapping_adds_fields():
    assert span_record(span([attr("http.request.method", "GET")]), {}, "p", {}) is None
    assert span_record(span([attr("gen_ai.operation.name", "embeddings"),
                             attr("gen_ai.request.model", "e")]), {}, "p", {}) is None
    attrs = [attr("gen_ai.request.model", "m"), attr("app.route", "support"), attr("app.ttft", "0.25"),
             attr("gen_ai.prompt.0.content", "x")]
    r = span_record(span(attrs), {"deployment.environment": "prod"}, "p",
                    {"route": "app.route", "ttft_ms": "app.ttft", "metadata.env": "deployment.environment"})
    assert r.route == "support" and r.ttft_ms == pytest.approx(250) and r.metadata["env"] == "prod"


@pytest.mark.parametrize("bad, reason", [
    (span([attr("gen_ai.request.model", "m")]), "without input messages"),
    ({**span([attr("gen_ai.prompt.0.content", "x"), attr("gen_ai.request.model", "m")]), "traceId": None},
     "'traceId'"),
    ({**span([attr("gen_ai.prompt.0.content", "x"), attr("gen_ai.request.model", "m")]),
      "startTimeUnixNano": "soon"}, "'startTimeUnixNano' is not an integer"),
    (span([attr("gen_ai.request.model", "m"), attr("gen_ai.input.messages", "[{not json")]), "not valid JSON"),
    (span([{"value": {"stringValue": "x"}}]), "no string 'key'"),
])
def test_bad_spans_are_rejected_with_a_reason(bad, reason):
    with pytest.raises(RecordError, match=reason):
        span_record(bad, {}, "p", {})


@pytest.mark.parametrize("value, reason", [
    ({"intValue": "1" * 30}, "Integer exceeds 64-bit range"),
    ({"arrayValue": [1, 2]}, "unusable record (AttributeError)"),
    ({"kvlistValue": "oops"}, "unusable record (AttributeError)"),
])
def test_attribute_values_of_an_odd_shape_quarantine_the_span(tmp_path, value, reason):
    bad = span([attr("gen_ai.prompt.0.content", "x"), attr("gen_ai.request.model", "m"),
                {"key": "custom.field", "value": value}])
    path = tmp_path / "traces.json"
    path.write_text(json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": [bad]}]}]}) + "\n")
    steps = list(OtelSource("o", str(path), 1_000_000, {}).read(None, TimeWindow()))
    rejected = [s.item for s in steps if isinstance(s.item, Rejected)]
    assert len(rejected) == 1 and reason in rejected[0].reason


def test_reading_resumes_inside_an_export_at_the_next_span(tmp_path):
    source = OtelSource("o", str(FIXTURE), 1_000_000, {})
    steps = list(source.read(None, TimeWindow()))
    records = [s.item for s in steps if isinstance(s.item, TrafficRecord)]
    assert len(records) == 30 and all(r.response_text for r in records)
    middle = steps[4].cursor
    assert middle["span"] == 5
    resumed = [s.item.request_id for s in source.read(middle, TimeWindow()) if isinstance(s.item, TrafficRecord)]
    assert resumed == [r.request_id for r in records[4:]]


def test_a_bad_export_line_or_span_is_quarantined_and_the_rest_read(tmp_path):
    good = FIXTURE.read_text().splitlines()[0]
    export = json.loads(good)
    export["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["spanId"] = 7
    path = tmp_path / "traces.json"
    path.write_text("\n".join([good.replace('"traceId": "0', '"traceId": "f'), '{"resourceSpans": 3}', "[]",
                               json.dumps(export)]) + "\n")
    steps = list(OtelSource("o", str(path), 1_000_000, {}).read(None, TimeWindow()))
    rejected = [s.item for s in steps if isinstance(s.item, Rejected)]
    assert [r.reason for r in rejected] == ["not an OTLP JSON trace export: no 'resourceSpans' list"] * 2 + \
        ["a span without string 'traceId' and 'spanId'"]
    assert rejected[2].position.endswith("#1")
    assert sum(isinstance(s.item, TrafficRecord) for s in steps) == 6 + 5


def test_unknown_mapping_keys_are_a_config_error():
    with pytest.raises(TrafficError, match="not used by otel sources"):
        open_source(SourceConfig(name="o", kind="otel", path="x", mapping={"colour": "blue"}))


def test_a_cursor_inside_an_export_follows_the_file_through_rotation(tmp_path):
    """Stopped mid-export, then the exporter rotated the file (`traces.jsonl` -> `traces.jsonl.1`): the rest of
    that export and the lines after it are read from the rotated file, then the new file from its start."""
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    live = tmp_path / "traces.jsonl"
    live.write_bytes(b"".join(lines[:2]))
    source = OtelSource("o", str(tmp_path), 1_000_000, {})
    steps = list(source.read(None, TimeWindow()))
    stop = next(i for i, s in enumerate(steps) if s.cursor.get("span") == 3 and s.cursor["offset"] > 0)
    cursor = steps[stop].cursor
    assert "head" in cursor
    live.write_bytes(b"".join(lines[:4]))
    live.rename(tmp_path / "traces.jsonl.1")
    live.write_bytes(lines[4])

    everything = [s.item.request_id for s in OtelSource("o", str(FIXTURE), 1_000_000, {}).read(None, TimeWindow())
                  if isinstance(s.item, TrafficRecord)]
    resumed = list(source.read(cursor, TimeWindow()))
    ids = [s.item.request_id for s in resumed if isinstance(s.item, TrafficRecord)]
    done = len([s for s in steps[:stop + 1] if isinstance(s.item, TrafficRecord)])
    assert ids == everything[done:]
    inside = next(s.cursor for s in resumed if s.cursor.get("span") and s.cursor["file"] == "traces.jsonl.1")
    again = [s.item.request_id for s in source.read(inside, TimeWindow()) if isinstance(s.item, TrafficRecord)]
    assert again == ids[ids.index(again[0]):] and len(again) < len(ids)
