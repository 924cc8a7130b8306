"""The per-endpoint scheduler: the one place that decides when an attempt to an endpoint starts.

Every attempt of a worker is offered here first, whatever its source — fan-out's first
attempt, a task from ``webhooks.deliveries`` (queued, retried or deferred), a delivery of the
parked backlog that the sweeper leased — and gets one of five answers:

``START``  a slot is taken now; the caller makes the attempt and then calls :meth:`finished`;
``WAIT``   the endpoint is at its cap but answers fast: the offer waits here, in memory, and
           starts in arrival order as slots free (the message stays unacked, so the wait is
           bounded by what the worker's prefetch already holds);
``QUEUE``  fan-out publishes a task to ``webhooks.deliveries`` instead of sending itself
           (a slow endpoint must not hold the event, nor the worker's global cap be passed);
``DEFER``  a task of a slow endpoint at its cap goes back to the broker for ``delay`` seconds
           (a leased delivery, to the parked backlog);
``PARK``   fan-out writes the delivery as parked; the sweeper attempts it at the endpoint's pace.
           An ordered endpoint's attempts are started only for its lane (:mod:`.ordered`):
           whatever else is offered for it goes to its backlog (a task's delivery is parked, a
           leased delivery handed back), in which the lane sends them one at a time, in order.

An offer that waits is decided later: it starts when a slot frees, or, once the endpoint turns
slow, fan-out's offers are queued and tasks deferred, so a hanging endpoint holds nothing.

An endpoint with a ``rate_limit`` also needs a token of its bucket (:mod:`.pacing`) to start:
fan-out's deliveries beyond the rate are parked, the sweeper sends them at the rate, and a
task that finds no token waits here for its turn (or, past that, is deferred to it).

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

from worker.pipeline.endpoint_state import (
    NO_WAITERS,
    NOTHING_IN_FLIGHT,
    EndpointState,
)
from worker.pipeline.offers import Decision, EndpointView, Offer, Route, Source
from worker.pipeline.pacing import Bucket, share

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
IDLE_FORGET_SECONDS = 300.0
MAX_ENDPOINTS = 100_000
# How long a task of an endpoint at its rate limit may wait here for its turn before it goes
# back to the broker: the sweeper releases about half a second of the rate at a time.
RATE_HOLD_SECONDS = 1.0


def _no_limits(_webhook_id: str) -> float | None:
    return None


def _unordered(_webhook_id: str) -> bool:
    return False


class Scheduler:
    def __init__(
        self,
        *,
        cap: int,
        global_cap: int,
        defer_tiers: Sequence[float],
        rate_limits: Callable[[str], float | None] = _no_limits,
        ordered: Callable[[str], bool] = _unordered,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate_limits`` gives an endpoint's ``rate_limit`` or None, ``ordered`` whether its
        attempts go one at a time in order (:mod:`.ordered`): lookups, no I/O."""
        self._cap = cap
        self._rate_limits = rate_limits
        self._ordered = ordered
        self._workers = 1
        self._global_cap = global_cap
        self._tiers = tuple(defer_tiers)
        self._clock = clock
        self._endpoints: dict[str, EndpointState] = {}
        self._tickets = itertools.count()
        self._in_flight = 0
        # Endpoints with a waiting line, for review() to look at.
        self._lines: set[str] = set()
        self._forgotten_at = clock()
        self._limit = MAX_ENDPOINTS

    # --- offers ---------------------------------------------------------------------------

    def offer(self, webhook_id: str, source: Source, deferrals: int = 0) -> Offer:
        """Offer an attempt; the returned offer is decided now or, for WAIT, later."""
        if source is not Source.LANE and self._ordered(webhook_id):
            # One at a time, in order: its lane's to send (see PARK above).
            offer = Offer(webhook_id, source, None)
            offer.settle(Decision(Route.PARK))
            return offer
        now = self._clock()
        endpoint = self._endpoint(webhook_id, now)
        self._pace(webhook_id, endpoint, now)
        slow = endpoint.slow(now)
        if source is Source.NEW:
            return self._offer_new(webhook_id, endpoint, slow)
        return self._offer_task(webhook_id, endpoint, source, slow, deferrals, now)

    async def admit(self, webhook_id: str, source: Source, deferrals: int = 0) -> Decision:
        """:meth:`offer`, waiting for the decision; a cancelled wait gives its place back."""
        offer = self.offer(webhook_id, source, deferrals)
        try:
            return await offer.wait()
        except asyncio.CancelledError:
            self.withdraw(offer)
            raise

    def _offer_new(self, webhook_id: str, endpoint: EndpointState, slow: bool) -> Offer:
        offer = Offer(webhook_id, Source.NEW, None)
        if endpoint.parked:
            # New deliveries join the back of a parked backlog: they neither overtake it nor
            # crowd the slots the sweeper refills.
            endpoint.park_mark += 1
            offer.settle(Decision(Route.PARK))
        elif slow:
            if len(endpoint.in_flight) + self._queued(endpoint) >= self._cap:
                endpoint.parked = True
                endpoint.park_mark += 1
                offer.settle(Decision(Route.PARK))
            else:
                offer.settle(Decision(Route.QUEUE))
        elif self._in_flight >= self._global_cap:
            offer.settle(Decision(Route.QUEUE))
        elif endpoint.bucket is not None and not endpoint.bucket.ready(self._clock()):
            # Beyond its rate limit: the backlog waits in the database and the sweeper
            # releases it at the rate (see room).
            endpoint.parked = True
            endpoint.park_mark += 1
            offer.settle(Decision(Route.PARK))
        elif not endpoint.waiting and len(endpoint.in_flight) < self._new_cap(endpoint):
            offer.settle(self._start(endpoint))
        else:
            self._enqueue(webhook_id, endpoint, offer)
        return offer

    def _offer_task(
        self,
        webhook_id: str,
        endpoint: EndpointState,
        source: Source,
        slow: bool,
        deferrals: int,
        now: float,
    ) -> Offer:
        if not slow and endpoint.bucket is None:
            offer = Offer(webhook_id, source, None)
        elif len(endpoint.waiting) < self._cap:
            hold = HOLD_SECONDS if slow else RATE_HOLD_SECONDS
            offer = Offer(webhook_id, source, now + hold)
        else:
            offer = Offer(webhook_id, source, None)
            offer.settle(self._defer(endpoint, deferrals, now))
            return offer
        if not endpoint.waiting and self._can_start(endpoint, now):
            offer.settle(self._start(endpoint))
            return offer
        self._enqueue(webhook_id, endpoint, offer)
        return offer

    def _enqueue(self, webhook_id: str, endpoint: EndpointState, offer: Offer) -> None:
        if endpoint.waiting is NO_WAITERS:
            endpoint.waiting = collections.deque()
        endpoint.waiting.append(offer)
        self._lines.add(webhook_id)

    # --- attempts -------------------------------------------------------------------------

    def finished(
        self, webhook_id: str, ticket: int, *, answered: bool = True, seconds: float | None = None
    ) -> None:
        """An attempt started with ``ticket`` ended: learn from it and hand its slot on.

        ``seconds`` is the request's own time, when the caller measured it: the slot's time
        also holds the worker's reads before the request, which under load say more about the
        worker than the endpoint. ``answered=False`` for a start that sent nothing (the
        endpoint was deleted or disabled meanwhile, or the task was unreadable): its time says
        nothing about the endpoint.
        """
        now = self._clock()
        endpoint = self._endpoints[webhook_id]
        started = endpoint.in_flight.pop(ticket)
        if not endpoint.in_flight:
            endpoint.in_flight = NOTHING_IN_FLIGHT
        self._in_flight -= 1
        if answered:
            if seconds is None:
                seconds = now - started
            average = endpoint.average
            endpoint.average = (
                seconds if average is None else average + WEIGHT * (seconds - average)
            )
        endpoint.used_at = now
        self._hand_on(webhook_id, endpoint, now)

    def _hand_on(self, webhook_id: str, endpoint: EndpointState, now: float) -> None:
        """Give free slots to the waiting line, oldest first; once the endpoint turns slow,
        send fan-out's waiters to the parked backlog and tasks back to the broker."""
        while endpoint.waiting and self._can_start(endpoint, now):
            offer = endpoint.waiting.popleft()
            offer.settle(self._start(endpoint))
        if endpoint.waiting and endpoint.slow(now):
            self._evict(webhook_id, endpoint, now, everything=True)
        elif not endpoint.waiting:
            endpoint.waiting = NO_WAITERS
            self._lines.discard(webhook_id)

    def review(self) -> None:
        """Let waits that have run out go, and forget idle endpoints. Call it a few times a
        second: a hanging endpoint shows itself only through time passing."""
        now = self._clock()
        for webhook_id in list(self._lines):
            endpoint = self._endpoints[webhook_id]
            self._pace(webhook_id, endpoint, now)
            if endpoint.bucket is not None or not endpoint.in_flight:
                # Its turn may have come with time alone, not only with an attempt's end; and
                # a line with nothing in flight (its limit was lifted while it waited) has no
                # attempt whose end would hand it on.
                self._hand_on(webhook_id, endpoint, now)
                if webhook_id not in self._lines:
                    continue
            self._evict(webhook_id, endpoint, now, everything=endpoint.slow(now))
        if now - self._forgotten_at >= IDLE_FORGET_SECONDS / 10:
            self._forget(now)

    def _evict(
        self, webhook_id: str, endpoint: EndpointState, now: float, *, everything: bool
    ) -> None:
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
        endpoint.waiting = kept or NO_WAITERS
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
                endpoint.waiting = NO_WAITERS
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
        over its response time (none while it is slow and its slots are taken or spoken for),
        within its rate limit."""
        now = self._clock()
        endpoint = self._endpoint(webhook_id, now)
        self._pace(webhook_id, endpoint, now)
        return endpoint.room(self._cap, self._queued(endpoint), seconds, now)

    def parked(self) -> list[str]:
        """Endpoints with a parked backlog that this worker sweeps. An ordered endpoint's
        backlog is its lane's, which sends it one at a time: the sweeper, which releases in
        bulk, drops it (and takes it up again at an adoption once it is no longer ordered)."""
        swept = []
        for webhook_id, endpoint in self._endpoints.items():
            if endpoint.parked and self._ordered(webhook_id):
                endpoint.parked = False
            elif endpoint.parked:
                swept.append(webhook_id)
        return swept

    def adopt(self, webhook_ids: Sequence[str]) -> None:
        """Sweep these endpoints' parked backlogs too (another worker may have parked them)."""
        now = self._clock()
        for webhook_id in webhook_ids:
            if self._ordered(webhook_id):
                continue  # its lane sends its backlog (see parked)
            endpoint = self._endpoint(webhook_id, now)
            endpoint.parked = True
            endpoint.park_mark += 1

    def set_workers(self, count: int) -> None:
        """How many workers share the endpoints' rate limits (see :mod:`.pacing`)."""
        self._workers = max(1, count)

    def park_mark(self, webhook_id: str) -> int:
        """Taken by a sweep before it claims, and handed back to :meth:`drained`."""
        endpoint = self._endpoints.get(webhook_id)
        return endpoint.park_mark if endpoint is not None else 0

    def drained(self, webhook_id: str, mark: int) -> None:
        """A sweep that took ``mark`` found the parked backlog empty: unless something was
        parked (or adopted) since, the endpoint's new deliveries are decided afresh."""
        endpoint = self._endpoints.get(webhook_id)
        if endpoint is not None and endpoint.park_mark == mark:
            endpoint.parked = False

    # --- questions ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def view(self, webhook_id: str) -> EndpointView:
        now = self._clock()
        endpoint = self._endpoints.get(webhook_id) or EndpointState(now)
        return EndpointView(
            in_flight=len(endpoint.in_flight),
            waiting=len(endpoint.waiting),
            queued=self._queued(endpoint),
            parked=endpoint.parked,
            response_seconds=endpoint.estimate(now),
            slow=endpoint.slow(now),
        )

    def __len__(self) -> int:
        """Endpoints remembered now."""
        return len(self._endpoints)

    # --- bookkeeping ----------------------------------------------------------------------

    def _endpoint(self, webhook_id: str, now: float) -> EndpointState:
        endpoint = self._endpoints.get(webhook_id)
        if endpoint is None:
            if len(self._endpoints) >= self._limit:
                self._forget(now, at_once=True)
                # Only idle records go; if the busy ones alone fill the table, let it grow
                # rather than scan it again for every new endpoint.
                self._limit = max(MAX_ENDPOINTS, 2 * len(self._endpoints))
            endpoint = self._endpoints[webhook_id] = EndpointState(now)
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

    def _can_start(self, endpoint: EndpointState, now: float) -> bool:
        if len(endpoint.in_flight) >= self._cap:
            return False
        return endpoint.bucket is None or endpoint.bucket.ready(now)

    def _pace(self, webhook_id: str, endpoint: EndpointState, now: float) -> None:
        """Give the endpoint its bucket, at this worker's share of its current rate limit."""
        limit = self._rate_limits(webhook_id)
        if limit is None:
            endpoint.bucket = None
        else:
            # An ordered endpoint is sent to by one worker only, its lane's: it takes it all.
            workers = 1 if self._ordered(webhook_id) else self._workers
            if endpoint.bucket is None:
                endpoint.bucket = Bucket(share(limit, workers), now)
            else:
                endpoint.bucket.rate = share(limit, workers)

    def _start(self, endpoint: EndpointState) -> Decision:
        ticket = next(self._tickets)
        if endpoint.in_flight is NOTHING_IN_FLIGHT:
            endpoint.in_flight = {}
        now = self._clock()
        endpoint.in_flight[ticket] = now
        if endpoint.bucket is not None:
            endpoint.bucket.take(now)
        self._in_flight += 1
        return Decision(Route.START, ticket=ticket)

    def _new_cap(self, endpoint: EndpointState) -> int:
        """Fan-out's first attempts to an endpoint never measured are a few probes."""
        return self._cap if endpoint.average is not None else min(PROBES, self._cap)

    def _queued(self, endpoint: EndpointState) -> int:
        if endpoint.queued and self._clock() - endpoint.queued_at > QUEUED_MEMORY_SECONDS:
            endpoint.queued = 0
        return endpoint.queued

    def _defer(self, endpoint: EndpointState, deferrals: int, now: float) -> Decision:
        delay = endpoint.deferral(self._tiers, self._cap, deferrals, now)
        return Decision(Route.DEFER, delay=delay)
