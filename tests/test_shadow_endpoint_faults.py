"""Provider replies the endpoint must classify, not crash on: odd headers, error bodies, wrong shapes, open bodies."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shadowjudge.analysis.golden import GoldenCase, NoAnswer
from shadowjudge.config import ShadowConfig, TargetConfig
from shadowjudge.shadow.endpoint import AttemptError, Completion, OpenAIEndpoint, parse_retry_after
from shadowjudge.shadow.engine import replay
from shadowjudge.shadow.golden_answers import ask_golden_cases
from test_shadow_engine import stored, store_samples
from test_shadow_http1 import SECRET, Reply, ScriptedServer, chunked, endpoint, fixed, silent

ANSWER = [b'data: {"choices":[{"index":0,"delta":{"content":"Par"}}]}\n\n',
          b'data: {"choices":[{"index":0,"delta":{"content":"is"},"finish_reason":"stop"}]}\n\n'
          b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n']
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "capital of France?"}]}


async def ask(port: int, stream: bool = True, timeout_s: float = 2.0) -> Completion | AttemptError:
    """One attempt through a fresh OpenAIEndpoint: the Completion, or the AttemptError it raised."""
    ep = endpoint(port)
    try:
        return await ep.complete(REQUEST, stream=stream, timeout_s=timeout_s)
    except AttemptError as exc:
        return exc
    finally:
        await ep.aclose()


def one_reply(reply: Reply, stream: bool = True) -> Completion | AttemptError:
    async def main() -> Completion | AttemptError:
        async with ScriptedServer([reply]) as srv:
            return await ask(srv.port, stream)
    return asyncio.run(main())


def sse(*events: bytes, done: bool = True) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events) + (b"data: [DONE]\n\n" if done else b"")


def with_type(body: bytes, content_type: bytes) -> Reply:
    return fixed(body, extra=b"content-type: " + content_type + b"\r\n")


# -- bug: an unparseable Retry-After made a 429 an unexpected, unretried failure

def test_an_unparseable_retry_after_is_no_hint_and_the_429_is_retried(engine):
    for value in ("soon", "1.5s", "Mon, 99 Foo 2024"):
        assert parse_retry_after({"retry-after": value}) is None
    assert parse_retry_after({"retry-after-ms": "later", "retry-after": "4"}) == 4.0
    run_id, samples = store_samples(engine, 1)
    limited = fixed(b'{"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}}', 429,
                    b"retry-after: soon\r\n")

    async def main() -> None:
        async with ScriptedServer([limited, chunked(ANSWER)]) as srv:
            target = TargetConfig(name="t", model="m", base_url=f"http://127.0.0.1:{srv.port}/v1", concurrency=1)
            report = await replay(engine, run_id, samples, [target],
                                  ShadowConfig(timeout_s=5.0, retry_backoff_s=0.01, max_retries=2), {})
            assert len(srv.requests) == 2
        assert report.targets["t"].errors == {}

    asyncio.run(main())
    [row] = stored(engine, run_id)
    assert (row.error_class, row.retries, row.output_text) == (None, 1, "Paris")


def test_a_429_with_an_unparseable_retry_after_is_a_retryable_rate_limit():
    result = one_reply(fixed(b'{"error": {"message": "slow down"}}', 429, b"retry-after: soon\r\n"))
    assert isinstance(result, AttemptError)
    assert (result.error_class, result.retryable, result.retry_after_s, result.status) == ("rate_limited", True,
                                                                                         None, 429)


# -- bug: a body held open after [DONE] turned a finished answer into a stalled stream (retried, billed again)

def held_open(pieces: list[bytes], release: asyncio.Event) -> Reply:
    """A chunked answer whose final empty chunk never comes: the body stays open until `release`."""
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        await release.wait()
        return False
    return reply


def test_an_answer_whose_body_stays_open_after_done_is_complete_and_its_connection_not_reused():
    async def main() -> None:
        release = asyncio.Event()
        async with ScriptedServer([held_open(ANSWER, release), chunked(ANSWER), chunked(ANSWER)]) as srv:
            target = TargetConfig(name="t", model="m", base_url=f"http://127.0.0.1:{srv.port}/v1", concurrency=1)
            ep = OpenAIEndpoint(target, SECRET, timeout_s=10.0)  # far longer than the server holds on to nothing
            try:
                answers = [await ep.complete(REQUEST, stream=True, timeout_s=10.0) for _ in range(3)]
            finally:
                release.set()
                await ep.aclose()
            # the open body's connection was closed, not handed to the next request; a body that ends soon
            # after [DONE] is read to its end and its connection reused
            assert srv.connections == 2
        for answer in answers:
            assert (answer.text, answer.finish_reason, answer.input_tokens, answer.output_tokens) == ("Paris", "stop",
                                                                                                      5, 2)
        assert answers[0].latency_ms >= answers[0].ttft_ms

    asyncio.run(main())


# -- bug: a 200 whose body is an error object or a proxy page was a retried truncated_stream, its message lost

CONTEXT = (b'{"error": {"message": "This model\'s maximum context length is 4096 tokens", '
           b'"type": "invalid_request_error", "code": "context_length_exceeded"}}')


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(("body", "error_class", "retryable"), [
    (CONTEXT, "bad_request", False),
    (b'{"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}',
     "rate_limited", True),
    (b'{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}', "server_error", True),
    (b'{"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}', "auth_error",
     False),
    (b'{\n  "error": "Request timed out upstream"\n}\n', "timeout", True),
])
def test_a_200_error_object_is_classified_like_the_http_error_it_stands_for(stream, body, error_class, retryable):
    result = one_reply(with_type(body, b"application/json"), stream)
    assert isinstance(result, AttemptError)
    assert (result.error_class, result.retryable) == (error_class, retryable)
    assert "truncated" not in str(result)
    if body == CONTEXT:
        assert "maximum context length is 4096 tokens" in str(result)


def test_an_error_event_in_the_stream_is_classified_by_its_cause():
    result = one_reply(chunked([sse(b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}', CONTEXT, done=False)]))
    assert isinstance(result, AttemptError)
    assert (result.error_class, result.retryable) == ("bad_request", False)
    assert "maximum context length" in str(result)


def stalls_after(piece: bytes) -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        await asyncio.sleep(0.5)
        return False
    return reply


def test_a_failed_attempt_carries_what_it_received_for_the_engine_to_charge():
    """A provider bills a stream that stalled or broke off for what it generated, and a request it was still
    working on when the deadline passed for its prompt; an error status for nothing."""
    broken = ANSWER[0] + b'data: {"choices": [\n\n' + ANSWER[1]  # the rest of the answer came after the bad chunk

    async def main() -> list[Completion | AttemptError]:
        replies = [stalls_after(ANSWER[0]), silent(0.5), chunked([broken]), fixed(b'{"error": {}}', 429)]
        async with ScriptedServer(replies) as srv:
            results = [await ask(srv.port, timeout_s=0.3) for _ in range(4)]
            await asyncio.sleep(0.3)  # the server's replies end their holds
            return results

    stalled, silence, malformed, refused = asyncio.run(main())
    assert (stalled.error_class, stalled.received.text, stalled.received.output_tokens) == ("stalled_stream", "Par",
                                                                                           None)
    assert (malformed.error_class, malformed.received.text) == ("malformed_response", "Paris")
    assert (malformed.received.input_tokens, malformed.received.output_tokens) == (5, 2)
    assert (silence.error_class, silence.received.text) == ("timeout", "")
    assert (refused.error_class, refused.received) == ("rate_limited", None)


PROXY_PAGE = (b"<html><head><title>502 Bad Gateway</title></head>\n<body>\n<pre>Authorization: Bearer "
              + SECRET.encode() + b"</pre>\n<p>" + b"padding " * 2000 + b"</p>\n</body>\n</html>\n")


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(("body", "content_type", "shows"), [
    (PROXY_PAGE, b"text/html", "502 Bad Gateway"),
    (b"upstream connect error or disconnect/reset before headers. key=" + SECRET.encode(), b"text/plain",
     "upstream connect error"),
    (b'{"detail": "Not authorised: ' + SECRET.encode() + b'"}', b"application/json", "Not authorised"),
])
def test_a_200_body_that_is_neither_the_answer_nor_an_error_object_is_malformed(stream, body, content_type, shows):
    result = one_reply(with_type(body, content_type), stream)
    assert isinstance(result, AttemptError)
    assert (result.error_class, result.retryable) == ("malformed_response", False)
    message = str(result)
    assert shows in message and SECRET not in message and SECRET[:12] not in message
    assert len(message) < 400  # an excerpt, not the page


def test_a_stream_that_only_stops_is_still_truncated_but_a_page_in_it_is_not():
    async def main() -> list[Completion | AttemptError]:
        replies = [chunked([b": keep-alive\n\n", b": keep-alive\n\n"]),
                   chunked([sse(b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}', done=False)]),
                   chunked([b"<html><body>gateway timeout</body></html>"])]
        results = []
        async with ScriptedServer(replies) as srv:
            for _ in range(len(replies)):  # the server takes its replies off the list as it answers
                results.append(await ask(srv.port))
        return results

    comments, cut, page = asyncio.run(main())
    assert all(isinstance(r, AttemptError) for r in (comments, cut, page))
    assert [(r.error_class, r.retryable) for r in (comments, cut)] == [("truncated_stream", True)] * 2
    assert (page.error_class, page.retryable) == ("malformed_response", False)
    assert "gateway timeout" in str(page)


# -- bug: valid JSON of the wrong shape raised AttributeError/TypeError, recorded as unexpected

def chunk(choice: bytes) -> bytes:
    return b'{"choices":[' + choice + b"]}"


STOP = chunk(b'{"index":0,"delta":{},"finish_reason":"stop"}')


@pytest.mark.parametrize("events", [
    [b'{"choices":"Paris"}', STOP],
    [b'{"choices":{"index":0,"delta":{"content":"Paris"}}}', STOP],
    [chunk(b'"Paris"'), STOP],
    [chunk(b'{"index":0,"delta":"Paris"}'), STOP],
    [chunk(b'{"index":0,"delta":{"content":7}}'), STOP],
    [chunk(b'{"index":0,"delta":{"content":["Paris"]}}'), STOP],
    [chunk(b'{"index":0,"delta":{"tool_calls":"get_weather"}}'), STOP],
    [chunk(b'{"index":0,"delta":{"tool_calls":["get_weather"]}}'), STOP],
    [chunk(b'{"index":0,"delta":{"tool_calls":[{"index":0,"function":"get_weather"}]}}'), STOP],
    [chunk(b'{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":7}}]}}'), STOP],
    [chunk(b'{"index":0,"delta":{"tool_calls":[{"index":[0],"function":{"name":"f"}}]}}'), STOP],
    [chunk(b'{"index":0,"delta":{"content":"Paris"},"finish_reason":1}')],
    [chunk(b'{"index":0,"delta":{"content":"Paris"}}'), STOP, b'{"choices":[],"usage":"n/a"}'],
    [chunk(b'{"index":0,"delta":{"content":"Paris"}}'), STOP, b'{"choices":[],"usage":{"prompt_tokens":"5"}}'],
])
def test_stream_chunks_of_the_wrong_shape_are_malformed(events):
    result = one_reply(chunked([sse(*events)]))
    assert isinstance(result, AttemptError), result
    assert (result.error_class, result.retryable) == ("malformed_response", False)


def completion_body(choice: bytes = b'{"index":0,"message":{"role":"assistant","content":"Paris"},'
                                    b'"finish_reason":"stop"}', usage: bytes = b"null") -> bytes:
    return b'{"choices":[' + choice + b'],"usage":' + usage + b"}"


@pytest.mark.parametrize("body", [
    completion_body(b'{"index":0,"message":"Paris","finish_reason":"stop"}'),
    completion_body(b'{"index":0,"message":{"content":7},"finish_reason":"stop"}'),
    completion_body(b'{"index":0,"message":{"content":"","tool_calls":"get_weather"},"finish_reason":"tool_calls"}'),
    completion_body(b'{"index":0,"message":{"tool_calls":[{"function":"get_weather"}]},"finish_reason":"tool_calls"}'),
    completion_body(b'{"index":0,"message":{"tool_calls":[{"function":{"name":["f"]}}]},"finish_reason":"stop"}'),
    completion_body(b'{"index":0,"message":{"content":"Paris"},"finish_reason":{"why":"stop"}}'),
    completion_body(usage=b'"n/a"'),
    completion_body(usage=b'{"prompt_tokens":5,"completion_tokens":"1"}'),
])
def test_completion_bodies_of_the_wrong_shape_are_malformed(body):
    result = one_reply(with_type(body, b"application/json"), stream=False)
    assert isinstance(result, AttemptError), result
    assert (result.error_class, result.retryable) == ("malformed_response", False)


def test_quirks_that_lose_nothing_are_tolerated():
    """Decoded tool-call arguments are rendered as JSON; an odd cached-token detail counts as none."""
    body = completion_body(b'{"index":0,"message":{"tool_calls":[{"function":{"name":"get_weather",'
                           b'"arguments":{"city":"Paris"}}}]},"finish_reason":"tool_calls"}',
                           usage=b'{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":"none"}')
    result = one_reply(with_type(body, b"application/json"), stream=False)
    assert isinstance(result, Completion), result
    assert 'city' in result.text and 'Paris' in result.text and "get_weather" in result.text
    assert (result.input_tokens, result.cached_input_tokens) == (5, 0)


# -- bug: one exception the endpoint did not classify stopped the whole golden-set gate

class GoldenEndpoint:
    """Answers every prompt except the one that makes it raise `error`."""

    def __init__(self, failing_prompt: str, error: Exception):
        self.failing_prompt, self.error = failing_prompt, error
        self.prompts: list[str] = []

    async def complete(self, body: dict, *, stream: bool, timeout_s: float) -> Completion:
        prompt = body["messages"][-1]["content"]
        self.prompts.append(prompt)
        if prompt == self.failing_prompt:
            raise self.error
        return Completion(text=f"answer to {prompt}", latency_ms=1.0, ttft_ms=None, itl_ms=None,
                          input_tokens=None, output_tokens=None)

    async def aclose(self) -> None:
        pass


def test_a_golden_case_whose_request_raises_fails_alone_with_a_scrubbed_log(monkeypatch, caplog):
    key = "sk-golden-0123456789abcdef"
    monkeypatch.setenv("GOLDEN_KEY", key)
    target = TargetConfig(name="cand", model="m", base_url="http://unused/v1", api_key_env="GOLDEN_KEY")
    cases = [GoldenCase(id="capital", prompt="capital of France?", must_contain="Paris"),
             GoldenCase(id="hello", prompt="say hi", must_contain="hi"),
             GoldenCase(id="refund", prompt="refund window?", must_contain="30 days")]
    fake = GoldenEndpoint("say hi", ValueError(f'Invalid date value or format "soon" (key {key})'))
    caplog.set_level(logging.WARNING)
    answers = ask_golden_cases(target, cases, ShadowConfig(max_retries=2, retry_backoff_s=0.01),
                               endpoint_factory=lambda t, api_key, s: fake)
    assert answers == {"capital": "answer to capital of France?", "hello": NoAnswer("unexpected"),
                       "refund": "answer to refund window?"}
    assert fake.prompts.count("say hi") == 1  # not an error a retry can help with
    assert "golden case hello on cand" in caplog.text and "ValueError" in caplog.text
    assert key not in caplog.text
