"""OpenTelemetry GenAI spans from OTLP JSON files (what the Collector's `file` exporter writes).

Each line is one OTLP/JSON `ExportTraceServiceRequest`: `{"resourceSpans": [{"resource": {...}, "scopeSpans":
[{"spans": [...]}]}]}` (plain or gzipped; a file or a folder of `*.json`, `*.jsonl`, `*.ndjson`, read in name
order; compact one export per line, as the exporter writes it). A line is a record for `max_record_bytes`.

Spans of model calls become requests: `gen_ai.operation.name` chat / text_completion / generate_content (or,
without an operation name, any span with `gen_ai.request.model`); other spans are skipped. Fields, per the
GenAI semantic conventions:

- id: `<traceId>-<spanId>`; time: `startTimeUnixNano`; latency: end - start
- route: `gen_ai.request.model` (override with `mapping: {route: <attribute>}`); incumbent model:
  `gen_ai.response.model`, else the request model
- tokens: `gen_ai.usage.input_tokens` / `output_tokens` (older `prompt_tokens` / `completion_tokens`)
- parameters: `gen_ai.request.temperature`, `top_p`, `max_tokens`, `frequency_penalty`, `presence_penalty`,
  `stop_sequences`, `seed`, `choice.count`
- messages, first found of: `gen_ai.input.messages` + `gen_ai.system_instructions` / `gen_ai.output.messages`
  (on the span or on a `gen_ai.client.inference.operation.details` event); the per-message events
  `gen_ai.{system,user,assistant,tool}.message` and `gen_ai.choice`; the `gen_ai.content.prompt` /
  `gen_ai.content.completion` events; flattened `gen_ai.prompt.<i>.role|content` and `gen_ai.completion.<i>.content`
- metadata: `service.name`, `gen_ai.provider.name` (or `gen_ai.system`), `gen_ai.operation.name`,
  `gen_ai.conversation.id` and the span's attributes outside `gen_ai.*`; `mapping` may add
  `metadata.<key>: <attribute>`, `ttft_ms: <attribute in seconds>`, `cost_usd: <attribute>`.

Cursor: file, byte offset of the export line, and how many of its spans were consumed.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import orjson

from shadowjudge.config import SourceConfig
from shadowjudge.traffic.lines import Line, read_lines
from shadowjudge.traffic.records import (
    UNUSABLE_ERRORS,
    RecordError,
    Rejected,
    SourceRead,
    TrafficRecord,
    parse_count,
    parse_name,
    parse_number,
    parse_timestamp,
    stable_request_id,
    unusable,
)
from shadowjudge.traffic.source import TimeWindow

SUFFIXES = tuple(s + gz for s in (".json", ".jsonl", ".ndjson") for gz in ("", ".gz"))
MODEL_CALLS = frozenset({"chat", "text_completion", "generate_content"})
PARAMS = {
    "gen_ai.request.temperature": "temperature", "gen_ai.request.top_p": "top_p",
    "gen_ai.request.max_tokens": "max_tokens", "gen_ai.request.frequency_penalty": "frequency_penalty",
    "gen_ai.request.presence_penalty": "presence_penalty", "gen_ai.request.stop_sequences": "stop",
    "gen_ai.request.seed": "seed", "gen_ai.request.choice.count": "n",
}
METADATA_ATTRIBUTES = {"gen_ai.provider.name": "provider", "gen_ai.system": "provider",
                       "gen_ai.operation.name": "operation", "gen_ai.conversation.id": "conversation_id"}
ROLE_EVENTS = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
               "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}
MAPPABLE = {"route", "ttft_ms", "cost_usd"}


# --- OTLP/JSON values --------------------------------------------------------------------------------------

def any_value(value: Any) -> Any:
    """An OTLP `AnyValue` (`{"stringValue": ...}`, `{"intValue": "3"}`, arrays, kvlists) as plain Python."""
    if not isinstance(value, dict) or not value:
        return None
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        try:
            return int(value["intValue"])
        except (TypeError, ValueError):
            raise RecordError("an attribute's intValue is not an integer") from None
    if "doubleValue" in value:
        return value["doubleValue"]
    if "boolValue" in value:
        return value["boolValue"]
    if "arrayValue" in value:
        items = (value["arrayValue"] or {}).get("values") or []
        if not isinstance(items, list):
            raise RecordError("an attribute's arrayValue.values is not a list")
        return [any_value(v) for v in items]
    if "kvlistValue" in value:
        return attributes((value["kvlistValue"] or {}).get("values"))
    if "bytesValue" in value:
        try:
            return base64.b64decode(value["bytesValue"]).hex()
        except (TypeError, ValueError):
            raise RecordError("an attribute's bytesValue is not base64") from None
    return None


def attributes(items: Any) -> dict[str, Any]:
    if items is None:
        return {}
    if not isinstance(items, list):
        raise RecordError("'attributes' must be a list of key/value pairs")
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise RecordError("an attribute has no string 'key'")
        out[item["key"]] = any_value(item.get("value"))
    return out


def _json_value(value: Any, name: str) -> Any:
    """Attributes holding structure may be a JSON string (spans) or structured already (events)."""
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RecordError(f"'{name}' is not valid JSON") from None
    return value


# --- messages ----------------------------------------------------------------------------------------------

def semconv_message(message: Any, name: str) -> dict[str, Any]:
    """A GenAI semconv message (`{"role", "parts": [{"type": "text", "content"}, ...]}`) in OpenAI chat form."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RecordError(f"'{name}' must hold messages with a string 'role'")
    if "parts" not in message:  # already OpenAI-shaped
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            content = orjson.dumps(content).decode()
        return {"role": message["role"], "content": content}
    parts = message.get("parts") or []
    if not isinstance(parts, list):
        raise RecordError(f"'{name}' has a message whose 'parts' is not a list")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    out: dict[str, Any] = {"role": message["role"]}
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("content"), str):
            texts.append(part["content"])
        elif kind == "tool_call":
            tool_calls.append({"id": part.get("id"), "type": "function",
                               "function": {"name": part.get("name"),
                                            "arguments": orjson.dumps(part.get("arguments")).decode()}})
        elif kind == "tool_call_response":
            out["role"] = "tool"
            out["tool_call_id"] = part.get("id")
            response = part.get("response")
            texts.append(response if isinstance(response, str) else orjson.dumps(response).decode())
    out["content"] = "".join(texts) if texts else None
    if tool_calls:
        out["tool_calls"] = tool_calls
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _message_list(value: Any, name: str) -> list[dict[str, Any]]:
    value = _json_value(value, name)
    if not isinstance(value, list):
        raise RecordError(f"'{name}' must be a list of messages")
    return [semconv_message(m, name) for m in value]


def _text_of(messages: list[dict[str, Any]]) -> str | None:
    for message in messages:
        if isinstance(message.get("content"), str):
            return message["content"]
    return None


def _messages_from_attributes(attrs: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    if "gen_ai.input.messages" not in attrs:
        return None, None
    messages = _message_list(attrs["gen_ai.input.messages"], "gen_ai.input.messages")
    instructions = attrs.get("gen_ai.system_instructions")
    if instructions is not None:
        parts = _json_value(instructions, "gen_ai.system_instructions")
        system = semconv_message({"role": "system", "parts": parts if isinstance(parts, list) else []},
                                 "gen_ai.system_instructions")
        if system["content"]:
            messages.insert(0, system)
    output = None
    if "gen_ai.output.messages" in attrs:
        output = _text_of(_message_list(attrs["gen_ai.output.messages"], "gen_ai.output.messages"))
    return messages, output


def _messages_from_events(events: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]] | None, str | None]:
    messages: list[dict[str, Any]] = []
    output: str | None = None
    for name, attrs in events:
        if name == "gen_ai.client.inference.operation.details":
            found, out = _messages_from_attributes(attrs)
            if found:
                return found, out
        elif name in ROLE_EVENTS:
            content = attrs.get("content", attrs.get("gen_ai.event.content"))
            if isinstance(content, str) and content.startswith(("{", "[")):
                content = _json_value(content, name)
            if isinstance(content, dict):
                content = content.get("content")
            messages.append({"role": ROLE_EVENTS[name], "content": content if isinstance(content, str) else None})
        elif name == "gen_ai.choice" and output is None:
            message = attrs.get("message", attrs.get("content"))
            if isinstance(message, str) and message.startswith("{"):
                message = _json_value(message, name)
            if isinstance(message, dict):
                message = message.get("content")
            output = message if isinstance(message, str) else None
        elif name == "gen_ai.content.prompt":
            messages = _message_list(attrs.get("gen_ai.prompt"), "gen_ai.prompt")
        elif name == "gen_ai.content.completion" and output is None:
            completion = _json_value(attrs.get("gen_ai.completion"), "gen_ai.completion")
            if isinstance(completion, list) and completion:
                first = completion[0]
                if isinstance(first, dict) and isinstance(first.get("message"), dict):
                    first = first["message"]
                output = first.get("content") if isinstance(first, dict) else None
            elif isinstance(completion, str):
                output = completion
    return (messages or None), output


def _messages_from_flat(attrs: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    messages = []
    i = 0
    while f"gen_ai.prompt.{i}.content" in attrs or f"gen_ai.prompt.{i}.role" in attrs:
        content = attrs.get(f"gen_ai.prompt.{i}.content")
        messages.append({"role": str(attrs.get(f"gen_ai.prompt.{i}.role") or "user"),
                         "content": content if isinstance(content, str) else None})
        i += 1
    output = attrs.get("gen_ai.completion.0.content")
    return (messages or None), output if isinstance(output, str) else None


# --- spans -------------------------------------------------------------------------------------------------

def is_model_call(attrs: dict[str, Any]) -> bool:
    operation = attrs.get("gen_ai.operation.name")
    if operation is not None:
        return operation in MODEL_CALLS
    return "gen_ai.request.model" in attrs or "gen_ai.prompt.0.content" in attrs


def span_record(span: Any, resource: dict[str, Any], position: str,
                mapping: dict[str, str]) -> TrafficRecord | None:
    """A model-call span as a `TrafficRecord`; None for spans that are not model calls."""
    if not isinstance(span, dict):
        raise RecordError("a span must be an object")
    attrs = attributes(span.get("attributes"))
    if not is_model_call(attrs):
        return None
    raw_events = span.get("events") or []
    if not isinstance(raw_events, list):
        raise RecordError("'events' must be a list")
    events = [(e.get("name"), attributes(e.get("attributes"))) for e in raw_events if isinstance(e, dict)]

    messages, output = _messages_from_attributes(attrs)
    if messages is None:
        messages, output = _messages_from_events(events)
    if messages is None:
        messages, output = _messages_from_flat(attrs)
    if not messages:
        raise RecordError("a model-call span without input messages (enable content capture in the instrumentation)")
    if output is None:
        _, output = _messages_from_flat(attrs)

    request_model = parse_name(attrs.get("gen_ai.request.model"), "gen_ai.request.model")
    response_model = parse_name(attrs.get("gen_ai.response.model"), "gen_ai.response.model")
    route = parse_name(attrs.get(mapping.get("route", "gen_ai.request.model")), "route") or request_model
    incumbent = response_model or request_model
    if route is None or incumbent is None:
        raise RecordError("a model-call span without 'gen_ai.request.model'")

    start = parse_timestamp(_nanos(span.get("startTimeUnixNano"), "startTimeUnixNano"), "startTimeUnixNano")
    start_ns = _nanos(span.get("startTimeUnixNano"), "startTimeUnixNano")
    end_ns = _nanos(span.get("endTimeUnixNano"), "endTimeUnixNano") if span.get("endTimeUnixNano") else None
    latency = (end_ns - start_ns) / 1e6 if end_ns is not None and end_ns >= start_ns else None

    trace_id, span_id = span.get("traceId"), span.get("spanId")
    if not isinstance(trace_id, str) or not isinstance(span_id, str) or not trace_id or not span_id:
        raise RecordError("a span without string 'traceId' and 'spanId'")

    params = {PARAMS[k]: v for k, v in attrs.items() if k in PARAMS and v is not None}
    metadata: dict[str, Any] = {}
    if resource.get("service.name") is not None:
        metadata["service"] = resource["service.name"]
    for key, value in attrs.items():
        if key in METADATA_ATTRIBUTES:
            metadata.setdefault(METADATA_ATTRIBUTES[key], value)
        elif not key.startswith("gen_ai.") and value is not None:
            metadata[key] = value
    for key, attribute in mapping.items():
        if key.startswith("metadata.") and attrs.get(attribute, resource.get(attribute)) is not None:
            metadata[key[len("metadata."):]] = attrs.get(attribute, resource.get(attribute))
    ttft_s = parse_number(attrs.get(mapping["ttft_ms"]), "ttft") if "ttft_ms" in mapping else None

    return TrafficRecord(
        request_id=stable_request_id(f"{trace_id}-{span_id}", start, route, messages),
        timestamp=start,
        route=route,
        incumbent_model=incumbent,
        messages=messages,
        params=params,
        response_text=output if isinstance(output, str) else None,
        input_tokens=parse_count(attrs.get("gen_ai.usage.input_tokens", attrs.get("gen_ai.usage.prompt_tokens")),
                                 "gen_ai.usage.input_tokens"),
        output_tokens=parse_count(attrs.get("gen_ai.usage.output_tokens",
                                            attrs.get("gen_ai.usage.completion_tokens")),
                                  "gen_ai.usage.output_tokens"),
        latency_ms=latency,
        ttft_ms=ttft_s * 1000 if ttft_s is not None else None,
        cost_usd=parse_number(attrs.get(mapping.get("cost_usd", "gen_ai.usage.cost")), "cost_usd"),
        cache_hit=False,
        metadata=metadata,
        position=position,
    )


def _nanos(value: Any, name: str) -> int:
    """OTLP/JSON writes 64-bit integers as strings."""
    if isinstance(value, bool) or value is None:
        raise RecordError(f"missing '{name}'")
    try:
        nanos = int(value)
    except (TypeError, ValueError):
        raise RecordError(f"'{name}' is not an integer") from None
    if nanos <= 0:
        raise RecordError(f"'{name}' must be positive")
    return nanos


def export_spans(export: Any) -> list[tuple[dict[str, Any], Any]]:
    """(resource attributes, span) for every span of one `ExportTraceServiceRequest`, in file order."""
    if not isinstance(export, dict) or not isinstance(export.get("resourceSpans"), list):
        raise RecordError("not an OTLP JSON trace export: no 'resourceSpans' list")
    out: list[tuple[dict[str, Any], Any]] = []
    for resource_spans in export["resourceSpans"]:
        if not isinstance(resource_spans, dict):
            raise RecordError("'resourceSpans' holds a non-object")
        resource = resource_spans.get("resource") or {}
        resource_attrs = attributes(resource.get("attributes")) if isinstance(resource, dict) else {}
        scopes = resource_spans.get("scopeSpans") or []
        if not isinstance(scopes, list):
            raise RecordError("'scopeSpans' must be a list")
        for scope in scopes:
            spans = scope.get("spans") if isinstance(scope, dict) else None
            if spans is None:
                continue
            if not isinstance(spans, list):
                raise RecordError("'spans' must be a list")
            out.extend((resource_attrs, span) for span in spans)
    return out


def mid_line_cursor(line: Line) -> dict[str, Any]:
    """A cursor at the start of `line`, keeping what tells its file apart from a replacement or a rotated tail: the
    head of the line's end, which covers the file's first bytes up to that end (at offset 0, the bytes before the
    line's start would identify nothing)."""
    cursor: dict[str, Any] = {"file": line.file, "offset": line.offset}
    for key in ("head", "head_bytes", "rotated_from"):
        if key in line.cursor:
            cursor[key] = line.cursor[key]
    return cursor


class OtelSource:
    """A file or folder of OTLP JSON trace exports; cursor: file, line offset, spans consumed in that line."""

    def __init__(self, name: str, path: str, max_record_bytes: int, mapping: dict[str, str]) -> None:
        self.name = name
        self.path = path
        self.max_record_bytes = max_record_bytes
        self.mapping = mapping

    def read(self, cursor: dict[str, Any] | None, window: TimeWindow) -> Iterator[SourceRead]:
        # a cursor inside an export names the line it stopped in: its spans before `span` are done only in the
        # line read where the cursor stopped (its file, or that file rotated), never in a replacement's first line
        consumed = cursor.get("span") if cursor else None
        for line in read_lines(self.path, cursor, self.max_record_bytes, SUFFIXES, backfill=window.is_backfill):
            first = int(consumed) if line.resumed and isinstance(consumed, int) else 0
            consumed = None
            position = f"{line.file}:{line.offset}"
            if line.error is not None:
                yield SourceRead(Rejected(position, line.error), line.cursor)
                continue
            if line.data is None or not line.data.strip():
                yield SourceRead(None, line.cursor)
                continue
            try:
                spans = export_spans(orjson.loads(line.data))
            except orjson.JSONDecodeError as exc:
                yield SourceRead(Rejected(position, f"invalid JSON: {exc.msg}"), line.cursor)
                continue
            except RecordError as exc:
                yield SourceRead(Rejected(position, str(exc)), line.cursor)
                continue
            except UNUSABLE_ERRORS as exc:
                yield SourceRead(Rejected(position, unusable(exc)), line.cursor)
                continue
            if not spans or first >= len(spans):
                yield SourceRead(None, line.cursor)
                continue
            for i in range(first, len(spans)):
                resource, span = spans[i]
                last = i == len(spans) - 1
                step_cursor = line.cursor if last else {**mid_line_cursor(line), "span": i + 1}
                span_position = f"{position}#{i}"
                try:
                    record = span_record(span, resource, span_position, self.mapping)
                except RecordError as exc:
                    yield SourceRead(Rejected(span_position, str(exc)), step_cursor)
                except UNUSABLE_ERRORS as exc:
                    yield SourceRead(Rejected(span_position, unusable(exc)), step_cursor)
                else:
                    yield SourceRead(record, step_cursor)


def open_source(config: SourceConfig) -> OtelSource:
    assert config.path is not None  # SourceConfig requires it for this kind
    mapping = config.mapping if isinstance(config.mapping, dict) else {}
    unknown = [k for k in mapping if k not in MAPPABLE and not k.startswith("metadata.")]
    if unknown:
        from shadowjudge.traffic.records import TrafficError

        raise TrafficError(f"source '{config.name}': mapping keys {unknown} are not used by otel sources "
                           f"(known: {sorted(MAPPABLE)} and metadata.<key>)")
    return OtelSource(config.name, config.path, config.max_record_bytes, mapping)
