"""Ingestion: read every configured source from its cursor, sample, redact, store.

Each batch is one transaction holding its new samples, its quarantined records and the source's cursor just
past the batch, so a run killed at any point resumes exactly where the last committed batch ended: nothing
lost, nothing stored twice (request ids are unique besides). A backfill (`since`/`until`) reads each source
from its beginning, keeps only requests inside the window and leaves the live cursor where it was.

One ingest writes to a store at a time (a lease in the store, `INGEST_LOCK`); another waits for it. The daily cap
and stratum quotas count what is stored, so two ingests interleaving their batches each admitted up to the cap;
and a cycle picks the samples above the last run's highest id, so ids must commit in order. Each batch renews the
lease in its own transaction, so an ingest that lost it (paused past it, taken over) stops before that batch commits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Engine, String, bindparam, select, type_coerce
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from shadowjudge.config import Config, SourceConfig
from shadowjudge.errors import ShadowJudgeError
from shadowjudge.store import Lock, QuarantinedRecord, SourceCursor, TrafficSample, session_scope
from shadowjudge.store.lease import LeaseLock
from shadowjudge.store.models import utcnow
from shadowjudge.traffic.records import Rejected, SourceRead, SourceUnavailable, TrafficRecord, storable_text
from shadowjudge.traffic.redaction import Redactor
from shadowjudge.traffic.sampling import DailyBudget, Sampler
from shadowjudge.traffic.source import TimeWindow, TrafficSource, open_source

log = logging.getLogger(__name__)
# A source that cannot be read: logged for flows, whose report no one prints; `traffic ingest` prints the error
# itself at the end and quiets this logger, so the message is not shown twice.
source_errors_log = logging.getLogger(f"{__name__}.sources")

MAX_POSITION = 512
MAX_REASON = 1024


@dataclass
class SourceReport:
    """What one source's ingestion did. read = stored + duplicates + quarantined + filtered."""

    source: str
    kind: str
    backfill: bool = False
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    filtered: int = 0
    filtered_by: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    cursor: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "kind": self.kind, "backfill": self.backfill, "read": self.read,
            "stored": self.stored, "duplicates": self.duplicates, "quarantined": self.quarantined,
            "filtered": self.filtered, "filtered_by": dict(self.filtered_by), "redactions": dict(self.redactions),
            "batches": self.batches, "cursor": self.cursor, "error": self.error,
        }


@dataclass
class IngestReport:
    sources: list[SourceReport]
    since: datetime | None = None
    until: datetime | None = None

    @property
    def ok(self) -> bool:
        """False if any source could not be read (its error says why); the others were still ingested."""
        return all(s.error is None for s in self.sources)

    @property
    def totals(self) -> dict[str, Any]:
        redactions: Counter[str] = Counter()
        filtered_by: Counter[str] = Counter()
        for s in self.sources:
            redactions.update(s.redactions)
            filtered_by.update(s.filtered_by)
        total: dict[str, Any] = {k: sum(getattr(s, k) for s in self.sources)
                                 for k in ("read", "stored", "duplicates", "quarantined", "filtered")}
        total["filtered_by"] = dict(filtered_by)
        total["redactions"] = dict(redactions)
        total["errors"] = sum(s.error is not None for s in self.sources)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": {"since": self.since.isoformat() if self.since else None,
                       "until": self.until.isoformat() if self.until else None},
            "sources": [s.to_dict() for s in self.sources],
            "totals": self.totals,
        }


ProgressCallback = Callable[[SourceReport], None]


def ingest_sources(engine: Engine, config: Config, *, since: datetime | None = None,
                   until: datetime | None = None, progress: bool = False, wait_s: float = 900.0) -> IngestReport:
    """Ingest every configured source into the store; with since/until, backfill that window instead.

    A source that cannot be read (missing path, unreachable database) gets an `error` in its report and the
    others go on; anything else (e.g. the store failing) raises, after the batches already committed.
    """
    window = TimeWindow(since, until)
    redactor = Redactor.from_config(config.redaction)
    sampler = Sampler(config.sampling, redactor)
    budget = DailyBudget()
    sources = [(c, open_source(c)) for c in config.sources]  # a misconfigured source fails before any work
    reports: list[SourceReport] = []
    with ingest_lease(engine, wait_s) as lease, _progress_display(progress) as show:
        for source_config, source in sources:
            reports.append(ingest_source(engine, source_config, source, sampler, redactor, budget, window, show,
                                         lease=lease))
    return IngestReport(reports, since, until)


INGEST_LOCK = "ingest"
INGEST_LEASE_S = 600.0


class IngestBusy(ShadowJudgeError):
    """Another ingest held the store's ingest lease for longer than this one would wait."""


class IngestLeaseLost(IngestBusy):
    """This ingest's lease ran out and another ingest took it over: this one stopped before writing beside it."""


@contextlib.contextmanager
def ingest_lease(engine: Engine, wait_s: float) -> Iterator[LeaseLock]:
    """Hold the store's ingest lease, waiting up to `wait_s` for another ingest to finish (a holder that died on
    this host is taken over at once, one elsewhere when its lease expires)."""
    lease = LeaseLock(engine, INGEST_LOCK, ttl_s=INGEST_LEASE_S)
    deadline = time.monotonic() + wait_s
    while not lease.acquire():
        if time.monotonic() >= deadline:
            holder = lease.current_holder()
            who = f"{holder[0]} (lease until {holder[1].isoformat()})" if holder else "another ingest"
            raise IngestBusy(f"another ingest is writing to this store: {who}; waited {wait_s:g} s")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    try:
        yield lease
    finally:
        lease.release()


def ingest_source(engine: Engine, source_config: SourceConfig, source: TrafficSource, sampler: Sampler,
                  redactor: Redactor, budget: DailyBudget, window: TimeWindow,
                  on_batch: ProgressCallback | None = None, *, lease: LeaseLock | None = None) -> SourceReport:
    """Ingest one source batch by batch (see the module docstring for the guarantees); with the ingest `lease`,
    each batch renews it in its own transaction and is not committed once the lease is lost (IngestLeaseLost)."""
    report = SourceReport(source_config.name, source_config.kind, backfill=window.is_backfill)
    batch: list[SourceRead] = []
    try:
        cursor = None if window.is_backfill else load_cursor(engine, source_config.name)
        report.cursor = cursor  # where this run starts: still the cursor when it reads nothing new
        for step in source.read(cursor, window):
            batch.append(step)
            if len(batch) >= source_config.batch_size:
                _store_batch(engine, source_config.name, batch, sampler, redactor, budget, window, report, lease)
                batch = []
                if on_batch:
                    on_batch(report)
    except SourceUnavailable as exc:
        report.error = str(exc)
        source_errors_log.error("source '%s': %s", source_config.name, exc)
    except BaseException:
        budget.forget()
        raise
    if batch:  # what was read before an unreadable stretch is still good
        _store_batch(engine, source_config.name, batch, sampler, redactor, budget, window, report, lease)
        if on_batch:
            on_batch(report)
    return report


def load_cursor(engine: Engine, source: str) -> dict[str, Any] | None:
    with session_scope(engine) as session:
        row = session.get(SourceCursor, source)
        return dict(row.position) if row is not None and row.position else None


def _store_batch(engine: Engine, source: str, batch: list[SourceRead], sampler: Sampler, redactor: Redactor,
                 budget: DailyBudget, window: TimeWindow, report: SourceReport, lease: LeaseLock | None) -> None:
    records = [s.item for s in batch if isinstance(s.item, TrafficRecord)]
    rejected = [s.item for s in batch if isinstance(s.item, Rejected)]
    cursor = batch[-1].cursor
    now = utcnow()
    try:
        with session_scope(engine) as session:
            selection = sampler.select(session, records, window, budget)
            rows = [sample_row(record, stratum, source, redactor, now) for record, stratum in selection.admitted]
            inserted = insert_samples(session, rows)
            quarantine(session, source, rejected, now)
            if not window.is_backfill:
                save_cursor(session, source, cursor, now)
            if lease is not None and not lease.renew_in(session):
                holder = session.scalar(select(Lock.holder).where(Lock.name == lease.name))
                raise IngestLeaseLost(f"this ingest lost the store's ingest lease to {holder or 'another ingest'} "
                                      f"(it ran past the lease); stopped before batch {report.batches + 1} of source "
                                      f"'{source}', whose earlier batches are stored")
    except BaseException:
        budget.forget()
        raise
    for row in rows:
        if row["request_id"] in inserted:
            report.redactions.update(row["redactions"])
        else:
            budget.remove(row["request_ts"].date(), row["stratum"])
    report.read += len(records) + len(rejected)
    report.stored += len(inserted)
    report.duplicates += selection.duplicates + len(rows) - len(inserted)
    report.quarantined += len(rejected)
    report.filtered += sum(selection.filtered_by.values())
    report.filtered_by.update(selection.filtered_by)
    report.batches += 1
    if not window.is_backfill:
        report.cursor = cursor


def sample_row(record: TrafficRecord, stratum: str | None, source: str, redactor: Redactor,
               now: datetime) -> dict[str, Any]:
    """The `traffic_samples` row for a kept record: every free text redacted, counts by kind alongside."""
    counts: dict[str, int] = {}
    messages = redactor.redact_value(record.messages, counts)
    response = redactor.redact(record.response_text, counts) if record.response_text else record.response_text
    params = redactor.redact_value(record.params, counts) if record.params else {}
    metadata = redactor.redact_value(record.metadata, counts) if record.metadata else {}
    return {
        "request_id": record.request_id,
        "source": source,
        "source_position": storable_text(record.position, MAX_POSITION),
        "route": storable_text(record.route, 128),
        "incumbent_model": storable_text(record.incumbent_model, 256),
        "messages": messages,
        "params": params,
        "response_text": storable_text(response),
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
        "cost_usd": record.cost_usd,
        "cache_hit": record.cache_hit,
        "meta": metadata,
        "stratum": storable_text(stratum),
        "redactions": counts,
        "request_ts": record.timestamp,
        "ingested_at": now,
    }


def _insert(session: Session):  # -> the dialect's insert() with on_conflict_* support
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def insert_samples(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """One batched INSERT ... ON CONFLICT DO NOTHING; returns the request ids that were new."""
    if not rows:
        return set()
    table = TrafficSample.__table__  # Core, not the ORM's bulk path: this is the hot loop
    # JSON columns are serialised here with orjson (several times faster than the JSON type's json.dumps)
    # and bound as text, which both SQLite and PostgreSQL store into their JSON columns as is.
    values = {c: type_coerce(bindparam(c), String) for c in _JSON_COLUMNS}
    stmt = (_insert(session)(table).values(values).on_conflict_do_nothing(index_elements=["request_id"])
            .returning(table.c.request_id))
    dumps = orjson.dumps
    encoded = [{**row, **{c: dumps(row[c]).decode() for c in _JSON_COLUMNS}} for row in rows]
    return set(session.execute(stmt, encoded).scalars())


_JSON_COLUMNS = ("messages", "params", "meta", "redactions")


def quarantine(session: Session, source: str, rejected: list[Rejected], now: datetime) -> None:
    if not rejected:
        return
    rows = list({r.position[:MAX_POSITION]: {"source": source, "position": storable_text(r.position, MAX_POSITION),
                                             "reason": storable_text(r.reason, MAX_REASON), "created_at": now}
                 for r in rejected}.values())
    stmt = _insert(session)(QuarantinedRecord.__table__).on_conflict_do_nothing(index_elements=["source", "position"])
    session.execute(stmt, rows)


def save_cursor(session: Session, source: str, position: dict[str, Any], now: datetime) -> None:
    stmt = _insert(session)(SourceCursor).values(source=source, position=position, updated_at=now)
    session.execute(stmt.on_conflict_do_update(index_elements=["source"],
                                               set_={"position": position, "updated_at": now}))


class _progress_display:
    """A live line per source on stderr while ingesting (only when asked, e.g. at a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressCallback | None:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=False)
        self._progress.start()
        return self._update

    def _update(self, report: SourceReport) -> None:
        text = (f"{report.source}: read {report.read:,} stored {report.stored:,} dup {report.duplicates:,} "
                f"quarantined {report.quarantined:,} filtered {report.filtered:,}")
        task = self._tasks.get(report.source)
        if task is None:
            self._tasks[report.source] = self._progress.add_task(text, total=None)
        else:
            self._progress.update(task, description=text)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
