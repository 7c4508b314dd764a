"""Scoring stage: judge every (incumbent, candidate) answer pair of a shadow run and store the judgments."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select, true

from evaluators.base import Evaluator
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, insert_ignoring_duplicates, session_scope

log = logging.getLogger(__name__)


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text a judge sees as the prompt: the last user turn (what the answer responds to)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


@dataclass
class ScoreReport:
    evaluator: str
    judged: int
    already_judged: int
    skipped_errors: int
    unreadable: int = 0  # judged pairs the judge gave no usable score or preference for (stored as None)


def _judged_value(value: float) -> float | None:
    """A judge's value as stored: None where it gave none (NaN: an LLM judge's unreadable reply), which the analysis
    leaves out rather than reading a placeholder as a real, middling score."""
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class _Pair:
    sample_id: int
    target: str
    prompt: str
    incumbent: str
    candidate: str


def _pending_pairs(engine: Engine, run_id: int, candidates: Sequence[str], evaluator: str,
                   sample_range: tuple[int, int] | None = None) -> tuple[list[_Pair], int, int]:
    in_range = ShadowResult.sample_id.between(*sample_range) if sample_range else true()
    with session_scope(engine) as s:
        done = set(s.execute(
            select(Judgment.sample_id, Judgment.target).where(
                Judgment.run_id == run_id, Judgment.evaluator == evaluator,
                Judgment.sample_id.between(*sample_range) if sample_range else true())
        ).all())
        rows = s.execute(
            select(ShadowResult.sample_id, ShadowResult.target, ShadowResult.output_text,
                   TrafficSample.messages, TrafficSample.response_text)
            .join(TrafficSample, TrafficSample.id == ShadowResult.sample_id)
            .where(ShadowResult.run_id == run_id, ShadowResult.attempt == 0, ShadowResult.target.in_(candidates),
                   in_range)
            .order_by(ShadowResult.sample_id, ShadowResult.target)
        ).all()
    pairs, skipped = [], 0
    for sample_id, target, output, messages, incumbent in rows:
        if (sample_id, target) in done:
            continue
        if output is None or incumbent is None:
            skipped += 1
            continue
        pairs.append(_Pair(sample_id, target, prompt_text(messages), incumbent, output))
    return pairs, len(done), skipped


def score_run(engine: Engine, run_id: int, evaluator: Evaluator, candidates: Sequence[str],
              batch_size: int = 64, progress: bool = False, sample_range: tuple[int, int] | None = None) -> ScoreReport:
    """Judge the run's pairs not yet judged by this evaluator version; each batch is committed as it completes.

    `sample_range` (first, last sample id, inclusive) limits the work to one slice of the run, so several workers
    can score one run side by side; the judgments' unique key makes overlapping slices harmless.
    """
    pairs, already, skipped = _pending_pairs(engine, run_id, candidates, evaluator.version, sample_range)
    incumbent_scores: dict[int, float | None] = {}
    unreadable = 0
    with session_scope(engine) as s:
        for sample_id, score in s.execute(
            select(Judgment.sample_id, Judgment.incumbent_score)
            .where(Judgment.run_id == run_id, Judgment.evaluator == evaluator.version)
        ).all():
            if score is not None:
                incumbent_scores[sample_id] = score

    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"judging {len(pairs)} pairs", total=len(pairs))
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            prompts = [p.prompt for p in batch]
            fresh = {p.sample_id: p for p in batch if p.sample_id not in incumbent_scores}
            if fresh:
                scores = evaluator.score([p.prompt for p in fresh.values()], [p.incumbent for p in fresh.values()])
                incumbent_scores.update(zip(fresh, map(_judged_value, scores)))
            cand_scores = evaluator.score(prompts, [p.candidate for p in batch])
            prefs = evaluator.compare(prompts, [p.incumbent for p in batch], [p.candidate for p in batch])
            rows = [
                dict(run_id=run_id, sample_id=p.sample_id, target=p.target, evaluator=evaluator.version,
                     candidate_score=_judged_value(c), incumbent_score=incumbent_scores[p.sample_id],
                     preference=_judged_value(q), details={})
                for p, c, q in zip(batch, cand_scores, prefs)
            ]
            unreadable += sum(r["preference"] is None or r["candidate_score"] is None or r["incumbent_score"] is None
                              for r in rows)
            with session_scope(engine) as s:
                insert_ignoring_duplicates(s, Judgment, rows, ["run_id", "sample_id", "target", "evaluator"])
                run = s.get(ShadowRun, run_id)
                if run is not None:
                    run.judge_version = evaluator.version
            bar.advance(task, len(batch))
    if unreadable:
        log.warning("run %s: the judge %s gave no usable score for %d of %d pairs (stored without one; the analysis "
                    "leaves them out)", run_id, evaluator.version, unreadable, len(pairs))
    return ScoreReport(evaluator.version, len(pairs), already, skipped, unreadable)
