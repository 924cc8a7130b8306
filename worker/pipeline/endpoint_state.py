"""What the scheduler keeps per endpoint (:mod:`worker.pipeline.scheduler` decides with it)."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from worker.pipeline.offers import Offer
from worker.pipeline.pacing import Bucket

# An endpoint answering slower than this on average is slow: fan-out does not send to it
# itself (the event would wait for it) and a full endpoint's new deliveries are parked.
FAST_SECONDS = 0.25
# How many of the shortest deferral tiers a fast endpoint's tasks go through (1 s, 5 s, 30 s).
FAST_ENDPOINT_TIERS = 3
# The most parked deliveries leased for one endpoint at a time.
MAX_RELEASE = 1_000

# Shared empty containers: most endpoints, most of the time, have nothing in flight and nobody
# waiting, and a deque of their own would cost 0.6 KB each. Replaced on first use.
NO_WAITERS: collections.deque[Offer] = collections.deque()
NOTHING_IN_FLIGHT: dict[int, float] = {}


class EndpointState:
    __slots__ = (
        "average",
        "bucket",
        "in_flight",
        "next_turn",
        "park_mark",
        "parked",
        "queued",
        "queued_at",
        "used_at",
        "waiting",
    )

    def __init__(self, now: float) -> None:
        self.average: float | None = None
        # Start times by ticket; dicts keep insertion order, so the first is the oldest.
        self.in_flight = NOTHING_IN_FLIGHT
        self.waiting = NO_WAITERS
        self.queued = 0
        self.queued_at = 0.0
        self.next_turn = 0.0
        self.parked = False
        # Counts every decision to park and every adoption: a sweep that found the backlog
        # empty clears ``parked`` only if nothing was parked since it looked (see drained).
        self.park_mark = 0
        # Only for an endpoint with a rate limit.
        self.bucket: Bucket | None = None
        self.used_at = now

    def idle(self) -> bool:
        return not (self.in_flight or self.waiting or self.queued or self.parked)

    def waited(self, now: float) -> float:
        """How long the oldest attempt in flight has been waiting for its answer."""
        return now - next(iter(self.in_flight.values())) if self.in_flight else 0.0

    def estimate(self, now: float) -> float | None:
        """Its response time as known now: the average, or longer while one is overdue."""
        waited = self.waited(now)
        if self.average is None:
            return waited or None
        return max(self.average, waited)

    def slow(self, now: float) -> bool:
        """Slow once its average answer or its oldest attempt in flight passes FAST_SECONDS:
        a hanging endpoint shows before its first answer comes."""
        if self.waited(now) >= FAST_SECONDS:
            return True
        return self.average is not None and self.average >= FAST_SECONDS

    def deferral(self, tiers: Sequence[float], cap: int, deferrals: int, now: float) -> float:
        """The deferral tier for a task of this endpoint, busy at its ``cap``.

        A fast endpoint frees a slot soon: its tasks wait 1 s, then 5 s, then 30 s. A slow one
        finishes about one attempt per (response time / cap) seconds, so its deferred tasks get
        successive turns that far apart, each waiting in the shortest tier reaching its turn.
        """
        at_least = tiers[min(deferrals, FAST_ENDPOINT_TIERS - 1, len(tiers) - 1)]
        estimate = self.estimate(now)
        if self.bucket is not None:
            # At its rate limit: one turn per 1/rate seconds, whatever its answers' speed.
            spacing = max(1 / self.bucket.rate, (estimate or 0.0) / cap)
        elif estimate is None or estimate < FAST_SECONDS:
            return at_least
        else:
            spacing = estimate / cap
        turn = max(now, self.next_turn) + spacing
        self.next_turn = turn
        wait = max(turn - now, at_least)
        return next((tier for tier in tiers if tier >= wait), tiers[-1])

    def room(self, cap: int, queued: int, seconds: float, now: float) -> int:
        """About how many parked deliveries it can start within ``seconds``, with ``queued``
        tasks spoken for (see :meth:`~worker.pipeline.scheduler.Scheduler.room`)."""
        claimed = len(self.in_flight) + queued + len(self.waiting)
        if claimed >= cap and self.slow(now):
            return 0
        estimate = self.estimate(now)
        if estimate is None:
            room = max(0, cap - claimed)
        else:
            room = min(MAX_RELEASE, max(1, round(cap * seconds / max(estimate, 0.001))))
        if self.bucket is not None:
            # What its rate allows in that time, less what waits here for a token (the
            # sweeper takes off what it holds leased itself). Not less what is queued: that
            # count is of tasks this worker published, which may come round to any worker.
            allowed = self.bucket.allowance(now, seconds)
            room = min(room, allowed - len(self.waiting))
        return max(0, room)
