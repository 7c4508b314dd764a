"""Traffic ingestion: read production requests from gateway logs, sample them, redact PII, store them.

Entry points: `ingest_sources(engine, config, since=..., until=..., progress=...) -> IngestReport` (what a
cycle calls) and the typer app `traffic_cli` (`shadowjudge traffic ingest|quarantine`). Sources live in
`shadowjudge.traffic.sources` behind the `TrafficSource` protocol; records are `TrafficRecord`s.
"""

from shadowjudge.traffic.ingest import IngestReport, SourceReport, ingest_source, ingest_sources, load_cursor
from shadowjudge.traffic.records import (
    InvalidWindow,
    RecordError,
    Rejected,
    SourceRead,
    SourceUnavailable,
    TrafficError,
    TrafficRecord,
)
from shadowjudge.traffic.redaction import Redactor
from shadowjudge.traffic.sampling import Sampler, hash_fraction
from shadowjudge.traffic.source import TimeWindow, TrafficSource, open_source

__all__ = [
    "IngestReport", "InvalidWindow", "RecordError", "Redactor", "Rejected", "Sampler", "SourceRead",
    "SourceReport", "SourceUnavailable", "TimeWindow", "TrafficError", "TrafficRecord", "TrafficSource",
    "hash_fraction", "ingest_source", "ingest_sources", "load_cursor", "open_source", "traffic_cli",
]


def __getattr__(name: str):
    # The CLI pulls in typer and rich: load it only when asked for.
    if name == "traffic_cli":
        from shadowjudge.traffic.cli import traffic_cli

        return traffic_cli
    raise AttributeError(name)
