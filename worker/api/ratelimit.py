"""A per-token rate limit for the management API: one token bucket per API token, in process.

Each bucket holds at most ``burst`` requests and refills at ``rate`` per second. The state
lives in the process, so with N API replicas a token gets up to N times the rate; that is
enough to stop one runaway client from starving the others without a shared store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Buckets untouched long enough to be full again are dropped past this many, so that a
# stream of distinct tokens cannot grow the table without bound.
PRUNE_ABOVE = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by an API token's id."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str) -> float:
        """Take one request from ``key``'s bucket: 0 if allowed, else seconds until one is."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= PRUNE_ABOVE:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
