"""SQLAlchemy 2.0 models. The schema is created only by Alembic (migrations/); tests check the two agree.

Every table that a flow writes has a natural unique key, so a rerun upserts instead of duplicating.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StoredString(TypeDecorator[str]):
    """VARCHAR(n) in the schema (Alembic sees plain String); every value bound to it goes through `storable_text`.

    PostgreSQL text cannot hold NUL and psycopg2 refuses it with a ValueError (not a database error), which lost a
    whole batch of results; replacing it at bind time covers every text column, and queries compare alike.
    """

    impl = String
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        """Built once per compiled statement (an import in `process_bind_param` cost 2 us per value, a fifth of an
        ingest batch's INSERT); the impl's own processor, if any, still runs after."""
        from shadowjudge.traffic.records import storable_text  # not at the top: the traffic package imports the store

        inner = super().bind_processor(dialect)

        def process(value: Any) -> Any:
            if isinstance(value, str):
                value = storable_text(value)
            return value if inner is None else inner(value)

        return process


class StoredText(StoredString):
    """TEXT in the schema, bound like StoredString."""

    impl = Text
    cache_ok = True  # SQLAlchemy reads it per class


def as_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime; a naive one is taken to be UTC already (every datetime the store holds is)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE in the schema; values go in as UTC and come back aware UTC on every backend.

    SQLite keeps no zone: it stored an aware datetime's wall time as given (another zone's read back shifted) and
    handed back naive values, so alert payloads and listings said `...T04:40:27` there and `...+00:00` on PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is None:  # naive values are UTC already (SQLite's own, a test's)
            return value
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def render_stored_type(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Alembic's `render_item`: a migration names the plain SQLAlchemy type, never an import of shadowjudge."""
    if kind == "type" and isinstance(obj, (StoredString, UtcDateTime)):
        return f"{autogen_context.opts['sqlalchemy_module_prefix']}{obj.impl_instance!r}"
    return False


def fit_column(column: Any, text: str | None) -> str | None:
    """`text` cut to its StoredString(n) column's length: PostgreSQL refuses a longer value where SQLite keeps it, and
    fails the whole transaction it comes in."""
    length = column.type.length
    return text[:length] if text and length else text


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


Base.metadata.naming_convention = NAMING  # type: ignore[assignment]

# SQLite only autoincrements INTEGER PRIMARY KEY; BigInteger elsewhere.
BigId = BigInteger().with_variant(Integer, "sqlite")


class TrafficSample(Base):
    """A sampled production request, normalised and redacted (raw text never lands here)."""

    __tablename__ = "traffic_samples"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(StoredString(128), unique=True)
    source: Mapped[str] = mapped_column(StoredString(128))
    source_position: Mapped[str] = mapped_column(StoredString(512))
    route: Mapped[str] = mapped_column(StoredString(128))
    incumbent_model: Mapped[str] = mapped_column(StoredString(256))
    messages: Mapped[list[Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    response_text: Mapped[str | None] = mapped_column(StoredText)
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stratum: Mapped[str | None] = mapped_column(StoredString(256))
    redactions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    request_ts: Mapped[datetime] = mapped_column(UtcDateTime())
    ingested_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_traffic_samples_route_request_ts", "route", "request_ts"),
        Index("ix_traffic_samples_ingested_at", "ingested_at"),
    )


class SourceCursor(Base):
    """How far a source has been read; advanced in the same transaction as the samples it covers."""

    __tablename__ = "source_cursors"

    source: Mapped[str] = mapped_column(StoredString(128), primary_key=True)
    position: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


class QuarantinedRecord(Base):
    """Input that could not be used: where it was and why, never its raw text."""

    __tablename__ = "quarantined_records"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(StoredString(128))
    position: Mapped[str] = mapped_column(StoredString(512))
    reason: Mapped[str] = mapped_column(StoredString(1024))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("source", "position"),)


class ShadowRun(Base):
    """One cycle's shadow test of one route. `run_key` is deterministic so a rerun finds it."""

    __tablename__ = "shadow_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_key: Mapped[str] = mapped_column(StoredString(128), unique=True)
    route: Mapped[str] = mapped_column(StoredString(128))
    kind: Mapped[str] = mapped_column(StoredString(32), default="cycle")
    status: Mapped[str] = mapped_column(StoredString(32), default="running")
    config_hash: Mapped[str] = mapped_column(StoredString(64))
    judge_version: Mapped[str | None] = mapped_column(StoredString(256))
    sample_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    mlflow_run_id: Mapped[str | None] = mapped_column(StoredString(64))
    decision: Mapped[str | None] = mapped_column(StoredString(32))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_shadow_runs_route_started_at", "route", "started_at"),)


class ShadowResult(Base):
    """One replayed request against one target (attempt > 0 in consistency mode)."""

    __tablename__ = "shadow_results"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("shadow_runs.id", ondelete="CASCADE"))
    sample_id: Mapped[int] = mapped_column(ForeignKey("traffic_samples.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(StoredString(128))
    model: Mapped[str] = mapped_column(StoredString(256))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    output_text: Mapped[str | None] = mapped_column(StoredText)
    ttft_ms: Mapped[float | None] = mapped_column(Float, doc="time to the first chunk carrying content")
    # As in vLLM's benchmarks: ITL is the mean gap between content chunks (a provider may put several tokens in
    # one chunk), TPOT is (latency - TTFT) / (output tokens - 1), per token whatever the chunking.
    itl_ms: Mapped[float | None] = mapped_column(Float, doc="mean gap between streamed content chunks")
    tpot_ms: Mapped[float | None] = mapped_column(Float, doc="(latency - TTFT) / (output tokens - 1)")
    latency_ms: Mapped[float | None] = mapped_column(Float)
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    error_class: Mapped[str | None] = mapped_column(StoredString(128))
    retries: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    # Drift windows and reports reach results through their samples; without this index SQLite scans the whole
    # table once per sample (22 s a cycle at 6k samples in bench/soak.py).
    __table_args__ = (UniqueConstraint("run_id", "sample_id", "target", "attempt"),
                      Index("ix_shadow_results_sample_id_target", "sample_id", "target"))


class Judgment(Base):
    """An evaluator's verdict on one (incumbent, candidate) pair for one sample."""

    __tablename__ = "judgments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("shadow_runs.id", ondelete="CASCADE"))
    sample_id: Mapped[int] = mapped_column(ForeignKey("traffic_samples.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(StoredString(128))
    evaluator: Mapped[str] = mapped_column(StoredString(256), doc="evaluator version string")
    candidate_score: Mapped[float | None] = mapped_column(Float)
    incumbent_score: Mapped[float | None] = mapped_column(Float)
    preference: Mapped[float | None] = mapped_column(Float, doc="P(candidate better than incumbent)")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("run_id", "sample_id", "target", "evaluator"),
                      Index("ix_judgments_sample_id_evaluator", "sample_id", "evaluator"))


class Alert(Base):
    """A regression or drift finding. `fingerprint` is the cause; one open alert per cause."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(StoredString(128))
    open_key: Mapped[str | None] = mapped_column(
        StoredString(128), unique=True,
        doc="the fingerprint while the alert is unresolved, NULL once resolved: at most one unresolved alert per cause, "
            "enforced by the database even when two cycles raise it at once")
    status: Mapped[str] = mapped_column(StoredString(16), default="open")
    severity: Mapped[str] = mapped_column(StoredString(16))
    kind: Mapped[str] = mapped_column(StoredString(32))
    route: Mapped[str] = mapped_column(StoredString(128))
    target: Mapped[str | None] = mapped_column(StoredString(128))
    metric: Mapped[str] = mapped_column(StoredString(128))
    slice: Mapped[str | None] = mapped_column(StoredString(256))
    effect_size: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    action: Mapped[str | None] = mapped_column(StoredString(256))
    message: Mapped[str] = mapped_column(StoredText)
    bundle: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("shadow_runs.id", ondelete="SET NULL"))
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    delivered: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="sink -> delivery status")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index("ix_alerts_fingerprint_status", "fingerprint", "status"),
        Index("ix_alerts_status_created_at", "status", "created_at"),
    )


class RouteState(Base):
    """Where a route's rollout stands now; the controller steps it one iteration at a time."""

    __tablename__ = "route_state"

    route: Mapped[str] = mapped_column(StoredString(128), primary_key=True)
    weights: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    candidate: Mapped[str | None] = mapped_column(StoredString(128))
    step_index: Mapped[int] = mapped_column(Integer, default=-1)
    step_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    phase: Mapped[str] = mapped_column(StoredString(32), default="idle")
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    approved_step: Mapped[int | None] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    serving: Mapped[str | None] = mapped_column(
        StoredString(128), doc="target that holds the route: the incumbent until a promotion")
    samples_in_step: Mapped[int] = mapped_column(Integer, default=0)
    policy_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="failed candidates, bandit posteriors")
    last_run_id: Mapped[int | None] = mapped_column(Integer, doc="run whose verdicts were applied last: a rerun is a no-op")
    last_outcome: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


class RouteWeightChange(Base):
    """Every weight change pushed (or refused) for a route: before, after, why, and the analysis."""

    __tablename__ = "route_weight_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(StoredString(128))
    revision: Mapped[int] = mapped_column(Integer)
    before: Mapped[dict[str, Any]] = mapped_column(JSON)
    after: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(StoredText)
    status: Mapped[str] = mapped_column(StoredString(32), default="applied")
    decision: Mapped[str] = mapped_column(StoredString(32), default="")
    error: Mapped[str | None] = mapped_column(StoredText, doc="why the gateway refused or failed, secrets removed")
    gateway: Mapped[str] = mapped_column(StoredString(64))
    analysis_link: Mapped[str | None] = mapped_column(StoredString(1024))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("shadow_runs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint("route", "revision"),
        Index("ix_route_weight_history_route_created_at", "route", "created_at"),
    )


class Lock(Base):
    """A lease-based lock row; acquiring is an INSERT that only one writer can win (SQLite and PostgreSQL)."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(StoredString(256), primary_key=True)
    holder: Mapped[str] = mapped_column(StoredString(256))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
