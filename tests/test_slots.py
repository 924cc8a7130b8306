"""Per-endpoint slots: a cap, a short bounded wait, and deferral beyond it."""

from __future__ import annotations

import asyncio

from worker.slots import EndpointSlots


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
