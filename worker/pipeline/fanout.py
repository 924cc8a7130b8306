"""The fan-out stage: one event from ``webhooks.events`` becomes one task per subscribed endpoint.

The envelope is validated first; anything malformed is parked in ``webhooks.dead`` with its
reason and never stops the worker. A valid event is stored with one delivery row per endpoint,
the tasks are published with confirms, and only then is the event acked.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from schemas.events import EventEnvelope
from worker.ops.metrics import Metrics
from worker.pipeline import topology
from worker.pipeline.delivery import (
    Deliverer,
    DeliveryTask,
    Publisher,
    encode_task,
    riding_out_database_outages,
)
from worker.pipeline.loader import BatchLoader
from worker.pipeline.parking import Parking
from worker.pipeline.writer import BatchWriter, PipelineRecord
from worker.store.records import NewEvent
from worker.store.store import Store

log = structlog.get_logger("sellfern_webhooks.fanout")

MAX_NESTING = 32
# Cached matches are invalidated by change notices; the TTL only bounds the damage of a lost
# notice (say, the API published while this worker was reconnecting).
MATCH_CACHE_TTL = 30.0


class RejectedEventError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _depth(value: Any, limit: int) -> int:  # noqa: ANN401 - any JSON value
    """How many levels of objects and arrays a JSON value nests, stopping once past ``limit``.

    Walked a level at a time, and only through containers: an event's scalars cost nothing.
    """
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level and depth <= limit:
        depth += 1
        inner: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            inner.extend(child for child in children if isinstance(child, dict | list))
        level = inner
    return depth


def parse_event(body: bytes, max_bytes: int) -> tuple[EventEnvelope, dict[str, Any]]:
    """Validate an event body; return the envelope and the JSON object as received.

    Raises :class:`RejectedEventError` with a reason from a bounded set.
    """
    if len(body) > max_bytes:
        raise RejectedEventError("oversize", f"{len(body)} bytes; the limit is {max_bytes}")
    try:
        raw = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RejectedEventError("invalid_encoding", f"not UTF-8: {exc}") from None
    except RecursionError:
        raise RejectedEventError("too_deep", "nested too deeply to parse") from None
    except ValueError as exc:  # bad JSON, or an integer too long to convert
        raise RejectedEventError("invalid_json", str(exc)[:500]) from None
    if not isinstance(raw, dict):
        raise RejectedEventError("invalid_envelope", "the body must be a JSON object")
    if _depth(raw, MAX_NESTING) > MAX_NESTING:
        raise RejectedEventError("too_deep", f"nested deeper than {MAX_NESTING} levels")
    try:
        envelope = EventEnvelope.model_validate(raw)
    except ValidationError as exc:
        unknown_type = any(e["loc"] == ("type",) for e in exc.errors()) and "type" in raw
        reason = "unknown_type" if unknown_type else "invalid_envelope"
        raise RejectedEventError(reason, str(exc)[:1000]) from None
    return envelope, raw


class EndpointMatcher:
    """Which endpoints an (organization, event type) goes to, cached per process.

    Cache misses that happen together — a burst of events from many organizations — are
    answered by one indexed query.
    """

    def __init__(self, store: Store) -> None:
        self._cache: dict[tuple[str, str], tuple[float, list[str]]] = {}
        # Bumped by every invalidation: an answer to a query that started before a change
        # is used once but not cached.
        self._generation = 0
        self._loader: BatchLoader[tuple[str, str], list[str]] = BatchLoader(
            "subscriptions", store.subscriptions, []
        )

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
                self._generation += 1
                self._cache.clear()


class ChangeNotifier:
    """Tells every worker that an organization's endpoints changed (API side)."""

    def __init__(self, topo: topology.Topology) -> None:
        self._exchange = topo.changes_exchange

    async def endpoints_changed(self, org_id: str) -> None:
        message = aio_pika.Message(json.dumps({"org_id": org_id}).encode())
        await self._exchange.publish(message, routing_key="", timeout=10)


def _observe(future: asyncio.Future[None]) -> None:
    """Mark a future's outcome seen: its failure is already reported by another."""
    if not future.cancelled():
        future.exception()


class FanOut:
    """Stores each event and hands it to its endpoints.

    A fast endpoint gets its first attempt from here, at once (see
    :meth:`Deliverer.sends_directly`); a slow one at its cap gets its delivery parked in the
    database (:mod:`worker.parking`); any other gets a task on ``webhooks.deliveries``. The
    event is acked only once the event and its parked deliveries are stored and each first
    attempt is recorded (with its retry confirmed) or its task confirmed by the broker.
    """

    def __init__(
        self, store: Store, writer: BatchWriter[PipelineRecord], publisher: Publisher,
        deliverer: Deliverer, parking: Parking, matcher: EndpointMatcher, metrics: Metrics,
        max_event_bytes: int,
    ) -> None:  # fmt: skip
        self._store = store
        self._writer = writer
        self._publisher = publisher
        self._deliverer = deliverer
        self._parking = parking
        self._matcher = matcher
        self._metrics = metrics
        self._max_event_bytes = max_event_bytes

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Consumer callback: settle the message in exactly one place.

        aio-pika runs each callback in a task of its own, so the log context bound while
        handling one event ends with it.
        """
        async with message.process(requeue=True, ignore_processed=True):
            try:
                await riding_out_database_outages(self._store, lambda: self._handle(message.body))
            except Exception:
                log.exception("event fan-out failed; it will be redelivered")
                await asyncio.sleep(1)  # do not hammer a broken dependency
                raise

    async def _handle(self, body: bytes) -> None:
        try:
            envelope, raw = parse_event(body, self._max_event_bytes)
        except RejectedEventError as exc:
            log.warning("event rejected", reason=exc.reason, detail=exc.detail[:200])
            self._metrics.events_rejected.labels(exc.reason).inc()
            await self._publisher.dead_letter(body, exc.reason, exc.detail)
            return
        structlog.contextvars.bind_contextvars(event_id=envelope.id, event_type=envelope.type)
        webhook_ids = await self._matcher.lookup(envelope.organization_id, envelope.type)
        parked = frozenset(w for w in webhook_ids if self._parking.park(w))
        stored = self._writer.submit(
            NewEvent(raw, envelope.occurred_at, tuple(webhook_ids), parked)
        )
        if parked:
            self._metrics.deliveries_published.labels(envelope.type, "parked").inc(len(parked))
            webhook_ids = [w for w in webhook_ids if w not in parked]
        if len(webhook_ids) == 1:
            # The common case, without the task per endpoint that gather would start.
            try:
                await self._deliver(envelope, raw, body, webhook_ids[0])
            except BaseException:
                stored.add_done_callback(_observe)
                raise
            await stored
        else:
            await asyncio.gather(
                stored,
                *(self._deliver(envelope, raw, body, webhook_id) for webhook_id in webhook_ids),
            )
        self._metrics.events_consumed.labels(envelope.type).inc()
        log.debug("event fanned out", endpoints=len(webhook_ids))

    async def _deliver(
        self, envelope: EventEnvelope, raw: dict[str, Any], body: bytes, webhook_id: str
    ) -> None:
        """Send the first attempt now if the endpoint is fast and free; else queue a task."""
        if self._deliverer.sends_directly(webhook_id):
            task = DeliveryTask.model_construct(
                event_id=envelope.id, webhook_id=webhook_id, attempt=1, event=raw
            )
            if await self._deliverer.deliver_directly(task):
                self._metrics.deliveries_published.labels(envelope.type, "direct").inc()
                return
        await self._deliverer.queue_new(webhook_id, encode_task(envelope.id, webhook_id, 1, body))
        self._metrics.deliveries_published.labels(envelope.type, "queued").inc()
