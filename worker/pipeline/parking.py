"""Parking: a slow endpoint's backlog waits in the database, not in the broker.

When the scheduler finds an endpoint slow and every one of its slots taken or spoken for, a
task offered now could only be deferred, and deferred again: each round costs a publish, a
consume and an ack, CPU that the other endpoints' deliveries need. Fan-out instead writes the
delivery as ``parked``, in the same transaction as the event, and publishes nothing; a recovery
parks the deliveries it sends again. The sweeper here makes their attempts itself, about as
fast as the endpoint can take them (the scheduler's
:meth:`~worker.pipeline.scheduler.Scheduler.room`), oldest first: it leases a batch from the
database and feeds it to the scheduler through its feeders, each offering one delivery at a
time. At most the endpoint's cap of them offer or send at once, so the backlog never crowds the
endpoint's waiting line; over all endpoints, backlogs have at most half the worker's
``DELIVERY_CONCURRENCY`` under way. A feeder gives both back when its request ends and records
the attempt without them, while another feeder sends: an attempt's record would otherwise hold
a slot for as long as its request did.

No message stands for a parked delivery, so the lease does what an unacked message does for a
task. Nothing is lost: the event is acked only once its parked rows are committed; a leased row
stays parked until its attempt is recorded, and a retry or dead letter is confirmed before that
record. A worker that dies with deliveries leased leaves them parked, and once the lease has run
out any sweep leases them again; only the attempts it had sent and not recorded are sent twice.
Each worker sweeps the endpoints it parked, and now and then adopts parked rows of any endpoint,
so the backlog of a worker that died is picked up by another.

An ordered endpoint's backlog is its lane's (:mod:`.ordered`), never swept: once an endpoint
turns ordered, the sweeper leases no more of it, and hands what it holds leased back at once,
free for the lane.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from worker.ops.metrics import Metrics
from worker.pipeline.attempts import AttemptRunner
from worker.pipeline.offers import Route, Source
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.tasks import DeliveryTask
from worker.store import Store
from worker.store.records import utcnow

log = structlog.get_logger("sellfern_webhooks.parking")

SWEEP_SECONDS = 0.5
# A backlog whose line is down to its endpoint's cap wakes the sweeper before SWEEP_SECONDS, so
# that its next lease arrives before its feeders run dry; sweeps are still this far apart.
SOONEST_SWEEP_SECONDS = 0.05
# How often a worker looks for parked deliveries it did not park itself (and counts them all).
ADOPT_SECONDS = 30.0
# A lease is the longest an attempt may take (DELIVERY_TIMEOUT) and this: a leased delivery
# starts only while at least the timeout and START_MARGIN_SECONDS of its lease are left, so it
# waits here for its turn at most the difference. A lease that ran out while its attempt was
# still under way would let another sweep send it too; one much longer keeps the deliveries a
# dead worker had leased waiting that much longer.
LEASE_MARGIN_SECONDS = 15.0
START_MARGIN_SECONDS = 5.0

# Feeders of a backlog, per slot of its endpoint: while one records its attempt, another sends.
FEEDERS_PER_SLOT = 2

Spawn = Callable[[Coroutine[Any, Any, None]], object]


@dataclass(frozen=True, slots=True)
class Leased:
    event_id: str
    event: dict[str, Any]
    attempts: int  # made so far; the next is number attempts + 1
    start_by: float  # loop time after which it is left for its lease to run out


@dataclass(slots=True)
class Backlog:
    """One endpoint's leased deliveries here: in line, and being attempted by its feeders."""

    line: collections.deque[Leased]
    # The endpoint's cap: held by a feeder from its offer until its request ends.
    sending: asyncio.Semaphore
    feeders: int = 0
    attempting: int = 0
    # Handed back, to be written in the next sweep: held until a time, returned for the next
    # lease at once, or skipped.
    held: list[str] | None = None
    held_for: float = 0.0
    returned: list[str] | None = None
    skipped: list[str] | None = None

    @property
    def outstanding(self) -> int:
        return len(self.line) + self.attempting


class ParkingSweeper:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        runner: AttemptRunner,
        metrics: Metrics,
        *,
        cap: int,
        global_cap: int,
        delivery_timeout: float,
        spawn: Spawn,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._runner = runner
        self._metrics = metrics
        self._cap = cap
        # Attempts the backlogs may have under way at once, over all endpoints: half the
        # worker's DELIVERY_CONCURRENCY, so fan-out keeps room for fresh deliveries.
        self._share = asyncio.Semaphore(max(1, global_cap // 2))
        self._delivery_timeout = delivery_timeout
        self._lease_seconds = delivery_timeout + LEASE_MARGIN_SECONDS
        self._spawn = spawn  # the worker's, so that stopping drains the feeders
        self._clock = clock
        self._backlogs: dict[str, Backlog] = {}
        self._stopping = False
        self._wake = asyncio.Event()  # a backlog's line runs low

    async def run(self) -> None:
        """Sweep until cancelled."""
        adopted_at = -ADOPT_SECONDS
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if loop.time() - adopted_at >= ADOPT_SECONDS:
                    counts = await self._store.parked.counts()
                    self._scheduler.adopt(list(counts))
                    self._metrics.parked.set(sum(counts.values()))
                    adopted_at = loop.time()
                self._wake.clear()
                await self.sweep()
            except Exception as exc:
                log.warning("sending parked deliveries failed; trying again", error=str(exc))
            await asyncio.sleep(SOONEST_SWEEP_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SWEEP_SECONDS - SOONEST_SWEEP_SECONDS)

    async def sweep(self) -> int:
        """Lease what each parked endpoint can take until the next sweep and set its feeders
        on it; return how many were leased."""
        await self.hand_back()
        leased = 0
        for webhook_id in self._scheduler.parked():
            backlog = self._backlogs.get(webhook_id)
            room = self._scheduler.room(webhook_id, SWEEP_SECONDS)
            if backlog is not None:
                room -= backlog.outstanding
            if room <= 0 or self._stopping:
                continue
            mark = self._scheduler.park_mark(webhook_id)
            rows = await self._store.parked.lease(webhook_id, room, self._lease_seconds)
            if len(rows) < room:
                await self._drained(webhook_id, mark, len(rows))
            if not rows:
                continue
            start_by = (
                self._clock() + self._lease_seconds - self._delivery_timeout - START_MARGIN_SECONDS
            )
            backlog = self._backlogs.setdefault(
                webhook_id, Backlog(collections.deque(), asyncio.Semaphore(self._cap))
            )
            backlog.line.extend(Leased(e, event, tries, start_by) for e, event, tries in rows)
            while backlog.feeders < min(FEEDERS_PER_SLOT * self._cap, len(backlog.line)):
                backlog.feeders += 1
                self._spawn(self._feed(webhook_id, backlog))
            leased += len(rows)
        if leased:
            self._metrics.parked_released.inc(leased)
        return leased

    async def _drained(self, webhook_id: str, mark: int, leased: int) -> None:
        """A lease came back short: the backlog is drained unless rows are left that others
        hold (a live worker's lease, a dead one's running out, a deferral's wait) — then the
        endpoint is swept on, and its new deliveries still join the back — or unless a
        delivery was parked while this sweep ran (the mark says)."""
        backlog = self._backlogs.get(webhook_id)
        ours = leased + (backlog.outstanding if backlog is not None else 0)
        if await self._store.parked.count(webhook_id) <= ours:
            self._scheduler.drained(webhook_id, mark)

    def stop(self) -> None:
        """Lease nothing more, and let the feeders end after their attempt under way; what
        is left in line goes back to the backlog at the next :meth:`hand_back`, which the
        worker calls once it has drained them."""
        self._stopping = True
        for backlog in self._backlogs.values():
            backlog.held = (backlog.held or []) + [leased.event_id for leased in backlog.line]
            backlog.line.clear()

    async def hand_back(self) -> None:
        """Write what was handed back since the last sweep: deliveries held for a deferral's
        time (or, once stopped, for none), returned ones free at once, and skipped ones."""
        for webhook_id, backlog in list(self._backlogs.items()):
            held, returned, skipped = backlog.held, backlog.returned, backlog.skipped
            now = utcnow()
            until = now + timedelta(seconds=backlog.held_for)
            backlog.held = backlog.returned = backlog.skipped = None
            backlog.held_for = 0.0
            try:
                if held:
                    await self._store.parked.hold(webhook_id, held, until)
                if returned:
                    await self._store.parked.hold(webhook_id, returned, now)
                if skipped:
                    await self._store.parked.unpark(webhook_id, skipped)
            except Exception:
                # Left leased: once the lease runs out, a sweep takes them again.
                log.warning("handing parked deliveries back failed", webhook_id=webhook_id)
            if not (backlog.feeders or backlog.line or backlog.held or backlog.returned):
                del self._backlogs[webhook_id]

    async def _feed(self, webhook_id: str, backlog: Backlog) -> None:
        """Offer the endpoint's leased deliveries to the scheduler one at a time, attempting
        each it starts, until its line is empty."""
        try:
            while backlog.line and not self._stopping:
                permits = _Permits(backlog.sending, self._share)
                try:
                    await permits.acquire()
                    if not backlog.line or self._stopping:
                        return
                    leased = backlog.line.popleft()
                    backlog.attempting += 1
                    if len(backlog.line) <= self._cap:
                        self._wake.set()
                    try:
                        if self._clock() > leased.start_by:
                            # Too little of its lease is left for an attempt: handed back for
                            # the next sweep to lease again, rather than left waiting until
                            # the lease is over.
                            backlog.returned = (backlog.returned or []) + [leased.event_id]
                            continue
                        await self._attempt(webhook_id, backlog, leased, permits.release)
                    except Exception as exc:
                        log.warning(
                            "a parked delivery's attempt failed; it stays parked",
                            webhook_id=webhook_id, event_id=leased.event_id, error=str(exc),
                        )  # fmt: skip
                    finally:
                        backlog.attempting -= 1
                finally:
                    permits.release()
        finally:
            backlog.feeders -= 1

    async def _attempt(
        self, webhook_id: str, backlog: Backlog, leased: Leased, released: Callable[[], None]
    ) -> None:
        decision = await self._scheduler.admit(webhook_id, Source.BACKLOG)
        if decision.route is Route.PARK:
            # The endpoint became ordered: its backlog is its lane's, which sends it in order.
            backlog.returned = (backlog.returned or []) + [leased.event_id]
            return
        if decision.route is not Route.START:
            # The endpoint turned slow: back to the backlog, for the deferral's time.
            backlog.held = (backlog.held or []) + [leased.event_id]
            backlog.held_for = max(backlog.held_for, decision.delay)
            return
        task = DeliveryTask.model_construct(
            event_id=leased.event_id,
            webhook_id=webhook_id,
            attempt=leased.attempts + 1,
            event=leased.event,
        )
        if not await self._runner.run(task, decision.ticket, None, parked=True, released=released):
            backlog.skipped = (backlog.skipped or []) + [leased.event_id]


class _Permits:
    """A feeder's hold on semaphores, taken in order and given back once, whichever comes
    first: the attempt's request ending, or the feeder being done with the delivery."""

    def __init__(self, *semaphores: asyncio.Semaphore) -> None:
        self._semaphores = semaphores
        self._held: list[asyncio.Semaphore] = []

    async def acquire(self) -> None:
        for semaphore in self._semaphores:
            await semaphore.acquire()
            self._held.append(semaphore)

    def release(self) -> None:
        while self._held:
            self._held.pop().release()
