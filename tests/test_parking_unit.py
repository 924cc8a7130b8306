"""The parking sweeper's feeding of a parked backlog, with a fake clock and an in-memory backlog:
how many it leases, how many it attempts at once, and what it hands back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, cast

import pytest

from tests.test_scheduler import TIERS, FakeClock, measure
from worker.ops.metrics import Metrics
from worker.pipeline.attempts import AttemptRunner
from worker.pipeline.offers import Route, Source
from worker.pipeline.parking import (
    FEEDERS_PER_SLOT,
    LEASE_MARGIN_SECONDS,
    SWEEP_SECONDS,
    ParkingSweeper,
)
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.tasks import DeliveryTask
from worker.store import Store
from worker.store.records import utcnow

pytestmark = pytest.mark.unit

WEBHOOK = "wh_parked"
CAP = 4


class FakeBacklog:
    """``store.parked``: rows in order, leased ones set aside until handed back."""

    def __init__(self, count: int, attempts: int = 0) -> None:
        self.free = [f"evt_{i:03}" for i in range(count)]
        self.taken = 0  # leased, and not recorded yet
        self.others = 0  # parked rows that other workers hold
        self.attempts = attempts
        self.leases: list[int] = []
        self.held: list[tuple[list[str], datetime]] = []
        self.unparked: list[str] = []

    async def counts(self) -> dict[str, int]:
        return {}

    async def count(self, webhook_id: str) -> int:
        assert webhook_id == WEBHOOK
        return len(self.free) + self.taken + self.others - len(self.unparked)

    async def lease(
        self, webhook_id: str, limit: int, seconds: float
    ) -> list[tuple[str, dict[str, Any], int]]:
        assert webhook_id == WEBHOOK
        assert seconds > 0
        taken, self.free = self.free[:limit], self.free[limit:]
        self.taken += len(taken)
        self.leases.append(limit)
        return [(e, {"id": e, "type": "order.created"}, self.attempts) for e in taken]

    async def hold(self, webhook_id: str, event_ids: Sequence[str], until: datetime) -> None:
        assert webhook_id == WEBHOOK
        self.held.append((list(event_ids), until))

    async def unpark(self, webhook_id: str, event_ids: Sequence[str]) -> None:
        assert webhook_id == WEBHOOK
        self.unparked.extend(event_ids)


class FakeRunner:
    """Makes each attempt when an answer is given, taking the fake clock's time over it, and
    hands the slot back as the real one does, before recording it; with ``records`` held,
    recording waits for one of those too."""

    def __init__(self, scheduler: Scheduler, clock: FakeClock, *, sent: bool = True) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.sent = sent
        self.answers = asyncio.Semaphore(0)
        self.records: asyncio.Semaphore | None = None
        self.recording = 0
        self.attempts: list[DeliveryTask] = []
        self.at_once = 0
        self.most_at_once = 0

    async def run(
        self, task: DeliveryTask, ticket: int, body: bytes | None, *, parked: bool,
        released: Callable[[], None],
    ) -> bool:  # fmt: skip
        assert parked
        assert body is None
        self.attempts.append(task)
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        started = self.clock()
        try:
            await self.answers.acquire()
        finally:
            self.at_once -= 1
            self.scheduler.finished(task.webhook_id, ticket, seconds=self.clock() - started)
            released()
        if self.records is not None:
            self.recording += 1
            await self.records.acquire()
            self.recording -= 1
        return self.sent

    def answer(self, count: int = 10_000) -> None:
        for _ in range(count):
            self.answers.release()


class Harness:
    def __init__(self, backlog: FakeBacklog, *, sent: bool = True, global_cap: int = 256) -> None:
        self.clock = FakeClock()
        self.ordered: set[str] = set()
        self.scheduler = Scheduler(
            cap=CAP, global_cap=256, defer_tiers=TIERS, ordered=self.ordered.__contains__,
            clock=self.clock,
        )  # fmt: skip
        self.backlog = backlog
        self.runner = FakeRunner(self.scheduler, self.clock, sent=sent)
        self.feeders: list[asyncio.Task[None]] = []
        store = type("FakeStore", (), {"parked": backlog})()
        self.sweeper = ParkingSweeper(
            cast("Store", store), self.scheduler, cast("AttemptRunner", self.runner),
            Metrics(), cap=CAP, global_cap=global_cap, delivery_timeout=5.0, spawn=self.spawn,
            clock=self.clock,
        )  # fmt: skip
        self.scheduler.adopt([WEBHOOK])

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.feeders.append(asyncio.create_task(coro))

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def finish(self) -> None:
        self.runner.answer()
        await asyncio.gather(*self.feeders)


async def test_a_leased_backlog_is_attempted_at_most_cap_at_once_oldest_first() -> None:
    h = Harness(FakeBacklog(30, attempts=2))
    measure(h.scheduler, h.clock, WEBHOOK, 0.1)  # fast: room is cap * 0.5 s / 0.1 s = 20
    assert await h.sweeper.sweep() == 20
    await h.settle()
    assert len(h.feeders) == FEEDERS_PER_SLOT * CAP
    assert h.runner.at_once == CAP  # the rest wait in the sweeper's line, not the scheduler's
    assert h.scheduler.view(WEBHOOK).waiting == 0

    # The next sweep leases only what the endpoint can take beyond what is outstanding here.
    assert await h.sweeper.sweep() == 0
    await h.finish()
    assert h.runner.most_at_once == CAP
    assert [t.event_id for t in h.runner.attempts] == [f"evt_{i:03}" for i in range(20)]
    assert {t.attempt for t in h.runner.attempts} == {3}  # the next after the attempts so far
    assert h.backlog.leases == [round(CAP * SWEEP_SECONDS / 0.1)]


async def test_skipped_attempts_leave_the_backlog_at_the_next_sweep() -> None:
    h = Harness(FakeBacklog(3), sent=False)  # the endpoint was paused: every attempt skipped
    await h.sweeper.sweep()
    await h.finish()
    assert h.backlog.unparked == []  # written with the next sweep, in one go
    await h.sweeper.sweep()
    assert sorted(h.backlog.unparked) == ["evt_000", "evt_001", "evt_002"]


async def test_stopping_hands_back_what_was_not_started() -> None:
    h = Harness(FakeBacklog(30))
    measure(h.scheduler, h.clock, WEBHOOK, 0.1)
    await h.sweeper.sweep()
    await h.settle()
    h.sweeper.stop()
    await h.finish()
    assert len(h.runner.attempts) == CAP  # the attempts under way end; no new one starts
    await h.sweeper.hand_back()
    ((held, _until),) = h.backlog.held
    assert held == [f"evt_{i:03}" for i in range(CAP, 20)]
    assert await h.sweeper.sweep() == 0  # and nothing more is leased


async def test_a_delivery_whose_lease_runs_out_before_its_turn_is_handed_back_at_once() -> None:
    h = Harness(FakeBacklog(8))
    measure(h.scheduler, h.clock, WEBHOOK, 0.1)
    await h.sweeper.sweep()
    await h.settle()
    # The endpoint stalls while the first four are under way: by the time they end, the
    # leases of the others have too little left for an attempt.
    h.clock.advance(LEASE_MARGIN_SECONDS)
    await h.finish()
    assert [t.event_id for t in h.runner.attempts] == [f"evt_{i:03}" for i in range(CAP)]
    assert h.backlog.held == []  # written with the next sweep, in one go
    await h.sweeper.hand_back()
    ((returned, until),) = h.backlog.held
    # Free for the next lease now, not once their leases are over: no wait of a lease's length.
    assert returned == [f"evt_{i:03}" for i in range(CAP, 8)]
    assert until <= utcnow()


async def test_a_slow_endpoint_s_leased_deliveries_are_held_for_the_deferral() -> None:
    h = Harness(FakeBacklog(12))
    measure(h.scheduler, h.clock, WEBHOOK, 0.05)
    # Tasks from the broker hold every slot; the backlog's offers wait behind them.
    busy = [h.scheduler.offer(WEBHOOK, Source.TASK) for _ in range(CAP)]
    assert all(o.decision is not None and o.decision.route is Route.START for o in busy)
    assert await h.sweeper.sweep() == 12
    await h.settle()
    assert h.scheduler.view(WEBHOOK).waiting == CAP  # one offer per feeder, no more
    # The tasks hang: the endpoint turns slow, and what waits is deferred, to the backlog.
    for _ in range(12):
        h.clock.advance(1.0)
        h.scheduler.review()
        await h.settle()
    await h.sweeper.hand_back()
    held = sorted(event_id for ids, _ in h.backlog.held for event_id in ids)
    assert held == [f"evt_{i:03}" for i in range(12)]
    assert h.runner.attempts == []
    assert all(until > utcnow() for _, until in h.backlog.held)  # for the deferral's time
    await asyncio.gather(*h.feeders)


async def test_an_endpoint_stays_swept_while_others_hold_part_of_its_backlog() -> None:
    h = Harness(FakeBacklog(2))
    h.backlog.others = 3  # leased by a worker that died, say: free again once the lease ends
    assert await h.sweeper.sweep() == 2
    assert WEBHOOK in h.scheduler.parked()  # swept on, and new deliveries join the back
    await h.finish()
    h.backlog.taken = h.backlog.others = 0  # recorded, and the others' done too
    assert await h.sweeper.sweep() == 0
    assert WEBHOOK not in h.scheduler.parked()  # drained: new deliveries decided afresh


async def test_while_attempts_are_recorded_the_next_ones_are_sent() -> None:
    h = Harness(FakeBacklog(30))
    h.runner.records = asyncio.Semaphore(0)  # the writes of the attempts take their time
    measure(h.scheduler, h.clock, WEBHOOK, 0.1)
    assert await h.sweeper.sweep() == 20
    await h.settle()
    h.runner.answer(CAP)  # the first requests end; their records are still being written
    await h.settle()
    assert h.runner.recording == CAP
    assert h.runner.at_once == CAP  # their slots went to the next deliveries meanwhile
    assert len(h.runner.attempts) == 2 * CAP
    assert h.scheduler.view(WEBHOOK).waiting == 0
    for _ in range(20):
        h.runner.records.release()
    await h.finish()
    assert h.runner.most_at_once == CAP
    assert len(h.runner.attempts) == 20


async def test_the_backlogs_share_half_the_worker_s_concurrency() -> None:
    h = Harness(FakeBacklog(30), global_cap=6)  # three attempts at once for every backlog
    measure(h.scheduler, h.clock, WEBHOOK, 0.1)
    await h.sweeper.sweep()
    await h.settle()
    assert h.runner.at_once == 3
    await h.finish()
    assert h.runner.most_at_once == 3
    assert len(h.runner.attempts) == 20


async def test_a_backlog_whose_endpoint_turns_ordered_is_handed_back_to_its_lane() -> None:
    h = Harness(FakeBacklog(30))
    measure(h.scheduler, h.clock, WEBHOOK, 0.1)
    assert await h.sweeper.sweep() == 20
    await h.settle()
    assert h.runner.at_once == CAP
    h.ordered.add(WEBHOOK)  # PATCH ordered=true while the first attempts are under way
    await h.finish()
    # The attempts under way end; what was still in line is not attempted but handed back.
    assert [t.event_id for t in h.runner.attempts] == [f"evt_{i:03}" for i in range(CAP)]
    assert await h.sweeper.sweep() == 0  # and nothing more is leased
    returned = sorted(event_id for ids, _ in h.backlog.held for event_id in ids)
    assert returned == [f"evt_{i:03}" for i in range(CAP, 20)]
    assert all(until <= utcnow() for _, until in h.backlog.held)  # free for the lane at once
    assert h.backlog.leases == [20]
    assert WEBHOOK not in h.scheduler.parked()
