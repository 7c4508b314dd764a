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
    """Mean model cost per request; a gateway cache hit costs nothing, an unknown cost counts as zero."""
    if not costs:
        return None
    return _total_cost(costs, cache_hits) / len(costs)


def cost_per_accepted_answer(costs: Sequence[float | None], scores: Sequence[float | None], floor: float,
                             cache_hits: Sequence[bool] | None = None) -> float | None:
    """Total model cost divided by the answers scoring at least `floor`.

    Failed or rejected answers still cost what they cost, which is the point: a cheap model that is often
    rejected can cost more per useful answer. None when no answer was accepted.
    """
    if len(scores) != len(costs) or (cache_hits is not None and len(cache_hits) != len(costs)):
        raise ValueError("costs, scores and cache_hits must have the same length")
    accepted = sum(1 for s in scores if s is not None and s >= floor)
    if accepted == 0:
        return None
    return _total_cost(costs, cache_hits) / accepted


def _total_cost(costs: Sequence[float | None], cache_hits: Sequence[bool] | None) -> float:
    hits = cache_hits if cache_hits is not None else [False] * len(costs)
    if len(hits) != len(costs):
        raise ValueError("costs and cache_hits must have the same length")
    return float(sum(c or 0.0 for c, hit in zip(costs, hits) if not hit))
