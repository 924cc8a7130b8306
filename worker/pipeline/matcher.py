"""Which endpoints an event goes to: subscriptions cached per worker, invalidated on change."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.pipeline import topology
from worker.pipeline.loader import BatchLoader
from worker.pipeline.policies import EndpointPolicies
from worker.store import Store

# Cached matches are invalidated by change notices; the TTL only bounds the damage of a lost
# notice (say, the API published while this worker was reconnecting).
MATCH_CACHE_TTL = 30.0


class EndpointMatcher:
    """Which endpoints an (organization, event type) goes to, cached per process.

    Cache misses that happen together — a burst of events from many organizations — are
    answered by one indexed query.
    """

    def __init__(self, store: Store, policies: EndpointPolicies) -> None:
        self._cache: dict[tuple[str, str], tuple[float, list[str]]] = {}
        # Bumped by every invalidation: an answer to a query that started before a change
        # is used once but not cached.
        self._generation = 0
        self._store = store
        self._policies = policies
        self._loader: BatchLoader[tuple[str, str], list[str]] = BatchLoader(
            "subscriptions", self._subscriptions, []
        )

    async def _subscriptions(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], list[str]]:
        """The endpoints of ``keys``, with the policies read after them: an endpoint created
        ordered (or with a rate limit) a moment ago, whose change notice this worker has not
        yet taken, is then not sent to as if it had neither."""
        found = await self._store.endpoints.subscriptions(keys)
        await self._policies.refresh()
        return found

    async def lookup(self, org_id: str, event_type: str) -> list[str]:
        key = (org_id, event_type)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self._generation
        ids = await self._loader.get(key)
        if generation == self._generation:
            self._cache[key] = (now + MATCH_CACHE_TTL, ids)
        return ids

    def forget_all(self) -> None:
        """Drop every cached match (notices may have been missed while disconnected)."""
        self._generation += 1
        self._cache.clear()

    def invalidate(self, org_id: str) -> None:
        self._generation += 1
        for key in [k for k in self._cache if k[0] == org_id]:
            del self._cache[key]

    async def on_change(self, message: AbstractIncomingMessage) -> None:
        """Consumer callback for ``webhooks.changes`` notices."""
        async with message.process(ignore_processed=True):
            try:
                self.invalidate(str(json.loads(message.body)["org_id"]))
            except (ValueError, KeyError, TypeError):
                self.forget_all()


class ChangeNotifier:
    """Tells every worker that an organization's endpoints changed (API side)."""

    def __init__(self, topo: topology.Topology) -> None:
        self._exchange = topo.changes_exchange

    async def endpoints_changed(self, org_id: str) -> None:
        message = aio_pika.Message(json.dumps({"org_id": org_id}).encode())
        await self._exchange.publish(message, routing_key="", timeout=10)
