"""Requests from a SQL table, through SQLAlchemy, with a column mapping in the config.

    sources:
      - name: litellm
        kind: sql
        url: postgresql+psycopg2://reader@litellm-db:5432/litellm   # password via SHADOWJUDGE__SOURCES__0__URL
        mapping: litellm          # the LiteLLM_SpendLogs preset below; or a dict, or {preset: litellm, ...overrides}
        settle_s: 300             # LiteLLM writes spend logs in batches: leave recent rows for the next run

Mapping keys (canonical field -> column): `table`, `request_id`*, `timestamp`*, `messages`* (a JSON list, or
`request`: a JSON request body holding them), `model` and/or `route`*, `response` (a JSON chat completion or
text) or `response_text`, `params` (JSON), `input_tokens`, `output_tokens`, `latency_ms` or `end_time`,
`ttft_ms` or `first_token_time`, `cost_usd`, `cache_hit`, `metadata` (JSON object), `metadata.<key>` for
extra columns to keep as metadata, and `written_at`: a date-time set when the row is written, where that is later
than the request's `timestamp` (a log row written when the request ends). (* required) An integer request id is
stored as `<source name>:<id>`, since another table numbers its rows from 1 too.

The LiteLLM preset reads `LiteLLM_SpendLogs` as LiteLLM's Prisma schema defines it. LiteLLM stores prompts and
responses there only with `general_settings: {store_prompts_in_spend_logs: true}`; rows without them are
quarantined with a reason that says so.

Cursor: the last (timestamp, request id) read, or (written_at, request id) where the mapping has `written_at`;
rows are read in that order in pages (keyset pagination). LiteLLM writes a spend-log row when its request ends,
so the preset's cursor follows `endTime`: following `startTime`, a request that ran longer than `settle_s` was
written behind the cursor and never read. Backfill windows select by the request's `timestamp` either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, String, Table, and_, func, literal, or_, select, type_coerce
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchTableError, SQLAlchemyError

from shadowjudge.config import SourceConfig, did_you_mean
from shadowjudge.store import get_engine
from shadowjudge.traffic.records import (
    UNUSABLE_ERRORS,
    RecordError,
    Rejected,
    SourceRead,
    SourceUnavailable,
    TrafficError,
    TrafficRecord,
    content_text,
    parse_count,
    parse_flag,
    parse_messages,
    parse_metadata,
    parse_name,
    parse_number,
    parse_timestamp,
    stable_request_id,
    unusable,
)
from shadowjudge.traffic.source import TimeWindow
from shadowjudge.traffic.sources.jsonl import NOT_PARAMS, response_parts

LITELLM_SPEND_LOGS: dict[str, str] = {
    "table": "LiteLLM_SpendLogs",
    "request_id": "request_id",
    "timestamp": "startTime",
    "end_time": "endTime",
    "written_at": "endTime",
    "first_token_time": "completionStartTime",
    "route": "model_group",
    "model": "model",
    "messages": "messages",
    "request": "proxy_server_request",
    "response": "response",
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "cost_usd": "spend",
    "cache_hit": "cache_hit",
    "metadata": "metadata",
    "metadata.call_type": "call_type",
    "metadata.provider": "custom_llm_provider",
    "metadata.team_id": "team_id",
    "metadata.end_user": "end_user",
    "metadata.session_id": "session_id",
    "metadata.status": "status",
    "metadata.request_tags": "request_tags",
}
PRESETS = {"litellm": LITELLM_SPEND_LOGS}
FIELDS = frozenset({
    "table", "request_id", "timestamp", "messages", "request", "model", "route", "response", "response_text",
    "params", "input_tokens", "output_tokens", "latency_ms", "end_time", "ttft_ms", "first_token_time",
    "cost_usd", "cache_hit", "metadata", "written_at",
})
# Request-body keys a proxy adds that are not replay parameters.
PROXY_KEYS = ("litellm_", "proxy_server_request", "secret_fields", "mock_", "headers")


class MappingError(ValueError):
    """A mapping the reader cannot use; the message names the key (the caller says which source)."""


def effective_mapping(raw: str | dict[str, str] | None, table: str | None) -> dict[str, str]:
    """The canonical-field -> column mapping that a source's `mapping` (a preset, a dict, or a preset with
    overrides) and `table` give. Config loading calls it too, so a mistake is found before any ingest."""
    if isinstance(raw, str):
        if raw not in PRESETS:
            raise MappingError(f"unknown mapping preset '{raw}'{did_you_mean([raw], PRESETS)} "
                               f"(known: {sorted(PRESETS)})")
        mapping = dict(PRESETS[raw])
    elif isinstance(raw, dict):
        overrides = dict(raw)
        preset = overrides.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise MappingError(f"unknown mapping preset '{preset}'{did_you_mean([preset], PRESETS)} "
                               f"(known: {sorted(PRESETS)})")
        mapping = {**PRESETS.get(preset or "", {}), **overrides}
    else:
        mapping = {}
    if table:
        mapping["table"] = table
    unknown = sorted(k for k in mapping if k not in FIELDS and not k.startswith("metadata."))
    if unknown:
        raise MappingError(f"unknown mapping keys {unknown}{did_you_mean(unknown, FIELDS | {'preset'})} "
                           f"(known: {sorted(FIELDS)}, preset and metadata.<key>)")
    missing = [k for k in ("table", "request_id", "timestamp") if not mapping.get(k)]
    if not (mapping.get("messages") or mapping.get("request")):
        missing.append("messages (or request)")
    if not (mapping.get("model") or mapping.get("route")):
        missing.append("model (or route)")
    if missing:
        raise MappingError(f"the mapping needs {', '.join(missing)}")
    return mapping


def resolve_mapping(config: SourceConfig) -> dict[str, str]:
    """The source's effective mapping; a SourceConfig built in code, not loaded from a file, is checked here."""
    try:
        return effective_mapping(config.mapping, config.table)
    except MappingError as exc:
        raise TrafficError(f"source '{config.name}': {exc}") from None


def safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable url>"


def _json(value: Any, name: str) -> Any:
    """JSON columns come back parsed on PostgreSQL and as text on SQLite."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        import orjson

        if not value.strip():
            return None
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            if name in ("response",):
                return value  # a plain-text response
            raise RecordError(f"column for '{name}' is not valid JSON") from None
    return value


def _elapsed_ms(start: datetime, end: Any, name: str) -> float | None:
    if end is None:
        return None
    delta = (parse_timestamp(end, name) - start).total_seconds() * 1000
    return delta if delta >= 0 else None


def row_record(row: dict[str, Any], mapping: dict[str, str], position: str,
               source: str | None = None) -> TrafficRecord:
    """One table row as a `TrafficRecord` (RecordError names the field, never its value).

    An integer request id (an autoincrement key) is unique only in its own table: two sources would both have a
    request 1, and the store keeps the first it sees. It becomes `<source>:<id>`."""
    def col(field: str) -> Any:
        column = mapping.get(field)
        return row.get(column) if column else None

    timestamp = parse_timestamp(col("timestamp"), "timestamp")
    request = _json(col("request"), "request")
    if request is not None and not isinstance(request, dict):
        raise RecordError("column for 'request' must hold a JSON object")
    request = request or {}
    raw_messages = _json(col("messages"), "messages")
    if not raw_messages:  # LiteLLM writes {} when it does not store prompts
        raw_messages = request.get("messages")
    if not raw_messages:
        raise RecordError("no messages in the row (LiteLLM stores them only with "
                          "general_settings.store_prompts_in_spend_logs: true)")
    messages = parse_messages(raw_messages, "messages")

    response_text, response_model, usage, _ = response_parts(_json(col("response"), "response"))
    if response_text is None and mapping.get("response_text"):
        response_text = content_text(col("response_text"))
    usage = usage or {}

    model = parse_name(col("model"), "model") or response_model or parse_name(request.get("model"), "request.model")
    route = parse_name(col("route"), "route") or parse_name(request.get("model"), "request.model") or model
    if route is None or model is None:
        raise RecordError("no model or route in the row")

    params_column = _json(col("params"), "params")
    if params_column is not None and not isinstance(params_column, dict):
        raise RecordError("column for 'params' must hold a JSON object")
    params = params_column if params_column is not None else {
        k: v for k, v in request.items() if k not in NOT_PARAMS and not k.startswith(PROXY_KEYS)}

    metadata = dict(parse_metadata(_json(col("metadata"), "metadata")))
    for field, column in mapping.items():
        if field.startswith("metadata.") and row.get(column) is not None:
            metadata[field[len("metadata."):]] = _json_value(row[column])

    latency = parse_number(col("latency_ms"), "latency_ms") if mapping.get("latency_ms") else \
        _elapsed_ms(timestamp, col("end_time"), "end_time")
    ttft = parse_number(col("ttft_ms"), "ttft_ms") if mapping.get("ttft_ms") else \
        _elapsed_ms(timestamp, col("first_token_time"), "first_token_time")
    input_tokens = col("input_tokens")
    output_tokens = col("output_tokens")
    return TrafficRecord(
        request_id=stable_request_id(_qualified_id(col("request_id"), source), timestamp, route, messages),
        timestamp=timestamp,
        route=route,
        incumbent_model=model,
        messages=messages,
        params=params,
        response_text=response_text,
        input_tokens=parse_count(input_tokens if input_tokens is not None else usage.get("prompt_tokens"),
                                 "input_tokens"),
        output_tokens=parse_count(output_tokens if output_tokens is not None else usage.get("completion_tokens"),
                                  "output_tokens"),
        latency_ms=latency,
        ttft_ms=ttft,
        cost_usd=parse_number(col("cost_usd"), "cost_usd"),
        cache_hit=parse_flag(col("cache_hit"), "cache_hit"),
        metadata=metadata,
        position=position,
    )


def _qualified_id(value: Any, source: str | None) -> Any:
    if source is not None and isinstance(value, int) and not isinstance(value, bool):
        return f"{source}:{value}"
    return value


class SqlSource:
    """Rows of one table in (timestamp, request id) order; cursor: the last pair read."""

    def __init__(self, name: str, url: str, mapping: dict[str, str], page_size: int, settle_s: float) -> None:
        self.name = name
        self.url = url
        self.mapping = mapping
        self.page_size = page_size
        self.settle_s = settle_s

    def _table(self) -> Table:
        where = f"source '{self.name}' ({safe_url(self.url)})"
        try:
            engine = get_engine(self.url)
            table = Table(self.mapping["table"], MetaData(), autoload_with=engine)
        except NoSuchTableError:
            raise SourceUnavailable(f"{where}: no table '{self.mapping['table']}'") from None
        except (SQLAlchemyError, ArgumentError) as exc:
            raise SourceUnavailable(f"{where}: cannot read the table ({type(exc).__name__}: "
                                    f"{_first_line(exc, self.url)})") from None
        missing = sorted({c for c in self.mapping.values() if c not in table.c} - {self.mapping["table"]})
        if missing:
            raise SourceUnavailable(f"{where}: table '{table.name}' has no column(s) {missing}")
        for field in ("timestamp", "written_at"):
            column = self.mapping.get(field)
            if column is not None and not isinstance(table.c[column].type, DateTime):
                # the cursor and the window compare date-times in the query
                raise SourceUnavailable(
                    f"{where}: column '{column}' is {table.c[column].type}, not a date-time: the cursor and "
                    "backfill windows need one (read from a view that casts it)")
        return table

    def read(self, cursor: dict[str, Any] | None, window: TimeWindow) -> Iterator[SourceRead]:
        table = self._table()
        ts_col: Column[Any] = table.c[self.mapping["timestamp"]]
        order_col: Column[Any] = table.c[self.mapping.get("written_at") or self.mapping["timestamp"]]
        id_col: Column[Any] = table.c[self.mapping["request_id"]]
        columns = [table.c[c] for c in dict.fromkeys(v for k, v in self.mapping.items() if k != "table")]

        engine = get_engine(self.url)
        # SQLite keeps date-times as text, in whatever layout the writer chose ('2026-11-22T10:00:00', seconds only,
        # an offset); compared as text with SQLAlchemy's own layout, rows were skipped or read again forever.
        # julianday() reads every layout as one number, on both sides of each comparison and in the order; it also
        # keeps SQLite from using an index on the column, so it is used only where a column holds another layout.
        foreign = engine.dialect.name == "sqlite" and not all(
            _sqlalchemy_layout(engine, column) for column in {ts_col, order_col})
        as_time = func.julianday if foreign else (lambda value: value)

        def bound(column: Column[Any], ts: datetime) -> Any:
            """`ts` as `column` compares it: in UTC, naive for a column without a zone."""
            naive = not getattr(column.type, "timezone", False)
            ts = (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
            return as_time(literal(ts.replace(tzinfo=None) if naive else ts, DateTime(timezone=not naive)))

        ts_key, order_key = as_time(ts_col), as_time(order_col)
        conditions = [ts_col.is_not(None), order_col.is_not(None), id_col.is_not(None)]
        if window.since is not None:
            conditions.append(ts_key >= bound(ts_col, window.since))
        if window.until is not None:
            conditions.append(ts_key < bound(ts_col, window.until))
        if self.settle_s:
            settled = datetime.now(timezone.utc) - timedelta(seconds=self.settle_s)
            conditions.append(order_key < bound(order_col, settled))
        last: tuple[Any, Any] | None = None
        if cursor and "ts" in cursor and "id" in cursor:
            last = (datetime.fromisoformat(cursor["ts"]), cursor["id"])

        while True:
            query = select(*columns).where(*conditions).order_by(order_key, id_col).limit(self.page_size)
            if last is not None:
                last_key = bound(order_col, last[0])
                query = query.where(or_(order_key > last_key, and_(order_key == last_key, id_col > last[1])))
            try:
                with engine.connect() as conn:  # a page at a time: no connection held while the store writes
                    rows = [dict(r) for r in conn.execute(query).mappings()]
            except SQLAlchemyError as exc:
                raise SourceUnavailable(f"source '{self.name}' ({safe_url(self.url)}): query failed "
                                        f"({type(exc).__name__}: {_first_line(exc, self.url)})") from None
            for row in rows:
                ts, rid = row[order_col.name], row[id_col.name]
                position = f"{table.name}:{_iso(row[ts_col.name])}:{rid}"
                step_cursor = {"ts": _iso(ts), "id": rid if isinstance(rid, (str, int)) else str(rid)}
                try:
                    yield SourceRead(row_record(row, self.mapping, position, self.name), step_cursor)
                except RecordError as exc:
                    yield SourceRead(Rejected(position, str(exc)), step_cursor)
                except UNUSABLE_ERRORS as exc:
                    yield SourceRead(Rejected(position, unusable(exc)), step_cursor)
                last = (ts, rid)
            if len(rows) < self.page_size:
                return


_SQLALCHEMY_SQLITE_LAYOUT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}")


def _sqlalchemy_layout(engine: Any, column: Column[Any]) -> bool:
    """Whether a SQLite column's earliest and latest values are text in the layout SQLAlchemy writes and binds
    ('2026-11-22 10:00:00.000000'), so text comparison orders them (an index on the column serves both reads)."""
    raw = type_coerce(column, String)
    with engine.connect() as conn:
        ends = [conn.scalar(select(raw).where(column.is_not(None)).order_by(order).limit(1))
                for order in (column.asc(), column.desc())]
    return all(value is None or (isinstance(value, str) and _SQLALCHEMY_SQLITE_LAYOUT.fullmatch(value))
               for value in ends)


def _iso(ts: Any) -> str:
    return ts.isoformat() if isinstance(ts, datetime) else str(ts)


def _json_value(value: Any) -> Any:
    """A column value as JSON metadata can hold it: date-times as ISO text, NUMERIC's Decimal as a number, UUIDs and
    other driver types as text."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else str(value)
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


def _first_line(exc: BaseException, url: str) -> str:
    """The driver's message, first line only, with the URL's password (if any) scrubbed."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else ""
    try:
        password = make_url(url).password
    except ArgumentError:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text[:300]


def open_source(config: SourceConfig) -> SqlSource:
    assert config.url is not None  # SourceConfig requires it for this kind
    return SqlSource(config.name, config.url, resolve_mapping(config), config.batch_size, config.settle_s)
