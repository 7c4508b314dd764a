"""Which samples each canary metric compares: gateway cache hits, logged requests that were not streamed, and runs
too small to decide anything. Stored runs of real AlpacaEval outputs (test_analysis_alpaca_runs), on SQLite and
PostgreSQL."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, update

from shadowjudge.analysis import Classification, Verdict, analyze_run
from shadowjudge.store import ShadowResult, TrafficSample, session_scope
from shadowjudge.traffic.records import TrafficRecord
from shadowjudge.traffic.sources.jsonl import normalise_openai_log
from test_analysis_alpaca_runs import PROFILES, Profile, build_run, mini, route_for

SPEED_AND_PRICE = ("cost_per_outcome", "latency_p95", "ttft")


def _serve_from_cache(engine, share: float) -> int:
    """Mark `share` of the logged requests as gateway cache hits, as LiteLLM logs one: a few ms, billed nothing."""
    with session_scope(engine) as s:
        ids = sorted(s.scalars(select(TrafficSample.id)))
        hits = random.Random(0).sample(ids, int(len(ids) * share))
        s.execute(update(TrafficSample).where(TrafficSample.id.in_(hits))
                  .values(cache_hit=True, latency_ms=6.0, ttft_ms=4.0, cost_usd=0.0))
    return len(hits)


def test_cache_hits_of_the_logged_incumbent_leave_the_speed_and_price_comparisons(engine):
    """The candidate is the incumbent's own model: with a third of the logged answers served from the gateway's
    cache it went marginal (cost 1.5x, TTFT 1.17x), as if it were slower and dearer than itself."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", replay_incumbent=False, profiles=PROFILES,
                       candidates={"same": "claude-2"})
    hits = _serve_from_cache(engine, 0.35)
    same = analyze_run(engine, run_id, route_for(["same"], slice_key=None)).candidate("same")
    assert same.verdict is Verdict.PASS, same.reasons
    assert same.n == 300 and same.n_cache_hits == hits == 105
    for name in SPEED_AND_PRICE:
        metric = same.metric(name)
        assert metric.classification is Classification.PASS, metric.describe()
        # Left out of both sides: cost per outcome stays paired by sample.
        assert (metric.n_candidate, metric.n_incumbent) == (195, 195), metric.describe()
        assert "105 gateway cache hits left out" in metric.note
    for name in ("quality", "error_rate"):  # a cached answer is still an answer the users got
        assert same.metric(name).n_candidate == 300 and "cache" not in same.metric(name).note


def test_a_slower_dearer_candidate_still_fails_with_cache_hits_left_out(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", replay_incumbent=False, profiles=PROFILES,
                       candidates={"slow": "claude-2"})
    with session_scope(engine) as s:
        s.execute(update(ShadowResult).values(latency_ms=ShadowResult.latency_ms * 3, ttft_ms=ShadowResult.ttft_ms * 3,
                                              cost_usd=ShadowResult.cost_usd * 4))
    _serve_from_cache(engine, 0.2)
    analysis = analyze_run(engine, run_id, route_for(["slow"]))
    slow = analysis.candidate("slow")
    for name in SPEED_AND_PRICE:
        metric = slow.metric(name)
        assert metric.classification is Classification.FAIL and metric.n_candidate == 240, metric.describe()
    # Per slice too: a slice counts its own cache hits.
    slice_hits = [int(m.note.split(" gateway cache hits")[0].rsplit(" ", 1)[-1]) for s in slow.slices
                  for m in s.metrics if m.metric == "ttft" and "cache hits" in m.note]
    assert sum(slice_hits) == slow.n_cache_hits == 60


def test_cache_hits_in_the_logs_do_not_touch_a_replayed_incumbent(engine):
    """With the incumbent replayed, both sides' numbers are replays: the logged cache hits measured nothing used."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES, candidates={"same": "claude-2"})
    route = route_for(["same"], slice_key=None)
    before = analyze_run(engine, run_id, route).candidate("same")
    _serve_from_cache(engine, 0.35)
    after = analyze_run(engine, run_id, route)
    assert after.incumbent_source == "replay"
    same = after.candidate("same")
    assert same.n_cache_hits == 0 and same.metrics == before.metrics
    assert all(same.metric(name).n_candidate == 300 for name in SPEED_AND_PRICE)


def _slower_first_token_run(engine) -> int:
    """A candidate 1.5 times slower to its first token than the incumbent's logged requests."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", replay_incumbent=False, profiles=PROFILES,
                       candidates={"slowstart": "claude-2"})
    with session_scope(engine) as s:
        s.execute(update(ShadowResult).values(ttft_ms=ShadowResult.ttft_ms * 1.5))
    return run_id


def test_ttft_is_compared_only_where_the_logged_request_streamed(engine):
    """Rows stored before ingestion dropped it hold a non-streamed request's "TTFT" (LiteLLM: completionStartTime =
    endTime, the whole latency). Half the logged requests so: the 1.5x regression read as a pass, its interval
    reaching below 0."""
    run_id = _slower_first_token_run(engine)
    with session_scope(engine) as s:
        ids = sorted(s.scalars(select(TrafficSample.id)))
        # A third said `stream: false`; another third said nothing, but their first token came at the end.
        s.execute(update(TrafficSample).where(TrafficSample.id.in_(ids[0::3]))
                  .values(ttft_ms=TrafficSample.latency_ms, params={"stream": False}))
        s.execute(update(TrafficSample).where(TrafficSample.id.in_(ids[1::3]))
                  .values(ttft_ms=TrafficSample.latency_ms))
    ttft = analyze_run(engine, run_id, route_for(["slowstart"], slice_key=None)).candidate("slowstart").metric("ttft")
    assert ttft.classification is Classification.FAIL, ttft.describe()
    assert 1.2 < ttft.ci_low <= ttft.effect <= ttft.ci_high < 1.8, ttft.describe()  # around the true 1.5
    assert (ttft.n_candidate, ttft.n_incumbent) == (100, 100)  # paired: the candidate's other 200 leave too
    assert "200 of 300 samples without a TTFT on both sides" in ttft.note


def test_ttft_pairs_by_sample_where_the_candidate_has_none(engine):
    """A candidate TTFT missing (its replay was not streamed) takes the sample off the incumbent's side as well."""
    run_id = _slower_first_token_run(engine)
    with session_scope(engine) as s:
        ids = sorted(s.scalars(select(TrafficSample.id)))
        s.execute(update(ShadowResult).where(ShadowResult.sample_id.in_(ids[::2])).values(ttft_ms=None))
    ttft = analyze_run(engine, run_id, route_for(["slowstart"], slice_key=None)).candidate("slowstart").metric("ttft")
    assert ttft.classification is Classification.FAIL and (ttft.n_candidate, ttft.n_incumbent) == (150, 150)


def test_a_record_drops_a_ttft_that_is_not_one():
    """Every source builds a TrafficRecord: a request that said `stream: false`, or whose first token came at its
    end, has no time to first token."""
    base = {"id": "r1", "timestamp": "2026-11-22T10:00:00Z", "response": "hello", "latency_ms": 900.0,
            "request": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}}
    assert normalise_openai_log({**base, "ttft_ms": 120.0}, "f:0").ttft_ms == 120.0
    assert normalise_openai_log({**base, "ttft_ms": 900.0}, "f:1").ttft_ms is None
    unstreamed = {**base, "ttft_ms": 120.0, "request": {**base["request"], "stream": False}}
    assert normalise_openai_log(unstreamed, "f:2").ttft_ms is None
    streamed = {**base, "ttft_ms": 120.0, "request": {**base["request"], "stream": "true"}}
    assert normalise_openai_log(streamed, "f:3").ttft_ms == 120.0
    record = TrafficRecord("r2", datetime(2026, 11, 22, tzinfo=timezone.utc), "chat", "m", [{"role": "user"}],
                           latency_ms=None, ttft_ms=250.0)  # no latency (an OTel span without an end): kept
    assert record.ttft_ms == 250.0


@pytest.mark.parametrize("min_samples", [1, 2])
def test_a_handful_of_samples_is_inconclusive_whatever_min_samples_says(engine, min_samples):
    """On 3 samples a candidate that errored on all of them failed error_rate (critical) with an interval [1, 1]:
    the bootstrap of three equal values is a point. No test of 3 pairs can show a change at 95%."""
    dead = {**PROFILES, "FuseChat-Gemma-2-9B-Instruct": Profile(250, 6, 2.0, error_rate=1.0)}
    prompt_ids = [p["id"] for p in mini().prompts[:3]]
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=dead,
                       candidates={"dead": "FuseChat-Gemma-2-9B-Instruct"}, prompt_ids=prompt_ids)
    result = analyze_run(engine, run_id, route_for(["dead"], slice_key=None, min_samples=min_samples))
    dead_c = result.candidate("dead")
    assert dead_c.n == 3 and dead_c.verdict is Verdict.INCONCLUSIVE, dead_c.reasons
    errors = dead_c.metric("error_rate")
    assert errors.classification is Classification.NODATA and "8 needed" in errors.note  # 0.95 over 5 metrics
