"""The triage bundle every alert carries: what a person needs to act without opening five tools.

The MLflow run link, the worst examples (prompt, incumbent answer, candidate answer, scores; for a regression on
metric `checks`, the answers that fail more checks than the incumbent's, with the checks each side failed), the
slice, the numbers behind the finding and the command that reruns the cycle that found it.

A bundle leaves the system (Slack, PagerDuty, a webhook), so every free text in it goes through the configured
Redactor first, as ingestion's does: the answers of the candidates and of the replayed incumbent are stored as the
models returned them, and a model can echo or make up an e-mail, a phone or a key.
"""

from __future__ import annotations

import shlex
from typing import Any

from sqlalchemy import Engine, select

from shadowjudge.alerts.findings import Finding
from shadowjudge.config import RouteConfig
from shadowjudge.scoring import prompt_text
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, session_scope
from shadowjudge.traffic.redaction import Redactor

TEXT_LIMIT = 1500
# What pasting the reproduce command does: a rerun of the same cycle is idempotent, except for two stages.
REPRODUCE_NOTE = ("reruns this cycle on its stored samples: stored shadow answers, judgments and teacher verdicts are "
                  "reused and its weight step is replayed, not repeated (only a push that failed is retried); it "
                  "still ingests new traffic first and asks the golden cases again (live candidate calls)")
# Where a bundle carries text from traffic or a model, however deep (a finding's details repeat its examples:
# `golden.results`, `drift.details.examples`): prompts, answers, drift examples and a golden case's failures (a JSON
# schema failure quotes the answer's value).
FREE_TEXT_KEYS = frozenset({"prompt", "incumbent_answer", "candidate_answer", "text", "failures"})


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + " [...]"


def _redacted_clip(text: str | None, redactor: Redactor) -> str | None:
    """Redacted, then clipped: a finding the clip cut in two would no longer be recognised (half a card number)."""
    return None if text is None else _clip(redactor.redact(text, {}))


def redact_free_text(value: Any, redactor: Redactor) -> Any:
    """`value` (a bundle, or a part of one) with everything under a FREE_TEXT_KEYS key redacted; the rest (ids,
    labels, numbers, the source keys deduplication compares) is kept as it is."""
    if isinstance(value, dict):
        return {key: redactor.redact_value(item, {}) if key in FREE_TEXT_KEYS else redact_free_text(item, redactor)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact_free_text(item, redactor) for item in value]
    return value


def worst_examples(engine: Engine, run_id: int, route: RouteConfig, target: str, sample_ids: list[int],
                   evaluator: str | None, limit: int, redactor: Redactor,
                   example_fields: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The given samples (worst first) with both answers and the judge's scores, texts redacted and clipped, and
    what `example_fields` holds for each (a `checks` finding: the checks each side failed)."""
    ids = sample_ids[:limit]
    if not ids:
        return []
    with session_scope(engine) as s:
        samples = {r.id: r for r in s.execute(
            select(TrafficSample.id, TrafficSample.request_id, TrafficSample.messages, TrafficSample.response_text,
                   TrafficSample.meta).where(TrafficSample.id.in_(ids))).all()}
        answers = {(r.sample_id, r.target): r for r in s.execute(
            select(ShadowResult.sample_id, ShadowResult.target, ShadowResult.output_text, ShadowResult.error_class)
            .where(ShadowResult.run_id == run_id, ShadowResult.attempt == 0, ShadowResult.sample_id.in_(ids),
                   ShadowResult.target.in_([target, route.incumbent.name]))).all()}
        scores = {r.sample_id: r for r in s.execute(
            select(Judgment.sample_id, Judgment.candidate_score, Judgment.incumbent_score, Judgment.preference)
            .where(Judgment.run_id == run_id, Judgment.target == target, Judgment.sample_id.in_(ids),
                   Judgment.evaluator == (evaluator or ""))).all()}
    examples = []
    for sid in ids:
        sample = samples.get(sid)
        if sample is None:
            continue
        replayed = answers.get((sid, route.incumbent.name))
        cand = answers.get((sid, target))
        judged = scores.get(sid)
        examples.append({
            "sample_id": sid,
            "request_id": sample.request_id,
            "slice": (sample.meta or {}).get(route.slice_key) if route.slice_key else None,
            "prompt": _redacted_clip(prompt_text(sample.messages), redactor),
            "incumbent_answer": _redacted_clip(replayed.output_text if replayed is not None else sample.response_text,
                                               redactor),
            "candidate_answer": _redacted_clip(cand.output_text if cand is not None else None, redactor),
            "candidate_error": cand.error_class if cand is not None else None,
            "candidate_score": judged.candidate_score if judged else None,
            "incumbent_score": judged.incumbent_score if judged else None,
            "preference": judged.preference if judged else None,
            **(example_fields or {}).get(sid, {}),
        })
    return examples


def reproduce_command(route: str, config_path: str | None, cycle_id: str) -> str:
    """The command that reruns this cycle; without --cycle-id `run` starts a new one (fresh samples, paid calls), or
    resumes the route's newest run if that one failed."""
    return (f"shadowjudge run --config {shlex.quote(config_path or 'CONFIG.yaml')} --route {shlex.quote(route)} "
            f"--cycle-id {shlex.quote(cycle_id)}")


def cycle_of(engine: Engine, route: str, run_id: int | None) -> tuple[str | None, str | None]:
    """The run key of a stored run and the cycle id it was opened for: a cycle's run key is '<route>:<cycle id>', so
    `run --cycle-id` finds this very run again (None for a run no cycle opened)."""
    if run_id is None:
        return None, None
    with session_scope(engine) as s:
        run_key = s.scalar(select(ShadowRun.run_key).where(ShadowRun.id == run_id))
    prefix = f"{route}:"
    return run_key, run_key[len(prefix):] if run_key and run_key.startswith(prefix) else None


def build_bundle(engine: Engine, finding: Finding, route: RouteConfig, run_link: str | None,
                 config_path: str | None, max_examples: int, redactor: Redactor) -> dict[str, Any]:
    """The finding's triage bundle, its free texts redacted by `redactor` (the configured one: `redaction`)."""
    details = redact_free_text(finding.details, redactor)
    examples: list[dict[str, Any]] = []
    if finding.kind == "regression" and finding.run_id is not None and finding.target:
        examples = worst_examples(engine, finding.run_id, route, finding.target, finding.sample_ids,
                                  details.get("evaluator"), max_examples, redactor, finding.example_fields)
    elif finding.kind == "drift":
        examples = list((details.get("drift") or {}).get("details", {}).get("examples") or [])[:max_examples]
    elif finding.kind == "golden":
        golden = details.get("golden", {})
        unanswered = finding.metric == "golden_unanswered"  # else the wrong answers (stored results may predate it)
        examples = [r for r in golden.get("results", [])
                    if not r.get("passed") and bool(r.get("unanswered")) == unanswered][:max_examples]
    run_key, cycle_id = cycle_of(engine, route.name, finding.run_id)
    return {
        "source_key": finding.source_key,
        "run_id": finding.run_id,
        "run_key": run_key,
        "cycle_id": cycle_id,
        "run_link": run_link,
        "slice": finding.slice,
        "examples": examples,
        # no cycle (a finding raised outside one): nothing to rerun, and a `run` without --cycle-id is a new cycle
        "reproduce": reproduce_command(route.name, config_path, cycle_id) if cycle_id else None,
        "reproduce_note": REPRODUCE_NOTE if cycle_id else None,
        **details,
    }
