"""What the controller needs from an analysis: one verdict per candidate, per cycle.

The analysis engine (shadowjudge.analysis) decides pass/fail against the route's declared criteria; the controller
only needs this summary, so it depends on this small dataclass and not on the analysis code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from shadowjudge.config import RouteConfig
from shadowjudge.errors import InputError

VerdictKind = Literal["pass", "marginal", "fail", "inconclusive"]
VERDICT_KINDS: tuple[str, ...] = ("pass", "marginal", "fail", "inconclusive")


class InvalidVerdict(InputError):
    """A verdict the controller cannot act on; the message names the target and the field."""


@dataclass(frozen=True)
class CandidateVerdict:
    """One candidate's analysis in one cycle.

    score: mean judge preference for the candidate over the incumbent, in [0, 1] (0.5 = as good); the bandit's
      evidence. quality: the analysis' quality measure, compared with `policy.quality_floor` by the cost-aware
      policy. cost_per_outcome / incumbent_cost_per_outcome: USD per accepted answer, for the cost-aware policy.
    n: samples this verdict rests on (counted toward `policy.min_samples_per_step`).
    critical_alert: a critical alert is open for this candidate: roll it back whatever the verdict says.
    """

    target: str
    verdict: VerdictKind
    score: float | None = None
    quality: float | None = None
    cost_per_outcome: float | None = None
    n: int = 0
    critical_alert: bool = False
    incumbent_cost_per_outcome: float | None = None

    def __post_init__(self) -> None:
        where = f"verdict for '{self.target}'"
        if self.verdict not in VERDICT_KINDS:
            raise InvalidVerdict(f"{where}: verdict must be one of {VERDICT_KINDS}, got {self.verdict!r}")
        if not isinstance(self.n, int) or self.n < 0:
            raise InvalidVerdict(f"{where}: n must be a non-negative integer, got {self.n!r}")
        if self.score is not None and not (math.isfinite(self.score) and 0.0 <= self.score <= 1.0):
            raise InvalidVerdict(f"{where}: score must be in [0, 1], got {self.score!r}")
        for name in ("quality", "cost_per_outcome", "incumbent_cost_per_outcome"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidVerdict(f"{where}: {name} must be a finite non-negative number, got {value!r}")

    @property
    def rolls_back(self) -> bool:
        return self.verdict == "fail" or self.critical_alert


def index_verdicts(route: RouteConfig, verdicts: Iterable[CandidateVerdict] | Mapping[str, CandidateVerdict]
                   ) -> dict[str, CandidateVerdict]:
    """Verdicts by candidate name; refuses verdicts for targets the route does not have, and duplicates."""
    items = list(verdicts.values()) if isinstance(verdicts, Mapping) else list(verdicts)
    known = {c.name for c in route.candidates} | {route.incumbent.name}
    out: dict[str, CandidateVerdict] = {}
    for v in items:
        if not isinstance(v, CandidateVerdict):
            raise InvalidVerdict(f"route '{route.name}': expected CandidateVerdict, got {type(v).__name__}")
        if v.target not in known:
            raise InvalidVerdict(f"route '{route.name}': verdict for unknown target '{v.target}' (known: {sorted(known)})")
        if v.target in out:
            raise InvalidVerdict(f"route '{route.name}': two verdicts for '{v.target}'")
        out[v.target] = v
    return out
