"""The shadow engine against the real replay server on loopback, storing into SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import statistics
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shadowjudge.config import Price, ShadowConfig, TargetConfig
from shadowjudge.shadow.endpoint import AttemptError, Completion
from shadowjudge.shadow.engine import ShadowError, replay, run_shadow
from shadowjudge.shadow.profiles import ProfileSet, plan_request
from shadowjudge.shadow.recordings import Recordings, prompt_id_for
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.shadow.tokens import count_message_tokens, message_text, split_tokens
from shadowjudge.shadow.writer import ResultStoreError
from shadowjudge.store import ShadowResult, ShadowRun, TrafficSample, session_scope
from shadowjudge.store.models import utcnow

DEMO = Path(__file__).resolve().parents[1] / "shadowjudge" / "demo_data"
RECORDINGS = DEMO / "recordings.jsonl.gz"
FAST = dict(timeout_s=2.0, retry_backoff_s=0.01, max_tokens=48)


def store_samples(engine, n: int, run_key: str = "route:test") -> tuple[int, list[TrafficSample]]:
    """n real requests of the demo log as stored samples, and an open run."""
    with gzip.open(DEMO / "requests.jsonl.gz", "rt") as fh:
        requests = [json.loads(line) for _, line in zip(range(n), fh)]
    with session_scope(engine) as s:
        for i, r in enumerate(requests):
            s.add(TrafficSample(request_id=r["id"], source="demo", source_position=str(i), route="route",
                                incumbent_model=r["response"]["model"], messages=r["request"]["messages"],
                                params={"temperature": r["request"].get("temperature"), "max_tokens": 1024},
                                request_ts=utcnow()))
        run = ShadowRun(run_key=run_key, route="route", config_hash="test")
        s.add(run)
        s.flush()
        run_id = run.id
    with session_scope(engine) as s:
        samples = list(s.scalars(select(TrafficSample).order_by(TrafficSample.id)))
        s.expunge_all()
    return run_id, samples


def stored(engine, run_id: int) -> list[ShadowResult]:
    with session_scope(engine) as s:
        rows = list(s.scalars(select(ShadowResult).where(ShadowResult.run_id == run_id)))
        s.expunge_all()
    return rows


def prompt_of(sample: TrafficSample) -> str:
    return prompt_id_for(message_text(next(m for m in reversed(sample.messages) if m["role"] == "user")["content"]))


FAULT_CLASS = {"stall": "stalled_stream", "malformed": "malformed_response"}
STATUS_CLASS = {500: "server_error", 429: "rate_limited"}


def expected_outcome(profiles: ProfileSet, model: str, prompt_id: str, max_retries: int) -> tuple[str | None, int]:
    """What the engine must record for one request: walk the server's seeded plan through the retries."""
    for n in range(max_retries + 1):
        plan = plan_request(profiles, model, prompt_id, n)
        if plan.outcome == "ok":
            return None, n
        error = FAULT_CLASS.get(plan.outcome) or STATUS_CLASS[plan.status]
        if error == "malformed_response" or n == max_retries:  # malformed answers are not retried
            return error, n
    raise AssertionError("unreachable")


def targets_for(srv: ReplayServer, **yi) -> list[TargetConfig]:
    return [TargetConfig(name="claude", model="claude-instant-1.2", base_url=srv.base_url, concurrency=4),
            TargetConfig(name="yi", model="Yi-34B-Chat", base_url=srv.base_url, concurrency=4, **yi)]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_every_request_is_accounted_for_under_injected_faults(engine, max_retries):
    """20% 500s/429s (with Retry-After), 10% stalled streams, 10% malformed chunks on one target."""
    profiles = ProfileSet(seed=8, models={"Yi-34B-Chat": {
        "error_rate": 0.2, "error_statuses": {500: 1, 429: 1}, "retry_after_s": 0.02,
        "stall_rate": 0.1, "stall_after_tokens": 2, "malformed_rate": 0.1, "malformed_after_tokens": 1}})
    run_id, samples = store_samples(engine, 30)
    shadow = ShadowConfig(**{**FAST, "timeout_s": 0.5}, max_retries=max_retries)
    expected = {s.id: expected_outcome(profiles, "Yi-34B-Chat", prompt_of(s), max_retries) for s in samples}
    expected_errors = Counter(e for e, _ in expected.values() if e)
    if max_retries == 0:  # the seed exercises every fault kind
        assert set(expected_errors) == {"server_error", "rate_limited", "stalled_stream", "malformed_response"}
    else:  # and retries recover most of them
        assert sum(expected_errors.values()) < 12 and sum(n for _, n in expected.values()) >= 12
    with ReplayServer(RECORDINGS, profiles) as srv:
        report = run_shadow(engine, run_id, samples, targets_for(srv), shadow, {})
        server = srv.stats()["models"]

    rows = stored(engine, run_id)
    assert len(rows) == len({(r.sample_id, r.target, r.attempt) for r in rows}) == 60
    yi = {r.sample_id: r for r in rows if r.target == "yi"}
    assert {sid: (r.error_class, r.retries) for sid, r in yi.items()} == expected
    assert all(r.error_class is None and r.output_text for r in rows if r.target == "claude")
    answered = [r for r in yi.values() if r.error_class is None]
    assert all(r.output_text and r.output_tokens and r.ttft_ms is not None for r in answered)
    for name, target_report in report.targets.items():
        assert target_report.ok + sum(target_report.errors.values()) == target_report.requests == 30, name
    assert report.targets["yi"].errors == dict(sorted(expected_errors.items()))
    assert report.targets["yi"].retries == sum(n for _, n in expected.values())
    # the server saw exactly one request per attempt: nothing lost, nothing sent twice
    assert server["Yi-34B-Chat"]["requests"] == sum(n + 1 for _, n in expected.values())
    assert server["claude-instant-1.2"]["requests"] == 30
    assert report.replayed == 60 and report.already_stored == 0


def test_measured_ttft_matches_the_injected_latency(engine):
    """TTFT is measured without bias: 80 ms more injected TTFT reads as 80 ms more (medians, within 2 ms).

    On loopback the measured TTFT is the injected one plus the time for the request to reach the server
    process and the first chunk to come back: well under a millisecond on a quiet machine, several ms
    when other jobs keep both cores busy (each process then waits for a CPU when it wakes up). So two
    targets, 20 ms and 100 ms injected, run side by side one request at a time, both paying that cost
    under the same load (their token delays make both take ~120 ms a request, so they also run over the
    same seconds); the difference of their median TTFTs isolates what the provider took. The absolute
    bias on a given machine is reported by bench/shadow_throughput.py (`ttft_bias_ms`)."""
    profiles = {"models": {"claude-instant-1.2": {"ttft_ms": 20, "token_ms": 14},
                           "Yi-34B-Chat": {"ttft_ms": 100, "token_ms": 3}}}
    run_id, samples = store_samples(engine, 40)
    with ReplayServer(RECORDINGS, profiles) as srv:
        targets = [TargetConfig(name="fast", model="claude-instant-1.2", base_url=srv.base_url, concurrency=1),
                   TargetConfig(name="slow", model="Yi-34B-Chat", base_url=srv.base_url, concurrency=1)]
        report = run_shadow(engine, run_id, samples, targets, ShadowConfig(**{**FAST, "max_tokens": 8}), {})
    rows = stored(engine, run_id)
    assert [r.error_class for r in rows] == [None] * 80
    ttft = {t: statistics.median(r.ttft_ms for r in rows if r.target == t) for t in ("fast", "slow")}
    itl = {t: statistics.median(r.itl_ms for r in rows if r.target == t) for t in ("fast", "slow")}
    assert abs(ttft["slow"] - ttft["fast"] - 80) <= 2, ttft
    assert ttft["fast"] >= 19 and ttft["slow"] >= 99, ttft  # never reads faster than the provider answered
    assert abs(itl["fast"] - 14) <= 1.5 and abs(itl["slow"] - 3) <= 1.5, itl
    # (>=: on a loaded machine the engine may read several chunks in one go, then they share one timestamp)
    assert all(r.latency_ms >= r.ttft_ms and r.tpot_ms >= 0 for r in rows)
    assert report.targets["slow"].ttft_ms["count"] == 40
    assert report.targets["slow"].ttft_ms["p50"] == pytest.approx(ttft["slow"])


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(engine):
    run_id, samples = store_samples(engine, 40)
    shadow = ShadowConfig(**FAST, consistency_k=2)
    profiles = {"default": {"ttft_ms": 15}}
    with ReplayServer(RECORDINGS, profiles) as srv:
        targets = targets_for(srv)

        async def interrupted() -> None:
            enough = asyncio.Event()
            seen = []

            def on_result(target: str, row: dict) -> None:
                seen.append(row)
                if len(seen) == 50:
                    enough.set()

            task = asyncio.create_task(replay(engine, run_id, samples, targets, shadow, {}, on_result=on_result))
            await enough.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(interrupted())
        first = stored(engine, run_id)
        assert 50 <= len(first) < 160
        report = run_shadow(engine, run_id, samples, targets, shadow, {})
        again = run_shadow(engine, run_id, samples, targets, shadow, {})
        sent = srv.stats()["models"]

    rows = stored(engine, run_id)
    keys = [(r.sample_id, r.target, r.attempt) for r in rows]
    assert len(keys) == len(set(keys)) == 160  # 40 samples x 2 targets x 2 attempts
    assert set(keys) == {(s.id, t, a) for s in samples for t in ("claude", "yi") for a in (0, 1)}
    assert report.already_stored == len(first) and report.replayed == 160 - len(first)
    assert again.replayed == 0 and again.already_stored == 160
    # at most the requests in flight at the interruption were sent twice
    assert 160 <= sum(m["requests"] for m in sent.values()) <= 160 + 8


def test_the_budget_stops_new_requests_and_a_later_call_sends_the_rest(engine):
    run_id, samples = store_samples(engine, 20)
    pricing = {"Yi-34B-Chat": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)}
    with ReplayServer(RECORDINGS) as srv:
        target = TargetConfig(name="yi", model="Yi-34B-Chat", base_url=srv.base_url, concurrency=1)
        report = run_shadow(engine, run_id, samples, [target], ShadowConfig(**FAST, budget_usd=0.3), pricing)
        rows = sorted(stored(engine, run_id), key=lambda r: r.sample_id)
        assert 0 < len(rows) < 20 and all(r.error_class is None for r in rows)  # the rest were never sent
        assert [r.sample_id for r in rows] == [s.id for s in samples[:len(rows)]]
        spent = [r.cost_usd for r in rows]
        assert sum(spent[:-1]) < 0.3 <= sum(spent)  # stopped at the first request after the budget was reached
        assert report.budget_exhausted and report.spend_usd == pytest.approx(sum(spent))
        assert report.targets["yi"].requests == len(rows) and report.targets["yi"].error_rate == 0.0
        assert report.targets["yi"].not_sent == 20 - len(rows)
        for r in rows:
            assert r.cost_usd == pytest.approx((r.input_tokens + r.output_tokens) * 1000 / 1e6)

        more = run_shadow(engine, run_id, samples, [target], ShadowConfig(**FAST, budget_usd=100.0), pricing)
    assert more.replayed == 20 - len(rows) and not more.budget_exhausted
    assert len(stored(engine, run_id)) == 20 and more.targets["yi"].not_sent == 0


def test_a_spent_budget_stops_every_target_records_no_errors_and_is_overshot_by_in_flight_requests_only(engine):
    """The budget is shared: a fast free target and a slow paid one. The unsent requests used to be stored as
    `budget_exhausted` errors, which failed the slow target's canary on error rate."""
    run_id, samples = store_samples(engine, 30)
    pricing = {"Yi-34B-Chat": Price(input_per_mtok=1000.0, output_per_mtok=1000.0),
               "claude-instant-1.2": Price(input_per_mtok=0.0, output_per_mtok=0.0)}
    with ReplayServer(RECORDINGS) as srv:
        fast = TargetConfig(name="fast", model="claude-instant-1.2", base_url=srv.base_url, concurrency=8)
        slow = TargetConfig(name="slow", model="Yi-34B-Chat", base_url=srv.base_url, concurrency=2)
        report = run_shadow(engine, run_id, samples, [fast, slow], ShadowConfig(**FAST, budget_usd=0.4), pricing)
    rows = stored(engine, run_id)
    paid = sorted((r.cost_usd for r in rows if r.target == "slow"), reverse=True)
    assert report.budget_exhausted and all(r.error_class is None for r in rows)
    assert 0 < len(paid) < 30 and report.targets["slow"].not_sent == 30 - len(paid)
    assert sum(paid) - sum(paid[:2]) < 0.4  # over the budget by at most the two requests in flight
    assert report.targets["slow"].error_rate == report.targets["fast"].error_rate == 0.0


def test_placeholders_an_earlier_version_stored_for_unsent_requests_are_sent_on_the_next_call(engine):
    run_id, samples = store_samples(engine, 4)
    with session_scope(engine) as s:
        s.add_all(ShadowResult(run_id=run_id, sample_id=x.id, target="yi", model="Yi-34B-Chat", attempt=0,
                               error_class="budget_exhausted") for x in samples)
    with ReplayServer(RECORDINGS) as srv:
        target = TargetConfig(name="yi", model="Yi-34B-Chat", base_url=srv.base_url)
        report = run_shadow(engine, run_id, samples, [target], ShadowConfig(**FAST), {})
    assert report.replayed == 4 and report.targets["yi"].errors == {}
    assert len(stored(engine, run_id)) == 4


def billed_tokens(profiles: ProfileSet, model: str, sample: TrafficSample, max_retries: int,
                  max_tokens: int) -> int:
    """Tokens the replay server delivered for one request over its attempts, as a provider bills them: the prompt
    and the answer of each attempt it accepted, up to where a stalled stream stopped; nothing for an error status."""
    answer = min(len(split_tokens(Recordings.load(RECORDINGS, [model]).answer(model, prompt_of(sample))[0])),
                 max_tokens)
    prompt = count_message_tokens(sample.messages)
    _, retries = expected_outcome(profiles, model, prompt_of(sample), max_retries)
    total = 0
    for n in range(retries + 1):
        plan = plan_request(profiles, model, prompt_of(sample), n)
        if plan.outcome != "error":
            stop = profiles.for_model(model).stall_after_tokens if plan.outcome == "stall" else answer
            total += prompt + min(answer, stop)
    return total


def test_failed_attempts_are_charged_by_what_they_received(engine):
    """A stalled stream is billed for the part of the answer it got, a malformed one for all it got, a stream that
    timed out before its first token for its prompt, an error status for nothing; a row's cost is all its attempts'.
    Only answers were charged, so a budget of $2 was overspent by $1.05 under stalls and malformed streams."""
    profiles = ProfileSet(seed=5, models={
        "Yi-34B-Chat": {"error_rate": 0.2, "stall_rate": 0.3, "stall_after_tokens": 3, "stall_s": 5,
                        "malformed_rate": 0.2, "malformed_after_tokens": 2},
        "claude-instant-1.2": {"stall_rate": 0.5, "stall_after_tokens": 0, "stall_s": 5}})
    run_id, samples = store_samples(engine, 12)
    shadow = ShadowConfig(**{**FAST, "timeout_s": 0.3, "max_tokens": 8}, max_retries=1)
    price = Price(input_per_mtok=1000.0, output_per_mtok=1000.0)  # $0.001 a token
    with ReplayServer(RECORDINGS, profiles) as srv:
        report = run_shadow(engine, run_id, samples, targets_for(srv), shadow,
                            {"Yi-34B-Chat": price, "claude-instant-1.2": price})
        server = srv.stats()["models"]
    rows = stored(engine, run_id)
    models = {"yi": "Yi-34B-Chat", "claude": "claude-instant-1.2"}
    expected = {(s.id, name): billed_tokens(profiles, model, s, 1, 8) / 1000 for s in samples
                for name, model in models.items()}
    yi = server["Yi-34B-Chat"]
    assert yi["stalled"] and yi["malformed"] and yi["errors"] and server["claude-instant-1.2"]["stalled"]
    assert report.targets["yi"].retries and set(report.targets["claude"].errors) == {"timeout"}
    assert {(r.sample_id, r.target): r.cost_usd for r in rows} == pytest.approx(expected)
    assert report.spend_usd == pytest.approx(sum(expected.values()))
    assert report.targets["yi"].spend_usd == pytest.approx(sum(v for (_, t), v in expected.items() if t == "yi"))


@pytest.mark.parametrize("n_samples", [2, 1])
def test_a_spent_budget_stops_retries_and_a_resumed_run_starts_from_what_failed_attempts_cost(engine, n_samples):
    """With one sample every request was sent, yet the budget kept its failed attempt from being retried: the report
    said `budget_exhausted: false`, and nothing told the user why a retryable error stayed (`not_retried`)."""
    run_id, samples = store_samples(engine, n_samples)
    prompt = count_message_tokens(samples[0].messages)
    stalled = AttemptError("stalled_stream", "stream stalled after 3 chunks", retryable=True)
    stalled.received = Completion(text="one two three", latency_ms=300.0, ttft_ms=10.0, itl_ms=5.0,
                                  input_tokens=None, output_tokens=None)
    endpoint = ScriptedEndpoint([stalled])
    target = TargetConfig(name="t", model="m", base_url="http://unused/v1", concurrency=1)
    pricing = {"m": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)}
    cost = (prompt + 3) / 1000
    shadow = ShadowConfig(**FAST, max_retries=3, budget_usd=cost / 2)
    report = asyncio.run(replay(engine, run_id, samples, [target], shadow, pricing,
                                endpoint_factory=lambda t, key, s: endpoint))
    rows = [(r.error_class, r.retries, r.cost_usd) for r in stored(engine, run_id)]
    assert rows == [("stalled_stream", 0, pytest.approx(cost))]
    assert report.spend_usd == pytest.approx(cost) and report.budget_exhausted
    assert report.targets["t"].not_sent == n_samples - 1 and len(endpoint.bodies) == 1  # no retry once spent
    assert report.targets["t"].not_retried == 1

    again = asyncio.run(replay(engine, run_id, samples, [target], ShadowConfig(**FAST, budget_usd=cost), pricing,
                               endpoint_factory=lambda t, key, s: ScriptedEndpoint([])))
    assert again.replayed == 0 and again.targets["t"].not_sent == n_samples - 1  # the failed attempt spent it


def test_a_request_the_replay_server_cannot_honour_is_the_targets_bad_request_with_a_clear_message(engine):
    """Production traffic that requires a tool call: the replay server answered it with plain text."""
    run_id, samples = store_samples(engine, 2)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    for sample in samples:
        sample.params = {**sample.params, "tools": tools, "tool_choice": "required"}
    with ReplayServer(RECORDINGS) as srv:
        target = TargetConfig(name="yi", model="Yi-34B-Chat", base_url=srv.base_url)
        report = run_shadow(engine, run_id, samples, [target], ShadowConfig(**FAST), {})
    assert report.targets["yi"].errors == {"bad_request": 2} and report.targets["yi"].retries == 0
    assert "replay server does not support tool_choice" in report.error_examples["yi"]["bad_request"]


def test_consistency_mode_without_streaming_with_a_progress_bar(engine, capsys):
    run_id, samples = store_samples(engine, 6)
    with ReplayServer(RECORDINGS) as srv:
        target = TargetConfig(name="yi", model="Yi-34B-Chat", base_url=srv.base_url)
        report = run_shadow(engine, run_id, samples, [target],
                            ShadowConfig(**FAST, stream=False, consistency_k=3), {}, progress=True)
    rows = stored(engine, run_id)
    assert sorted(Counter((r.sample_id, r.attempt) for r in rows).values()) == [1] * 18
    by_sample = {}
    for r in rows:
        assert r.error_class is None and r.ttft_ms is None and r.latency_ms > 0 and r.output_tokens <= 48
        by_sample.setdefault(r.sample_id, set()).add(r.output_text)
    assert all(len(texts) == 1 for texts in by_sample.values())  # a replay server is perfectly consistent
    assert report.targets["yi"].ok == 18
    assert "18/18" in capsys.readouterr().out


def test_api_keys_never_reach_the_store_or_the_logs(engine, monkeypatch, caplog):
    key, wrong = "sk-live-secret-0123456789", "sk-stale-secret-9876543210"
    monkeypatch.setenv("GOOD_KEY", key)
    monkeypatch.setenv("STALE_KEY", wrong)
    run_id, samples = store_samples(engine, 4)
    caplog.set_level(logging.DEBUG)
    with ReplayServer(RECORDINGS, api_key=key) as srv:
        targets = [TargetConfig(name="good", model="Yi-34B-Chat", base_url=srv.base_url, api_key_env="GOOD_KEY"),
                   TargetConfig(name="stale", model="Yi-34B-Chat", base_url=srv.base_url, api_key_env="STALE_KEY")]
        report = run_shadow(engine, run_id, samples, targets, ShadowConfig(**FAST), {})
    assert report.targets["good"].ok == 4
    assert report.targets["stale"].errors == {"auth_error": 4}
    assert "Incorrect API key provided: ***" in report.error_examples["stale"]["auth_error"]
    dumped = json.dumps([{c: getattr(r, c) for c in ("output_text", "error_class", "model", "target")}
                         for r in stored(engine, run_id)])
    for secret in (key, wrong):
        assert secret not in dumped
        assert secret not in caplog.text
        assert secret not in json.dumps(report.as_dict())


def test_inputs_that_cannot_run_fail_before_any_request(engine, monkeypatch):
    run_id, samples = store_samples(engine, 2)
    target = TargetConfig(name="yi", model="Yi-34B-Chat", base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ShadowError, match="pricing has no entry for \\['Yi-34B-Chat'\\]"):
        run_shadow(engine, run_id, samples, [target], ShadowConfig(budget_usd=1.0), {})
    with pytest.raises(ShadowError, match="NO_SUCH_KEY is not set"):
        run_shadow(engine, run_id, samples, [target], ShadowConfig(), {})
    unstored = TrafficSample(request_id="never-stored", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(ShadowError, match="'never-stored' has no id"):
        run_shadow(engine, run_id, [unstored], [target], ShadowConfig(), {})
    assert stored(engine, run_id) == []


def test_a_store_failure_stops_the_run_with_a_clear_error(engine):
    _, samples = store_samples(engine, 3)
    with ReplayServer(RECORDINGS) as srv:
        target = TargetConfig(name="yi", model="Yi-34B-Chat", base_url=srv.base_url)
        with pytest.raises(ResultStoreError, match="cannot store 3 shadow results"):
            run_shadow(engine, 999_999, samples, [target], ShadowConfig(**FAST), {})  # no such run: FK fails
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ShadowResult)) == 0


class ScriptedEndpoint:
    """A ChatEndpoint playing back a script, for unit tests of the engine's own retry and error handling."""

    def __init__(self, script: list):
        self.script = list(script)
        self.bodies: list[dict] = []

    async def complete(self, body: dict, *, stream: bool, timeout_s: float) -> Completion:
        self.bodies.append(body)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    async def aclose(self) -> None:
        pass


def test_retries_follow_retry_after_and_unexpected_failures_are_recorded_scrubbed(engine, caplog, monkeypatch):
    run_id, samples = store_samples(engine, 2)
    answer = Completion(text="fine", latency_ms=12.0, ttft_ms=3.0, itl_ms=1.0, input_tokens=None, output_tokens=None)
    script = [AttemptError("rate_limited", "slow down", retryable=True, retry_after_s=0.01),
              AttemptError("server_error", "oops", retryable=True), answer,
              RuntimeError("SDK broke with key sk-secret-abcdef123456")]
    endpoint = ScriptedEndpoint(script)
    monkeypatch.setenv("SCRIPTED_KEY", "sk-secret-abcdef123456")
    target = TargetConfig(name="t", model="m", base_url="http://unused/v1", concurrency=1, api_key_env="SCRIPTED_KEY")
    caplog.set_level(logging.INFO)
    report = asyncio.run(replay(engine, run_id, samples, [target], ShadowConfig(**FAST, max_retries=3), {},
                                endpoint_factory=lambda t, key, s: endpoint))
    first, second = sorted(stored(engine, run_id), key=lambda r: r.sample_id)
    assert (first.error_class, first.retries, first.output_text) == (None, 2, "fine")
    # no usage in the answer: tokens are counted locally, the way the replay server counts them
    assert (first.output_tokens, first.input_tokens) == (1, count_message_tokens(samples[0].messages))
    assert (second.error_class, second.retries) == ("unexpected", 0)
    assert report.targets["t"].errors == {"unexpected": 1}
    assert "sk-secret-abcdef123456" not in caplog.text and "RuntimeError" in caplog.text
    assert "sk-secret" not in json.dumps(report.as_dict())


def test_rpm_and_tpm_buckets_are_charged_per_attempt_and_refunded(engine, monkeypatch):
    from shadowjudge.shadow.ratelimit import TokenBucket

    charged: list[tuple[float, float]] = []  # (rate, amount): rate tells the RPM bucket from the TPM one
    refunded: list[float] = []
    real_acquire, real_settle = TokenBucket.acquire, TokenBucket.settle

    async def acquire(self, amount=1.0):
        charged.append((self.rate, amount))
        await real_acquire(self, amount)

    def settle(self, reserved, used):
        refunded.append(reserved - used)
        real_settle(self, reserved, used)

    monkeypatch.setattr(TokenBucket, "acquire", acquire)
    monkeypatch.setattr(TokenBucket, "settle", settle)
    run_id, samples = store_samples(engine, 1)
    answer = Completion(text="ok", latency_ms=5.0, ttft_ms=1.0, itl_ms=None, input_tokens=30, output_tokens=10)
    endpoint = ScriptedEndpoint([AttemptError("rate_limited", "429", retryable=True, retry_after_s=0.0), answer])
    target = TargetConfig(name="t", model="m", base_url="http://unused/v1", rpm=600_000, tpm=6_000_000)
    asyncio.run(replay(engine, run_id, samples, [target], ShadowConfig(**FAST), {},
                       endpoint_factory=lambda t, key, s: endpoint))
    prompt = count_message_tokens(samples[0].messages)
    reserve = prompt + FAST["max_tokens"]
    assert charged == [(10_000, 1), (100_000, reserve), (10_000, 1), (100_000, reserve)]  # both attempts
    assert refunded == [reserve, reserve - 40]  # the failed attempt in full, then what the answer did not use
    assert endpoint.bodies[0]["max_tokens"] == FAST["max_tokens"]


def test_tpm_is_settled_with_what_each_attempt_received(engine, monkeypatch):
    """A refused attempt gives its reservation back; one that got part of an answer keeps what it got (it counted
    towards the provider's limit too); it used to be refunded in full."""
    from shadowjudge.shadow.ratelimit import TokenBucket

    used: list[float] = []
    real_settle = TokenBucket.settle

    def settle(self, reserved, spent):
        used.append(spent)
        real_settle(self, reserved, spent)

    monkeypatch.setattr(TokenBucket, "settle", settle)
    run_id, samples = store_samples(engine, 1)
    stalled = AttemptError("stalled_stream", "stalled", retryable=True)
    stalled.received = Completion(text="a b", latency_ms=9.0, ttft_ms=1.0, itl_ms=None, input_tokens=None,
                                  output_tokens=None)
    answer = Completion(text="ok", latency_ms=5.0, ttft_ms=1.0, itl_ms=None, input_tokens=30, output_tokens=10)
    endpoint = ScriptedEndpoint([AttemptError("rate_limited", "429", retryable=True, retry_after_s=0.0), stalled,
                                 answer])
    target = TargetConfig(name="t", model="m", base_url="http://unused/v1", tpm=6_000_000)
    asyncio.run(replay(engine, run_id, samples, [target], ShadowConfig(**FAST), {},
                       endpoint_factory=lambda t, key, s: endpoint))
    assert used == [0, count_message_tokens(samples[0].messages) + 2, 40]


def test_a_shadow_run_that_cannot_start_is_bad_input_not_a_transient_fault():
    """A key that is not set (or a target list that cannot run) failed the same way on each of the stage's retries,
    10 s apart: the flows retry everything but InputError."""
    from flows.stages import transient_fault
    from shadowjudge.errors import InputError

    error = ShadowError("target 'cand': env var NO_SUCH_KEY is not set")
    assert isinstance(error, InputError) and error.exit_code == 2
    assert not transient_fault(None, None, type("State", (), {"data": error})())



def test_a_target_without_a_price_has_an_unknown_spend_not_zero(engine, caplog):
    """An unpriced target's cost per request and spend read $0 in the report and MLflow, the cheapest possible;
    pricing it later leaves its earlier results unknown, and a budget counts only what is known to be spent."""
    run_id, samples = store_samples(engine, 3)

    def answer() -> Completion:
        return Completion(text="fine", latency_ms=12.0, ttft_ms=3.0, itl_ms=1.0, input_tokens=10, output_tokens=5)

    scripts = {name: ScriptedEndpoint([answer() for _ in samples]) for name in ("priced", "unpriced")}
    targets = [TargetConfig(name=name, model=name, base_url="http://unused/v1", concurrency=1) for name in scripts]
    price = Price(input_per_mtok=1000.0, output_per_mtok=1000.0)  # $0.015 a request here
    report = asyncio.run(replay(engine, run_id, samples, targets, ShadowConfig(**FAST), {"priced": price},
                                endpoint_factory=lambda t, key, s: scripts[t.name]))
    priced, unpriced = report.targets["priced"], report.targets["unpriced"]
    assert (priced.ok, unpriced.ok) == (3, 3)
    assert priced.spend_usd == pytest.approx(0.045) and priced.cost_per_request_usd == pytest.approx(0.015)
    assert unpriced.spend_usd is None and unpriced.cost_per_request_usd is None
    assert report.spend_usd is None  # a total with an unknown part is not the total

    caplog.set_level(logging.WARNING)
    again = asyncio.run(replay(engine, run_id, samples, targets, ShadowConfig(**FAST, budget_usd=1.0),
                               {"priced": price, "unpriced": price},
                               endpoint_factory=lambda t, key, s: ScriptedEndpoint([])))
    assert again.replayed == 0 and again.targets["unpriced"].spend_usd is None
    assert "3 stored results have no known cost" in caplog.text and "0.0450 USD known to be spent" in caplog.text
