"""What the canary analysis reads from the store for one shadow run, in plain per-sample records.

The incumbent's numbers come from its own replay in the run when its endpoint was configured (a shadow result with
target == route.incumbent.name), so both sides are measured under the same conditions; otherwise from what the
gateway logged for the sampled request (traffic_samples: latency, TTFT, cost, answer). A logged answer the gateway
served from its cache is marked (`cache_hit`), for the analysis to leave out of the speed and price comparisons, and a
logged TTFT that is not one (a request that was not streamed) is dropped here (`logged_ttft_ms`); the store keeps
what the gateway logged.
On a route that declares checks (routes[].checks) every answer, the candidates' and the incumbent's from the same
source, is run through them here: deterministic and free, so the analysis computes them from the stored answers and
the same stored data gives the same analysis.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from evaluators.checks import run_checks
from shadowjudge.config import RouteConfig, incumbent_served
from shadowjudge.errors import ShadowJudgeError
from shadowjudge.scoring import prompt_text
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, session_scope
from shadowjudge.traffic.records import RecordError, parse_flag
from shadowjudge.traffic.redaction import Redactor

MISSING_SLICE = "(none)"


class AnalysisError(ShadowJudgeError):
    """The run cannot be analysed as asked (unknown run, wrong route); the message says which."""


@dataclass(frozen=True)
class TargetRecord:
    """One target's answer to one sample (attempt 0)."""

    sample_id: int
    error: bool
    latency_ms: float | None
    ttft_ms: float | None
    cost_usd: float | None
    output_chars: int | None = None  # length of the answer, for the length-controlled quality comparison
    # Names of the route's checks the answer fails, in declared order (empty: passes them all); None when the
    # route declares no checks or there is no answer to check.
    failed_checks: tuple[str, ...] | None = None
    cache_hit: bool = False  # a logged answer the gateway served from its cache: no measure of the model's speed


def stream_requested(params: Any) -> bool | None:
    """What the logged request body said of `stream`, as a boolean or as the text some gateways log ("true",
    "false"); None where it says nothing usable (many logs keep no `stream` key)."""
    value = params.get("stream") if isinstance(params, dict) else None
    if value is None or value == "":
        return None
    try:
        return parse_flag(value, "stream")
    except RecordError:
        return None


def logged_ttft_ms(ttft_ms: float | None, latency_ms: float | None, params: Any) -> float | None:
    """A logged time to first token, or None where the log holds none. A request that was not streamed has no first
    token before its whole answer, and LiteLLM sets completionStartTime = endTime for one, so its "TTFT" is its
    latency: compared with a streamed replay's, it reads as a slow incumbent. Where the request does not say whether
    it streamed, a first token at or after its end is taken for that fallback; one that said `stream: true` keeps
    its TTFT, which for a one-chunk answer logged in whole milliseconds can equal its latency."""
    streamed = stream_requested(params)
    if ttft_ms is None or streamed is False:
        return None
    if streamed is None and latency_ms is not None and ttft_ms >= latency_ms:
        return None
    return ttft_ms


@dataclass(frozen=True)
class PairJudgment:
    sample_id: int
    candidate_score: float | None
    incumbent_score: float | None
    preference: float | None


@dataclass
class RunData:
    run_id: int
    route: str
    evaluator: str | None
    incumbent_source: str  # "replay" or "logs"
    incumbent: dict[int, TargetRecord]
    candidates: dict[str, dict[int, TargetRecord]]
    judgments: dict[str, dict[int, PairJudgment]]
    slices: dict[int, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    check_names: tuple[str, ...] = ()  # the route's checks, in declared order; empty: no `checks` metric


def _chars(text: str | None) -> int | None:
    return None if text is None else len(text)


def _pick_evaluator(session, run: ShadowRun, requested: str | None) -> str | None:
    """The requested version, else the run's judge, else the version that judged most of the run's pairs."""
    if requested:
        return requested
    if run.judge_version:
        return run.judge_version
    counts = Counter(session.scalars(select(Judgment.evaluator).where(Judgment.run_id == run.id)))
    return counts.most_common(1)[0][0] if counts else None


def load_run_data(engine: Engine, run_id: int, route: RouteConfig, evaluator_version: str | None = None,
                  redactor: Redactor | None = None) -> RunData:
    """What the analysis of a run reads. `redactor` (ingestion's) redacts replayed answers before the route's checks
    see them: logged answers were redacted at ingestion, and a check comparing redacted text with raw text (a
    forbidden e-mail pattern, JSON a card number's placeholder broke) would fail one side for the redaction alone."""
    with session_scope(engine) as s:
        run = s.get(ShadowRun, run_id)
        if run is None:
            raise AnalysisError(f"shadow run {run_id} does not exist")
        if run.route != route.name:
            raise AnalysisError(f"shadow run {run_id} belongs to route '{run.route}', not '{route.name}'")
        evaluator = _pick_evaluator(s, run, evaluator_version)
        checks = route.build_checks() if route.checks else []
        results = s.execute(
            select(ShadowResult.sample_id, ShadowResult.target, ShadowResult.model, ShadowResult.output_text,
                   ShadowResult.error_class, ShadowResult.latency_ms, ShadowResult.ttft_ms, ShadowResult.cost_usd)
            .where(ShadowResult.run_id == run_id, ShadowResult.attempt == 0)
            .order_by(ShadowResult.sample_id, ShadowResult.target)
        ).all()
        sample_ids = set(run.sample_ids or []) | {r.sample_id for r in results}
        samples = s.execute(
            select(TrafficSample.id, TrafficSample.meta, TrafficSample.response_text, TrafficSample.latency_ms,
                   TrafficSample.ttft_ms, TrafficSample.cost_usd, TrafficSample.incumbent_model,
                   TrafficSample.cache_hit, TrafficSample.params)
            .where(TrafficSample.id.in_(sample_ids)).order_by(TrafficSample.id)
        ).all() if sample_ids else []
        judgments = s.execute(
            select(Judgment.sample_id, Judgment.target, Judgment.candidate_score, Judgment.incumbent_score,
                   Judgment.preference)
            .where(Judgment.run_id == run_id, Judgment.evaluator == evaluator)
            .order_by(Judgment.sample_id, Judgment.target)
        ).all() if evaluator else []
        # The prompts only where a check may read them: a route without checks loads what it always did.
        prompts = dict(s.execute(
            select(TrafficSample.id, TrafficSample.messages).where(TrafficSample.id.in_(sample_ids))
        ).all()) if checks and sample_ids else {}

    # Samples a candidate served (in a run opened before open_run passed them over) are no evidence of the incumbent.
    logged = [(t.id, t.incumbent_model) for t in samples]
    by_candidate = {sample_id for sample_id, _ in logged} - set(incumbent_served(route, logged))
    samples = [t for t in samples if t.id not in by_candidate]
    results = [r for r in results if r.sample_id not in by_candidate]
    judgments = [j for j in judgments if j.sample_id not in by_candidate]

    candidate_names = {c.name for c in route.candidates}
    candidates: dict[str, dict[int, TargetRecord]] = {c.name: {} for c in route.candidates}
    replayed_incumbent: dict[int, TargetRecord] = {}
    models = {c.name: c.model for c in route.candidates} | {route.incumbent.name: route.incumbent.model}
    def failed(sample_id: int, answer: str | None, error: bool, replayed: bool) -> tuple[str, ...] | None:
        """The checks the answer fails; None without checks or an answer. A replay is redacted first, as ingestion
        redacted the logged answers."""
        if not checks or error or answer is None:
            return None
        if replayed and redactor is not None:
            answer = redactor.redact(answer, {})
        prompt = prompt_text(prompts.get(sample_id) or [])
        return tuple(r.name for r in run_checks(checks, [prompt], [answer])[0] if not r.passed)

    for r in results:
        error = r.error_class is not None or r.output_text is None
        record = TargetRecord(r.sample_id, error, r.latency_ms, r.ttft_ms, r.cost_usd, _chars(r.output_text),
                              failed(r.sample_id, r.output_text, error, replayed=True))
        if r.target == route.incumbent.name:
            replayed_incumbent[r.sample_id] = record
        elif r.target in candidate_names:
            candidates[r.target][r.sample_id] = record
        models[r.target] = r.model

    if replayed_incumbent:
        incumbent, source = replayed_incumbent, "replay"
    else:
        # A logged request without an answer is counted as the incumbent's error.
        incumbent = {t.id: TargetRecord(t.id, t.response_text is None, t.latency_ms,
                                        logged_ttft_ms(t.ttft_ms, t.latency_ms, t.params), t.cost_usd,
                                        _chars(t.response_text),
                                        failed(t.id, t.response_text, t.response_text is None, replayed=False),
                                        cache_hit=bool(t.cache_hit))
                     for t in samples}
        source = "logs"

    slices: dict[int, str] = {}
    if route.slice_key:
        for t in samples:
            value = (t.meta or {}).get(route.slice_key)
            slices[t.id] = MISSING_SLICE if value is None or value == "" else str(value)

    pairs: dict[str, dict[int, PairJudgment]] = {name: {} for name in candidates}
    for j in judgments:
        if j.target in pairs:
            pairs[j.target][j.sample_id] = PairJudgment(j.sample_id, j.candidate_score, j.incumbent_score,
                                                        j.preference)
    return RunData(run_id, route.name, evaluator, source, incumbent, candidates, pairs, slices, models,
                   tuple(c.name for c in checks))
