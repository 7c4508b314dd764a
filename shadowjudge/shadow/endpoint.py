"""One HTTP attempt at a chat completion, measured: the boundary between the engine and a provider.

`OpenAIEndpoint` goes through the `openai` SDK (AsyncOpenAI: base URL, auth headers, timeouts, the SDK's
status-error classes) on a lean HTTP/1.1 transport (`http1.py`, in place of the SDK's aiohttp one: swapping
it cut the engine's CPU per streamed request by roughly 40% on loopback), and posts the request body as
stored rather than via `chat.completions.create`: `create` re-validates every message through the SDK's
TypedDict transform and builds a pydantic object per streamed chunk, which on a 2-core box caps the engine
near 100 req/s. Replayed requests are already plain JSON, so the body goes as orjson bytes (the SDK would
otherwise deep-copy and re-serialise it) and the engine reads the SSE bytes itself, which is also where each
chunk's arrival time is taken.

What comes back is checked, not trusted: a body that is not the answer it should be (a provider's `{"error":
...}` object with a 200, a proxy's HTML page, JSON of the wrong shape) becomes a classified `AttemptError`,
never a crash the engine can only call "unexpected". An error object is classified like the HTTP error it
stands for (a context-length error is a bad request, not retried); anything else is a `malformed_response`
with a short, secret-scrubbed excerpt.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from shadowjudge.answers import with_tool_calls
from shadowjudge.config import TargetConfig
from shadowjudge.shadow.credentials import scrub_secrets
from shadowjudge.shadow.http1 import Http1Transport


@dataclass
class Completion:
    """A successful attempt. Token counts are the provider's usage, None when it reported none."""

    text: str
    latency_ms: float
    ttft_ms: float | None
    itl_ms: float | None
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int = 0
    finish_reason: str | None = None


class AttemptError(Exception):
    """A failed attempt, classified; `retryable` and `retry_after_s` drive the engine's backoff.

    `received` is what the attempt got before it failed, for the engine to charge (a provider bills a stream that
    stalled or broke off for what it generated): set once the provider accepted the request (a 200 response) or
    the deadline passed waiting for it; None when it was refused (an error status) or never got a response."""

    def __init__(self, error_class: str, message: str, *, retryable: bool = False,
                 retry_after_s: float | None = None, status: int | None = None,
                 received: Completion | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status
        self.received = received


class ChatEndpoint(Protocol):
    async def complete(self, body: dict[str, Any], *, stream: bool, timeout_s: float) -> Completion: ...

    async def aclose(self) -> None: ...


def classify_status(status: int) -> tuple[str, bool]:
    """Error class and whether a retry can help, for an HTTP error status."""
    if status == 429:
        return "rate_limited", True
    if status >= 500:
        return "server_error", True
    if status == 408:
        return "timeout", True
    if status in (401, 403):
        return "auth_error", False
    if status == 404:
        return "not_found", False
    if status in (400, 413, 422):
        return "bad_request", False
    return "client_error", False


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, `retry-after` (seconds or an HTTP date); None when absent."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither seconds nor a date ("soon"): no hint, the normal backoff applies
        return None
    return max(0.0, parsed.timestamp() - time.time())


# Words in a provider's error object (its code, type or status, else its message) and the HTTP status they stand
# for, most specific first. Matched in the lower-cased text with spaces and hyphens as underscores.
_ERROR_WORDS = (
    ("context_length", 400), ("too_large", 413), ("rate_limit", 429), ("too_many_requests", 429),
    ("resource_exhausted", 429), ("quota", 429), ("authentication", 401), ("unauthenticated", 401),
    ("invalid_api_key", 401), ("permission", 403), ("not_found", 404), ("invalid_request", 400),
    ("invalid_argument", 400), ("bad_request", 400), ("timeout", 408), ("timed_out", 408),
    ("deadline_exceeded", 408), ("overloaded", 503), ("unavailable", 503), ("server_error", 500), ("internal", 500),
)


def _error_object_status(error: dict[str, Any], message: str) -> int:
    """The HTTP status a provider's error object stands for: an HTTP status in its `code` or `status`, else the
    first of `_ERROR_WORDS` in its code, status or type, else in its message; 500 when it names no cause."""
    named = []
    for key in ("code", "status", "type"):
        value = error.get(key)
        if type(value) is str and len(value) == 3 and value.isdecimal():
            value = int(value)
        if type(value) is int and 400 <= value < 600:
            return value
        if type(value) is str:
            named.append(value)
    for text in (*named, message):
        words = text.lower().replace(" ", "_").replace("-", "_")
        for word, status in _ERROR_WORDS:
            if word in words:
                return status
    return 500


def _provider_error(error: Any, where: str, secrets: Sequence[str] = ()) -> AttemptError:
    """The AttemptError for a provider's error object (`{"error": ...}` as a 200 body or an SSE event), classified
    by `classify_status` like the HTTP error it stands for; its message is kept, scrubbed."""
    fields = error if type(error) is dict else {"message": error}
    message = fields.get("message")
    if type(message) is not str:
        message = orjson.dumps(error).decode()
    error_class, retryable = classify_status(_error_object_status(fields, message))
    return AttemptError(error_class, f"{where}: {scrub_secrets(message, secrets)[:300]}", retryable=retryable)


def _excerpt(body: bytes, secrets: Sequence[str], limit: int = 160) -> str:
    """The start of a body for an error message: secrets scrubbed before it is cut, whitespace collapsed."""
    text = " ".join(scrub_secrets(body.decode("utf-8", "replace"), secrets).split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _malformed(what: str) -> AttemptError:
    return AttemptError("malformed_response", what)


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "an integer"}


def _wrong_type(what: str, kind: type) -> AttemptError:
    return _malformed(f"{what} is not {_JSON_KINDS[kind]}")


def _not_a_completion(body: bytes, what: str, secrets: Sequence[str] = ()) -> AttemptError:
    """The AttemptError for a body that is not the answer: a provider's JSON error object is classified like
    the HTTP error it stands for (`_provider_error`), anything else (a proxy page, other JSON) is malformed."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if type(data) is dict and data.get("error"):
        return _provider_error(data["error"], "error object in a 200 response", secrets)
    return _malformed(f"{what}: {_excerpt(body, secrets)}")


SENT_AT = "shadowjudge_sent_at"
# How long the end of a streamed body is awaited after [DONE] (see `OpenAIEndpoint._until_body_end`).
DONE_GRACE_S = 0.2
_loads = orjson.loads


async def _mark_sent(request: Any) -> None:
    """httpx event hook: the moment the request goes to the transport starts the clock.

    TTFT and latency then measure the provider and the wire, not the SDK building the request (about a
    millisecond of client CPU, more on a loaded machine)."""
    request.extensions[SENT_AT] = time.perf_counter()


# SSE framing without an event: comments, fields, a `data:` line cut short. A body of only these merely stopped.
_SSE_LINE = (b":", b"data:", b"event:", b"id:", b"retry:")
# The most of a body's start kept while no event has come, to say what the body was if none does.
_UNFRAMED_LIMIT = 1 << 16


class StreamParser:
    """Folds the SSE bytes of a streamed chat completion into text, usage and chunk arrival times.

    It takes raw body chunks (not decoded lines): splitting bytes and handing them to orjson is several
    times cheaper than the text line iterator, and this loop runs once per token of every answer. Chunks of
    the wrong shape raise a `malformed_response`; the checks on the hot path are bare type tests."""

    def __init__(self, started: float, secrets: Sequence[str] = ()):
        self.started = started
        self._secrets = secrets
        self.parts: list[str] = []
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.token_times: list[float] = []
        self.usage: tuple[int | None, int | None, int] = (None, None, 0)
        self.finish_reason: str | None = None
        self.done = False
        self.ended: float | None = None
        self._rest = b""
        self._unframed: bytes | None = b""  # the body so far, until its first event (then None)

    def feed(self, data: bytes, now: float) -> None:
        """Take the next piece of the body, which may end mid-line; `now` is when it arrived.

        A bad event fails the attempt, but only once the events already received after it are read too: they
        were delivered, and so billed (`AttemptError.received`)."""
        if self._unframed is not None and len(self._unframed) < _UNFRAMED_LIMIT:
            self._unframed += data[:_UNFRAMED_LIMIT - len(self._unframed)]
        if self._rest:
            data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        failure: AttemptError | None = None
        for line in lines:
            if self.done:
                break
            if line[:5] == b"data:":
                try:
                    self._event(line[5:].strip(), now)
                except AttemptError as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure

    def _event(self, data: bytes, now: float) -> None:
        self._unframed = None
        if data == b"[DONE]":
            self.done = True
            self.ended = now
            return
        try:
            chunk = _loads(data)
        except orjson.JSONDecodeError:
            raise _malformed(f"stream chunk is not JSON: {_excerpt(data, self._secrets)}") from None
        if type(chunk) is not dict:
            raise _wrong_type("stream chunk", dict)
        error = chunk.get("error")
        if error:
            raise _provider_error(error, "error event in stream", self._secrets)
        usage = chunk.get("usage")
        if usage:
            self.usage = _usage_counts(usage)
        choices = chunk.get("choices")
        if not choices:
            return
        if type(choices) is not list:
            raise _wrong_type("stream chunk's choices", list)
        for choice in choices:
            if type(choice) is not dict:
                raise _wrong_type("stream chunk's choice", dict)
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                if type(delta) is not dict:
                    raise _wrong_type("stream chunk's delta", dict)
                content = delta.get("content")
                if content:
                    if type(content) is not str:
                        raise _wrong_type("delta content", str)
                    self.parts.append(content)
                calls = delta.get("tool_calls")
                if calls:
                    self._add_tool_calls(calls)
                if content or calls:
                    self.token_times.append(now)
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                self.finish_reason = _finish_reason(finish_reason)

    def _add_tool_calls(self, calls: Any) -> None:
        """Streamed tool calls come in pieces, appended to the call of the same index."""
        if type(calls) is not list:
            raise _wrong_type("delta tool_calls", list)
        for call in calls:
            index, name, arguments = _tool_call(call)
            slot = self.tool_calls.setdefault(index, {"name": "", "arguments": ""})
            slot["name"] += name
            slot["arguments"] += arguments

    def unfinished(self) -> AttemptError:
        """Why a body that ended before a finish_reason or [DONE] failed: a stream that stopped is truncated
        (a retry can help); a body without any event was never a stream, see `_not_a_completion`."""
        body = self._unframed
        if body is None or all(line.startswith(_SSE_LINE) for line in body.split(b"\n") if line.strip()):
            return AttemptError("truncated_stream", "stream ended before a finish_reason or [DONE]", retryable=True)
        return _not_a_completion(body, "streamed body is not an event stream", self._secrets)

    def text(self) -> str:
        return _with_tool_calls("".join(self.parts), list(self.tool_calls.values()))

    def completion(self, ended: float) -> Completion:
        times = self.token_times
        ttft = (times[0] - self.started) * 1000 if times else None
        itl = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else None
        input_tokens, output_tokens, cached = self.usage
        return Completion(text=self.text(), latency_ms=(ended - self.started) * 1000, ttft_ms=ttft, itl_ms=itl,
                          input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached,
                          finish_reason=self.finish_reason)


def _with_tool_calls(text: str, calls: list[dict[str, str]]) -> str:
    """Tool calls are part of the answer the judge sees (`shadowjudge.answers`)."""
    return with_tool_calls(text, [(c["name"], c["arguments"]) for c in calls]) or ""


def _tool_call(call: Any) -> tuple[int, str, str]:
    """Index, name and arguments of a tool call (or of a streamed piece of one; absent parts are empty)."""
    if type(call) is not dict:
        raise _wrong_type("tool call", dict)
    index = call.get("index") or 0
    if type(index) is not int:
        raise _wrong_type("tool call index", int)
    function = call.get("function") or {}
    if type(function) is not dict:
        raise _wrong_type("tool call function", dict)
    name, arguments = function.get("name") or "", function.get("arguments") or ""
    if type(arguments) in (dict, list):  # some servers send the arguments decoded; the judge reads them as JSON
        arguments = orjson.dumps(arguments).decode()
    if type(name) is not str or type(arguments) is not str:
        raise _wrong_type("tool call name or arguments", str)
    return index, name, arguments


def _finish_reason(value: Any) -> str | None:
    if value is not None and type(value) is not str:
        raise _wrong_type("finish_reason", str)
    return value


def _usage_counts(usage: Any) -> tuple[int | None, int | None, int]:
    """Prompt, completion and cached prompt tokens of a `usage` object (None, None, 0 when there is none)."""
    if not usage:
        return None, None, 0
    if type(usage) is not dict:
        raise _wrong_type("usage", dict)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if any(n is not None and type(n) is not int for n in (prompt, completion)):
        raise _wrong_type("a usage token count", int)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None  # a detail: odd shapes count as none
    return prompt, completion, cached if type(cached) is int else 0


class OpenAIEndpoint:
    """A target reached through the openai SDK. Holds the key; never puts it in an error message."""

    def __init__(self, target: TargetConfig, api_key: str, *, timeout_s: float):
        import httpx2
        import openai

        self._httpx = httpx2
        self._openai = openai
        self._secrets = [api_key]
        limits = httpx2.Limits(max_connections=target.concurrency, max_keepalive_connections=target.concurrency)
        hooks = {"request": [_mark_sent]}
        http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout_s, event_hooks=hooks,
                                                     transport=Http1Transport(max_connections=target.concurrency))
        self._client = openai.AsyncOpenAI(base_url=target.base_url, api_key=api_key, max_retries=0,
                                          timeout=timeout_s, http_client=http_client)
        # The SDK's base URL with the path resolved once: merging a relative path into the base URL re-parses
        # and re-validates both on every request (~0.1 ms of CPU), an absolute URL is taken as it is.
        self._url = str(self._client.base_url.join("chat/completions"))

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, body: dict[str, Any], *, stream: bool, timeout_s: float) -> Completion:
        httpx2, openai = self._httpx, self._openai
        parser = StreamParser(time.perf_counter(), self._secrets)
        response = None
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._client.post(self._url, content=orjson.dumps(body),
                                                   cast_to=httpx2.Response, stream=stream)
                parser.started = response.request.extensions.get(SENT_AT, parser.started)
                if not stream:
                    payload = await response.aread()
                    return _parse_completion(payload, parser.started, time.perf_counter(), self._secrets)
                # Undecoded bodies skip httpx2's decoder and chunker layers: the bytes are the same.
                encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
                chunks = response.aiter_bytes() if encoded else response.aiter_raw()
                async for data in chunks:
                    parser.feed(data, time.perf_counter())
                    if parser.done:
                        break
            if parser.done:  # the answer is whole: the deadline no longer applies, only a grace for the body's end
                await self._until_body_end(chunks)
                return parser.completion(parser.ended or time.perf_counter())
            if parser.finish_reason is None:
                raise parser.unfinished()
            return parser.completion(time.perf_counter())
        except AttemptError as exc:  # raised on a 200 response's body: what it brought is billed
            exc.received = parser.completion(time.perf_counter())
            raise
        except openai.APIStatusError as exc:
            error_class, retryable = classify_status(exc.status_code)
            raise AttemptError(error_class, self._scrub(f"HTTP {exc.status_code}: {exc.message}"),
                               retryable=retryable, retry_after_s=parse_retry_after(exc.response.headers),
                               status=exc.status_code) from None
        except (TimeoutError, openai.APITimeoutError, httpx2.TimeoutException):
            stalled = bool(parser.token_times)
            what = f"stream stalled after {len(parser.token_times)} chunks" if stalled else "no answer"
            raise AttemptError("stalled_stream" if stalled else "timeout",
                               f"{what}: not finished within the {timeout_s:g}s deadline", retryable=True,
                               received=parser.completion(time.perf_counter())) from None
        except (openai.APIConnectionError, httpx2.TransportError) as exc:
            received = parser.completion(time.perf_counter()) if response is not None else None
            raise AttemptError("connection_error", self._scrub(f"{type(exc).__name__}: {exc}"),
                               retryable=True, received=received) from None
        finally:
            if response is not None:
                await response.aclose()

    async def _until_body_end(self, chunks: AsyncIterator[bytes]) -> None:
        """Read what follows [DONE] for at most DONE_GRACE_S. An HTTP/1.1 connection is only reused once its body
        is fully read (a new connection per request costs more than the request); a body still open after that
        (a proxy holding it) is left, and closing the response then closes its connection instead."""
        try:
            async with asyncio.timeout(DONE_GRACE_S):
                async for _ in chunks:
                    pass
        except (TimeoutError, self._httpx.RequestError):
            pass

    def _scrub(self, text: str) -> str:
        return scrub_secrets(text, self._secrets)


def _parse_completion(payload: bytes, started: float, ended: float, secrets: Sequence[str] = ()) -> Completion:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    if type(data) is not dict or not data.get("choices"):  # an error object, a proxy page, cut-off JSON
        raise _not_a_completion(payload, "response body is not a chat completion", secrets)
    choices = data["choices"]
    if type(choices) is not list:
        raise _wrong_type("choices", list)
    choice = choices[0]
    if type(choice) is not dict:
        raise _wrong_type("choice", dict)
    message = choice.get("message") or {}
    if type(message) is not dict:
        raise _wrong_type("message", dict)
    content = message.get("content") or ""
    if type(content) is not str:
        raise _wrong_type("message content", str)
    tool_calls = message.get("tool_calls") or []
    if type(tool_calls) is not list:
        raise _wrong_type("message tool_calls", list)
    calls = [{"name": name, "arguments": arguments} for _, name, arguments in map(_tool_call, tool_calls)]
    input_tokens, output_tokens, cached = _usage_counts(data.get("usage"))
    return Completion(text=_with_tool_calls(content, calls), latency_ms=(ended - started) * 1000, ttft_ms=None,
                      itl_ms=None, input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached,
                      finish_reason=_finish_reason(choice.get("finish_reason")))
