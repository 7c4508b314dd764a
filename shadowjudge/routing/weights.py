"""Weight arithmetic every policy shares: integer percentages that sum to 100, rate limits, the incumbent floor.

All functions are pure and keep the key order of the route's targets, so rendered configs and history rows read
in the same order every time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Weights = dict[str, int]


def apportion(shares: Mapping[str, float], names: Sequence[str]) -> Weights:
    """Integer percentages proportional to `shares` that sum to exactly 100 (largest remainder; ties by order)."""
    values = [max(0.0, float(shares.get(n, 0.0))) for n in names]
    total = sum(values)
    if total <= 0:
        raise ValueError(f"cannot apportion 100 over shares that are all zero: {dict(shares)}")
    exact = [v * 100.0 / total for v in values]
    floors = [math.floor(x + 1e-9) for x in exact]
    short = 100 - sum(floors)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[:short]:
        floors[i] += 1
    return dict(zip(names, floors))


def limit_change(current: Mapping[str, int], desired: Mapping[str, int], max_change: int,
                 names: Sequence[str]) -> Weights:
    """Move from `current` toward `desired`, changing no target's weight by more than `max_change`.

    The move is scaled as a whole (every target goes the same fraction of its way), then rounded with the
    largest-remainder rule; rounding moves each target by less than 1, and since `max_change` is an integer the
    cap still holds.
    """
    deltas = {n: desired.get(n, 0) - current.get(n, 0) for n in names}
    biggest = max((abs(d) for d in deltas.values()), default=0)
    if biggest <= max_change:
        return {n: int(desired.get(n, 0)) for n in names}
    factor = max_change / biggest
    shares = {n: current.get(n, 0) + factor * deltas[n] for n in names}
    return apportion(shares, names)


def with_floor(weights: Mapping[str, int], keep: str, floor: int, names: Sequence[str]) -> Weights:
    """`weights` with `keep` holding at least `floor`, the difference taken from the others in proportion."""
    if weights.get(keep, 0) >= floor:
        return {n: int(weights.get(n, 0)) for n in names}
    others = [n for n in names if n != keep]
    rest = sum(weights.get(n, 0) for n in others)
    if rest <= 0:
        return {n: (100 if n == keep else 0) for n in names}
    shares: dict[str, float] = {keep: float(floor)}
    for n in others:
        shares[n] = weights.get(n, 0) * (100 - floor) / rest
    out = apportion(shares, names)
    if out[keep] < floor:  # largest remainder may round the kept target down by one
        donor = max(others, key=lambda n: out[n])
        out[donor] -= floor - out[keep]
        out[keep] = floor
    return out


def step_toward(current: Mapping[str, int], desired: Mapping[str, int], max_change: int, keep: str, floor: int,
                names: Sequence[str]) -> Weights:
    """Move from `current` toward `desired`, no target by more than `max_change`, leaving `keep` at least `floor`.

    The floor is applied to the destination before the move is limited: applied after, it took the shortfall from
    targets the limit had already moved by the full `max_change`. When `current` meets the floor both hold (the
    limited move is a convex mix of two weightings that meet it, and rounding never goes below an integer floor).
    When it does not (the floor was raised, or the gateway was edited by hand) the limit wins: `keep` climbs
    toward its floor by at most `max_change` a step.
    """
    return limit_change(current, with_floor(desired, keep, floor, names), max_change, names)


def percentages(raw: Mapping[str, int], names: Sequence[str]) -> Weights | None:
    """The share of traffic a gateway's `raw` weights send to each of `names`, as percentages summing to 100.

    Gateways weigh relatively: LiteLLM's {a: 50, b: 0}, left by a push that failed part-way, sends everything to
    `a`, as {a: 100, b: 0} does. None when the weights send nothing anywhere (the gateway has no config yet).
    """
    if sum(max(0, int(raw.get(n, 0))) for n in names) <= 0:
        return None
    return apportion({n: raw.get(n, 0) for n in names}, names)


def weights_diff(before: Mapping[str, int], after: Mapping[str, int]) -> str:
    """`a 95→75, b 5→25`: what `--dry-run` prints and what reasons quote."""
    names = list(dict.fromkeys([*before, *after]))
    parts = [f"{n} {before.get(n, 0)}→{after.get(n, 0)}" for n in names if before.get(n, 0) != after.get(n, 0)]
    return ", ".join(parts) if parts else "no change"


def format_weights(weights: Mapping[str, int]) -> str:
    return ", ".join(f"{n}={w}" for n, w in weights.items())
