"""Stores shadow results while a run goes, in small batches written off the event loop.

One INSERT per result would cost more CPU than the request itself at hundreds of requests per second, and
a blocking write on the loop would add its duration to the TTFT of every stream in flight. So rows wait at
most `max_delay_s` (or until `batch_size` are pending) and are inserted in a worker thread, ignoring
duplicates of the natural key, which makes a rerun or an overlapping resume harmless.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from shadowjudge.errors import ShadowJudgeError
from shadowjudge.store import ShadowResult
from shadowjudge.store.models import fit_column

RESULT_KEY = ["run_id", "sample_id", "target", "attempt"]
COLUMNS = ("run_id", "sample_id", "target", "model", "attempt", "output_text", "ttft_ms", "itl_ms", "tpot_ms",
           "latency_ms", "input_tokens", "output_tokens", "cost_usd", "error_class", "retries")


class ResultStoreError(ShadowJudgeError):
    """Results could not be written to the store."""


class ResultWriter:
    def __init__(self, engine: Engine, *, batch_size: int = 64, max_delay_s: float = 0.1):
        self.engine = engine
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._writing: asyncio.Future[None] | None = None  # the insert in its thread, which a cancel does not stop
        # One INSERT .. ON CONFLICT DO NOTHING executed for many rows: compiled once and cached, unlike a
        # multi-VALUES statement built per batch, which costs more to compile than the rows cost to write.
        dialect_insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
        self._statement = dialect_insert(ShadowResult.__table__).on_conflict_do_nothing(index_elements=RESULT_KEY)

    def add(self, row: dict[str, Any]) -> None:
        pending = {c: row.get(c) for c in COLUMNS}
        pending["model"] = fit_column(ShadowResult.model, pending["model"])  # a config's name, of any length
        self._pending.append(pending)
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    def close(self) -> None:
        """Ask `run` to write what is pending and return."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Flush until closed; on cancellation (an interrupted run) still write what has arrived, the batch whose
        insert was under way included, before returning (else a resume read the store before it committed, and
        sent those requests again)."""
        try:
            while not self._closing:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.max_delay_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                await self.flush()
            await self.flush()
        except asyncio.CancelledError:
            if self._writing is not None:  # the batch being written when the cancel came: wait for its commit
                await asyncio.wait([self._writing])
            await self.flush()
            raise

    async def flush(self) -> None:
        """Write what is pending in transactions of at most `batch_size` rows, so a fault loses one batch."""
        while self._pending:
            rows, self._pending = self._pending[:self.batch_size], self._pending[self.batch_size:]
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._insert, rows))
            await asyncio.shield(self._writing)
            self._writing = None

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(self._statement, rows)
        except (SQLAlchemyError, ValueError, TypeError) as exc:  # the driver refusing a value raises the latter two
            raise ResultStoreError(f"cannot store {len(rows)} shadow results: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300]}") from None
