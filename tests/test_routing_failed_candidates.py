"""A candidate that failed never gains traffic, under any policy, and one serving the route is rolled back too.

The controller is stepped one iteration at a time, as a pure function: no store, no gateway.
"""

from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowjudge.config import parse_config
from shadowjudge.routing.controller import Posterior, RolloutState, decide, target_fingerprint
from shadowjudge.routing.verdicts import VERDICT_KINDS, CandidateVerdict, apply_golden_gate
from shadowjudge.routing.weights import apportion
from test_routing_controller import T0, make_route, v

NAMES = ["inc", "a", "b"]


def step(route, state, verdicts, now):
    """One cycle, and the state the next one starts from (the store bumps the revision on every step)."""
    d = decide(route, state, {x.target: x for x in verdicts}, now)
    return d, replace(d.applied, revision=state.revision + 1)


def test_bandit_never_gives_traffic_to_a_candidate_that_failed_a_golden_case():
    route = make_route({"kind": "bandit"})  # every guard at its default: no step limit
    state = RolloutState.initial(route)
    golden = {"a": {"n_failed": 2, "n_unanswered": 0}}
    for i in range(3):
        verdicts = apply_golden_gate([v("a", score=0.9, n=200), v("b", score=0.4, n=200)], golden)
        assert verdicts[0].verdict == "fail" and verdicts[0].critical_alert
        d, state = step(route, state, verdicts, T0 + timedelta(hours=i))
        assert d.after["a"] == 0, d.reason
        assert "a=fail" in d.reason
    assert d.after == {"inc": 100, "a": 0, "b": 0}  # b, judged worse than the incumbent, earns nothing either


def test_bandit_gives_no_traffic_on_a_plain_fail_or_on_an_inconclusive_verdict():
    route = make_route({"kind": "bandit", "max_step_change": 20, "min_samples_per_step": 0, "min_dwell_s": 0})
    state = RolloutState.initial(route)
    for i in range(3):
        d, state = step(route, state, [v("a", "fail", score=0.9, n=200), v("b", "inconclusive", score=0.9, n=200)],
                        T0 + timedelta(hours=i))
        assert d.action == "hold" and d.after == {"inc": 100, "a": 0, "b": 0}, d.reason
        assert "no candidate passed this cycle (a=fail, b=inconclusive)" in d.reason


def test_bandit_gives_an_arm_without_a_pass_no_more_than_it_holds_and_moves_the_arms_that_passed():
    route = make_route({"kind": "bandit", "max_step_change": 20})
    strong = {n: Posterior(90.0, 10.0, target_fingerprint(t)) for n, t in (("a", route.candidates[0]),
                                                                          ("b", route.candidates[1]))}
    state = replace(RolloutState.initial(route), weights={"inc": 70, "a": 0, "b": 30}, posteriors=strong)
    for i, b_verdict in enumerate(["inconclusive", "marginal", None]):
        verdicts = [v("a", score=0.9, n=200)] + ([v("b", b_verdict, score=0.9, n=200)] if b_verdict else [])
        d, state = step(route, state, verdicts, T0 + timedelta(hours=i))
        # b's posterior is as strong as a's, so its share (about half) is above its 30%: it stays at 30
        assert d.action == "advance" and d.after["b"] == 30 and d.after["a"] > d.before["a"], d.reason
        assert "no gain without a pass: b=" in d.reason
    # b passes again: it may gain once more (its posterior is as strong as a's)
    d, _ = step(route, state, [v("a", score=0.9, n=200), v("b", score=0.9, n=200)], T0 + timedelta(hours=5))
    assert d.action == "advance" and d.after["b"] > d.before["b"], d.reason


@pytest.mark.parametrize("verdict", ["marginal", "inconclusive", None])
def test_bandit_takes_traffic_back_from_an_arm_that_keeps_missing_a_pass_as_its_posterior_sinks(verdict):
    """The arm's quality slipped (preference 0.35 on 300 samples a cycle) but never far enough for a `fail`: it
    must lose its traffic to the incumbent, a step at a time, and never gain any back."""
    route = make_route({"kind": "bandit", "max_step_change": 20}, candidates=("a",))
    a = route.candidates[0]
    state = replace(RolloutState.initial(route), weights={"inc": 40, "a": 60},
                    posteriors={"a": Posterior(1.0 + 0.35 * 300, 1.0 + 0.65 * 300, target_fingerprint(a))})
    seen = []
    for i in range(5):
        verdicts = {"a": v("a", verdict, score=0.35, n=300)} if verdict else {}
        d = decide(route, state, verdicts, T0 + timedelta(hours=i), seed=i)
        assert d.action in ("advance", "hold") and d.after["a"] <= d.before["a"], d.reason
        assert sum(d.after.values()) == 100 and min(d.after.values()) >= 0
        seen.append(d.after["a"])
        state = replace(d.applied, revision=state.revision + 1)
    assert seen == [40, 20, 0, 0, 0], seen  # the step limit (20) is the only brake
    assert d.after == {"inc": 100, "a": 0}


def test_bandit_takes_traffic_from_a_sinking_arm_while_another_passes():
    route = make_route({"kind": "bandit", "max_step_change": 100})
    fingerprints = {t.name: target_fingerprint(t) for t in route.candidates}
    state = replace(RolloutState.initial(route), weights={"inc": 40, "a": 50, "b": 10},
                    posteriors={"a": Posterior(70.0, 130.0, fingerprints["a"]),
                                "b": Posterior(150.0, 50.0, fingerprints["b"])})
    d = decide(route, state, {"a": v("a", "marginal", score=0.35, n=200), "b": v("b", score=0.75, n=200)}, T0,
               seed=3)
    assert d.action == "advance" and d.after["a"] == 0 and d.after["b"] > 10, d.reason
    assert "no gain without a pass: a=marginal" in d.reason


def test_a_passing_verdict_with_a_critical_alert_starts_no_ladder_and_no_cost_aware_move():
    ladder = make_route({"steps": [5, 25, 50, 100]})
    d, _ = step(ladder, RolloutState.initial(ladder), [v("a", critical_alert=True), v("b", "inconclusive")], T0)
    assert d.action == "hold" and d.after["a"] == 0, d.reason
    d, _ = step(ladder, RolloutState.initial(ladder), [v("a", critical_alert=True), v("b")], T0)
    assert d.action == "advance" and d.after == {"inc": 95, "a": 0, "b": 5}, d.reason
    cheap = make_route({"kind": "cost_aware"})
    d, _ = step(cheap, RolloutState.initial(cheap),
                [v("a", critical_alert=True, cost_per_outcome=0.001, incumbent_cost_per_outcome=0.01)], T0)
    assert d.action == "hold" and d.after["a"] == 0, d.reason


def _policies():
    return st.one_of(
        st.fixed_dictionaries({"kind": st.just("ladder"), "steps": st.just([5, 25, 50, 100]),
                               "max_step_change": st.integers(5, 100)}),
        st.fixed_dictionaries({"kind": st.just("cost_aware"), "max_step_change": st.integers(1, 100)}),
        st.fixed_dictionaries({"kind": st.just("bandit"), "max_step_change": st.integers(1, 100)}),
    )


def _verdict(name):
    kinds = st.sampled_from(VERDICT_KINDS)
    one = st.builds(CandidateVerdict, st.just(name), kinds, score=st.floats(0, 1), n=st.integers(0, 300),
                    critical_alert=st.booleans(), cost_per_outcome=st.sampled_from([0.001, 0.02]),
                    incumbent_cost_per_outcome=st.just(0.01))
    return st.one_of(st.none(), one)


@settings(max_examples=300, deadline=None, derandomize=True)  # seeded: the same examples on every run
@given(policy=_policies(), raw=st.lists(st.integers(0, 100), min_size=3, max_size=3).filter(lambda w: sum(w) > 0),
       fed=st.lists(st.tuples(st.floats(1, 200), st.floats(1, 200)), min_size=2, max_size=2),
       va=_verdict("a"), vb=_verdict("b"))
def test_under_every_policy_a_candidate_gains_weight_only_on_a_clean_pass(policy, raw, fed, va, vb):
    route = make_route({**policy, "min_samples_per_step": 0, "min_dwell_s": 0})
    weights = apportion(dict(zip(NAMES, raw)), NAMES)
    holder = next((n for n in ("a", "b") if weights[n] > 0), None)
    posteriors = {n: Posterior(alpha, beta, target_fingerprint(t))
                  for (alpha, beta), n, t in zip(fed, ("a", "b"), route.candidates)}
    state = replace(RolloutState.initial(route), weights=weights, posteriors=posteriors,
                    candidate=holder if policy["kind"] == "ladder" else None)
    verdicts = {x.target: x for x in (va, vb) if x is not None}
    d = decide(route, state, verdicts, T0, seed=7)
    for name in ("a", "b"):
        got = verdicts.get(name)
        clean_pass = got is not None and got.verdict == "pass" and not got.critical_alert
        if not clean_pass:
            assert d.after[name] <= d.before[name], (d.action, d.reason)
        if got is not None and got.rolls_back:  # rolled back if it held traffic, kept at 0 if it held none
            assert d.after[name] == 0, (d.action, d.reason)


def _promoted(route):
    state = RolloutState.initial(route)
    for i in range(2):
        d, state = step(route, state, [v("a")], T0 + timedelta(hours=i))
    assert d.action == "promote" and state.serving == "a" and state.weights["a"] == 100
    return state


def test_a_promoted_candidate_that_regresses_is_rolled_back_to_the_configs_incumbent():
    route = make_route({"steps": [50, 100]})
    state = _promoted(route)
    # the config still names 'inc' as incumbent, so the cycle still judges 'a' against it
    d, state = step(route, state, [v("a", "fail", score=0.1, critical_alert=True)], T0 + timedelta(hours=3))
    assert d.action == "rollback" and d.after == {"inc": 100, "a": 0, "b": 0}
    assert "config names 'inc' as incumbent" in d.reason and "routes rollback chat --to inc" in d.reason
    assert state.serving == "inc" and state.phase == "rolled_back" and "a" in state.failed
    # 'inc' serves again: 'a' stays failed, and the rollout goes on with the other candidates
    d, state = step(route, state, [v("a"), v("b")], T0 + timedelta(hours=4))
    assert d.action == "advance" and d.after == {"inc": 50, "a": 0, "b": 50}, d.reason


def test_a_promoted_candidate_that_fails_without_an_alert_is_rolled_back_and_a_refused_push_is_retried():
    route = make_route({"steps": [50, 100], "min_dwell_s": 3600})
    state = _promoted(route)
    d = decide(route, state, {"a": v("a", "fail", score=0.2)}, T0 + timedelta(hours=1, minutes=1))
    assert d.action == "rollback" and d.after["inc"] == 100 and "analysis failed" in d.reason
    # the push failed: the refused state keeps 'a' serving and marked, and the next cycle pushes the rollback again
    # even though its verdict recovered
    refused = replace(d.refused, revision=state.revision + 1)
    assert refused.serving == "a" and refused.phase == "rolling_back"
    again = decide(route, refused, {"a": v("a")}, T0 + timedelta(hours=2))
    assert again.action == "rollback" and again.after["inc"] == 100 and "marked failed earlier" in again.reason
    assert again.applied.serving == "inc"


def test_a_promoted_candidate_that_passes_is_held_until_the_config_names_it():
    route = make_route({"steps": [50, 100]})
    state = _promoted(route)
    d, _ = step(route, state, [v("a", "inconclusive")], T0 + timedelta(hours=3))
    assert d.action == "hold" and "config stale" in d.reason and d.after["a"] == 100


def _swapped(route):
    """The config a person writes after 'a' was promoted: 'a' the incumbent, 'inc' a candidate."""
    return parse_config({"sources": [{"name": "logs", "path": "x.jsonl"}], "routes": [{
        "name": "chat", "incumbent": {"name": "a", "model": "m-a", "base_url": "http://127.0.0.1:9001/v1"},
        "candidates": [{"name": "inc", "model": "m-inc", "base_url": "http://127.0.0.1:9000/v1"},
                       {"name": "b", "model": "m-b", "base_url": "http://127.0.0.1:9002/v1"}],
        "policy": route.policy.model_dump()}]}).routes[0]


def _rolled_back_then_swapped():
    """'a' promoted, then rolled back for failing, and the person swaps the config one cycle too late."""
    route = make_route({"steps": [50, 100]})
    state = _promoted(route)
    d, state = step(route, state, [v("a", "fail", score=0.2, critical_alert=True)], T0 + timedelta(hours=2))
    assert d.action == "rollback" and state.serving == "inc" and "a" in state.failed
    return _swapped(route), state


def test_a_failing_serving_target_is_never_rolled_back_onto_an_incumbent_marked_failed():
    swapped, state = _rolled_back_then_swapped()
    d, state = step(swapped, state, [v("inc", "fail", score=0.3), v("b", "inconclusive")], T0 + timedelta(hours=3))
    assert d.action == "hold" and d.after == {"a": 0, "inc": 100, "b": 0}, d.reason
    assert "config stale" in d.reason and "incumbent 'a' is marked failed" in d.reason
    assert "nothing safe to roll back to" in d.reason and "routes rollback chat --to <target>" in d.reason
    assert state.serving == "inc" and "inc" not in state.failed
    # the next cycle, whatever the verdict, holds until a person names a target or fixes the config
    d, _ = step(swapped, state, [v("inc"), v("b")], T0 + timedelta(hours=4))
    assert d.action == "hold" and d.after["inc"] == 100 and "config stale" in d.reason, d.reason
    assert "'a' as incumbent, which is marked failed" in d.reason and "name 'inc' as incumbent again" in d.reason


def test_a_stranded_serving_target_still_takes_back_the_traffic_of_a_candidate_that_fails():
    swapped, state = _rolled_back_then_swapped()
    d = decide(swapped, state, {"inc": v("inc", "fail", score=0.3), "b": v("b", "fail", score=0.2)},
               T0 + timedelta(hours=3), gateway_weights={"a": 0, "inc": 80, "b": 20})  # b got 20% by hand
    assert d.action == "rollback" and d.after == {"a": 0, "inc": 100, "b": 0}, d.reason
    assert "b" in d.applied.failed and d.applied.serving == "inc" and "nothing safe to roll back to" in d.reason


def test_a_failed_manual_rollback_to_the_serving_target_does_not_roll_the_serving_target_back():
    from shadowjudge.routing.step import rollback_decision

    route = make_route({"steps": [50, 100]})
    state = _promoted(route)
    d, state = step(route, state, [v("a", "fail", score=0.2)], T0 + timedelta(hours=2))
    assert state.serving == "inc" and "a" in state.failed
    # a false alarm: the person serves 'a' again, on purpose
    state = replace(rollback_decision(route, state, "a", "false alarm", T0 + timedelta(hours=3)).applied,
                    revision=state.revision + 1)
    # a hand edit gave 'b' 10%; `routes rollback chat` (everything to 'a') is refused by the gateway
    drifted = {"inc": 0, "a": 90, "b": 10}
    refused = rollback_decision(route, state, None, "manual rollback", T0 + timedelta(hours=4),
                                gateway_weights=drifted).refused
    state = replace(refused, revision=state.revision + 1)
    assert state.phase == "rolling_back" and state.serving == "a"
    d = decide(route, state, {"a": v("a"), "b": v("b", "inconclusive")}, T0 + timedelta(hours=5),
               gateway_weights=drifted)
    assert d.action == "rollback" and d.after == {"inc": 0, "a": 100, "b": 0}, d.reason  # b only
    assert d.applied.serving == "a"


def test_the_controllers_own_refused_rollback_of_the_serving_target_is_recorded_and_retried():
    route = make_route({"steps": [50, 100]})
    state = _promoted(route)
    d = decide(route, state, {"a": v("a", "fail", score=0.2)}, T0 + timedelta(hours=2))
    assert d.refused.pending_rollback == "a" and d.applied.pending_rollback is None
    refused = replace(d.refused, revision=state.revision + 1)
    again = decide(route, refused, {"a": v("a")}, T0 + timedelta(hours=3))
    assert again.action == "rollback" and again.after["inc"] == 100 and again.applied.pending_rollback is None
    # a person who then serves 'a' on purpose (`routes rollback --to a`) ends the pending rollback
    from shadowjudge.routing.step import rollback_decision

    chosen = rollback_decision(route, refused, "a", "keep a", T0 + timedelta(hours=3)).applied
    assert chosen.pending_rollback is None
    d = decide(route, replace(chosen, revision=refused.revision + 1), {"a": v("a")}, T0 + timedelta(hours=4))
    assert d.action == "hold" and d.after["a"] == 100 and "config stale" in d.reason, d.reason


# -- many cycles: the invariants after every decision ----------------------------------------------------------

POLICIES = [{"kind": "ladder", "steps": [5, 25, 50, 100]},
            {"kind": "ladder", "steps": [10, 50], "incumbent_min_weight": 20, "max_step_change": 40},
            {"kind": "cost_aware", "max_step_change": 30},
            {"kind": "bandit"},
            {"kind": "bandit", "max_step_change": 20, "incumbent_min_weight": 10}]


def _verdicts_of_a_cycle():
    def verdict(name):
        one = st.builds(CandidateVerdict, st.just(name), st.sampled_from(["pass"] * 6 + ["fail", "marginal"] +
                                                                          ["inconclusive"] * 2),
                        score=st.floats(0.05, 0.95), n=st.integers(0, 300),
                        critical_alert=st.sampled_from([False] * 30 + [True]),
                        cost_per_outcome=st.sampled_from([0.001, 0.02]), incumbent_cost_per_outcome=st.just(0.01))
        return st.one_of(st.none(), one, one, one, one, one)  # now and then no verdict
    return st.tuples(verdict("a"), verdict("b"))


def _cycles():
    drift = st.lists(st.integers(0, 5), min_size=3, max_size=3).map(
        lambda w: apportion({"inc": w[0] + 1, "a": w[1], "b": w[2]}, NAMES))
    cycle = st.fixed_dictionaries({
        "verdicts": _verdicts_of_a_cycle(),
        "gateway": st.one_of(*[st.none()] * 15, drift),  # a hand edit now and then
        "manual": st.sampled_from([None] * 20 + ["serving", "inc", "a", "b"]),  # `routes rollback [--to]`
        "push_fails": st.sampled_from([False] * 9 + [True]),
    })
    return st.lists(cycle, min_size=1, max_size=20)


@settings(max_examples=200, deadline=None, derandomize=True)  # seeded: the same examples on every run
@given(policy=st.sampled_from(POLICIES), cycles=_cycles())
def test_over_many_cycles_weights_stay_whole_and_only_a_clean_pass_gains(policy, cycles):
    """sim.py's invariants, cycle after cycle, through hand edits of the gateway, manual rollbacks and pushes the
    gateway refuses: weights sum to 100 and none is negative; a candidate gains only on a clean pass; a failing
    candidate that holds traffic loses all of it; once a decision is in force no failed candidate holds traffic
    other than the one serving."""
    from shadowjudge.routing.step import rollback_decision

    route = make_route(policy)
    state = RolloutState.initial(route)
    for i, cycle in enumerate(cycles):
        now = T0 + timedelta(hours=i)
        verdicts = {x.target: x for x in cycle["verdicts"] if x is not None}
        if cycle["manual"] is not None:
            to = None if cycle["manual"] == "serving" else cycle["manual"]
            d = rollback_decision(route, state, to, "manual", now, gateway_weights=cycle["gateway"])
        else:
            d = decide(route, state, verdicts, now, seed=i, gateway_weights=cycle["gateway"])
        assert sum(d.after.values()) == 100 and min(d.after.values()) >= 0, d.reason
        if cycle["manual"] is None:
            for name in ("a", "b"):
                got = verdicts.get(name)
                if name != d.applied.serving and not (got and got.verdict == "pass" and not got.critical_alert):
                    assert d.after[name] <= d.before[name], (name, d.reason)
                if got is not None and got.rolls_back and d.before[name] > 0:
                    assert d.after[name] == 0, (name, d.reason)
        state = replace(d.refused if cycle["push_fails"] else d.applied, revision=state.revision + 1)
        if not cycle["push_fails"]:
            holding_failed = [n for n in state.failed if state.weights.get(n, 0) > 0 and n != state.serving]
            assert not holding_failed, (holding_failed, d.reason)
            assert state.pending_rollback is None or d.action == "hold", d.reason
