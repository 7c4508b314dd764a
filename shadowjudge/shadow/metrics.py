"""Latency percentiles and cost per outcome: the numbers a shadow run is judged on besides quality."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from shadowjudge.config import Price

PERCENTILES = (50, 75, 90, 95, 99)


def latency_percentiles(values: Iterable[float | None]) -> dict[str, float | None]:
    """P50/P75/P90/P95/P99, mean and count of the non-missing values (linear interpolation); None when empty."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None, "count": 0}
    points = np.percentile(data, PERCENTILES)
    return {**{f"p{p}": float(v) for p, v in zip(PERCENTILES, points)}, "mean": float(data.mean()),
            "count": int(data.size)}


def request_cost(price: Price, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
    """USD for one request; cached input tokens at the cached price when the provider has one."""
    cached = min(max(cached_input_tokens, 0), input_tokens)
    cached_price = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    return ((input_tokens - cached) * price.input_per_mtok + cached * cached_price
            + output_tokens * price.output_per_mtok) / 1_000_000


def cost_per_request(costs: Sequence[float | None], cache_hits: Sequence[bool] | None = None) -> float | None:
    """Mean model cost of the requests whose cost is known; a gateway cache hit costs nothing.

    An unknown cost (a target without a price when the request ran) is left out, not counted as free: None when no
    cost is known, the mean of the known ones when pricing was added part way through a run.
    """
    known = [cost for cost, _ in _known_costs(costs, cache_hits)]
    return sum(known) / len(known) if known else None


def cost_per_accepted_answer(costs: Sequence[float | None], scores: Sequence[float | None], floor: float,
                             cache_hits: Sequence[bool] | None = None) -> float | None:
    """Total model cost divided by the answers scoring at least `floor`, over the requests whose cost is known.

    Failed or rejected answers still cost what they cost, which is the point: a cheap model that is often
    rejected can cost more per useful answer. Requests of unknown cost are left out on both sides of the ratio, as
    the analysis does. None when no answer of known cost was accepted.
    """
    if len(scores) != len(costs):
        raise ValueError("costs, scores and cache_hits must have the same length")
    known = _known_costs(costs, cache_hits)
    accepted = sum(1 for _, i in known if scores[i] is not None and scores[i] >= floor)
    if accepted == 0:
        return None
    return sum(cost for cost, _ in known) / accepted


def total_spend(costs: Iterable[float | None]) -> float | None:
    """What the requests (or targets) cost together; None when any part is unknown: a sum with a part left out is
    not the total, and an unknown cost is not $0."""
    total = 0.0
    for cost in costs:
        if cost is None:
            return None
        total += cost
    return total


def _known_costs(costs: Sequence[float | None],
                 cache_hits: Sequence[bool] | None) -> list[tuple[float, int]]:
    """(cost, index) of each request whose cost is known: a cache hit's is 0, an unpriced request's is not known."""
    hits = cache_hits if cache_hits is not None else [False] * len(costs)
    if len(hits) != len(costs):
        raise ValueError("costs and cache_hits must have the same length")
    return [(0.0 if hit else float(cost), i) for i, (cost, hit) in enumerate(zip(costs, hits))
            if hit or cost is not None]
