"""Unit tests of the engine's parts that need no server: parsing, limits, backoff, costs, secrets."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowjudge.config import ConfigError, Price, ShadowConfig, TargetConfig
from shadowjudge.shadow.credentials import resolve_api_key, scrub_secrets
from shadowjudge.shadow.endpoint import AttemptError, StreamParser, classify_status, parse_retry_after
from shadowjudge.shadow.engine import MAX_BACKOFF_S, backoff_delay, build_request_body
from shadowjudge.shadow.metrics import (
    cost_per_accepted_answer,
    cost_per_request,
    latency_percentiles,
    request_cost,
    total_spend,
)
from shadowjudge.shadow.ratelimit import TokenBucket


def test_stream_parser_folds_chunks_usage_and_timing():
    p = StreamParser(started=10.0)
    lines = [
        ": keep-alive comment",
        'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        "",
        'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}',
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,'
        '"prompt_tokens_details":{"cached_tokens":3}}}',
        "data: [DONE]",
    ]
    for i, line in enumerate(lines):
        p.feed(line.encode() + b"\n", 10.0 + i * 0.01)
    c = p.completion(ended=11.0)
    assert c.text == "Hello"
    assert c.ttft_ms == pytest.approx(20.0)  # the empty role chunk is not a token
    assert c.itl_ms == pytest.approx(20.0)
    assert (c.input_tokens, c.output_tokens, c.cached_input_tokens, c.finish_reason) == (7, 2, 3, "stop")
    assert p.done


def test_stream_parser_keeps_tool_calls_and_rejects_bad_chunks():
    p = StreamParser(started=0.0)
    call = 'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":%s}]}}]}'
    p.feed((call % '{"name":"get_w","arguments":""}').encode() + b"\n\n", 1.0)
    p.feed((call % '{"arguments":"{\\"c\\":1}"}').encode()[:30], 2.0)  # a chunk can end mid-line
    p.feed((call % '{"arguments":"{\\"c\\":1}"}').encode()[30:] + b"\n\n", 2.0)
    assert p.text() == '[{"name":"get_w","arguments":"{\\"c\\":1}"}]'
    assert p.completion(3.0).ttft_ms == 1000.0
    with pytest.raises(AttemptError) as err:
        p.feed(b'data: {"choices": [\n', 4.0)
    assert err.value.error_class == "malformed_response" and not err.value.retryable
    with pytest.raises(AttemptError) as err:
        p.feed(b'data: {"error": {"message": "overloaded"}}\r\n', 5.0)
    assert (err.value.error_class, err.value.retryable) == ("server_error", True)


def test_stream_parser_reads_the_events_received_after_a_bad_one_before_failing():
    """They were delivered, so billed: the engine charges a malformed stream for all it received."""
    p = StreamParser(started=0.0)
    with pytest.raises(AttemptError) as err:
        p.feed(b'data: {"choices":[{"index":0,"delta":{"content":"Par"}}]}\n\ndata: {"choices": [\n\n'
               b'data: {"choices":[{"index":0,"delta":{"content":"is"},"finish_reason":"stop"}]}\n\n'
               b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n', 1.0)
    assert err.value.error_class == "malformed_response" and "not JSON" in str(err.value)
    assert (p.text(), p.usage) == ("Paris", (5, 2, 0))


@pytest.mark.parametrize("status, expected", [
    (429, ("rate_limited", True)), (500, ("server_error", True)), (503, ("server_error", True)),
    (408, ("timeout", True)), (401, ("auth_error", False)), (404, ("not_found", False)),
    (400, ("bad_request", False)), (409, ("client_error", False)),
])
def test_status_classes(status, expected):
    assert classify_status(status) == expected


def test_retry_after_headers():
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({}) is None


def test_backoff_honours_retry_after_and_grows_with_jitter():
    rng = random.Random(1)
    assert backoff_delay(1, 0.5, 3.0, rng) == 3.0
    assert backoff_delay(1, 0.5, 10_000.0, rng) == MAX_BACKOFF_S
    for retry in (1, 2, 3, 4):
        delays = [backoff_delay(retry, 0.5, None, rng) for _ in range(200)]
        nominal = 0.5 * 2 ** (retry - 1)
        assert nominal * 0.5 <= min(delays) < max(delays) <= nominal * 1.5
        assert len(set(delays)) > 100  # jittered, so retries of many requests do not align


def test_request_body_carries_sampling_params_and_caps_tokens():
    shadow = ShadowConfig(max_tokens=256)
    params = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 1024, "user": "alice@example.com", "n": 3,
              "metadata": {"tenant": "t1"}, "stream": False, "seed": None}
    body = build_request_body([{"role": "user", "content": "hi"}], params, "cand-model", shadow)
    assert body == {"model": "cand-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
                    "top_p": 0.9, "max_tokens": 256, "stream": True, "stream_options": {"include_usage": True}}
    small = build_request_body([], {"max_completion_tokens": 64}, "m", ShadowConfig(max_tokens=256, stream=False))
    assert small == {"model": "m", "messages": [], "max_completion_tokens": 64}
    assert "max_tokens" not in build_request_body([], {}, "m", ShadowConfig(max_tokens=None))


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_paces_requests_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket.per_minute(120, clock=clock, sleep=clock.sleep)  # 2/s, burst 2

    async def take(n: int) -> None:
        for _ in range(n):
            await bucket.acquire(1)

    asyncio.run(take(10))
    assert clock.now == pytest.approx(4.0)  # 2 from the burst, then 8 at 2/s


def test_token_bucket_lets_a_large_request_through_and_charges_the_debt():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=100, capacity=100, clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        await bucket.acquire(300)  # larger than the bucket: goes at once, level -200
        assert clock.now == 0
        await bucket.acquire(50)  # waits for the debt and its own 50
        assert clock.now == pytest.approx(2.5)
        bucket.settle(1000, 0)
        assert bucket.level == 100  # refunds never exceed capacity

    asyncio.run(scenario())


def test_tokens_used_beyond_the_reservation_are_charged_as_debt():
    """A request without max_tokens reserves its prompt only; what it generated beyond that used to be
    forgiven, so a TPM limit was overshot by the whole output (93x in the reviewer's script)."""
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=100, capacity=100, clock=clock, sleep=clock.sleep)

    async def scenario() -> None:
        await bucket.acquire(50)
        bucket.settle(50, 450)  # the provider counted 450 tokens
        assert bucket.level == pytest.approx(-350)
        await bucket.acquire(50)  # waits for the debt and its own 50
        assert clock.now == pytest.approx(4.0)

    asyncio.run(scenario())


def test_latency_percentiles():
    p = latency_percentiles(list(range(1, 101)) + [None])
    assert (p["p50"], p["p90"], p["p99"], p["count"]) == (
        pytest.approx(50.5), pytest.approx(90.1), pytest.approx(99.01), 100)
    assert latency_percentiles([None])["p95"] is None and latency_percentiles([])["count"] == 0


def test_costs_per_request_and_per_accepted_answer():
    price = Price(input_per_mtok=2.0, output_per_mtok=10.0, cached_input_per_mtok=0.5)
    expected = (600 * 2 + 400 * 0.5 + 100 * 10) / 1e6
    assert request_cost(price, 1000, 100, cached_input_tokens=400) == pytest.approx(expected)
    flat = Price(input_per_mtok=1, output_per_mtok=1)
    assert request_cost(flat, 10, 0, cached_input_tokens=50) == pytest.approx(10 / 1e6)  # cached <= input
    costs = [0.01, 0.02, None, 0.03]
    scores = [0.9, 0.2, None, 0.7]
    hits = [False, False, False, True]
    assert cost_per_request(costs) == pytest.approx(0.02)  # the unknown cost is left out, not counted as $0
    assert cost_per_request(costs, hits) == pytest.approx(0.01)
    assert cost_per_accepted_answer(costs, scores, floor=0.5) == pytest.approx(0.03)
    assert cost_per_accepted_answer(costs, scores, floor=0.5, cache_hits=hits) == pytest.approx(0.015)
    assert cost_per_accepted_answer(costs, scores, floor=0.95) is None
    with pytest.raises(ValueError):
        cost_per_accepted_answer(costs, scores[:2], floor=0.5)
    with pytest.raises(ValueError):
        cost_per_request(costs, hits[:2])


def test_an_unknown_cost_is_unknown_not_free():
    """A target without a price stores no cost: its cost per request and per accepted answer read $0, the cheapest
    possible, in the run report and MLflow."""
    assert cost_per_request([None, None, None]) is None
    assert cost_per_accepted_answer([None, None], [0.9, 0.9], floor=0.5) is None
    assert cost_per_request([None, None], cache_hits=[True, False]) == 0.0  # a cache hit is known to be free
    # pricing added part way through a run: the ratio over the requests whose cost is known
    assert cost_per_accepted_answer([None, 0.02, 0.04], [0.9, 0.9, 0.1], floor=0.5) == pytest.approx(0.06)
    assert cost_per_accepted_answer([0.02, None], [0.1, 0.9], floor=0.5) is None  # no accepted answer of known cost
    assert total_spend([0.01, 0.02]) == pytest.approx(0.03) and total_spend([]) == 0.0
    assert total_spend([0.01, None]) is None


@given(st.text(), st.text(alphabet="abcdefghijklmnop0123456789", min_size=12, max_size=40))
def test_scrubbing_removes_a_known_secret_anywhere(prefix, secret):
    text = f"{prefix} failed with key {secret} ({secret[:-1]})"
    assert secret not in scrub_secrets(text, [secret])


def test_scrubbing_catches_bearer_tokens_and_key_shaped_strings():
    text = "401: Authorization: Bearer abc.def-ghi; got sk-proj-AAAAbbbbCCCC1234 from header"
    assert scrub_secrets(text, []) == "401: Authorization: Bearer ***; got *** from header"


def test_api_key_from_a_prefect_secret_block_wins_over_the_env(monkeypatch):
    monkeypatch.setenv("CAND_KEY", "from-env")
    target = TargetConfig(name="t", model="m", base_url="http://x/v1", api_key_env="CAND_KEY")
    assert resolve_api_key(target) == "from-env"
    secret_target = target.model_copy(update={"api_key_secret": "cand-key"})
    assert resolve_api_key(secret_target, load_secret={"cand-key": "from-block"}.__getitem__) == "from-block"
    monkeypatch.delenv("CAND_KEY")
    with pytest.raises(ConfigError, match="CAND_KEY is not set"):
        resolve_api_key(target)
