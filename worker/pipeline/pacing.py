"""An endpoint's rate limit, as the scheduler applies it: a token bucket per worker.

``rate_limit`` is attempts per second to the endpoint across every worker. Each worker takes an
equal share of it — the limit over the workers consuming ``webhooks.deliveries``, a count the
broker keeps (see :mod:`worker.pipeline.worker`) — so that no coordination is needed per
attempt: RabbitMQ hands each worker about the same part of the events and tasks, and the
parked backlog is shared, so each worker has work for its share while there is a backlog. A
worker that dies stops counting within seconds and the others' shares grow. On SQLite there is
one process, which takes the whole limit.

The bucket holds at most :data:`BURST_SECONDS` of the share (and at least one attempt), so the
rate over any second stays close to the share, and what the scheduler's review finds between
two looks is not lost.
"""

from __future__ import annotations

import math

# How much of its share a bucket may save up: a little more than the scheduler's review
# interval, so that waiting attempts are started at the full rate between two reviews.
BURST_SECONDS = 0.2


class Bucket:
    """``rate`` attempts a second on average, at most :data:`BURST_SECONDS` of them at once."""

    __slots__ = ("at", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        # One to begin with: a new bucket (a worker that just started, or an endpoint whose
        # record was forgotten) does not add a burst of its own.
        self.tokens = 1.0
        self.at = now

    def _fill(self, now: float) -> None:
        capacity = max(1.0, self.rate * BURST_SECONDS)
        self.tokens = min(capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def ready(self, now: float) -> bool:
        """An attempt may start now."""
        self._fill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> None:
        self._fill(now)
        self.tokens -= 1.0

    def wait(self, now: float) -> float:
        """Seconds until an attempt may start."""
        self._fill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def allowance(self, now: float, seconds: float) -> int:
        """How many attempts may start within the next ``seconds``."""
        self._fill(now)
        return max(0, math.floor(self.tokens + self.rate * seconds))


def share(rate_limit: float, workers: int) -> float:
    """One worker's part of an endpoint's limit."""
    return rate_limit / max(1, workers)
