from hypothesis import given, settings
from hypothesis import strategies as st

from shadowjudge.routing.weights import apportion, limit_change, weights_diff, with_floor

NAMES = ["inc", "a", "b", "c"]


def weight_vectors():
    """Integer weight vectors over NAMES that sum to 100."""
    return st.lists(st.integers(0, 100), min_size=len(NAMES), max_size=len(NAMES)).filter(lambda v: sum(v) > 0).map(
        lambda v: apportion(dict(zip(NAMES, v)), NAMES))


def test_apportion_is_exact_for_integer_percentages_and_breaks_ties_by_order():
    assert apportion({"inc": 95, "a": 5}, ["inc", "a"]) == {"inc": 95, "a": 5}
    assert apportion({"inc": 1, "a": 1, "b": 1}, ["inc", "a", "b"]) == {"inc": 34, "a": 33, "b": 33}
    assert apportion({"a": 0.5}, ["inc", "a"]) == {"inc": 0, "a": 100}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=6).filter(lambda v: sum(v) > 1e-6))
def test_apportion_always_gives_integers_summing_to_100(values):
    names = [f"t{i}" for i in range(len(values))]
    out = apportion(dict(zip(names, values)), names)
    assert sum(out.values()) == 100 and all(isinstance(w, int) and w >= 0 for w in out.values())
    total = sum(values)
    assert all(abs(out[n] - v * 100 / total) < 1 for n, v in zip(names, values))


@settings(max_examples=300, deadline=None)
@given(weight_vectors(), weight_vectors(), st.integers(1, 100))
def test_limit_change_respects_the_cap_and_keeps_the_sum(current, desired, cap):
    moved = limit_change(current, desired, cap, NAMES)
    assert sum(moved.values()) == 100
    assert all(abs(moved[n] - current[n]) <= cap for n in NAMES)
    if max(abs(desired[n] - current[n]) for n in NAMES) <= cap:
        assert moved == desired
    else:  # it moves: the biggest mover goes the full cap toward its target
        assert moved != current


@settings(max_examples=200, deadline=None)
@given(weight_vectors(), st.integers(0, 100))
def test_with_floor_keeps_the_incumbent_at_its_minimum(weights, floor):
    out = with_floor(weights, "inc", floor, NAMES)
    assert sum(out.values()) == 100 and out["inc"] >= floor
    if weights["inc"] >= floor:
        assert out == weights


def test_weights_diff_lists_only_changes():
    assert weights_diff({"inc": 95, "a": 5, "b": 0}, {"inc": 75, "a": 25, "b": 0}) == "inc 95→75, a 5→25"
    assert weights_diff({"inc": 100}, {"inc": 100}) == "no change"
