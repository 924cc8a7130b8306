"""The endpoints' delivery policies a worker applies itself: rate limits and ordering.

The scheduler asks for an endpoint's rate limit at every offer, before a task's body is read,
so the answer is a lookup in memory. It holds only the endpoints that have a limit or are
ordered — few, and found through a partial index — reloaded when an organization's endpoints
change (the change notice every worker receives), every :data:`REFRESH_SECONDS` in case a
notice was lost (a PATCH of a limit applies within seconds), and after each read of endpoints
by :class:`~worker.pipeline.matcher.EndpointMatcher`: an event may be taken before the notice
of its endpoint's creation, and its match must not be fresher than its policies.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from worker.store import Store

log = structlog.get_logger("sellfern_webhooks.policies")

REFRESH_SECONDS = 5.0


class EndpointPolicies:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._rate_limits: dict[str, float] = {}
        self._ordered: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        # Refreshes one at a time, so that an older read is never applied after a newer one.
        self._refreshing = asyncio.Lock()
        # Counts change notices: what a worker read of an endpoint before it may be stale.
        self.generation = 0

    def rate_limit(self, webhook_id: str) -> float | None:
        """Attempts a second to the endpoint across every worker, or None for no limit."""
        return self._rate_limits.get(webhook_id)

    def ordered(self, webhook_id: str) -> bool:
        return webhook_id in self._ordered

    def ordered_ids(self) -> frozenset[str]:
        return self._ordered

    def changed(self) -> None:
        """Some organization's endpoints changed: reload soon."""
        self.generation += 1
        self._changed.set()

    async def refresh(self) -> None:
        async with self._refreshing:
            rate_limits: dict[str, float] = {}
            ordered: set[str] = set()
            for webhook_id, rate_limit, is_ordered in await self._store.endpoints.policies():
                if rate_limit is not None:
                    rate_limits[webhook_id] = float(rate_limit)
                if is_ordered:
                    ordered.add(webhook_id)
            self._rate_limits, self._ordered = rate_limits, frozenset(ordered)

    async def run(self) -> None:
        """Reload on every change notice and every REFRESH_SECONDS, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REFRESH_SECONDS)
            self._changed.clear()
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("reloading endpoint policies failed; keeping the last", error=str(exc))
