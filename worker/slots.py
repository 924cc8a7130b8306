"""Per-endpoint concurrency: at most ``cap`` attempts in flight to one endpoint.

A task that finds its endpoint busy may wait a moment for a slot — a healthy endpoint frees
one within milliseconds — but only as many tasks as the cap may wait at once, and none longer
than ``hold_seconds``. Everything beyond that is deferred to the broker by the caller, so a
slow endpoint holds at most twice its cap of the worker's prefetch and never all of it.
"""

from __future__ import annotations

import asyncio
import collections


class EndpointSlots:
    def __init__(self, cap: int, hold_seconds: float) -> None:
        self._cap = cap
        self._hold = hold_seconds
        self._busy: collections.Counter[str] = collections.Counter()
        self._waiting: collections.Counter[str] = collections.Counter()
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    def full(self, webhook_id: str) -> bool:
        """True when waiting would not help: every slot taken and the waiting line full."""
        return self._busy[webhook_id] >= self._cap and self._waiting[webhook_id] >= self._cap

    async def acquire(self, webhook_id: str) -> bool:
        """Take a slot, waiting at most ``hold_seconds``; False means: defer the task."""
        if self.full(webhook_id):
            return False
        semaphore = self._semaphores.setdefault(webhook_id, asyncio.Semaphore(self._cap))
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
