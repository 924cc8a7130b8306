"""Per-endpoint concurrency: at most ``cap`` attempts in flight to one endpoint.

A task that finds its endpoint busy may wait a moment for a slot — a healthy endpoint frees
one within milliseconds — but only as many tasks as the cap may wait at once, and none longer
than ``hold_seconds``. Everything beyond that is deferred to the broker by the caller, so a
slow endpoint holds at most twice its cap of the worker's prefetch and never all of it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable


class EndpointSlots:
    def __init__(self, cap: int, hold_seconds: float) -> None:
        self._cap = cap
        self._hold = hold_seconds
        self._busy: collections.Counter[str] = collections.Counter()
        self._waiting: collections.Counter[str] = collections.Counter()
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    def busy(self, webhook_id: str) -> int:
        """How many attempts to the endpoint are in flight."""
        return self._busy.get(webhook_id, 0)

    def full(self, webhook_id: str) -> bool:
        """True when waiting would not help: every slot taken and the waiting line full."""
        return self._busy[webhook_id] >= self._cap and self._waiting[webhook_id] >= self._cap

    async def acquire(self, webhook_id: str) -> bool:
        """Take a slot, waiting at most ``hold_seconds``; False means: defer the task."""
        if self.full(webhook_id):
            return False
        semaphore = self._semaphores.get(webhook_id)
        if semaphore is None:
            semaphore = self._semaphores[webhook_id] = asyncio.Semaphore(self._cap)
        if not semaphore.locked():
            # A slot is free: take it without arming a timer (the common case).
            await semaphore.acquire()
            self._busy[webhook_id] += 1
            return True
        self._waiting[webhook_id] += 1
        try:
            async with asyncio.timeout(self._hold):
                await semaphore.acquire()
            self._busy[webhook_id] += 1
        except TimeoutError:
            return False
        finally:
            self._waiting[webhook_id] -= 1
            self._forget_if_idle(webhook_id)
        return True

    def release(self, webhook_id: str) -> None:
        self._busy[webhook_id] -= 1
        self._semaphores[webhook_id].release()
        self._forget_if_idle(webhook_id)

    def _forget_if_idle(self, webhook_id: str) -> None:
        if self._busy[webhook_id] <= 0 and self._waiting[webhook_id] <= 0:
            self._busy.pop(webhook_id, None)
            self._waiting.pop(webhook_id, None)
            self._semaphores.pop(webhook_id, None)


class ResponseTimes:
    """How fast each endpoint answers: a moving average of its attempts' durations, and how
    long its oldest attempt in flight has waited so far (a slow endpoint shows before its
    first answer comes).

    Fan-out makes an event's first attempt itself only to endpoints that answer quickly, since
    the event waits for it. An endpoint not yet measured is tried by a few probes at a time, so
    a slow one holds a few events once, and then its tasks go through the queue.
    """

    # Weight of the newest attempt: a handful of slow answers mark an endpoint slow.
    WEIGHT = 0.2
    PROBES = 2
    MAX_ENDPOINTS = 100_000

    def __init__(self, fast_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._fast = fast_seconds
        self._clock = clock
        self._average: dict[str, float] = {}
        # Start times of the attempts in flight, per endpoint, by ticket. Dicts keep insertion
        # order, so the first entry is always the oldest attempt still in flight.
        self._in_flight: dict[str, dict[int, float]] = {}
        self._tickets = itertools.count()

    def started(self, webhook_id: str) -> int:
        """Note an attempt under way; pass what this returns to :meth:`finished`."""
        ticket = next(self._tickets)
        self._in_flight.setdefault(webhook_id, {})[ticket] = self._clock()
        return ticket

    def finished(self, webhook_id: str, ticket: int) -> None:
        starts = self._in_flight[webhook_id]
        start = starts.pop(ticket)
        if not starts:
            del self._in_flight[webhook_id]
        self.observe(webhook_id, self._clock() - start)

    def observe(self, webhook_id: str, seconds: float) -> None:
        average = self._average.get(webhook_id)
        if average is None:
            if len(self._average) >= self.MAX_ENDPOINTS:
                self._average.clear()  # bounded memory; endpoints are simply measured again
            self._average[webhook_id] = seconds
        else:
            self._average[webhook_id] = average + self.WEIGHT * (seconds - average)

    def _waited(self, webhook_id: str) -> float:
        starts = self._in_flight.get(webhook_id)
        return self._clock() - next(iter(starts.values())) if starts else 0.0

    def estimate(self, webhook_id: str) -> float | None:
        """Seconds an attempt to the endpoint takes, as far as is known yet."""
        average = self._average.get(webhook_id)
        waited = self._waited(webhook_id)
        if average is None:
            return waited or None
        return max(average, waited)

    def fast(self, webhook_id: str, in_flight: int) -> bool:
        if self._waited(webhook_id) >= self._fast:
            return False
        average = self._average.get(webhook_id)
        if average is None:
            return in_flight < self.PROBES
        return average < self._fast
