"""The store: every stage's output, in SQLite or PostgreSQL."""

from shadowjudge.store.database import (
    current_revision,
    dispose_engines,
    get_engine,
    initialised_engine,
    insert_ignoring_duplicates,
    session_scope,
    upgrade_database,
)
from shadowjudge.store.models import (
    Alert,
    Base,
    Judgment,
    Lock,
    QuarantinedRecord,
    RouteState,
    RouteWeightChange,
    ShadowResult,
    ShadowRun,
    SourceCursor,
    TrafficSample,
)

__all__ = [
    "Alert", "Base", "Judgment", "Lock", "QuarantinedRecord", "RouteState", "RouteWeightChange",
    "ShadowResult", "ShadowRun", "SourceCursor", "TrafficSample", "current_revision", "dispose_engines",
    "get_engine", "initialised_engine", "insert_ignoring_duplicates", "session_scope", "upgrade_database",
]
