"""An endpoint's rate limit in the scheduler, driven by a fake clock: no broker, no database."""

from __future__ import annotations

import pytest

from tests.test_scheduler import TIERS, FakeClock, decided
from worker.pipeline import pacing
from worker.pipeline.offers import Offer, Route, Source
from worker.pipeline.scheduler import RATE_HOLD_SECONDS, Scheduler

pytestmark = pytest.mark.unit

STEP = 0.001  # each attempt answers in 1 ms: the rate, not the endpoint, is the limit


def make(limits: dict[str, float], cap: int = 32) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock()
    scheduler = Scheduler(
        cap=cap, global_cap=256, defer_tiers=TIERS, rate_limits=limits.get, clock=clock
    )
    return scheduler, clock


def run_tasks(s: Scheduler, clock: FakeClock, webhook_id: str, seconds: float) -> list[float]:
    """Offer a task every millisecond for ``seconds``, review as the worker does, answer each
    started attempt at once; the start times."""
    starts: list[float] = []
    waiting: list[Offer] = []
    end = clock.now + seconds
    while clock.now < end:
        if len(waiting) < 16:
            waiting.append(s.offer(webhook_id, Source.TASK))
        s.review()
        for offer in [o for o in waiting if o.decision is not None]:
            waiting.remove(offer)
            decision = decided(offer)
            if decision.route is Route.START:
                starts.append(clock.now)
                s.finished(webhook_id, decision.ticket)
        clock.advance(STEP)
    return starts


def test_tasks_start_at_the_rate_limit_and_no_faster() -> None:
    s, clock = make({"wh_limited": 50})
    starts = run_tasks(s, clock, "wh_limited", 10.0)
    assert 50 * 10 * 0.95 <= len(starts) <= 50 * 10 * 1.02 + 1
    # Over any one second, no more than the rate and its small saved-up burst.
    for first in starts:
        in_second = sum(1 for t in starts if first <= t < first + 1.0)
        assert in_second <= 50 * (1 + pacing.BURST_SECONDS) + 1


def test_each_worker_takes_its_share_of_the_limit() -> None:
    s, clock = make({"wh_limited": 90})
    s.set_workers(3)
    starts = run_tasks(s, clock, "wh_limited", 10.0)
    assert 30 * 10 * 0.95 <= len(starts) <= 30 * 10 * 1.02 + 1


def test_a_changed_limit_applies_to_the_next_offers() -> None:
    limits = {"wh_limited": 100.0}
    s, clock = make(limits)
    fast = run_tasks(s, clock, "wh_limited", 2.0)
    limits["wh_limited"] = 10.0
    slow = run_tasks(s, clock, "wh_limited", 2.0)
    assert len(fast) >= 180
    assert len(slow) <= 10 * 2 * 1.1 + 2


def test_fan_out_beyond_the_rate_parks_and_the_sweeper_is_given_the_rate() -> None:
    s, clock = make({"wh_limited": 20})
    first = decided(s.offer("wh_limited", Source.NEW))
    assert first.route is Route.START
    s.finished("wh_limited", first.ticket)
    # The next ones, within the same instant, are beyond the rate: parked, not failed or queued.
    routes = [decided(s.offer("wh_limited", Source.NEW)).route for _ in range(10)]
    assert routes == [Route.PARK] * 10
    assert s.parked() == ["wh_limited"]
    # Half a second of the rate is what a sweep may release.
    clock.advance(1.0)
    room = s.room("wh_limited", 0.5)
    assert 10 <= room <= 10 + 20 * pacing.BURST_SECONDS + 1
    # The released tasks come round: those beyond the tokens wait here, and count against the
    # next sweep.
    for _ in range(room):
        s.queued("wh_limited")
        offer = s.offer("wh_limited", Source.TASK)
        if offer.decision is not None:
            s.finished("wh_limited", decided(offer).ticket)
    assert s.room("wh_limited", 0.5) == 0


def test_releases_that_come_round_before_their_confirm_do_not_hold_the_sweeper_back() -> None:
    # One of three workers. Each sweep's tasks come round (here or at another worker) within
    # milliseconds, often before the publish is confirmed and counted as queued: the count of
    # tasks queued then only grows. The release must still follow the rate.
    s, clock = make({"wh_limited": 30})
    s.set_workers(3)
    s.adopt(["wh_limited"])
    waiting: list[Offer] = []
    starts = 0
    released = []
    for _ in range(20):
        room = s.room("wh_limited", 0.5)
        released.append(room)
        for _ in range(room):  # about what comes round here from the three sweepers
            s.came_round("wh_limited")
            waiting.append(s.offer("wh_limited", Source.TASK))
        for _ in range(room):
            s.queued("wh_limited")  # the confirms
        for _ in range(50):  # until the next sweep, reviewed as the worker does
            s.review()
            for offer in [o for o in waiting if o.decision is not None]:
                waiting.remove(offer)
                assert decided(offer).route is Route.START
                starts += 1
                s.finished("wh_limited", decided(offer).ticket)
            clock.advance(0.01)
    assert min(released[2:]) >= 10 * 0.5 - 2, released
    assert 10 * 10 * 0.9 <= starts <= 10 * 10 * 1.05 + 2, released


def test_a_task_without_a_token_waits_for_its_turn_then_goes_back_to_the_broker() -> None:
    s, clock = make({"wh_limited": 2}, cap=4)
    started = decided(s.offer("wh_limited", Source.TASK))
    assert started.route is Route.START
    s.finished("wh_limited", started.ticket)
    waiting = [s.offer("wh_limited", Source.TASK) for _ in range(4)]
    assert all(o.decision is None for o in waiting)
    clock.advance(0.6)
    s.review()  # a token came with time alone: the oldest waiter starts
    assert decided(waiting[0]).route is Route.START
    assert all(o.decision is None for o in waiting[1:])
    clock.advance(RATE_HOLD_SECONDS - 0.5)  # past RATE_HOLD_SECONDS since the offers
    s.review()  # the next token, then the others' hold runs out: deferred to later turns
    assert decided(waiting[1]).route is Route.START
    deferred = [decided(o) for o in waiting[2:]]
    assert [d.route for d in deferred] == [Route.DEFER, Route.DEFER]
    assert 1.0 <= deferred[0].delay <= deferred[1].delay


def test_endpoints_without_a_limit_are_untouched() -> None:
    s, _clock = make({"wh_limited": 1})
    routes = [decided(s.offer("wh_free", Source.TASK)).route for _ in range(32)]
    assert routes == [Route.START] * 32


def test_a_lifted_limit_lets_the_waiting_line_start() -> None:
    # Tasks wait for tokens; the limit is removed; a task offered then queues behind them,
    # without a deadline, and nothing is in flight whose end would hand the line on.
    limits = {"wh_limited": 2.0}
    s, clock = make(limits, cap=4)
    first = decided(s.offer("wh_limited", Source.TASK))
    s.finished("wh_limited", first.ticket)
    held = [s.offer("wh_limited", Source.TASK) for _ in range(3)]
    assert all(o.decision is None for o in held)
    del limits["wh_limited"]
    late = s.offer("wh_limited", Source.TASK)
    clock.advance(0.05)
    s.review()
    assert [decided(o).route for o in [*held, late]] == [Route.START] * 4
