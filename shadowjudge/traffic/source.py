"""The one boundary every traffic source implements, and how a configured source is opened.

Adding a source is adding one module `shadowjudge/traffic/sources/<kind>.py` with a class that satisfies
`TrafficSource` and a function `open_source(config: SourceConfig) -> TrafficSource` (plus the kind's name in
`SourceConfig.kind`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from shadowjudge.config import SourceConfig
from shadowjudge.traffic.records import InvalidWindow, SourceRead, TrafficError


@dataclass(frozen=True)
class TimeWindow:
    """Requests with since <= timestamp < until; an open end is None. A bounded window is a backfill."""

    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise InvalidWindow(f"--{name} must carry a time zone (e.g. 2026-11-22T00:00:00Z)")
        if self.since and self.until and self.since >= self.until:
            raise InvalidWindow(f"since ({self.since.isoformat()}) must be before until ({self.until.isoformat()})")

    @property
    def is_backfill(self) -> bool:
        return self.since is not None or self.until is not None

    def contains(self, ts: datetime) -> bool:
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)


@runtime_checkable
class TrafficSource(Protocol):
    """Reads requests from one place, from a cursor on.

    `read` yields every step in order with the cursor just past it; the caller stores records and cursor
    in one transaction, so resuming from the last stored cursor neither skips nor repeats a step. With
    `cursor` None the source starts from its beginning. A source may use `window` to skip what is outside
    it cheaply (the caller filters by timestamp anyway).
    """

    name: str

    def read(self, cursor: dict[str, Any] | None, window: TimeWindow) -> Iterator[SourceRead]: ...


def open_source(config: SourceConfig) -> TrafficSource:
    """The source for a configured kind: `shadowjudge.traffic.sources.<kind>.open_source(config)`."""
    try:
        module = importlib.import_module(f"shadowjudge.traffic.sources.{config.kind}")
    except ModuleNotFoundError:
        raise TrafficError(f"source '{config.name}': no reader for kind '{config.kind}'") from None
    return module.open_source(config)
