"""Which samples each canary metric compares: gateway cache hits, logged requests that were not streamed, and runs
too small to decide anything. Stored runs of real AlpacaEval outputs (test_analysis_alpaca_runs), on SQLite and
PostgreSQL."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, update

from shadowjudge.analysis import Classification, Verdict, analyze_run
from shadowjudge.analysis.run_data import logged_ttft_ms
from shadowjudge.store import ShadowResult, TrafficSample, session_scope
from shadowjudge.traffic.records import TrafficRecord
from shadowjudge.traffic.sources.jsonl import normalise_openai_log
from test_analysis_alpaca_runs import PROFILES, Profile, build_run, mini, route_for
from test_analysis_regression import slow_and_dear_run

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
    run_id = slow_and_dear_run(engine)
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
    """The store keeps a non-streamed request's logged "TTFT" (LiteLLM: completionStartTime = endTime, the whole
    latency). Two thirds of the logged requests so: the 1.5x regression read as a pass, its interval reaching
    below 0."""
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


def test_a_streamed_request_keeps_a_ttft_equal_to_its_latency(engine):
    """A one-chunk streamed answer logged in whole milliseconds can end in the millisecond its first token came: a
    request that said `stream: true` keeps that TTFT (it was dropped, and a third of the pairs with it). One that
    said "false", as text, has none however early its first token came."""
    run_id = _slower_first_token_run(engine)
    with session_scope(engine) as s:
        ids = sorted(s.scalars(select(TrafficSample.id)))
        s.execute(update(TrafficSample).where(TrafficSample.id.in_(ids[0::3]))
                  .values(ttft_ms=TrafficSample.latency_ms, params={"stream": True}))
        s.execute(update(TrafficSample).where(TrafficSample.id.in_(ids[1::3])).values(params={"stream": "false"}))
        s.execute(update(TrafficSample).where(TrafficSample.id.in_(ids[2::3])).values(params={"stream": "true"}))
    ttft = analyze_run(engine, run_id, route_for(["slowstart"], slice_key=None)).candidate("slowstart").metric("ttft")
    assert (ttft.n_candidate, ttft.n_incumbent) == (200, 200), ttft.describe()
    assert "100 of 300 samples without a TTFT on both sides" in ttft.note


@pytest.mark.parametrize(("params", "ttft_ms", "latency_ms", "read"), [
    ({}, 120.0, 900.0, 120.0),
    ({}, 900.0, 900.0, None),  # LiteLLM's completionStartTime = endTime of a request that was not streamed
    ({"stream": False}, 120.0, 900.0, None),
    ({"stream": "false"}, 120.0, 900.0, None),
    ({"stream": 0}, 120.0, 900.0, None),
    ({"stream": True}, 240.0, 240.0, 240.0),  # a one-chunk streamed answer, in whole ms
    ({"stream": "true"}, 240.0, 239.0, 240.0),
    ({"stream": "True"}, 120.0, 900.0, 120.0),
    ({"stream": "sometimes"}, 900.0, 900.0, None),  # says nothing usable: read as not saying
    ({"stream": "sometimes"}, 120.0, 900.0, 120.0),
    ({}, 250.0, None, 250.0),  # no latency (an OTel span without an end)
    ({"stream": True}, None, 900.0, None),
])
def test_which_logged_ttft_the_analysis_reads(params, ttft_ms, latency_ms, read):
    assert logged_ttft_ms(ttft_ms, latency_ms, params) == read


def test_a_record_keeps_the_ttft_the_gateway_logged():
    """Ingestion stores what was logged, for the analysis to read by one rule (`logged_ttft_ms`): a TTFT dropped at
    ingest could not come back when the rule turned out wrong, as it did for a streamed one-chunk answer."""
    base = {"id": "r1", "timestamp": "2026-11-22T10:00:00Z", "response": "hello", "latency_ms": 900.0,
            "request": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}}
    assert normalise_openai_log({**base, "ttft_ms": 900.0}, "f:0").ttft_ms == 900.0
    unstreamed = {**base, "ttft_ms": 120.0, "request": {**base["request"], "stream": False}}
    record = normalise_openai_log(unstreamed, "f:1")
    assert record.ttft_ms == 120.0 and record.params["stream"] is False
    streamed = {**base, "ttft_ms": 900.0, "request": {**base["request"], "stream": True}}
    assert normalise_openai_log(streamed, "f:2").ttft_ms == 900.0
    record = TrafficRecord("r2", datetime(2026, 11, 22, tzinfo=timezone.utc), "chat", "m", [{"role": "user"}],
                           latency_ms=300.0, ttft_ms=300.0)
    assert record.ttft_ms == 300.0


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


def _bucket_run(engine, sizes: list[int]) -> int:
    """A run of the 300 stored prompts cut into slices `bucket` of the given sizes (in sample order)."""
    assert sum(sizes) == 300
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"better": "FuseChat-Gemma-2-9B-Instruct"})
    with session_scope(engine) as s:
        ids = sorted(s.scalars(select(TrafficSample.id)))
        start = 0
        for k, size in enumerate(sizes):
            s.execute(update(TrafficSample).where(TrafficSample.id.in_(ids[start:start + size]))
                      .values(meta={"bucket": f"b{k:02d}"}))
            start += size
    return run_id


def test_every_slice_tested_can_be_decided_at_the_slices_confidence(engine):
    """min_slice_samples lowered to 5, ten slices of 20 and ten of 10. Twenty slices tested put each at 1 - 0.05 / 100
    (5 metrics), where a test needs 12 samples: the slices of 10 counted in that correction but could only be
    inconclusive, and the slices of 20 paid for them with wider intervals. Ten slices tested need 11 each: the
    slices of 10 are not tested, and say that 11 were needed."""
    run_id = _bucket_run(engine, [20] * 10 + [10] * 10)
    better = analyze_run(engine, run_id, route_for(["better"], slice_key="bucket", min_slice_samples=5)
                         ).candidate("better")
    assert len(better.slices) == 20
    for s in better.slices:
        if s.n == 10:
            assert s.metrics == [] and s.reasons == ["only 10 samples, 11 needed"], s.reasons
        else:
            assert all(m.confidence == pytest.approx(1 - 0.05 / 50) for m in s.metrics
                       if m.classification is not Classification.NODATA)
            quality = next(m for m in s.metrics if m.metric == "quality")
            assert quality.classification is not Classification.NODATA, quality.describe()


@pytest.mark.parametrize("sizes", [[10] * 30, [8] * 5 + [12] * 10 + [40] * 3 + [20], [60] * 5,
                                   [13] * 10 + [40] * 3 + [7, 9, 11, 12, 11]])
def test_a_slice_that_is_not_tested_names_the_floor_the_tested_ones_met(engine, sizes):
    """Whatever the sizes, the slices with metrics are those the floor named to the others admits, and each has
    the samples a test needs at the confidence they share."""
    from shadowjudge.analysis.stats import fewest_decisive_pairs

    run_id = _bucket_run(engine, sizes)
    better = analyze_run(engine, run_id, route_for(["better"], slice_key="bucket", min_slice_samples=5)
                         ).candidate("better")
    untested = [s for s in better.slices if not s.metrics]
    tested = [s for s in better.slices if s.metrics]
    floors = {int(s.reasons[0].split(", ")[1].split(" ")[0]) for s in untested}
    assert len(floors) <= 1
    confidence = 1 - 0.05 / (5 * max(1, len(tested)))
    assert all(m.confidence == pytest.approx(confidence) for s in tested for m in s.metrics
               if m.classification is not Classification.NODATA)
    assert all(s.n >= max(5, fewest_decisive_pairs(confidence)) for s in tested)
    if floors:
        floor = floors.pop()
        assert all(s.n < floor for s in untested) and all(s.n >= floor for s in tested)
