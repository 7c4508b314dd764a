"""The evaluation cycle's stages as plain functions; flows/cycle.py only wires them together.

Every stage reads what the previous one stored and writes its own output idempotently, so a cycle rerun with
the same `cycle_id` (after a crash, or on purpose) finishes the work without duplicating a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, func, select

from shadowjudge.config import Config, RouteConfig
from shadowjudge.store import (
    Judgment,
    RouteWeightChange,
    ShadowResult,
    ShadowRun,
    TrafficSample,
    session_scope,
)
from shadowjudge.store.models import utcnow


def default_cycle_id(now: datetime | None = None) -> str:
    """Cycles are keyed by their (scheduled) minute, so a retry of the same schedule slot is the same cycle."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%MZ")


@dataclass
class RunHandle:
    run_id: int
    run_key: str
    sample_ids: list[int]
    resumed: bool


def open_run(engine: Engine, config: Config, route: RouteConfig, cycle_id: str) -> RunHandle:
    """Find or create the cycle's run and fix its sample set: samples of the route newer than the last finished run's."""
    run_key = f"{route.name}:{cycle_id}"
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == run_key))
        if run is not None:
            return RunHandle(run.id, run_key, list(run.sample_ids), resumed=True)
        last = s.scalar(
            select(ShadowRun).where(ShadowRun.route == route.name, ShadowRun.status == "finished", ShadowRun.kind == "cycle")
            .order_by(ShadowRun.id.desc()).limit(1)
        )
        watermark = int(last.summary.get("max_sample_id", 0)) if last is not None else 0
        query = (select(TrafficSample.id).where(TrafficSample.route == route.name, TrafficSample.id > watermark)
                 .order_by(TrafficSample.id))
        if config.shadow.max_samples:
            query = query.limit(config.shadow.max_samples)
        sample_ids = list(s.scalars(query))
        run = ShadowRun(run_key=run_key, route=route.name, kind="cycle", status="running",
                        config_hash=config.fingerprint(), sample_ids=sample_ids,
                        summary={"max_sample_id": max(sample_ids, default=watermark), "cycle_id": cycle_id})
        s.add(run)
        s.flush()
        return RunHandle(run.id, run_key, sample_ids, resumed=False)


def load_samples(engine: Engine, sample_ids: list[int]) -> list[TrafficSample]:
    with session_scope(engine) as s:
        rows = list(s.scalars(select(TrafficSample).where(TrafficSample.id.in_(sample_ids)).order_by(TrafficSample.id)))
        s.expunge_all()
    return rows


def route_targets(route: RouteConfig) -> list:
    """The incumbent is replayed too, so its latency and cost are measured under the same conditions."""
    return [route.incumbent, *route.candidates]


def finish_run(engine: Engine, run_id: int, decision: str, summary: dict[str, Any],
               mlflow_run_id: str | None = None) -> None:
    with session_scope(engine) as s:
        run = s.get(ShadowRun, run_id)
        run.status = "finished"
        run.decision = decision
        run.summary = {**run.summary, **summary}
        if mlflow_run_id:
            run.mlflow_run_id = mlflow_run_id
        run.finished_at = utcnow()


def already_routed(engine: Engine, route: str, run_id: int) -> RouteWeightChange | None:
    """The weight change this run already made, so a rerun never steps the ladder twice."""
    with session_scope(engine) as s:
        change = s.scalar(select(RouteWeightChange).where(RouteWeightChange.route == route,
                                                          RouteWeightChange.run_id == run_id).limit(1))
        if change is not None:
            s.expunge(change)
        return change


def samples_table(engine: Engine, run_id: int, evaluator: str | None, limit: int = 2000) -> dict[str, list[Any]]:
    """The per-sample table logged to MLflow: prompt, both answers, scores and latency, one row per pair."""
    from shadowjudge.scoring import prompt_text

    with session_scope(engine) as s:
        q = (select(TrafficSample.request_id, TrafficSample.messages, TrafficSample.response_text,
                    TrafficSample.meta, ShadowResult.target, ShadowResult.output_text, ShadowResult.ttft_ms,
                    ShadowResult.latency_ms, ShadowResult.cost_usd, ShadowResult.error_class,
                    Judgment.candidate_score, Judgment.incumbent_score, Judgment.preference)
             .join(TrafficSample, TrafficSample.id == ShadowResult.sample_id)
             .outerjoin(Judgment, (Judgment.run_id == ShadowResult.run_id) & (Judgment.sample_id == ShadowResult.sample_id)
                        & (Judgment.target == ShadowResult.target) & (Judgment.evaluator == (evaluator or "")))
             .where(ShadowResult.run_id == run_id, ShadowResult.attempt == 0)
             .order_by(ShadowResult.sample_id, ShadowResult.target).limit(limit))
        rows = s.execute(q).all()
    cols: dict[str, list[Any]] = {k: [] for k in (
        "request_id", "target", "slice", "prompt", "incumbent_answer", "candidate_answer", "candidate_score",
        "incumbent_score", "preference", "ttft_ms", "latency_ms", "cost_usd", "error")}
    for r in rows:
        cols["request_id"].append(r.request_id)
        cols["target"].append(r.target)
        cols["slice"].append(str(r.meta.get("task", "")) if isinstance(r.meta, dict) else "")
        cols["prompt"].append(prompt_text(r.messages)[:2000])
        cols["incumbent_answer"].append((r.response_text or "")[:4000])
        cols["candidate_answer"].append((r.output_text or "")[:4000])
        cols["candidate_score"].append(r.candidate_score)
        cols["incumbent_score"].append(r.incumbent_score)
        cols["preference"].append(r.preference)
        cols["ttft_ms"].append(r.ttft_ms)
        cols["latency_ms"].append(r.latency_ms)
        cols["cost_usd"].append(r.cost_usd)
        cols["error"].append(r.error_class)
    return cols


def count_rows(engine: Engine) -> dict[str, int]:
    """Row counts per table: what `status` shows and what idempotency tests compare."""
    from shadowjudge.store import Alert, QuarantinedRecord

    out = {}
    with session_scope(engine) as s:
        for model in (TrafficSample, QuarantinedRecord, ShadowRun, ShadowResult, Judgment, Alert, RouteWeightChange):
            out[model.__tablename__] = s.scalar(select(func.count()).select_from(model)) or 0
    return out


# --- stages the flow calls: each takes the engine and config, returns JSON-friendly data ---

def ingest(engine: Engine, config: Config, progress: bool = False) -> dict[str, Any]:
    from shadowjudge.traffic import ingest_sources

    return ingest_sources(engine, config, progress=progress).to_dict()


def shadow(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, progress: bool = False) -> dict[str, Any]:
    from shadowjudge.shadow import run_shadow

    samples = load_samples(engine, handle.sample_ids)
    report = run_shadow(engine, handle.run_id, samples, route_targets(route), config.shadow, config.pricing,
                        progress=progress)
    return report.to_dict()


def score(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, progress: bool = False) -> dict[str, Any]:
    from dataclasses import asdict

    from evaluators import load_evaluator
    from shadowjudge.scoring import score_run

    evaluator = load_evaluator(config.judge, config.mlflow.tracking_uri)
    report = score_run(engine, handle.run_id, evaluator, [c.name for c in route.candidates],
                       batch_size=config.judge.batch_size, progress=progress)
    return asdict(report)
