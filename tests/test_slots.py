"""Per-endpoint slots: a cap, a short bounded wait, and deferral beyond it."""

from __future__ import annotations

import asyncio

import pytest

from worker.pipeline.slots import EndpointSlots, ResponseTimes


async def test_cap_then_bounded_wait_then_refusal() -> None:
    slots = EndpointSlots(cap=2, hold_seconds=0.05)
    assert await slots.acquire("wh_a")
    assert await slots.acquire("wh_a")
    assert await slots.acquire("wh_b")  # another endpoint is not affected
    assert not slots.full("wh_a")  # busy, but a task may still wait for a slot
    assert not await slots.acquire("wh_a")  # waited hold_seconds, nothing freed


async def test_waiter_gets_the_freed_slot() -> None:
    slots = EndpointSlots(cap=1, hold_seconds=5)
    assert await slots.acquire("wh_a")
    waiter = asyncio.create_task(slots.acquire("wh_a"))
    await asyncio.sleep(0)  # let the waiter queue up on the semaphore
    slots.release("wh_a")
    assert await asyncio.wait_for(waiter, 1)


async def test_full_when_the_waiting_line_is_full() -> None:
    slots = EndpointSlots(cap=1, hold_seconds=5)
    assert await slots.acquire("wh_a")
    waiter = asyncio.create_task(slots.acquire("wh_a"))
    await asyncio.sleep(0)
    assert slots.full("wh_a")
    assert not await slots.acquire("wh_a")  # refused at once, no waiting
    slots.release("wh_a")
    assert await waiter
    slots.release("wh_a")
    assert slots._semaphores == {}


def test_unmeasured_endpoint_gets_a_few_probes() -> None:
    times = ResponseTimes(fast_seconds=0.25)
    assert times.fast("wh_new", in_flight=0)
    assert times.fast("wh_new", in_flight=ResponseTimes.PROBES - 1)
    assert not times.fast("wh_new", in_flight=ResponseTimes.PROBES)
    assert times.estimate("wh_new") is None


def test_average_marks_slow_and_fast_again() -> None:
    times = ResponseTimes(fast_seconds=0.25)
    times.observe("wh_a", 2.0)
    assert not times.fast("wh_a", in_flight=0)
    for _ in range(30):  # it recovers as fast answers come in
        times.observe("wh_a", 0.01)
    assert times.fast("wh_a", in_flight=10)
    assert times.estimate("wh_a") == pytest.approx(0.01, abs=0.01)


def test_an_attempt_in_flight_too_long_marks_slow_before_it_ends() -> None:
    now = [100.0]
    times = ResponseTimes(fast_seconds=0.05, clock=lambda: now[0])
    times.observe("wh_a", 0.001)
    ticket = times.started("wh_a")
    assert times.fast("wh_a", in_flight=1)
    now[0] += 0.08  # still no answer
    assert not times.fast("wh_a", in_flight=1)
    assert times.estimate("wh_a") == pytest.approx(0.08)
    times.finished("wh_a", ticket)
    assert times.estimate("wh_a") == pytest.approx(0.001 + 0.2 * (0.08 - 0.001))
