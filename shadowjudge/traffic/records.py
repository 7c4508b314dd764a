"""The canonical traffic record every source produces, and the small parsers sources share.

A source turns whatever it reads (a log line, a span, a table row) into a `TrafficRecord`, or into a
`Rejected` that says where and why (never the raw text), and pairs each with the cursor just past it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from decimal import Decimal
from datetime import datetime, timezone
from typing import Any, NamedTuple

import orjson

from shadowjudge.errors import InputError, ShadowJudgeError


class TrafficError(ShadowJudgeError):
    """Ingestion cannot go on for a source; the message says which and why."""


class SourceUnavailable(TrafficError):
    """A source cannot be read at all right now (missing path, unreachable database, unknown table)."""


class InvalidWindow(InputError):
    """A backfill window that cannot be used (e.g. since >= until)."""


# A timestamp or window bound needs room for a day and a zone shift either side (the sampler's day windows, the
# SQL source's bounds): datetime's own years 1 and 9999 overflow there.
SUPPORTED_YEARS = range(2, 9999)


class RecordError(ValueError):
    """One input record cannot be used. The message is safe to store: it never quotes the record's text."""


@dataclass(slots=True)
class TrafficRecord:
    """One production request, normalised: what the shadow replays and the judge compares against.

    `route` is the name the client called (the gateway's virtual model); `incumbent_model` is the model
    that actually answered. `position` says where in the source the record was read.
    """

    request_id: str
    timestamp: datetime
    route: str
    incumbent_model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    response_text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None  # as logged: the analysis decides whether it is one (run_data.logged_ttft_ms)
    cost_usd: float | None = None
    cache_hit: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    position: str = ""

    def __post_init__(self) -> None:
        """Refuse here, where the source quarantines it, a record the store or the sampler could not take: one
        such record would otherwise fail its whole batch on every run and stop the source for good."""
        if self.timestamp.year not in SUPPORTED_YEARS:
            raise RecordError("'timestamp' is out of range")
        for name in ("messages", "params", "metadata"):
            try:
                orjson.dumps(getattr(self, name))
            except orjson.JSONEncodeError as exc:  # nested too deeply, an integer beyond 64 bits, ...
                raise RecordError(f"'{name}' cannot be stored as JSON ({str(exc).split(':')[0]})") from None


@dataclass(slots=True, frozen=True)
class Rejected:
    """An input record that was read but cannot be used: it goes to `quarantined_records`."""

    position: str
    reason: str


class SourceRead(NamedTuple):
    """One step of a source: a record, a rejection, or None (something skipped, e.g. a blank line or a
    non-LLM span), and the source's cursor once this step is consumed."""

    item: TrafficRecord | Rejected | None
    cursor: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Field parsers shared by the sources. They raise RecordError with the field's name, never its value.

MAX_REQUEST_ID = 128


def parse_timestamp(value: Any, name: str = "timestamp") -> datetime:
    """ISO 8601 text or epoch seconds/milliseconds/nanoseconds; naive values are taken as UTC."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise RecordError(f"'{name}' is not an ISO 8601 date-time or epoch number") from None
        else:
            return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise RecordError(f"'{name}' is not a valid epoch time")
        if seconds > 1e17:
            seconds /= 1e9
        elif seconds > 1e14:
            seconds /= 1e6
        elif seconds > 1e11:
            seconds /= 1e3
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise RecordError(f"'{name}' is out of range") from None
    if value is None:
        raise RecordError(f"missing '{name}'")
    raise RecordError(f"'{name}' must be a date-time string or epoch number, got {type(value).__name__}")


_INF = float("inf")


def parse_number(value: Any, name: str) -> float | None:
    """A non-negative finite number (numeric strings accepted), or None when absent."""
    kind = type(value)
    if (kind is float or kind is int) and 0 <= value < _INF:  # the common case, first
        return float(value)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RecordError(f"'{name}' must be a number, got bool")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RecordError(f"'{name}' must be a number") from None
    if not isinstance(value, (int, float, Decimal)):  # Decimal: what NUMERIC columns come back as
        raise RecordError(f"'{name}' must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise RecordError(f"'{name}' must be a finite number >= 0")
    return number


def storable_text(text: str | None, limit: int | None = None) -> str | None:
    """Text as the store keeps it: PostgreSQL text cannot hold NUL characters (they become U+FFFD), cut to `limit`.
    Whatever is compared with stored text (a stratum the sampler counts) must go through here too."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text[:limit] if limit else text


def parse_count(value: Any, name: str) -> int | None:
    if type(value) is int and 0 <= value < 2**31:
        return value
    number = parse_number(value, name)
    if number is None:
        return None
    if number != int(number) or number > 2**31 - 1:
        raise RecordError(f"'{name}' must be a whole number below 2^31")
    return int(number)


def parse_flag(value: Any, name: str) -> bool:
    """Booleans, 0/1 and the strings gateways write ("True", "false", "" for LiteLLM's cache_hit)."""
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RecordError(f"'{name}' must be a boolean")


def parse_text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def parse_name(value: Any, name: str) -> str | None:
    """A short identifier such as a route or model name (at most 256 characters)."""
    if type(value) is str and 0 < len(value) <= 256 and not value[0].isspace() and not value[-1].isspace():
        return value
    text = parse_text(value, name)
    if text is None or not text.strip():
        return None
    if len(text) > 256:
        raise RecordError(f"'{name}' is longer than 256 characters")
    return text.strip()


def parse_metadata(value: Any, name: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError:
            raise RecordError(f"'{name}' is a string that is not a JSON object") from None
    if not isinstance(value, dict):
        raise RecordError(f"'{name}' must be an object, got {type(value).__name__}")
    return value


def parse_messages(value: Any, name: str = "messages") -> list[dict[str, Any]]:
    """A non-empty chat message list: objects with a string role and string, parts-list or null content."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RecordError(f"'{name}' is a string that is not JSON") from None
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{name}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError(f"'{name}[{i}]' must be an object")
        if not isinstance(message.get("role"), str):
            raise RecordError(f"'{name}[{i}].role' must be a string")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RecordError(f"'{name}[{i}].content' must be a string, a list of parts or null")
    return value


def content_text(content: Any) -> str | None:
    """The text of a message content: a string, or the text parts of a parts list joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") if isinstance(p, dict) else p for p in content]
        return "".join(t for t in texts if isinstance(t, str))
    raise RecordError("message content must be a string or a list of parts")


def stable_request_id(explicit: Any, timestamp: datetime, route: str, messages: list[dict[str, Any]]) -> str:
    """The gateway's id when it has one (hashed if too long), else a hash of when, where and what was asked."""
    if explicit is not None and not isinstance(explicit, bool) and str(explicit).strip():
        text = str(explicit).strip()
        if len(text) <= MAX_REQUEST_ID and "\x00" not in text:  # PostgreSQL text cannot hold NUL: hashed instead
            return text
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    blob = orjson.dumps([timestamp.isoformat(), route, messages], option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# What a parser may raise on a record of an unexpected shape; the source quarantines the record with `unusable`.
UNUSABLE_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, AttributeError, KeyError, IndexError)


def unusable(exc: BaseException) -> str:
    """A quarantine reason for an unexpected parse failure: the error's type only, since its message
    could quote the record."""
    return f"unusable record ({type(exc).__name__})"
