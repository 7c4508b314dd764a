"""analyze_run on stored runs of real AlpacaEval outputs and GPT-4 Turbo scores, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from sqlalchemy import update

from shadowjudge.analysis import AnalysisError, Classification, RunAnalysis, Verdict, analyze_run
from shadowjudge.store import ShadowResult, session_scope
from test_analysis_alpaca_runs import PROFILES, Profile, build_run, route_for

GEMMA, FALCON = "FuseChat-Gemma-2-9B-Instruct", "falcon-40b-instruct"


def test_no_change_passes_and_a_one_slice_regression_fails_with_the_slice_named(engine):
    """The candidate is much better on average, but on koala its answers are falcon-40b's: the slice is caught."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"same": "claude-2", "mixed": {"*": GEMMA, "koala": FALCON}})
    analysis = analyze_run(engine, run_id, route_for(["same", "mixed"]))

    same = analysis.candidate("same")
    assert same.verdict is Verdict.PASS and same.score == 100.0
    assert all(s.verdict is not Verdict.FAIL for s in same.slices)

    mixed = analysis.candidate("mixed")
    quality = mixed.metric("quality")
    assert quality.classification is Classification.PASS and quality.effect > 2  # far better on average
    assert mixed.verdict is Verdict.FAIL
    assert [s.label for s in mixed.failing_slices] == ["task=koala"]
    koala = mixed.failing_slices[0].metrics[0]
    assert koala.metric == "quality" and koala.classification is Classification.FAIL and koala.ci_high < 0.97
    assert "task=koala" in mixed.reasons[0]
    assert mixed.failing_slices[0].worst_sample_ids  # examples for triage


def test_slice_failure_can_mark_instead_of_fail(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES,
                       candidates={"mixed": {"*": GEMMA, "koala": FALCON}})
    analysis = analyze_run(engine, run_id, route_for(["mixed"], slice_failure="mark"))
    assert analysis.candidate("mixed").verdict is Verdict.MARGINAL
    assert "(marked)" in analysis.candidate("mixed").reasons[0]


def test_a_worse_model_fails_overall_and_the_analysis_is_deterministic_and_json(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES, candidates={"bad": FALCON})
    route = route_for(["bad"])
    analysis = analyze_run(engine, run_id, route)
    bad = analysis.candidate("bad")
    assert bad.verdict is Verdict.FAIL and bad.metric("quality").classification is Classification.FAIL
    assert bad.metric("quality").p_value < 1e-6  # the Mann-Whitney test agrees
    data = analysis.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert analyze_run(engine, run_id, route).to_dict() == data
    assert RunAnalysis.from_dict(data).to_dict() == data


def test_latency_error_and_cost_regressions_are_measured_against_the_logged_incumbent(engine):
    """No incumbent replay: its latency, TTFT and cost come from the gateway log."""
    run_id = build_run(engine, run_key="r", incumbent="claude-2", replay_incumbent=False, profiles=PROFILES,
                       candidates={"slow": "claude-2"})
    # The candidate answers as claude-2 does, but three times slower and four times dearer.
    with session_scope(engine) as s:
        s.execute(update(ShadowResult).values(latency_ms=ShadowResult.latency_ms * 3, ttft_ms=ShadowResult.ttft_ms * 3,
                                              cost_usd=ShadowResult.cost_usd * 4))
    analysis = analyze_run(engine, run_id, route_for(["slow"]))
    assert analysis.incumbent_source == "logs"
    slow_c = analysis.candidate("slow")
    for name in ("latency_p95", "ttft", "cost_per_outcome"):
        metric = slow_c.metric(name)
        assert metric.classification is Classification.FAIL, metric.describe()
        assert metric.ci_low > 1.0


def test_candidate_errors_fail_the_error_rate(engine):
    flaky = {**PROFILES, GEMMA: Profile(250, 6, 2.0, error_rate=0.2)}
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=flaky, candidates={"flaky": GEMMA}, seed=4)
    flaky_c = analyze_run(engine, run_id, route_for(["flaky"])).candidate("flaky")
    errors = flaky_c.metric("error_rate")
    assert errors.classification is Classification.FAIL and errors.candidate_value > 0.1
    assert flaky_c.verdict is Verdict.FAIL  # error rate is critical
    assert flaky_c.worst_sample_ids  # failed requests lead the triage examples


def test_too_little_data_is_inconclusive_never_a_pass(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", profiles=PROFILES, candidates={"few": GEMMA},
                       datasets={"vicuna"})  # 28 prompts
    few = analyze_run(engine, run_id, route_for(["few"], min_samples=30)).candidate("few")
    assert few.verdict is Verdict.INCONCLUSIVE and few.score is None
    unjudged = build_run(engine, run_key="u", incumbent="claude-2", profiles=PROFILES, candidates={"c": GEMMA},
                         judge=False, window=1)
    assert analyze_run(engine, unjudged, route_for(["c"])).candidate("c").verdict is Verdict.INCONCLUSIVE


def test_unknown_run_and_wrong_route_are_clear_errors(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", candidates={"c": GEMMA}, datasets={"vicuna"})
    with pytest.raises(AnalysisError, match="shadow run 999 does not exist"):
        analyze_run(engine, 999, route_for(["c"]))
    with pytest.raises(AnalysisError, match="belongs to route 'chat', not 'other'"):
        analyze_run(engine, run_id, route_for(["c"], route="other"))


def test_a_candidate_that_changed_nothing_rarely_fails_any_metric():
    """Family-wise: 40 no-change runs (same answers and scores, fresh latency/TTFT/cost noise), all five metrics
    looked at each time; Bonferroni over metrics keeps chance failures to about (1 - confidence) / 2 per run."""
    import numpy as np

    from shadowjudge.analysis.regression import _analyse_candidate
    from shadowjudge.analysis.run_data import PairJudgment, RunData, TargetRecord

    rng = np.random.default_rng(0)
    route = route_for(["c"], slice_key=None)
    failed_runs = 0
    for run in range(40):
        def records():
            return {i: TargetRecord(i, bool(rng.random() < 0.02), float(rng.lognormal(7, 0.5)),
                                    float(rng.lognormal(5.7, 0.2)), float(rng.lognormal(-6, 0.5))) for i in range(200)}
        scores = rng.beta(2, 2, 200)
        pairs = {i: PairJudgment(i, float(scores[i]), float(scores[i]), 0.5) for i in range(200)}
        data = RunData(run, "chat", "judge", "replay", records(), {"c": records()}, {"c": pairs})
        analysis = _analyse_candidate(data, route, "c", 0.5)
        failed_runs += any(m.classification is Classification.FAIL for m in analysis.metrics)
    assert failed_runs <= 3, failed_runs  # expected about 1 in 40
