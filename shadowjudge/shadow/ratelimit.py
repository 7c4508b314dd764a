"""Async token buckets for per-target RPM and TPM limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """Refills at `rate_per_s` up to `capacity`.

    `acquire(n)` waits until the bucket holds min(n, capacity) and then takes n, so the level can go
    negative: a request larger than the whole bucket (a long prompt under a small TPM) still goes through,
    and the debt delays the requests after it, which keeps the long-run rate right without deadlocking.
    Waiters are served in arrival order.
    """

    def __init__(self, rate_per_s: float, capacity: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate = rate_per_s
        self.capacity = capacity if capacity is not None else max(1.0, rate_per_s)
        self._level = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()
        self._lock = asyncio.Lock()

    @classmethod
    def per_minute(cls, limit: int, **kwargs) -> "TokenBucket":
        """A bucket for a provider's per-minute limit, allowing bursts of one second's worth."""
        rate = limit / 60.0
        return cls(rate, max(1.0, rate), **kwargs)

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    async def acquire(self, amount: float = 1.0) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            while self._level < need:
                await self._sleep((need - self._level) / self.rate)
                self._refill()
            self._level -= amount

    def settle(self, reserved: float, used: float) -> None:
        """Correct a reservation by what the request used: give back what it did not use (max_tokens it did not
        generate), or charge what it used beyond it as debt (no max_tokens, a prompt the local tokenizer
        undercounted), so the long-run rate holds to what the provider counted."""
        self._refill()
        self._level = min(self.capacity, self._level + reserved - used)
