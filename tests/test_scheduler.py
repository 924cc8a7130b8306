"""The per-endpoint scheduler's decisions, driven by a fake clock: no broker, no database."""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import dataclass

import pytest

from worker.pipeline import endpoint_state
from worker.pipeline import scheduler as sched
from worker.pipeline.offers import Decision, Offer, Route, Source
from worker.pipeline.scheduler import Scheduler

pytestmark = pytest.mark.unit

TIERS = (1.0, 5.0, 30.0, 120.0, 600.0)


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(cap: int = 4, global_cap: int = 256) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock()
    return Scheduler(cap=cap, global_cap=global_cap, defer_tiers=TIERS, clock=clock), clock


def decided(offer: Offer) -> Decision:
    assert offer.decision is not None, "the offer is still waiting"
    return offer.decision


def measure(s: Scheduler, clock: FakeClock, webhook_id: str, seconds: float, n: int = 5) -> None:
    """Let the endpoint answer ``n`` attempts in ``seconds`` each."""
    for _ in range(n):
        decision = decided(s.offer(webhook_id, Source.TASK))
        assert decision.route is Route.START
        clock.advance(seconds)
        s.finished(webhook_id, decision.ticket)


def test_a_burst_to_a_fast_endpoint_waits_in_memory_and_starts_in_arrival_order() -> None:
    s, clock = make(cap=4)
    measure(s, clock, "wh_fast", 0.005)
    offers = [s.offer("wh_fast", Source.NEW) for _ in range(20)]
    started = [o for o in offers if o.decision is not None]
    assert [decided(o).route for o in started] == [Route.START] * 4
    waiting = offers[4:]
    assert all(o.decision is None for o in waiting)  # not queued, not deferred, not parked
    assert s.view("wh_fast").waiting == 16
    # Slots free one by one: the waiting line starts oldest first, never more than the cap.
    order = []
    running = [decided(o).ticket for o in started]
    while running:
        clock.advance(0.005)
        s.finished("wh_fast", running.pop(0))
        assert s.view("wh_fast").in_flight <= 4
        for i, offer in enumerate(waiting):
            if offer.decision is not None and i not in order:
                order.append(i)
                running.append(decided(offer).ticket)
    assert order == list(range(16))
    assert s.view("wh_fast").in_flight == 0


def test_queued_tasks_of_a_fast_endpoint_wait_too_and_are_never_deferred() -> None:
    s, clock = make(cap=2)
    measure(s, clock, "wh_a", 0.01)
    offers = [s.offer("wh_a", Source.TASK) for _ in range(10)]
    clock.advance(0.2)  # under FAST_SECONDS since the oldest started: still fast
    s.review()
    assert [o.decision is None for o in offers] == [False, False] + [True] * 8


def test_an_endpoint_hanging_before_its_first_answer() -> None:
    s, clock = make(cap=4)
    # Never measured: fan-out sends only a few probes, the rest wait.
    offers = [s.offer("wh_hang", Source.NEW) for _ in range(4)]
    routes = [o.decision.route if o.decision else None for o in offers]
    assert routes == [Route.START] * sched.PROBES + [None] * (4 - sched.PROBES)
    clock.advance(endpoint_state.FAST_SECONDS / 2)
    s.review()
    assert offers[-1].decision is None  # not slow yet
    # The probes hang: once the oldest has waited past FAST_SECONDS it is slow, and what
    # waited for it goes to the queue instead of holding its events.
    clock.advance(endpoint_state.FAST_SECONDS / 2)
    s.review()
    assert [decided(o).route for o in offers[sched.PROBES :]] == [Route.QUEUE] * 2
    for _ in offers[sched.PROBES :]:
        s.queued("wh_hang")
    assert s.view("wh_hang").slow
    # Every slot is taken or spoken for: new deliveries are parked, and join that backlog.
    assert decided(s.offer("wh_hang", Source.NEW)).route is Route.PARK
    assert s.view("wh_hang").parked


def test_a_slow_endpoint_saturates_is_parked_and_is_released_as_it_recovers() -> None:
    s, clock = make(cap=4)
    measure(s, clock, "wh_slow", 1.0)
    assert s.view("wh_slow").slow
    # Slow and not full: fan-out queues a task (it never sends to a slow endpoint itself).
    assert decided(s.offer("wh_slow", Source.NEW)).route is Route.QUEUE
    s.queued("wh_slow")
    # The tasks come round and fill the slots.
    s.came_round("wh_slow")
    tickets = [decided(s.offer("wh_slow", Source.TASK)).ticket for _ in range(4)]
    # Saturated: a new delivery is parked, a further task waits briefly, then is deferred.
    assert decided(s.offer("wh_slow", Source.NEW)).route is Route.PARK
    assert s.parked() == ["wh_slow"]
    assert s.room("wh_slow", 0.5) == 0
    task = s.offer("wh_slow", Source.TASK)
    assert task.decision is None
    clock.advance(sched.HOLD_SECONDS)
    s.review()
    assert decided(task).route is Route.DEFER
    assert decided(task).delay >= 1.0
    # It answers again, fast: the sweeper is given room at its pace.
    for ticket in tickets:
        s.finished("wh_slow", ticket)
    measure(s, clock, "wh_slow", 0.01, n=30)
    assert not s.view("wh_slow").slow
    room = s.room("wh_slow", 0.5)
    seconds = s.view("wh_slow").response_seconds
    assert seconds is not None
    assert room == min(endpoint_state.MAX_RELEASE, round(4 * 0.5 / seconds))
    s.drained("wh_slow", s.park_mark("wh_slow"))
    assert s.parked() == []
    assert decided(s.offer("wh_slow", Source.NEW)).route is Route.START


def test_a_sweep_that_found_nothing_does_not_clear_a_backlog_parked_while_it_ran() -> None:
    s, _clock = make(cap=4)
    s.adopt(["wh_a"])
    mark = s.park_mark("wh_a")  # a sweep starts, and claims what is parked
    s.adopt(["wh_a"])  # meanwhile a recovery parks another batch
    s.drained("wh_a", mark)  # the sweep found less than it had room for
    assert s.parked() == ["wh_a"], "the new batch would wait for the next adoption"
    assert decided(s.offer("wh_a", Source.NEW)).route is Route.PARK  # it joins the backlog
    mark = s.park_mark("wh_a")
    s.drained("wh_a", mark)  # a later sweep finds it empty, and nothing came in between
    assert s.parked() == []


def test_an_endpoint_made_ordered_has_its_backlog_and_its_tasks_left_to_its_lane() -> None:
    ordered: set[str] = set()
    clock = FakeClock()
    s = Scheduler(
        cap=4, global_cap=256, defer_tiers=TIERS, ordered=ordered.__contains__, clock=clock
    )
    measure(s, clock, "wh_a", 1.0)  # slow: at its cap, new deliveries are parked
    tickets = [decided(s.offer("wh_a", Source.TASK)).ticket for _ in range(4)]
    assert decided(s.offer("wh_a", Source.NEW)).route is Route.PARK
    for ticket in tickets:
        s.finished("wh_a", ticket)
    assert s.parked() == ["wh_a"]
    assert s.room("wh_a", 0.5) > 0  # the sweeper would lease a few of the backlog now

    ordered.add("wh_a")  # PATCH ordered=true
    # The sweeper leaves the backlog to the lane, and stops asking about it.
    assert s.parked() == []
    assert not s.view("wh_a").parked
    # Whatever else is offered for it goes to the backlog, in which the lane sends it in order:
    # a delivery the sweeper had leased already, a task queued before the change, a new one.
    for source in (Source.BACKLOG, Source.TASK, Source.NEW):
        assert decided(s.offer("wh_a", source)).route is Route.PARK
    assert s.view("wh_a").in_flight == 0
    # Only the lane's offer starts an attempt.
    lane = decided(s.offer("wh_a", Source.LANE))
    assert lane.route is Route.START
    s.finished("wh_a", lane.ticket)

    ordered.discard("wh_a")  # no longer ordered: an adoption hands its backlog to the sweeper
    s.adopt(["wh_a"])
    assert s.parked() == ["wh_a"]


def test_deferral_turns_spread_a_slow_endpoints_backlog_over_the_tiers() -> None:
    s, clock = make(cap=1)
    measure(s, clock, "wh_slow", 10.0, n=3)
    running = decided(s.offer("wh_slow", Source.TASK))
    assert running.route is Route.START
    # The first task waits briefly (a line as long as the cap); the others are deferred at
    # once, each a turn (10 s / cap 1) after the one before.
    assert s.offer("wh_slow", Source.TASK).decision is None
    delays = [decided(s.offer("wh_slow", Source.TASK)).delay for _ in range(4)]
    assert delays == [30.0, 30.0, 30.0, 120.0]


@pytest.mark.parametrize(
    ("deferrals", "delay"),
    [(0, 1.0), (1, 5.0), (2, 30.0), (7, 30.0)],
)
def test_a_fast_endpoints_deferred_tasks_use_the_short_tiers(deferrals: int, delay: float) -> None:
    s, clock = make(cap=1)
    measure(s, clock, "wh_a", 0.01)
    s.offer("wh_a", Source.TASK)
    clock.advance(endpoint_state.FAST_SECONDS)  # the one in flight hangs: slow now, its line full
    assert s.offer("wh_a", Source.TASK).decision is None  # waits briefly: the line is full
    assert decided(s.offer("wh_a", Source.TASK, deferrals)).delay == delay


def test_many_endpoints_do_not_share_caps() -> None:
    s, clock = make(cap=2, global_cap=5000)
    for i in range(1000):
        measure(s, clock, f"wh_{i}", 0.001, n=1)
    first = [decided(s.offer(f"wh_{i}", Source.NEW)).route for i in range(1000)]
    assert first == [Route.START] * 1000
    assert s.in_flight == 1000


def test_the_global_cap_sends_fan_out_to_the_queue() -> None:
    s, clock = make(cap=10, global_cap=3)
    for i in range(3):
        measure(s, clock, f"wh_{i}", 0.001, n=1)
        assert decided(s.offer(f"wh_{i}", Source.NEW)).route is Route.START
    measure(s, clock, "wh_x", 0.001, n=1)
    assert decided(s.offer("wh_x", Source.NEW)).route is Route.QUEUE


def test_one_hanging_endpoint_does_not_hold_another() -> None:
    s, clock = make(cap=2)
    measure(s, clock, "wh_ok", 0.001)
    [s.offer("wh_hang", Source.NEW) for _ in range(5)]
    clock.advance(5.0)
    s.review()
    assert decided(s.offer("wh_ok", Source.NEW)).route is Route.START
    assert decided(s.offer("wh_hang", Source.NEW)).route is Route.PARK


def test_stale_state_is_forgotten() -> None:
    s, clock = make(cap=2)
    measure(s, clock, "wh_a", 0.01)
    s.queued("wh_b")
    assert s.view("wh_b").queued == 1
    # Another worker took the task: the count stops moving and is forgotten.
    clock.advance(sched.QUEUED_MEMORY_SECONDS + 1)
    assert s.view("wh_b").queued == 0
    assert len(s) == 2
    clock.advance(sched.IDLE_FORGET_SECONDS + 1)
    s.review()
    assert len(s) == 0


def test_memory_is_bounded_by_dropping_idle_endpoints() -> None:
    s, clock = make(cap=2)
    busy = decided(s.offer("wh_busy", Source.TASK))
    for i in range(sched.MAX_ENDPOINTS + 10):
        s.view(f"wh_{i}")  # a look remembers nothing
        s.came_round(f"wh_{i}")
    assert len(s) == 1
    for i in range(sched.MAX_ENDPOINTS + 10):
        s.queued(f"wh_q{i}")
        clock.advance(3 * sched.QUEUED_MEMORY_SECONDS / sched.MAX_ENDPOINTS)
    assert len(s) <= sched.MAX_ENDPOINTS
    assert s.view("wh_busy").in_flight == 1  # what is in flight is never dropped
    s.finished("wh_busy", busy.ticket)


async def test_admit_waits_and_a_cancelled_wait_gives_its_place_back() -> None:
    s, clock = make(cap=1)
    measure(s, clock, "wh_a", 0.001)
    first = await s.admit("wh_a", Source.NEW)
    second = asyncio.create_task(s.admit("wh_a", Source.NEW))
    third = asyncio.create_task(s.admit("wh_a", Source.NEW))
    await asyncio.sleep(0)
    assert s.view("wh_a").waiting == 2
    second.cancel()
    await asyncio.sleep(0)
    assert s.view("wh_a").waiting == 1
    s.finished("wh_a", first.ticket)
    got = await asyncio.wait_for(third, 1)
    assert got.route is Route.START
    assert s.view("wh_a").in_flight == 1


def test_an_idle_endpoint_costs_a_fifth_of_a_kilobyte() -> None:
    s, clock = make(cap=32, global_cap=10**9)
    ids = [f"wh_{i:026d}" for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for webhook_id in ids:
            ticket = decided(s.offer(webhook_id, Source.TASK)).ticket
            clock.advance(0.001)
            s.finished(webhook_id, ticket)
        per_endpoint = (tracemalloc.get_traced_memory()[0] - before) / len(ids)
    finally:
        tracemalloc.stop()
    assert len(s) == len(ids)
    assert per_endpoint < 250


def test_the_requests_own_time_is_learned_not_the_workers_reads_before_it() -> None:
    """A loaded worker spends a while between taking a slot and sending (reading the endpoint,
    rechecking the task); an endpoint answering in 5 ms stays fast however long that took."""
    s, clock = make(cap=4)
    for _ in range(10):
        decision = decided(s.offer("wh_fast", Source.TASK))
        clock.advance(0.4)  # the slot's time: the worker's reads, then the request
        s.finished("wh_fast", decision.ticket, seconds=0.005)
    view = s.view("wh_fast")
    assert not view.slow
    assert view.response_seconds == pytest.approx(0.005)
    # Measured by the slot alone, the same attempts make it slow.
    measure(s, clock, "wh_other", 0.4, n=10)
    assert s.view("wh_other").slow
