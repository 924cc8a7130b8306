"""The fan-out stage: one event from ``webhooks.events`` becomes one delivery per subscribed
endpoint.

The envelope is validated first; anything malformed goes to ``webhooks.dead`` with its reason
and never stops the worker. A valid event is stored with one delivery row per endpoint, each
delivery is started, queued or parked as the scheduler decides, and only once all of that is
durable is the event acked.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, NoReturn

import structlog
from pydantic import ValidationError

from schemas.events import EventEnvelope
from worker.ops.metrics import Metrics
from worker.ops.tracing import Carrier, Traced, Tracing
from worker.pipeline.attempts import AttemptRunner
from worker.pipeline.consuming import Delivered, headers_of
from worker.pipeline.matcher import EndpointMatcher
from worker.pipeline.offers import Offer, Route, Source
from worker.pipeline.publisher import Publisher, TaskQueue
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.settle import Settler
from worker.pipeline.tasks import DeliveryTask, encode_task
from worker.pipeline.writer import BatchWriter, PipelineRecord
from worker.store.events import EventRepository
from worker.store.records import NewEvent

log = structlog.get_logger("sellfern_webhooks.fanout")

MAX_NESTING = 32


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


def _not_a_number(constant: str) -> NoReturn:
    """``NaN`` and ``Infinity``, which Python's decoder takes and JSON does not: neither a
    receiver's parser nor PostgreSQL's ``json`` type would take the event either."""
    raise ValueError(f"{constant} is not a JSON value")


# Made once: json.loads given an option builds a decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_not_a_number)
# A \u escape of a UTF-16 surrogate. A pair decodes to one character; a lone one decodes to a
# string that cannot be encoded, so the payload could never be sent.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(raw: dict[str, Any]) -> None:
    """Raise ``UnicodeEncodeError`` if any string of ``raw`` holds a lone surrogate."""
    json.dumps(raw, ensure_ascii=False).encode("utf-8")


def parse_event(body: bytes, max_bytes: int) -> tuple[EventEnvelope, dict[str, Any]]:
    """Validate an event body; return the envelope and the JSON object as received.

    Raises :class:`RejectedEventError` with a reason from a bounded set.
    """
    if len(body) > max_bytes:
        raise RejectedEventError("oversize", f"{len(body)} bytes; the limit is {max_bytes}")
    try:
        raw = _DECODER.decode(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RejectedEventError("invalid_encoding", f"not UTF-8: {exc}") from None
    except RecursionError:
        raise RejectedEventError("too_deep", "nested too deeply to parse") from None
    except ValueError as exc:  # bad JSON, or an integer too long to convert
        raise RejectedEventError("invalid_json", str(exc)[:500]) from None
    if not isinstance(raw, dict):
        raise RejectedEventError("invalid_envelope", "the body must be a JSON object")
    # Only a body with a surrogate escape (as an ASCII-only encoder writes an emoji) is checked.
    if _SURROGATE_ESCAPE.search(body):
        try:
            _check_text(raw)
        except UnicodeEncodeError:
            raise RejectedEventError(
                "invalid_json", "a \\u escape names a lone UTF-16 surrogate, which is no character"
            ) from None
    # A body with no more brackets than the limit cannot nest deeper: most events skip the walk.
    brackets = body.count(b"{") + body.count(b"[")
    if brackets > MAX_NESTING and _depth(raw, MAX_NESTING) > MAX_NESTING:
        raise RejectedEventError("too_deep", f"nested deeper than {MAX_NESTING} levels")
    try:
        envelope = EventEnvelope.model_validate(raw)
    except ValidationError as exc:
        unknown_type = any(e["loc"] == ("type",) for e in exc.errors()) and "type" in raw
        reason = "unknown_type" if unknown_type else "invalid_envelope"
        raise RejectedEventError(reason, str(exc)[:1000]) from None
    return envelope, raw


def _observe(future: asyncio.Future[None]) -> None:
    """Mark a future's outcome seen: its failure is already reported by another."""
    if not future.cancelled():
        future.exception()


class FanOut:
    """Stores each event and hands each of its deliveries to the per-endpoint scheduler.

    The scheduler decides per endpoint (:mod:`worker.pipeline.scheduler`): a fast endpoint gets
    its first attempt from here, at once or as soon as one of its slots frees; a slow one at
    its cap gets its delivery parked in the database (:mod:`worker.pipeline.parking`); any
    other gets a task on ``webhooks.deliveries``. The event is acked only once the event and
    its parked deliveries are stored and each first attempt is recorded (with its retry
    confirmed) or its task confirmed by the broker.
    """

    def __init__(
        self, writer: BatchWriter[PipelineRecord], publisher: Publisher, scheduler: Scheduler,
        runner: AttemptRunner, tasks: TaskQueue, matcher: EndpointMatcher, settler: Settler,
        metrics: Metrics, max_event_bytes: int, tracing: Tracing, events: EventRepository,
    ) -> None:  # fmt: skip
        self._events = events
        self._writer = writer
        self._publisher = publisher
        self._scheduler = scheduler
        self._runner = runner
        self._tasks = tasks
        self._matcher = matcher
        self._settler = settler
        self._metrics = metrics
        self._max_event_bytes = max_event_bytes
        self._tracing = tracing

    async def on_message(self, message: Delivered) -> None:
        """Consumer callback; aiormq runs each in a task of its own, so the log context
        bound while handling one event ends with it."""
        redelivered = bool(message.redelivered)
        await self._settler.settle(
            message, lambda: self._handle(message.body, headers_of(message), redelivered)
        )

    async def _handle(self, body: bytes, headers: dict[str, Any] | None, redelivered: bool) -> None:
        # One span per fan-out, continuing the publisher's trace (the message's headers).
        with self._tracing.fanout(headers) as span:
            await self._fan_out(body, span, redelivered)

    async def _fan_out(self, body: bytes, span: Traced, redelivered: bool) -> None:
        try:
            envelope, raw = parse_event(body, self._max_event_bytes)
        except RejectedEventError as exc:
            log.warning("event rejected", reason=exc.reason, detail=exc.detail[:200])
            self._metrics.events_rejected.labels(exc.reason).inc()
            await self._publisher.dead_letter(body, exc.reason, exc.detail)
            return
        structlog.contextvars.bind_contextvars(event_id=envelope.id, event_type=envelope.type)
        webhook_ids = await self._matcher.lookup(envelope.organization_id, envelope.type)
        if redelivered and webhook_ids:
            webhook_ids = await self._not_yet_started(envelope.id, webhook_ids)
        span.fanned_out(envelope.id, envelope.type, len(webhook_ids))
        # Offered before the event is written: which deliveries are parked goes in that write.
        offers = [self._scheduler.offer(w, Source.NEW) for w in webhook_ids]
        parked = frozenset(
            o.webhook_id for o in offers if o.decision and o.decision.route is Route.PARK
        )
        stored = self._writer.submit(
            NewEvent(raw, envelope.occurred_at, tuple(webhook_ids), parked, body.decode())
        )
        if parked:
            self._metrics.deliveries_published.labels(envelope.type, "parked").inc(len(parked))
            offers = [o for o in offers if o.webhook_id not in parked]
        if len(offers) == 1:
            # The common case, without the task per endpoint that gather would start.
            try:
                await self._deliver(envelope, raw, body, offers[0], span.headers, stored)
            except BaseException:
                stored.add_done_callback(_observe)
                raise
            await stored
        else:
            await asyncio.gather(
                stored,
                *(
                    self._deliver(envelope, raw, body, offer, span.headers, stored)
                    for offer in offers
                ),
            )
        self._metrics.events_consumed.labels(envelope.type).inc()
        log.debug("event fanned out", endpoints=len(webhook_ids))

    async def _not_yet_started(self, event_id: str, webhook_ids: list[str]) -> list[str]:
        """Of a redelivered event's endpoints, those the store does not have delivered or
        parked: an event fanned out but not acked before a crash is not sent twice where its
        first attempt succeeded, nor released twice where it was parked. Any other delivery is
        offered again, so that none is lost: a failure's retry, or a queued task, may not have
        been confirmed before the crash."""
        progress = await self._events.progress(event_id)
        started = {
            webhook_id
            for webhook_id, (state, _) in progress.items()
            if state in ("succeeded", "parked")
        }
        if started:
            self._metrics.already_recorded.inc(len(started & set(webhook_ids)))
        return [w for w in webhook_ids if w not in started]

    async def _deliver(
        self,
        envelope: EventEnvelope,
        raw: dict[str, Any],
        body: bytes,
        offer: Offer,
        trace: Carrier | None,
        stored: asyncio.Future[None],
    ) -> None:
        """Make the first attempt when the scheduler starts it; queue a task when it says so,
        once the event's write (``stored``) is committed.

        Either way the attempt continues ``trace``, the fan-out's context.
        """
        try:
            decision = await offer.wait()
        except asyncio.CancelledError:
            self._scheduler.withdraw(offer)
            raise
        webhook_id = offer.webhook_id
        if decision.route is Route.START:
            task = DeliveryTask.model_construct(
                event_id=envelope.id, webhook_id=webhook_id, attempt=1, event=raw
            )
            await self._runner.run(task, decision.ticket, None, trace)
            self._metrics.deliveries_published.labels(envelope.type, "direct").inc()
            return
        # Not before: another worker could take the task and write its attempt while this
        # write, which opens the delivery, is still open, each transaction then waiting on a
        # row of the other's (PostgreSQL ends one of them as a deadlock, after a second).
        await asyncio.shield(stored)
        await self._tasks.queue(webhook_id, encode_task(envelope.id, webhook_id, 1, body), trace)
        self._metrics.deliveries_published.labels(envelope.type, "queued").inc()
