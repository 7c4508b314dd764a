"""OpenAI-style JSONL request logs, as an OpenAI-compatible gateway or proxy writes them.

One JSON object per line (UTF-8; plain or gzipped; a file, or a folder of `*.jsonl`, `*.ndjson`, `*.log`
files, optionally `.gz`, read in name order):

    {
      "id": "req-123",                      # optional; also "request_id", else the response's "id",
                                            #   else a hash of timestamp + route + messages
      "timestamp": "2026-11-22T10:00:00Z",  # ISO 8601 or epoch s/ms/ns; also "ts", "time", "created_at"
      "route": "chat-default",              # optional: the virtual model the client called
                                            #   (default: request.model)
      "request": {                          # a chat completions request body
        "model": "chat-default", "messages": [{"role": "user", "content": "..."}],
        "temperature": 0.7, "max_tokens": 512, ...   # every other key is kept as a replay parameter
      },
      "response": {                         # a chat completion (or a plain string)
        "model": "gpt-4o-2024-08-06",       # the incumbent model that answered (default: request.model)
        "choices": [{"message": {"role": "assistant", "content": "..."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 80}   # or input_tokens / output_tokens
      },
      "latency_ms": 812.5, "ttft_ms": 120.0, "cost_usd": 0.00042, "cache_hit": false,   # all optional
      "metadata": {"task": "qa", "tenant": "acme"}                                       # optional
    }

Accepted variants: the request's fields at the top level (`"model"`, `"messages"`, parameters under
`"params"` or as known OpenAI parameter names); a legacy `"prompt"` string instead of messages; a
completions-style response (`choices[0].text`); a top-level `"usage"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from shadowjudge.answers import with_tool_calls
from shadowjudge.config import SourceConfig
from shadowjudge.traffic.lines import read_lines
from shadowjudge.traffic.records import (
    UNUSABLE_ERRORS,
    RecordError,
    Rejected,
    SourceRead,
    TrafficRecord,
    content_text,
    parse_count,
    parse_flag,
    parse_messages,
    parse_metadata,
    parse_name,
    parse_number,
    parse_timestamp,
    stable_request_id,
    unusable,
)
from shadowjudge.traffic.source import TimeWindow

SUFFIXES = tuple(s + gz for s in (".jsonl", ".ndjson", ".log") for gz in ("", ".gz"))

# Replay parameters recognised at the top level of the flat variant.
OPENAI_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "stream", "stream_options", "reasoning_effort", "modalities", "prediction",
})
# Request keys that are not replay parameters (identity, bookkeeping) and never stored as such.
NOT_PARAMS = frozenset({"model", "messages", "prompt", "metadata", "user", "api_key"})
TIMESTAMP_KEYS = ("timestamp", "ts", "time", "created_at")


def normalise_openai_log(obj: Any, position: str) -> TrafficRecord:
    """One log object as a `TrafficRecord`; RecordError (naming the field, never its value) if unusable."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    request = obj.get("request")
    if request is None:
        request = obj
        params_source = obj.get("params") if isinstance(obj.get("params"), dict) else {}
        params = {k: v for k, v in obj.items() if k in OPENAI_PARAMS}
        params.update(params_source)
    elif isinstance(request, dict):
        params = {k: v for k, v in request.items() if k not in NOT_PARAMS}
    else:
        raise RecordError(f"'request' must be an object, got {type(request).__name__}")

    if "messages" in request:
        messages = parse_messages(request["messages"], "request.messages")
    elif isinstance(request.get("prompt"), str):
        messages = [{"role": "user", "content": request["prompt"]}]
    else:
        raise RecordError("no 'messages' (or 'prompt') in the request")

    request_model = parse_name(request.get("model"), "request.model")
    response = obj.get("response")
    response_text, response_model, usage, response_id = response_parts(response)
    if usage is None and isinstance(obj.get("usage"), dict):
        usage = obj["usage"]
    usage = usage or {}

    route = parse_name(obj.get("route"), "route") or request_model
    incumbent = response_model or parse_name(obj.get("incumbent_model"), "incumbent_model") or request_model
    if route is None or incumbent is None:
        raise RecordError("no route: neither 'route' nor 'request.model' is set")

    raw_ts = obj.get("timestamp")
    if raw_ts is None:
        raw_ts = next((obj[k] for k in TIMESTAMP_KEYS if obj.get(k) is not None), None)
    if raw_ts is None and isinstance(response, dict) and response.get("created") is not None:
        raw_ts = response["created"]
    timestamp = parse_timestamp(raw_ts, "timestamp")

    explicit_id = obj.get("id") if obj.get("id") is not None else obj.get("request_id")
    if explicit_id is None:
        explicit_id = response_id
    if isinstance(explicit_id, (dict, list)):
        raise RecordError("'id' must be a string or a number")

    return TrafficRecord(
        request_id=stable_request_id(explicit_id, timestamp, route, messages),
        timestamp=timestamp,
        route=route,
        incumbent_model=incumbent,
        messages=messages,
        params=params,
        response_text=response_text,
        input_tokens=parse_count(usage.get("prompt_tokens", usage.get("input_tokens")), "usage.prompt_tokens"),
        output_tokens=parse_count(usage.get("completion_tokens", usage.get("output_tokens")),
                                  "usage.completion_tokens"),
        latency_ms=parse_number(obj.get("latency_ms"), "latency_ms"),
        ttft_ms=parse_number(obj.get("ttft_ms"), "ttft_ms"),
        cost_usd=parse_number(obj.get("cost_usd"), "cost_usd"),
        cache_hit=parse_flag(obj.get("cache_hit"), "cache_hit"),
        metadata=parse_metadata(obj.get("metadata")),
        position=position,
    )


def _tool_calls(calls: Any) -> list[tuple[str, str]]:
    """(name, arguments) of a message's tool calls, arguments as JSON text (entries of another shape are left out)."""
    out = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            arguments = function.get("arguments") or ""
            if not isinstance(arguments, str):
                arguments = orjson.dumps(arguments).decode() if isinstance(arguments, (dict, list)) else ""
            out.append((function["name"], arguments))
    return out


def response_parts(response: Any) -> tuple[str | None, str | None, dict[str, Any] | None, Any]:
    """(text, model, usage, id) of a chat completion, a completions response or a plain string."""
    if response is None:
        return None, None, None, None
    if isinstance(response, str):
        return response, None, None, None
    if not isinstance(response, dict):
        raise RecordError(f"'response' must be an object or a string, got {type(response).__name__}")
    text = None
    choices = response.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            raise RecordError("'response.choices' must be a list")
        if choices:
            first = choices[0]
            if not isinstance(first, dict):
                raise RecordError("'response.choices[0]' must be an object")
            message = first.get("message")
            if isinstance(message, dict):
                text = with_tool_calls(content_text(message.get("content")), _tool_calls(message.get("tool_calls")))
            elif isinstance(first.get("text"), str):
                text = first["text"]
    usage = response.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise RecordError("'response.usage' must be an object")
    response_id = response.get("id")
    if isinstance(response_id, (dict, list)):
        response_id = None
    return text, parse_name(response.get("model"), "response.model"), usage, response_id


class JsonlSource:
    """A file or folder of OpenAI-style JSONL request logs; cursor: file name + byte offset."""

    def __init__(self, name: str, path: str, max_record_bytes: int) -> None:
        self.name = name
        self.path = path
        self.max_record_bytes = max_record_bytes

    def read(self, cursor: dict[str, Any] | None, window: TimeWindow) -> Iterator[SourceRead]:
        loads = orjson.loads
        for line in read_lines(self.path, cursor, self.max_record_bytes, SUFFIXES, backfill=window.is_backfill):
            position = f"{line.file}:{line.offset}"
            if line.error is not None:
                yield SourceRead(Rejected(position, line.error), line.cursor)
                continue
            if line.data is None or not line.data.strip():
                yield SourceRead(None, line.cursor)
                continue
            try:
                record = normalise_openai_log(loads(line.data), position)
            except orjson.JSONDecodeError as exc:
                yield SourceRead(Rejected(position, f"invalid JSON: {exc.msg}"), line.cursor)
            except RecordError as exc:
                yield SourceRead(Rejected(position, str(exc)), line.cursor)
            except UNUSABLE_ERRORS as exc:
                yield SourceRead(Rejected(position, unusable(exc)), line.cursor)
            else:
                yield SourceRead(record, line.cursor)


def open_source(config: SourceConfig) -> JsonlSource:
    assert config.path is not None  # SourceConfig requires it for this kind
    return JsonlSource(config.name, config.path, config.max_record_bytes)
