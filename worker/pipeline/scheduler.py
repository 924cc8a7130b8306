"""The per-endpoint scheduler: the one place that decides when an attempt to an endpoint starts.

Every attempt of a worker is offered here first, whatever its source — fan-out's first
attempt, a task from ``webhooks.deliveries`` (queued, retried, deferred or released from the
parked backlog) — and gets one of five answers:

``START``  a slot is taken now; the caller makes the attempt and then calls :meth:`finished`;
``WAIT``   the endpoint is at its cap but answers fast: the offer waits here, in memory, and
           starts in arrival order as slots free (the message stays unacked, so the wait is
           bounded by what the worker's prefetch already holds);
``QUEUE``  fan-out publishes a task to ``webhooks.deliveries`` instead of sending itself
           (a slow endpoint must not hold the event, nor the worker's global cap be passed);
``DEFER``  a task of a slow endpoint at its cap goes back to the broker for ``delay`` seconds;
``PARK``   fan-out writes the delivery as parked; the sweeper releases it at the endpoint's pace.

An offer that waits is decided later: it starts when a slot frees, or, once the endpoint turns
slow, fan-out's offers are queued and tasks deferred, so a hanging endpoint holds nothing.

It holds everything known per endpoint: the attempts in flight and when each started, a moving
average of response times, the tasks queued from here that have not come round yet, the next
deferral turn, whether a parked backlog exists, and the waiting line. It does no I/O and reads
time from the clock it is given, so each decision is unit-tested with a fake clock.

Memory: an endpoint's record holds a few numbers, about 0.2 KB: 100,000 distinct endpoints
cost about 18 MB besides their ids (``tests/test_scheduler.py`` measures it). A record with
nothing in flight, waiting, queued or parked is dropped :data:`IDLE_FORGET_SECONDS` after its
last use, and beyond :data:`MAX_ENDPOINTS` records the idle ones go at once; a forgotten
endpoint is simply measured again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Sequence

from worker.pipeline.offers import Decision, EndpointView, Offer, Route, Source

# An endpoint answering slower than this on average is slow: fan-out does not send to it
# itself (the event would wait for it) and a full endpoint's new deliveries are parked.
FAST_SECONDS = 0.25
# How long a task of a slow endpoint at its cap may wait for a slot before it is deferred.
HOLD_SECONDS = 0.25
# Attempts at once to an endpoint not measured yet: a few probes, so a hanging one holds few.
PROBES = 2
# Weight of the newest response time in the moving average: a handful of slow answers mark an
# endpoint slow.
WEIGHT = 0.2
# A count of tasks queued for an endpoint that has not moved for this long is forgotten: they
# went to another worker.
QUEUED_MEMORY_SECONDS = 10.0
# How many of the shortest deferral tiers a fast endpoint's tasks go through (1 s, 5 s, 30 s).
FAST_ENDPOINT_TIERS = 3
# The most parked deliveries released for one endpoint at a time.
MAX_RELEASE = 1_000
IDLE_FORGET_SECONDS = 300.0
MAX_ENDPOINTS = 100_000


# Shared empty containers: most endpoints, most of the time, have nothing in flight and nobody
# waiting, and a deque of their own would cost 0.6 KB each. Replaced on first use.
_NO_WAITERS: collections.deque[Offer] = collections.deque()
_NOTHING_IN_FLIGHT: dict[int, float] = {}


class _Endpoint:
    __slots__ = (
        "average",
        "in_flight",
        "next_turn",
        "parked",
        "queued",
        "queued_at",
        "used_at",
        "waiting",
    )

    def __init__(self, now: float) -> None:
        self.average: float | None = None
        # Start times by ticket; dicts keep insertion order, so the first is the oldest.
        self.in_flight = _NOTHING_IN_FLIGHT
        self.waiting = _NO_WAITERS
        self.queued = 0
        self.queued_at = 0.0
        self.next_turn = 0.0
        self.parked = False
        self.used_at = now

    def idle(self) -> bool:
        return not (self.in_flight or self.waiting or self.queued or self.parked)


class Scheduler:
    def __init__(
        self,
        *,
        cap: int,
        global_cap: int,
        defer_tiers: Sequence[float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cap = cap
        self._global_cap = global_cap
        self._tiers = tuple(defer_tiers)
        self._clock = clock
        self._endpoints: dict[str, _Endpoint] = {}
        self._tickets = itertools.count()
        self._in_flight = 0
        # Endpoints with a waiting line, for review() to look at.
        self._lines: set[str] = set()
        self._forgotten_at = clock()
        self._limit = MAX_ENDPOINTS

    # --- offers ---------------------------------------------------------------------------

    def offer(self, webhook_id: str, source: Source, deferrals: int = 0) -> Offer:
        """Offer an attempt; the returned offer is decided now or, for WAIT, later."""
        now = self._clock()
        endpoint = self._endpoint(webhook_id, now)
        slow = self._slow(endpoint, now)
        if source is Source.NEW:
            return self._offer_new(webhook_id, endpoint, slow)
        return self._offer_task(webhook_id, endpoint, slow, deferrals, now)

    async def admit(self, webhook_id: str, source: Source, deferrals: int = 0) -> Decision:
        """:meth:`offer`, waiting for the decision; a cancelled wait gives its place back."""
        offer = self.offer(webhook_id, source, deferrals)
        try:
            return await offer.wait()
        except asyncio.CancelledError:
            self.withdraw(offer)
            raise

    def _offer_new(self, webhook_id: str, endpoint: _Endpoint, slow: bool) -> Offer:
        offer = Offer(webhook_id, Source.NEW, None)
        if endpoint.parked:
            # New deliveries join the back of a parked backlog: they neither overtake it nor
            # crowd the slots the sweeper refills.
            offer.settle(Decision(Route.PARK))
        elif slow:
            if len(endpoint.in_flight) + self._queued(endpoint) >= self._cap:
                endpoint.parked = True
                offer.settle(Decision(Route.PARK))
            else:
                offer.settle(Decision(Route.QUEUE))
        elif self._in_flight >= self._global_cap:
            offer.settle(Decision(Route.QUEUE))
        elif not endpoint.waiting and len(endpoint.in_flight) < self._new_cap(endpoint):
            offer.settle(self._start(endpoint))
        else:
            self._enqueue(webhook_id, endpoint, offer)
        return offer

    def _offer_task(
        self, webhook_id: str, endpoint: _Endpoint, slow: bool, deferrals: int, now: float
    ) -> Offer:
        if not slow:
            offer = Offer(webhook_id, Source.TASK, None)
        elif len(endpoint.waiting) < self._cap:
            offer = Offer(webhook_id, Source.TASK, now + HOLD_SECONDS)
        else:
            offer = Offer(webhook_id, Source.TASK, None)
            offer.settle(self._defer(endpoint, deferrals, now))
            return offer
        if not endpoint.waiting and len(endpoint.in_flight) < self._cap:
            offer.settle(self._start(endpoint))
            return offer
        self._enqueue(webhook_id, endpoint, offer)
        return offer

    def _enqueue(self, webhook_id: str, endpoint: _Endpoint, offer: Offer) -> None:
        if endpoint.waiting is _NO_WAITERS:
            endpoint.waiting = collections.deque()
        endpoint.waiting.append(offer)
        self._lines.add(webhook_id)

    # --- attempts -------------------------------------------------------------------------

    def finished(self, webhook_id: str, ticket: int, *, answered: bool = True) -> None:
        """An attempt started with ``ticket`` ended: learn from it and hand its slot on.

        ``answered=False`` for a start that sent nothing (the endpoint was deleted or disabled
        meanwhile, or the task was unreadable): its time says nothing about the endpoint.
        """
        now = self._clock()
        endpoint = self._endpoints[webhook_id]
        started = endpoint.in_flight.pop(ticket)
        if not endpoint.in_flight:
            endpoint.in_flight = _NOTHING_IN_FLIGHT
        self._in_flight -= 1
        if answered:
            seconds = now - started
            average = endpoint.average
            endpoint.average = (
                seconds if average is None else average + WEIGHT * (seconds - average)
            )
        endpoint.used_at = now
        self._hand_on(webhook_id, endpoint, now)

    def _hand_on(self, webhook_id: str, endpoint: _Endpoint, now: float) -> None:
        """Give free slots to the waiting line, oldest first; once the endpoint turns slow,
        send fan-out's waiters to the parked backlog and tasks back to the broker."""
        while endpoint.waiting and len(endpoint.in_flight) < self._cap:
            offer = endpoint.waiting.popleft()
            offer.settle(self._start(endpoint))
        if endpoint.waiting and self._slow(endpoint, now):
            self._evict(webhook_id, endpoint, now, everything=True)
        elif not endpoint.waiting:
            endpoint.waiting = _NO_WAITERS
            self._lines.discard(webhook_id)

    def review(self) -> None:
        """Let waits that have run out go, and forget idle endpoints. Call it a few times a
        second: a hanging endpoint shows itself only through time passing."""
        now = self._clock()
        for webhook_id in list(self._lines):
            endpoint = self._endpoints[webhook_id]
            self._evict(webhook_id, endpoint, now, everything=self._slow(endpoint, now))
        if now - self._forgotten_at >= IDLE_FORGET_SECONDS / 10:
            self._forget(now)

    def _evict(self, webhook_id: str, endpoint: _Endpoint, now: float, *, everything: bool) -> None:
        kept: collections.deque[Offer] = collections.deque()
        for offer in endpoint.waiting:
            timed_out = offer.deadline is not None and offer.deadline <= now
            if not (everything or timed_out):
                kept.append(offer)
            elif offer.source is Source.NEW:
                # Its event row is already being written as pending: publish a task rather
                # than park; the tasks then count toward the cap, so the next ones park.
                offer.settle(Decision(Route.QUEUE))
            else:
                offer.settle(self._defer(endpoint, 0, now))
        endpoint.waiting = kept or _NO_WAITERS
        if not kept:
            self._lines.discard(webhook_id)

    def withdraw(self, offer: Offer) -> None:
        """The offer's caller gave up (its task was cancelled): free its place or slot."""
        endpoint = self._endpoints.get(offer.webhook_id)
        if endpoint is None:
            return
        if offer.decision is None:
            endpoint.waiting.remove(offer)
            if not endpoint.waiting:
                endpoint.waiting = _NO_WAITERS
                self._lines.discard(offer.webhook_id)
        elif offer.decision.route is Route.START:
            self.finished(offer.webhook_id, offer.decision.ticket)

    # --- the broker and the parked backlog -------------------------------------------------

    def queued(self, webhook_id: str) -> None:
        """A task for the endpoint was published from here: a slot spoken for until it comes
        round, so that parking and release do not overcommit the endpoint."""
        now = self._clock()
        endpoint = self._endpoint(webhook_id, now)
        endpoint.queued = self._queued(endpoint) + 1
        endpoint.queued_at = now

    def came_round(self, webhook_id: str) -> None:
        """A task queued (not deferred) for the endpoint arrived; this worker's or another's."""
        endpoint = self._endpoints.get(webhook_id)
        if endpoint is not None and endpoint.queued:
            endpoint.queued -= 1
            endpoint.queued_at = self._clock()

    def room(self, webhook_id: str, seconds: float) -> int:
        """About how many parked deliveries the endpoint can start within ``seconds``: its cap
        over its response time, less what is in flight or queued for it already."""
        now = self._clock()
        endpoint = self._endpoint(webhook_id, now)
        claimed = len(endpoint.in_flight) + self._queued(endpoint) + len(endpoint.waiting)
        if claimed >= self._cap and self._slow(endpoint, now):
            return 0
        estimate = self._estimate(endpoint, now)
        if estimate is None:
            return max(0, self._cap - claimed)
        return min(MAX_RELEASE, max(1, round(self._cap * seconds / max(estimate, 0.001))))

    def parked(self) -> list[str]:
        """Endpoints with a parked backlog that this worker sweeps."""
        return [w for w, endpoint in self._endpoints.items() if endpoint.parked]

    def adopt(self, webhook_ids: Sequence[str]) -> None:
        """Sweep these endpoints' parked backlogs too (another worker may have parked them)."""
        now = self._clock()
        for webhook_id in webhook_ids:
            self._endpoint(webhook_id, now).parked = True

    def drained(self, webhook_id: str) -> None:
        """The endpoint's parked backlog is empty: its new deliveries are decided afresh."""
        endpoint = self._endpoints.get(webhook_id)
        if endpoint is not None:
            endpoint.parked = False

    # --- questions ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def view(self, webhook_id: str) -> EndpointView:
        now = self._clock()
        endpoint = self._endpoints.get(webhook_id) or _Endpoint(now)
        return EndpointView(
            in_flight=len(endpoint.in_flight),
            waiting=len(endpoint.waiting),
            queued=self._queued(endpoint),
            parked=endpoint.parked,
            response_seconds=self._estimate(endpoint, now),
            slow=self._slow(endpoint, now),
        )

    def __len__(self) -> int:
        """Endpoints remembered now."""
        return len(self._endpoints)

    # --- bookkeeping ----------------------------------------------------------------------

    def _endpoint(self, webhook_id: str, now: float) -> _Endpoint:
        endpoint = self._endpoints.get(webhook_id)
        if endpoint is None:
            if len(self._endpoints) >= self._limit:
                self._forget(now, at_once=True)
                # Only idle records go; if the busy ones alone fill the table, let it grow
                # rather than scan it again for every new endpoint.
                self._limit = max(MAX_ENDPOINTS, 2 * len(self._endpoints))
            endpoint = self._endpoints[webhook_id] = _Endpoint(now)
        else:
            endpoint.used_at = now
        return endpoint

    def _forget(self, now: float, *, at_once: bool = False) -> None:
        self._forgotten_at = now
        self._endpoints = {
            webhook_id: endpoint
            for webhook_id, endpoint in self._endpoints.items()
            if not (
                self._queued(endpoint) == 0
                and endpoint.idle()
                and (at_once or now - endpoint.used_at > IDLE_FORGET_SECONDS)
            )
        }

    def _start(self, endpoint: _Endpoint) -> Decision:
        ticket = next(self._tickets)
        if endpoint.in_flight is _NOTHING_IN_FLIGHT:
            endpoint.in_flight = {}
        endpoint.in_flight[ticket] = self._clock()
        self._in_flight += 1
        return Decision(Route.START, ticket=ticket)

    def _new_cap(self, endpoint: _Endpoint) -> int:
        """Fan-out's first attempts to an endpoint never measured are a few probes."""
        return self._cap if endpoint.average is not None else min(PROBES, self._cap)

    def _queued(self, endpoint: _Endpoint) -> int:
        if endpoint.queued and self._clock() - endpoint.queued_at > QUEUED_MEMORY_SECONDS:
            endpoint.queued = 0
        return endpoint.queued

    @staticmethod
    def _waited(endpoint: _Endpoint, now: float) -> float:
        """How long the oldest attempt in flight has been waiting for its answer."""
        return now - next(iter(endpoint.in_flight.values())) if endpoint.in_flight else 0.0

    def _estimate(self, endpoint: _Endpoint, now: float) -> float | None:
        waited = self._waited(endpoint, now)
        if endpoint.average is None:
            return waited or None
        return max(endpoint.average, waited)

    def _slow(self, endpoint: _Endpoint, now: float) -> bool:
        """Slow once its average answer or its oldest attempt in flight passes FAST_SECONDS:
        a hanging endpoint shows before its first answer comes."""
        if self._waited(endpoint, now) >= FAST_SECONDS:
            return True
        return endpoint.average is not None and endpoint.average >= FAST_SECONDS

    def _defer(self, endpoint: _Endpoint, deferrals: int, now: float) -> Decision:
        """The deferral tier for a task of a busy endpoint.

        A fast endpoint frees a slot soon: its tasks wait 1 s, then 5 s, then 30 s. A slow one
        finishes about one attempt per (response time / cap) seconds, so its deferred tasks get
        successive turns that far apart, each waiting in the shortest tier reaching its turn.
        """
        at_least = self._tiers[min(deferrals, FAST_ENDPOINT_TIERS - 1, len(self._tiers) - 1)]
        estimate = self._estimate(endpoint, now)
        if estimate is None or estimate < FAST_SECONDS:
            return Decision(Route.DEFER, delay=at_least)
        turn = max(now, endpoint.next_turn) + estimate / self._cap
        endpoint.next_turn = turn
        wait = max(turn - now, at_least)
        delay = next((tier for tier in self._tiers if tier >= wait), self._tiers[-1])
        return Decision(Route.DEFER, delay=delay)
