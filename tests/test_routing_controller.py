"""The controller stepped one iteration at a time, as a pure function: no store, no gateway."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shadowjudge.config import ConfigError, parse_config
from shadowjudge.routing.controller import (
    Proposal,
    RolloutState,
    RoutingStateError,
    _guarded_move,
    decide,
    target_fingerprint,
)
from shadowjudge.routing.weights import apportion
from shadowjudge.routing.verdicts import CandidateVerdict, InvalidVerdict, index_verdicts

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def make_route(policy=None, candidates=("a", "b")):
    cfg = parse_config({
        "sources": [{"name": "logs", "path": "x.jsonl"}],
        "routes": [{
            "name": "chat",
            "incumbent": {"name": "inc", "model": "m-inc", "base_url": "http://127.0.0.1:9000/v1"},
            "candidates": [{"name": c, "model": f"m-{c}", "base_url": f"http://127.0.0.1:90{i + 1:02d}/v1"}
                           for i, c in enumerate(candidates)],
            "policy": policy or {},
        }],
    })
    return cfg.routes[0]


def v(target, verdict="pass", score=0.6, n=100, **kw):
    return CandidateVerdict(target, verdict, score=score, n=n, **kw)


def run(route, state, verdicts, now=T0):
    return decide(route, state, {x.target: x for x in verdicts}, now)


def test_ladder_walks_each_step_on_passing_verdicts_and_promotes_at_100():
    route = make_route({"steps": [1, 5, 25, 50, 100]})
    state = RolloutState.initial(route)
    seen = []
    for i in range(5):
        d = run(route, state, [v("a")], T0 + timedelta(hours=i))
        seen.append((d.action, d.after["a"]))
        state = d.applied
    assert seen == [("advance", 1), ("advance", 5), ("advance", 25), ("advance", 50), ("promote", 100)]
    assert state.serving == "a" and state.phase == "promoted" and state.candidate is None
    d = run(route, state, [v("a"), v("b")], T0 + timedelta(hours=6))
    assert d.action == "hold" and "config stale" in d.reason and "make 'a' the incumbent" in d.reason


def test_inconclusive_marginal_and_missing_verdicts_hold_the_weight():
    route = make_route()
    state = run(route, RolloutState.initial(route), [v("a")]).applied
    for verdicts in ([v("a", "inconclusive")], [v("a", "marginal")], []):
        d = run(route, state, verdicts, T0 + timedelta(hours=1))
        assert d.action == "hold" and d.after == state.weights


def test_a_failing_verdict_rolls_back_to_zero_in_the_same_cycle_and_the_candidate_stays_failed():
    route = make_route({"steps": [10, 50, 100], "max_step_change": 10, "min_dwell_s": 3600})
    state = RolloutState.initial(route)
    for i in range(4):
        state = run(route, state, [v("a")], T0 + timedelta(hours=2 * i)).applied
    assert state.weights["a"] == 40  # capped moves: 10, 20, 30, 40
    d = run(route, state, [v("a", "fail", score=0.3)], T0 + timedelta(hours=6, minutes=1))  # dwell not over: still rolls back
    assert d.action == "rollback" and d.after == {"inc": 100, "a": 0, "b": 0}
    assert d.applied.phase == "rolled_back" and "a" in d.applied.failed
    # a failed candidate is not restarted on a later passing verdict; another passing candidate is
    d2 = run(route, d.applied, [v("a"), v("b")], T0 + timedelta(hours=9))
    assert d2.action == "advance" and d2.after["a"] == 0 and d2.after["b"] == 10


def test_a_failed_candidate_is_retried_when_its_target_config_changes():
    route = make_route()
    state = run(route, RolloutState.initial(route), [v("a")]).applied
    state = run(route, state, [v("a", "fail")], T0 + timedelta(hours=1)).applied
    assert run(route, state, [v("a")], T0 + timedelta(hours=2)).action == "hold"
    new_model = route.model_copy(deep=True)
    new_model.candidates[0].model = "m-a-v2"
    assert run(new_model, state, [v("a")], T0 + timedelta(hours=2)).action == "advance"


def test_a_critical_alert_rolls_back_even_a_passing_frozen_candidate():
    route = make_route()
    state = run(route, RolloutState.initial(route), [v("a")]).applied
    frozen = replace(state, frozen=True)
    d = run(route, frozen, [v("a", "pass", critical_alert=True)], T0 + timedelta(minutes=5))
    assert d.action == "rollback" and d.after["a"] == 0 and "critical alert" in d.reason


def test_a_rollback_whose_push_failed_is_retried_whatever_the_next_verdict():
    route = make_route()
    state = run(route, RolloutState.initial(route), [v("a")]).applied
    state = run(route, state, [v("a")], T0 + timedelta(hours=1)).applied
    d = run(route, state, [v("a", "fail")], T0 + timedelta(hours=2))
    refused = d.refused  # the gateway refused the rollback: weights unchanged, failure remembered
    assert refused.weights == state.weights and refused.phase == "rolling_back"
    d2 = run(route, refused, [v("a", "pass")], T0 + timedelta(hours=3))
    assert d2.action == "rollback" and d2.after["a"] == 0


def test_freeze_holds_advances():
    route = make_route({"frozen": True})
    d = run(route, RolloutState.initial(route), [v("a")])
    assert d.action == "hold" and "frozen (config)" in d.reason
    route = make_route()
    d = run(route, replace(RolloutState.initial(route), frozen=True), [v("a")])
    assert d.action == "hold" and "frozen (state)" in d.reason


def test_dwell_time_and_sample_count_gate_each_advance():
    route = make_route({"min_dwell_s": 3600, "min_samples_per_step": 150})
    state = RolloutState.initial(route)
    d = run(route, state, [v("a", n=100)])
    assert d.action == "hold" and "100 of 150 samples" in d.reason
    d = run(route, d.applied, [v("a", n=100)], T0 + timedelta(minutes=10))
    assert d.action == "advance" and d.after["a"] == 1
    state = d.applied
    d = run(route, state, [v("a", n=500)], T0 + timedelta(minutes=40))
    assert d.action == "hold" and "dwell 1800s of 3600s" in d.reason
    d = run(route, d.applied, [v("a", n=10)], T0 + timedelta(minutes=75))
    assert d.action == "advance" and d.after["a"] == 5  # samples from the held cycle count toward the step


def test_manual_gate_waits_for_approval_of_each_step():
    route = make_route({"manual_gate": True})
    state = RolloutState.initial(route)
    d = run(route, state, [v("a")])
    assert d.action == "hold" and "waiting for approval of step 0" in d.reason
    approved = replace(d.applied, approved_step=d.applied.step_index + 1)
    d = run(route, approved, [v("a")], T0 + timedelta(minutes=1))
    assert d.action == "advance" and d.after["a"] == 1
    d = run(route, d.applied, [v("a")], T0 + timedelta(minutes=2))
    assert d.action == "hold" and "approval of step 1" in d.reason


def test_incumbent_minimum_weight_holds_until_the_promotion_step():
    route = make_route({"steps": [25, 50, 90, 100], "incumbent_min_weight": 20, "max_step_change": 40})
    state = RolloutState.initial(route)
    weights = []
    for i in range(5):
        d = run(route, state, [v("a")], T0 + timedelta(hours=i))
        state = d.applied
        weights.append(d.after["inc"])
    assert weights == [75, 50, 20, 0, 0]  # 90% would leave the incumbent 10 < 20: the rung is skipped, then promoted
    assert state.serving == "a"


def test_policy_config_refuses_a_floor_that_could_never_be_promoted():
    with pytest.raises(ConfigError, match="incumbent_min_weight"):
        make_route({"incumbent_min_weight": 30, "max_step_change": 20})


def test_cost_aware_moves_traffic_to_the_cheapest_passing_target():
    route = make_route({"kind": "cost_aware", "max_step_change": 50, "quality_floor": 0.8})
    state = RolloutState.initial(route)
    verdicts = [v("a", cost_per_outcome=0.002, quality=0.9, incumbent_cost_per_outcome=0.01),
                v("b", cost_per_outcome=0.001, quality=0.7, incumbent_cost_per_outcome=0.01)]  # b cheaper, under floor
    d = run(route, state, verdicts)
    assert d.action == "advance" and d.after == {"inc": 50, "a": 50, "b": 0}
    d = run(route, d.applied, verdicts, T0 + timedelta(hours=1))
    assert d.action == "promote" and d.after == {"inc": 0, "a": 100, "b": 0} and d.applied.serving == "a"


def test_cost_aware_keeps_the_incumbent_when_it_is_cheapest_or_cost_is_unknown():
    route = make_route({"kind": "cost_aware"})
    state = RolloutState.initial(route)
    d = run(route, state, [v("a", cost_per_outcome=0.02, incumbent_cost_per_outcome=0.01)])
    assert d.action == "hold" and "'inc' is the cheapest" in d.reason
    d = run(route, state, [v("a", cost_per_outcome=0.001)])
    assert d.action == "hold" and "no incumbent cost_per_outcome" in d.reason


def test_bandit_is_reproducible_shifts_toward_the_better_arm_within_the_step_limit():
    route = make_route({"kind": "bandit", "max_step_change": 10, "incumbent_min_weight": 10})
    state = RolloutState.initial(route)
    history = []
    for i in range(12):
        d = decide(route, state, {"a": v("a", score=0.75, n=80), "b": v("b", score=0.35, n=80)}, T0 + timedelta(hours=i))
        assert all(abs(d.after[n] - state.weights[n]) <= 10 for n in d.after)
        assert sum(d.after.values()) == 100 and d.after["inc"] >= 10
        history.append(d.after)
        state = replace(d.applied, revision=state.revision + 1)
    assert history[-1]["a"] >= 80 and history[-1]["b"] <= 5
    again = decide(route, RolloutState.initial(route), {"a": v("a", score=0.75, n=80)}, T0)
    first = decide(route, RolloutState.initial(route), {"a": v("a", score=0.75, n=80)}, T0)
    assert again.after == first.after  # seeded by route and revision


def test_bandit_rolls_back_a_failing_arm_immediately():
    route = make_route({"kind": "bandit", "max_step_change": 10})
    state = replace(RolloutState.initial(route), weights={"inc": 60, "a": 30, "b": 10})
    d = decide(route, state, {"a": v("a", "fail", score=0.2), "b": v("b")}, T0)
    assert d.action == "rollback" and d.after == {"inc": 90, "a": 0, "b": 10}


def test_state_that_does_not_fit_the_config_is_a_clear_error():
    route = make_route()
    state = replace(RolloutState.initial(route), weights={"inc": 80, "gone": 20})
    with pytest.raises(RoutingStateError, match="'gone': 20"):
        run(route, state, [])


def test_bad_verdicts_are_refused_with_the_target_named():
    with pytest.raises(InvalidVerdict, match="verdict for 'a'"):
        CandidateVerdict("a", "great")
    with pytest.raises(InvalidVerdict, match="score must be in"):
        CandidateVerdict("a", "pass", score=1.5)
    with pytest.raises(InvalidVerdict, match="unknown target 'zzz'"):
        index_verdicts(make_route(), [CandidateVerdict("zzz", "pass")])
    with pytest.raises(InvalidVerdict, match="target must be a target name"):
        CandidateVerdict(["a"], "pass")  # a verdicts file with a list where the name goes
    with pytest.raises(InvalidVerdict, match="score must be a number"):
        CandidateVerdict("a", "pass", score="high")
    with pytest.raises(InvalidVerdict, match="n must be a non-negative integer"):
        CandidateVerdict("a", "pass", n=True)
    with pytest.raises(InvalidVerdict, match="critical_alert must be true or false"):
        CandidateVerdict("a", "pass", critical_alert="yes")


def test_verdicts_from_a_run_analysis():
    from shadowjudge.analysis.canary import Classification, MetricResult, Verdict
    from shadowjudge.analysis.regression import CandidateAnalysis, RunAnalysis
    from shadowjudge.routing.verdicts import verdicts_from_analysis

    def metric(name, kind, effect, cand=None, inc=None):
        return MetricResult(name, Classification.PASS, "bootstrap", kind, effect, effect, effect, 0.97, 1.0, True,
                            cand, inc, 100, 100)

    def candidate(target, verdict, metrics):
        return CandidateAnalysis(target, f"m-{target}", verdict, 80.0, 120, 110, metrics, [], [])

    analysis = RunAnalysis(7, "chat", "inc", "replayed", "small-judge:1", None, 0.95, [
        candidate("a", Verdict.PASS, [metric("quality", "ratio", 1.0), metric("cost_per_outcome", "ratio", 0.5, 0.002, 0.004)]),
        candidate("b", Verdict.INCONCLUSIVE, [metric("quality", "level", 0.62)]),
        candidate("c", Verdict.FAIL, [metric("quality", "ratio", float("nan"))]),
    ])
    route = make_route(candidates=("a", "b", "c"))
    a, b, c = verdicts_from_analysis(analysis, critical_targets=["c"])
    assert (a.verdict, a.score, a.quality, a.cost_per_outcome, a.incumbent_cost_per_outcome, a.n) == (
        "pass", 0.5, 1.0, 0.002, 0.004, 110)
    assert (b.verdict, b.score, b.cost_per_outcome) == ("inconclusive", 0.62, None)
    assert (c.verdict, c.score, c.critical_alert) == ("fail", None, True)
    assert set(index_verdicts(route, [a, b, c])) == {"a", "b", "c"}


def test_the_ladder_never_starts_a_candidate_on_another_candidates_samples():
    route = make_route({"steps": [5, 25, 50, 100], "min_samples_per_step": 100})
    d = run(route, RolloutState.initial(route), [v("a", n=60), v("b", "inconclusive", n=60)])
    assert d.action == "hold" and "60 of 100 samples" in d.reason
    # a turns inconclusive and b passes: the count restarts for b instead of adding b's 60 to a's
    d = run(route, d.applied, [v("a", "inconclusive", n=60), v("b", n=60)], T0 + timedelta(hours=1))
    assert d.action == "hold" and "60 of 100 samples" in d.reason and d.applied.samples_for == "b"
    d = run(route, d.applied, [v("a", "inconclusive", n=60), v("b", n=60)], T0 + timedelta(hours=2))
    assert d.action == "advance" and d.after["b"] == 5


@pytest.mark.parametrize("policy", [
    {"kind": "bandit", "min_samples_per_step": 100},
    {"kind": "cost_aware", "min_samples_per_step": 100},
])
def test_a_candidate_that_is_down_does_not_hold_back_an_advance(policy):
    route = make_route(policy)
    down = v("b", "inconclusive", score=None, n=0)
    state = RolloutState.initial(route)
    d = decide(route, state, {"a": v("a", score=0.8, n=300, cost_per_outcome=0.001, incumbent_cost_per_outcome=0.01),
                              "b": down}, T0, seed=1)
    assert d.action in ("advance", "promote") and d.after["a"] > 0, d.reason
    mark = {"fingerprint": target_fingerprint(route.candidates[1]), "reason": "failed earlier"}
    failed = replace(state, failed={"b": mark})  # nor does a candidate that failed
    d = decide(route, failed, {"a": v("a", score=0.8, n=300, cost_per_outcome=0.001, incumbent_cost_per_outcome=0.01),
                               "b": v("b", "fail", score=0.2, n=5)}, T0, seed=1)
    assert d.action in ("advance", "promote") and d.after["a"] > 0, d.reason


def test_a_new_model_revision_starts_the_bandit_from_the_prior():
    route = make_route({"kind": "bandit"})
    state = RolloutState.initial(route)
    for i in range(3):  # the old model earns a strong posterior
        state = decide(route, state, {"a": v("a", score=0.9, n=300)}, T0 + timedelta(hours=i), seed=1).applied
    assert state.weights["a"] > 0
    state = replace(state, weights={"inc": 100, "a": 0, "b": 0})
    new_model = route.model_copy(deep=True)
    new_model.candidates[0].model = "m-a-v2"
    d = decide(new_model, state, {}, T0 + timedelta(hours=4), seed=1)
    assert d.action == "hold" and "no judge scores yet" in d.reason and d.after["a"] == 0
    d = decide(new_model, state, {"a": v("a", score=0.6, n=10)}, T0 + timedelta(hours=4), seed=1)
    fresh = d.applied.posteriors["a"]
    assert (fresh.alpha, fresh.beta) == pytest.approx((1 + 6, 1 + 4))


def test_the_step_limit_and_the_ladder_are_measured_from_what_the_gateway_holds():
    route = make_route({"steps": [5, 25, 50, 100], "max_step_change": 50})
    state = replace(RolloutState.initial(route), weights={"inc": 50, "a": 50, "b": 0}, candidate="a", step_index=2,
                    phase="progressing", step_started_at=T0, approved_step=3)
    gateway = {"inc": 100, "a": 0, "b": 0}  # reset by hand since the last step
    d = decide(route, state, {"a": v("a")}, T0 + timedelta(hours=1), gateway_weights=gateway)
    assert d.action == "advance" and d.before == gateway and d.after == {"inc": 95, "a": 5, "b": 0}
    assert "gateway drift: it holds inc=100, a=0, b=0 where the state recorded inc=50, a=50, b=0" in d.reason
    # no drift: the gateway agrees with the state (LiteLLM's relative weights count as the split they send)
    same = decide(route, state, {"a": v("a")}, T0 + timedelta(hours=1), gateway_weights={"inc": 5, "a": 5, "b": 0})
    assert same.action == "promote" and "drift" not in same.reason


def test_a_drifted_gateway_restarts_the_step():
    route = make_route({"steps": [5, 25, 50, 100], "min_dwell_s": 3600, "manual_gate": True})
    state = replace(RolloutState.initial(route), weights={"inc": 75, "a": 25, "b": 0}, candidate="a", step_index=1,
                    phase="progressing", step_started_at=T0, samples_in_step=500, approved_step=2)
    d = decide(route, state, {"a": v("a")}, T0 + timedelta(hours=5), gateway_weights={"inc": 90, "a": 10, "b": 0})
    assert d.action == "hold" and "dwell 0s of 3600s" in d.reason and "gateway drift" in d.reason
    assert d.applied.weights == {"inc": 90, "a": 10, "b": 0} and d.applied.approved_step is None
    assert d.applied.step_started_at == T0 + timedelta(hours=5)


def test_a_candidate_the_gateway_already_gives_everything_is_promoted_without_a_push():
    route = make_route({"steps": [5, 25, 50, 100]})
    state = replace(RolloutState.initial(route), weights={"inc": 50, "a": 50, "b": 0}, candidate="a", step_index=2,
                    phase="progressing")
    d = decide(route, state, {"a": v("a")}, T0, gateway_weights={"inc": 0, "a": 100, "b": 0})
    assert d.action == "promote" and not d.changes_weights and d.applied.serving == "a"


def _weightings():
    return st.lists(st.integers(0, 100), min_size=4, max_size=4).filter(lambda w: sum(w) > 0).map(
        lambda w: apportion(dict(zip(["inc", "a", "b", "c"], w)), ["inc", "a", "b", "c"]))


@settings(max_examples=300, deadline=None, derandomize=True)  # seeded: the same examples on every run
@example(current={"inc": 18, "a": 4, "b": 75, "c": 3}, desired={"inc": 1, "a": 20, "b": 31, "c": 48}, cap=44,
         floor=18)  # the review's case: the floor, applied after the limit, moved b by 49
@example(current={"inc": 5, "a": 95, "b": 0, "c": 0}, desired={"inc": 0, "a": 100, "b": 0, "c": 0}, cap=10,
         floor=20)  # both cannot hold: the limit wins, the incumbent climbs 5 -> 15
@given(current=_weightings(), desired=_weightings(), cap=st.integers(1, 100), floor=st.integers(0, 100))
def test_a_move_keeps_the_step_limit_and_the_incumbents_floor(current, desired, cap, floor):
    floor = min(floor, cap)  # the config refuses a floor above the step limit
    route = make_route({"kind": "bandit", "max_step_change": cap, "incumbent_min_weight": floor},
                       candidates=("a", "b", "c"))
    d = _guarded_move(route, replace(RolloutState.initial(route), weights=current),
                      Proposal(desired, None, "test", completes=False), ["inc", "a", "b", "c"], T0)
    moved = d.after
    assert sum(moved.values()) == 100 and min(moved.values()) >= 0
    assert all(abs(moved[n] - current[n]) <= cap for n in moved), (current, moved)
    if current["inc"] >= floor:
        assert moved["inc"] >= floor, (current, moved)
    else:  # the step limit wins: the incumbent climbs toward its floor, never away from it
        assert moved["inc"] >= current["inc"], (current, moved)
