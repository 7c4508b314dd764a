"""One HTTP attempt at a chat completion, measured: the boundary between the engine and a provider.

`OpenAIEndpoint` goes through the `openai` SDK (AsyncOpenAI: base URL, auth headers, timeouts, the SDK's
status-error classes) on a lean HTTP/1.1 transport (`http1.py`, in place of the SDK's aiohttp one: swapping
it cut the engine's CPU per streamed request by roughly 40% on loopback), and posts the request body as
stored rather than via `chat.completions.create`: `create` re-validates every message through the SDK's
TypedDict transform and builds a pydantic object per streamed chunk, which on a 2-core box caps the engine
near 100 req/s. Replayed requests are already plain JSON, so the body goes as orjson bytes (the SDK would
otherwise deep-copy and re-serialise it) and the engine reads the SSE bytes itself, which is also where each
chunk's arrival time is taken.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

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
    """A failed attempt, classified; `retryable` and `retry_after_s` drive the engine's backoff."""

    def __init__(self, error_class: str, message: str, *, retryable: bool = False,
                 retry_after_s: float | None = None, status: int | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status


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
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


SENT_AT = "shadowjudge_sent_at"
_loads = orjson.loads


async def _mark_sent(request: Any) -> None:
    """httpx event hook: the moment the request goes to the transport starts the clock.

    TTFT and latency then measure the provider and the wire, not the SDK building the request (about a
    millisecond of client CPU, more on a loaded machine)."""
    request.extensions[SENT_AT] = time.perf_counter()


class StreamParser:
    """Folds the SSE bytes of a streamed chat completion into text, usage and chunk arrival times.

    It takes raw body chunks (not decoded lines): splitting bytes and handing them to orjson is several
    times cheaper than the text line iterator, and this loop runs once per token of every answer."""

    def __init__(self, started: float):
        self.started = started
        self.parts: list[str] = []
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.token_times: list[float] = []
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False
        self.ended: float | None = None
        self._rest = b""

    def feed(self, data: bytes, now: float) -> None:
        """Take the next piece of the body, which may end mid-line; `now` is when it arrived."""
        if self._rest:
            data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            if self.done:
                return
            if line[:5] == b"data:":
                self._event(line[5:].strip(), now)

    def _event(self, data: bytes, now: float) -> None:
        if data == b"[DONE]":
            self.done = True
            self.ended = now
            return
        try:
            chunk = _loads(data)
        except orjson.JSONDecodeError:
            raise AttemptError("malformed_response", f"stream chunk is not JSON: {data[:120]!r}") from None
        if type(chunk) is not dict:
            raise AttemptError("malformed_response", "stream chunk is not a JSON object")
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise AttemptError("server_error", f"error event in stream: {message}", retryable=True)
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                content = delta.get("content")
                if content:
                    self.parts.append(content)
                calls = delta.get("tool_calls")
                if calls:
                    for call in calls:
                        slot = self.tool_calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                        fn = call.get("function") or {}
                        slot["name"] += fn.get("name") or ""
                        slot["arguments"] += fn.get("arguments") or ""
                if content or calls:
                    self.token_times.append(now)
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                self.finish_reason = finish_reason

    def text(self) -> str:
        return _with_tool_calls("".join(self.parts), list(self.tool_calls.values()))

    def completion(self, ended: float) -> Completion:
        times = self.token_times
        ttft = (times[0] - self.started) * 1000 if times else None
        itl = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else None
        usage = self.usage or {}
        return Completion(text=self.text(), latency_ms=(ended - self.started) * 1000, ttft_ms=ttft, itl_ms=itl,
                          input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"),
                          cached_input_tokens=_cached_tokens(usage), finish_reason=self.finish_reason)


def _with_tool_calls(text: str, calls: list[dict[str, str]]) -> str:
    """Tool calls are part of the answer the judge sees, appended as JSON after any text."""
    if not calls:
        return text
    rendered = orjson.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls]).decode()
    return f"{text}\n{rendered}" if text else rendered


def _cached_tokens(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


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
        parser = StreamParser(time.perf_counter())
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._client.post(self._url, content=orjson.dumps(body),
                                                   cast_to=httpx2.Response, stream=stream)
                parser.started = response.request.extensions.get(SENT_AT, parser.started)
                try:
                    if not stream:
                        payload = await response.aread()
                        return _parse_completion(payload, parser.started, time.perf_counter())
                    # Read to the end even after [DONE]: an HTTP/1.1 connection is only reused once its
                    # body is fully consumed, and a new connection per request costs more than the request.
                    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
                    # Undecoded bodies skip httpx2's decoder and chunker layers: the bytes are the same.
                    async for data in (response.aiter_bytes() if encoded else response.aiter_raw()):
                        parser.feed(data, time.perf_counter())
                finally:
                    await response.aclose()
        except AttemptError:
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
                               f"{what}: not finished within the {timeout_s:g}s deadline", retryable=True) from None
        except (openai.APIConnectionError, httpx2.TransportError) as exc:
            raise AttemptError("connection_error", self._scrub(f"{type(exc).__name__}: {exc}"),
                               retryable=True) from None
        ended = parser.ended or time.perf_counter()
        if not parser.done and parser.finish_reason is None:
            raise AttemptError("truncated_stream", "stream ended before a finish_reason or [DONE]", retryable=True)
        return parser.completion(ended)

    def _scrub(self, text: str) -> str:
        return scrub_secrets(text, self._secrets)


def _parse_completion(payload: bytes, started: float, ended: float) -> Completion:
    try:
        data = orjson.loads(payload)
        choice = data["choices"][0]
        message = choice.get("message") or {}
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise AttemptError("malformed_response", f"response body is not a chat completion: {payload[:120]!r}") from None
    functions = [c.get("function") or {} for c in message.get("tool_calls") or ()]
    calls = [{"name": f.get("name") or "", "arguments": f.get("arguments") or ""} for f in functions]
    usage = data.get("usage") or {}
    return Completion(text=_with_tool_calls(message.get("content") or "", calls), latency_ms=(ended - started) * 1000,
                      ttft_ms=None, itl_ms=None, input_tokens=usage.get("prompt_tokens"),
                      output_tokens=usage.get("completion_tokens"), cached_input_tokens=_cached_tokens(usage),
                      finish_reason=choice.get("finish_reason"))

