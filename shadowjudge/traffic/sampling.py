"""Which requests become samples.

In order, a request is dropped if it is outside the backfill window, on another route, from another incumbent
model, or missing a required metadata value. It is a candidate when its hash says so (`hash(seed, request_id)
< rate`, so the same request is always in or out, and one in at 1% is also in at 5%), or when its stratum is
still below the floor (`min_per_stratum` per day, so rare slices get samples too). A candidate whose request id
is already stored is a duplicate. Otherwise it is kept if its stratum is below the floor: floors are guaranteed,
so these are taken even past the day's cap (and count toward it, so the cap is exceeded by at most the floor per
stratum seen that day); else it is kept unless the day's cap or its stratum's quota for the day is reached.

Days are UTC calendar days of the request's timestamp, and counts come from the store, so caps hold across
runs, sources and backfills. Whether a request hashes in does not depend on order, but the floor and the cap do:
they go to the first requests of the day in the order the sources yield them (across runs too). Choosing them
independently of order would need a whole day's requests before keeping any, which a live ingest, run while the
day is still going, never has.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shadowjudge.config import MetadataValue, SamplingConfig
from shadowjudge.store import TrafficSample
from shadowjudge.traffic.records import TrafficRecord, storable_text
from shadowjudge.traffic.redaction import Redactor
from shadowjudge.traffic.source import TimeWindow

_TWO_64 = float(2**64)
_LOOKUP_CHUNK = 900
MAX_STRATUM = 256

# Why a request read was not kept; the keys of `filtered_by` in the ingest report.
OUTSIDE_WINDOW = "outside_window"
ROUTE = "route"
MODEL = "model"
METADATA = "metadata"
RATE = "rate"
DAILY_CAP = "daily_cap"
STRATUM_QUOTA = "stratum_quota"


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


def metadata_matches(expected: MetadataValue, value: Any) -> bool:
    """Whether a logged metadata value (any JSON) is the configured one as a user means it: YAML `true` or the text
    'true' matches a JSON true (and a logged 'true' or 'True': gateways log booleans as text too), 1 matches 1.0 or
    '1', text matches the same text, null matches a missing or null value. Booleans are never numbers."""
    if expected is None or value is None:
        return expected is None and value is None
    if isinstance(expected, str) and isinstance(value, str):
        return expected == value
    return _scalar(expected) == _scalar(value)


def _scalar(value: Any) -> tuple[str, Any]:
    """A metadata value keyed by kind, so that only values of one kind compare (True == 1 in Python); text that
    spells a boolean or a JSON number is that boolean or number."""
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, (int, float)):
        return "number", value
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return "bool", value.lower() == "true"
        if _JSON_NUMBER.fullmatch(value):
            return "number", int(value) if value.lstrip("-").isdigit() else float(value)
        return "text", value
    return "other", repr(value)  # a list or an object matches no configured scalar


def hash_fraction(seed: str, request_id: str) -> float:
    """A request's fixed place in [0, 1): sampling at rate r keeps exactly those below r."""
    digest = hashlib.blake2b(f"{seed}\x00{request_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


@dataclass
class DayCount:
    total: int = 0
    by_stratum: Counter[str | None] = field(default_factory=Counter)


class DailyBudget:
    """Samples stored per UTC day (in all and per stratum), read from the store the first time a day is seen
    and kept up to date as batches commit."""

    def __init__(self) -> None:
        self._days: dict[date, DayCount] = {}

    def day(self, session: Session, day: date) -> DayCount:
        count = self._days.get(day)
        if count is None:
            start = datetime.combine(day, time.min, tzinfo=timezone.utc)
            rows = session.execute(
                select(TrafficSample.stratum, func.count())
                .where(TrafficSample.request_ts >= start, TrafficSample.request_ts < start + timedelta(days=1))
                .group_by(TrafficSample.stratum)
            ).all()
            count = DayCount(sum(n for _, n in rows), Counter({s: n for s, n in rows}))
            self._days[day] = count
        return count

    def add(self, day: date, stratum: str | None) -> None:
        count = self._days.setdefault(day, DayCount())
        count.total += 1
        count.by_stratum[stratum] += 1

    def remove(self, day: date, stratum: str | None) -> None:
        """Undo an `add` for a sample that turned out not to be new (another writer stored it first)."""
        count = self._days.get(day)
        if count is not None:
            count.total -= 1
            count.by_stratum[stratum] -= 1

    def forget(self) -> None:
        """Drop what is cached (after a failed batch): the next look reads the store again."""
        self._days.clear()


@dataclass
class Selection:
    """The outcome of sampling one batch."""

    admitted: list[tuple[TrafficRecord, str | None]]
    duplicates: int
    filtered_by: Counter[str]


class Sampler:
    def __init__(self, config: SamplingConfig, redactor: Redactor) -> None:
        self.config = config
        self.redactor = redactor
        self._routes = frozenset(config.routes)
        self._models = frozenset(config.models)
        floor = config.min_per_stratum
        if config.per_stratum_quota is not None:
            floor = min(floor, config.per_stratum_quota)
        self._floor = floor if config.stratify_by else 0

    def screen(self, record: TrafficRecord, window: TimeWindow) -> str | None:
        """Why the record is filtered out before sampling, or None if it passes."""
        if not window.contains(record.timestamp):
            return OUTSIDE_WINDOW
        if self._routes and record.route not in self._routes:
            return ROUTE
        if self._models and record.incumbent_model not in self._models:
            return MODEL
        for key, expected in self.config.metadata_equals.items():
            if not metadata_matches(expected, record.metadata.get(key)):
                return METADATA
        return None

    def stratum(self, record: TrafficRecord) -> str | None:
        """The record's stratum: its (redacted) value of the `stratify_by` metadata key."""
        key = self.config.stratify_by
        if key is None:
            return None
        value = record.metadata.get(key)
        if value is None:
            return None
        text = value if isinstance(value, str) else str(value)
        return storable_text(self.redactor.redact(text, {}), MAX_STRATUM)  # as stored, so the store's counts match

    def hash_in(self, record: TrafficRecord) -> bool:
        return self.config.rate >= 1.0 or hash_fraction(self.config.seed, record.request_id) < self.config.rate

    def select(self, session: Session, records: list[TrafficRecord], window: TimeWindow,
               budget: DailyBudget) -> Selection:
        filtered: Counter[str] = Counter()
        passing: list[tuple[TrafficRecord, str | None, date, bool]] = []
        for record in records:
            reason = self.screen(record, window)
            if reason is not None:
                filtered[reason] += 1
            else:
                passing.append((record, self.stratum(record), record.timestamp.date(), self.hash_in(record)))
        # Only requests that may be kept are looked up (hashed in, or their stratum still under the floor:
        # counts only grow within a batch, so this is a superset of what is kept).
        stored = existing_request_ids(session, [
            r.request_id for r, stratum, day, hashed_in in passing
            if hashed_in or budget.day(session, day).by_stratum[stratum] < self._floor])

        admitted: list[tuple[TrafficRecord, str | None]] = []
        duplicates = 0
        seen: set[str] = set()
        for record, stratum, day, hashed_in in passing:
            count = budget.day(session, day)
            in_stratum = count.by_stratum[stratum]
            below_floor = in_stratum < self._floor
            if not hashed_in and not below_floor:
                filtered[RATE] += 1
                continue
            if record.request_id in stored or record.request_id in seen:
                duplicates += 1
                continue
            seen.add(record.request_id)
            # Below the floor it is kept even past the cap: common traffic filling the cap early in the day would
            # otherwise starve the rare slices the floor is for. (The quota is never below the floor.)
            limit = None if below_floor else self._limit_reached(count.total, in_stratum)
            if limit is not None:
                filtered[limit] += 1
            else:
                admitted.append((record, stratum))
                budget.add(day, stratum)
        return Selection(admitted, duplicates, filtered)

    def _limit_reached(self, day_total: int, in_stratum: int) -> str | None:
        """The day's limit (cap, then stratum quota) already reached, if any."""
        cap, quota = self.config.daily_cap, self.config.per_stratum_quota
        if cap is not None and day_total >= cap:
            return DAILY_CAP
        if quota is not None and in_stratum >= quota:
            return STRATUM_QUOTA
        return None


def existing_request_ids(session: Session, request_ids: list[str]) -> set[str]:
    found: set[str] = set()
    unique = list(dict.fromkeys(request_ids))
    for i in range(0, len(unique), _LOOKUP_CHUNK):
        chunk = unique[i:i + _LOOKUP_CHUNK]
        found.update(session.scalars(select(TrafficSample.request_id).where(TrafficSample.request_id.in_(chunk))))
    return found
