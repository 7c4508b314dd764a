"""What the controller needs from an analysis: one verdict per candidate, per cycle.

The analysis engine (shadowjudge.analysis) decides pass/fail against the route's declared criteria; the controller
only needs this summary, so it depends on this small dataclass and not on the analysis code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

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
        if not isinstance(self.target, str) or not self.target:
            raise InvalidVerdict(f"verdict: target must be a target name, got {self.target!r}")
        where = f"verdict for '{self.target}'"
        for name in ("score", "quality", "cost_per_outcome", "incumbent_cost_per_outcome"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InvalidVerdict(f"{where}: {name} must be a number, got {value!r}")
        if not isinstance(self.critical_alert, bool):
            raise InvalidVerdict(f"{where}: critical_alert must be true or false, got {self.critical_alert!r}")
        if not isinstance(self.verdict, str) or self.verdict not in VERDICT_KINDS:
            raise InvalidVerdict(f"{where}: verdict must be one of {VERDICT_KINDS}, got {self.verdict!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 0:
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
            raise InvalidVerdict(
                f"route '{route.name}': verdict for unknown target '{v.target}' (known: {sorted(known)})")
        if v.target in out:
            raise InvalidVerdict(f"route '{route.name}': two verdicts for '{v.target}'")
        out[v.target] = v
    return out


def verdicts_from_analysis(analysis: Any, critical_targets: Iterable[str] = ()) -> list[CandidateVerdict]:
    """Controller input from a `shadowjudge.analysis.RunAnalysis` (read by attribute; no import of the engine).

    score: the quality metric as a preference: a preference level is used as is; a quality ratio r (candidate
    over incumbent) becomes r / (1 + r), the Bradley-Terry chance that the candidate's answer is the better one,
    so 0.5 still means "as good". quality: the quality effect itself (ratio, or preference level), for
    `policy.quality_floor`. Costs: the cost_per_outcome metric's candidate and incumbent values.
    """
    critical = set(critical_targets)
    out = []
    for c in analysis.candidates:
        quality_metric, cost_metric = c.metric("quality"), c.metric("cost_per_outcome")
        quality = _finite_or_none(getattr(quality_metric, "effect", None))
        score = None
        if quality is not None:
            score = quality if quality_metric.effect_kind == "level" else quality / (1.0 + quality)
            score = min(1.0, max(0.0, score))
        out.append(CandidateVerdict(
            target=c.target, verdict=str(getattr(c.verdict, "value", c.verdict)),  # type: ignore[arg-type]
            score=score, quality=quality,
            cost_per_outcome=_finite_or_none(getattr(cost_metric, "candidate_value", None)),
            incumbent_cost_per_outcome=_finite_or_none(getattr(cost_metric, "incumbent_value", None)),
            n=int(c.n_judged), critical_alert=c.target in critical))
    return out


def apply_golden_gate(verdicts: Iterable[CandidateVerdict], golden: Mapping[str, Mapping[str, Any]]
                      ) -> list[CandidateVerdict]:
    """The verdicts after each candidate's golden report (`GoldenReport.to_dict()` by target name).

    A wrong answer to a golden case fails the candidate with a critical alert: rolled back if it holds traffic.
    Unanswered cases (its requests failed: an outage, no evidence either way) never fail it, but a candidate that
    has not passed every case may not advance on them: a pass is held as inconclusive.
    """
    out = []
    for v in verdicts:
        report = golden.get(v.target) or {}
        if report.get("n_failed"):
            v = replace(v, verdict="fail", critical_alert=True)
        elif report.get("n_unanswered") and v.verdict == "pass":
            v = replace(v, verdict="inconclusive")
        out.append(v)
    return out


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None
