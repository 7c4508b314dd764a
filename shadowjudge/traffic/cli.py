"""`shadowjudge traffic ...`: ingest (live, or a backfill window) and list quarantined records."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from shadowjudge.config import Config, load_config
from shadowjudge.errors import InputError, ShadowJudgeError
from shadowjudge.subcommands import ConfigOption, literal
from shadowjudge.traffic.records import SUPPORTED_YEARS

traffic_cli = typer.Typer(help="Ingest production traffic from the configured sources.", no_args_is_help=True,
                          pretty_exceptions_enable=False, add_completion=False)
console = Console()

SourceOption = typer.Option(None, "--source", "-s", help="Only this source (repeatable)")


def parse_when(value: str | None, option: str) -> datetime | None:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputError(f"{option} '{value}' is not an ISO 8601 date or date-time "
                         "(e.g. 2026-11-22 or 2026-11-22T06:00:00Z)") from None
    if parsed.year not in SUPPORTED_YEARS:
        raise InputError(f"{option} '{value}' is out of range (years {SUPPORTED_YEARS[0]} to {SUPPORTED_YEARS[-1]})")
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed


def _config(path: Path, sources: list[str] | None) -> Config:
    config = load_config(path)
    if sources:
        known = [s.name for s in config.sources]
        unknown = [s for s in sources if s not in known]
        if unknown:
            raise InputError(f"no source named {', '.join(unknown)} in {path} (known: {', '.join(known)})")
        config = config.model_copy(update={"sources": [s for s in config.sources if s.name in sources]})
    return config


def _engine(config: Config):
    from shadowjudge.store import initialised_engine

    return initialised_engine(config.store.url)


@traffic_cli.command()
def ingest(config: Path = ConfigOption,
           since: Optional[str] = typer.Option(None, help="Backfill from this time (inclusive, UTC if no zone)"),
           until: Optional[str] = typer.Option(None, help="Backfill up to this time (exclusive)"),
           source: Optional[list[str]] = SourceOption,
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
           ) -> None:
    """Read new requests from each source (or, with --since/--until, backfill that window without moving the
    live cursor), sample, redact and store them."""
    from shadowjudge.traffic.ingest import ingest_sources, source_errors_log

    cfg = _config(config, source)
    quieted = source_errors_log.level
    source_errors_log.setLevel(logging.CRITICAL + 1)  # each source's error is printed once, below, as `error:`
    try:
        report = ingest_sources(_engine(cfg), cfg, since=parse_when(since, "--since"),
                                until=parse_when(until, "--until"), progress=console.is_terminal and not as_json)
    finally:
        source_errors_log.setLevel(quieted)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title="backfill" if report.since or report.until else "ingest")
        for column in ("source", "read", "stored", "duplicates", "quarantined", "filtered", "redactions"):
            table.add_column(column, justify="left" if column in ("source", "redactions") else "right")
        for s in report.sources + [None]:
            row = report.totals if s is None else s.to_dict()
            name = "total" if s is None else s.source
            counts = (f"{row[k]:,}" for k in ("read", "stored", "duplicates", "quarantined", "filtered"))
            table.add_row(*literal(name), *counts,
                          ", ".join(f"{k} {v}" for k, v in sorted(row["redactions"].items())) or "-")
        console.print(table)
        for s in report.sources:
            if s.filtered_by:
                console.print(f"{s.source}: filtered by " + ", ".join(f"{k} {v:,}" for k, v in s.filtered_by.items()))
    failed = [s for s in report.sources if s.error]
    if failed:
        raise ShadowJudgeError("; ".join(f"source '{s.source}': {s.error}" for s in failed))


@traffic_cli.command("quarantine")
def list_quarantine(config: Path = ConfigOption, source: Optional[list[str]] = SourceOption,
                    limit: int = typer.Option(50, min=1, max=10_000, help="Most recent first"),
                    as_json: bool = typer.Option(False, "--json", help="Print as JSON lines")) -> None:
    """List quarantined records: where each was (source, position) and why; never its text."""
    from sqlalchemy import func, select, true

    from shadowjudge.store import QuarantinedRecord, session_scope

    cfg = _config(config, source)
    names = [s.name for s in cfg.sources]
    with session_scope(_engine(cfg)) as session:
        where = QuarantinedRecord.source.in_(names) if source else true()
        total = session.scalar(select(func.count()).select_from(QuarantinedRecord).where(where))
        rows = session.scalars(select(QuarantinedRecord).where(where)
                               .order_by(QuarantinedRecord.created_at.desc(), QuarantinedRecord.id.desc())
                               .limit(limit)).all()
    if as_json:
        for r in rows:
            typer.echo(json.dumps({"source": r.source, "position": r.position, "reason": r.reason,
                                   "created_at": r.created_at.isoformat()}))
        return
    table = Table(title=f"quarantined records ({len(rows)} of {total})")
    for column in ("when", "source", "position", "reason"):
        table.add_column(column)
    for r in rows:
        # positions are file names and table keys, shown as stored (a '[/x]' in one is not Rich markup)
        table.add_row(*literal(r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.source, r.position, r.reason))
    console.print(table)
