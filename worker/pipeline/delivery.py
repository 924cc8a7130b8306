"""The delivery stage: one task from ``webhooks.deliveries`` becomes one recorded attempt.

For each task: re-check the endpoint (a PATCH ``enabled=false`` or a DELETE stops new attempts
at once), defer it if the endpoint is at its concurrency cap, sign and POST, record the
attempt, and on a retryable failure publish the next attempt to its retry tier. The message is
acked only after the attempt is committed and the retry confirmed by the broker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.events import TEST_EVENT_TYPE, new_event_id
from worker.ops.metrics import Metrics, status_class
from worker.pipeline import topology
from worker.pipeline.loader import BatchLoader
from worker.pipeline.outcome import Decision, Verdict, decide
from worker.pipeline.sender import Sender, Sent
from worker.pipeline.slots import EndpointSlots, ResponseTimes
from worker.pipeline.writer import BatchWriter, PipelineRecord
from worker.settings import Settings
from worker.store.ids import new_id
from worker.store.records import Attempt, AttemptRecord, DeliveryState, Webhook, utcnow
from worker.store.store import Store

log = structlog.get_logger("sellfern_webhooks.delivery")

DISABLED_GONE = "the endpoint answered 410 Gone"
# How long a task may wait for a slot of a busy endpoint before it is deferred to the broker.
SLOT_WAIT_SECONDS = 0.25
DISABLED_FAILING = "every delivery failed for {days:g} days"
# How many of the shortest deferral tiers a fast endpoint's tasks go through (1 s, 5 s, 30 s).
FAST_ENDPOINT_TIERS = 3
# A count of tasks queued for an endpoint that has not moved for this long is forgotten: they
# went to another worker.
QUEUED_MEMORY_SECONDS = 10.0
# The most parked deliveries released for one endpoint at a time.
MAX_RELEASE = 1_000
# Endpoints whose deferral turns or queued tasks are remembered at once; beyond it, what is
# past or stale is dropped.
MAX_TRACKED_ENDPOINTS = 10_000
# Fan-out sends an event's first attempts itself only to endpoints answering faster than this
# on average; an event is acked after them, so a slower endpoint would hold events back.
DIRECT_SEND_MAX_SECONDS = 0.25
# Waits between probes of an unreachable database (the last one repeats).
DATABASE_PROBE_SECONDS = (0.5, 1.0, 2.0, 5.0)


async def _database_reachable(store: Store) -> bool:
    try:
        await asyncio.wait_for(store.ping(), 5)
    except Exception:
        return False
    return True


async def riding_out_database_outages(store: Store, handle: Callable[[], Awaitable[None]]) -> None:
    """Run ``handle``; if it fails while the database is unreachable, wait for the database
    and run it again, keeping the message unacked meanwhile.

    Requeueing instead would count against the queue's ``DELIVERY_LIMIT`` once a second, and a
    ten-second database outage would dead-letter healthy events and tasks. A failure with the
    database up is raised, so that a poison message still ends in ``webhooks.dead``.
    """
    while True:
        try:
            await handle()
        except Exception:
            if await _database_reachable(store):
                raise
            log.warning("database unreachable; the message is kept and retried when it is back")
            delays = iter(DATABASE_PROBE_SECONDS)
            while True:
                await asyncio.sleep(next(delays, DATABASE_PROBE_SECONDS[-1]))
                if await _database_reachable(store):
                    break
        else:
            return


def encode_task(event_id: str, webhook_id: str, attempt: int, event_json: bytes) -> bytes:
    """A :class:`DeliveryTask` body around an event already in JSON, without re-encoding it."""
    head = json.dumps({"event_id": event_id, "webhook_id": webhook_id, "attempt": attempt})
    return f'{head[:-1]}, "event": '.encode() + event_json + b"}"


def task_headers(webhook_id: str) -> dict[str, Any]:
    """Headers of a delivery task message: the endpoint, readable without parsing the body."""
    return {topology.WEBHOOK_HEADER: webhook_id}


class DeliveryTask(BaseModel):
    """The body of a message on ``webhooks.deliveries`` and the retry tiers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(min_length=1, max_length=100)
    webhook_id: str = Field(min_length=1, max_length=40)
    attempt: int = Field(ge=1, le=1000)
    event: dict[str, Any]

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class Publisher:
    """Confirmed, persistent publishes to a named queue through the default exchange."""

    def __init__(self, topo: topology.Topology, metrics: Metrics) -> None:
        self._topology = topo
        self._metrics = metrics

    async def to_queue(
        self, queue: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            headers=headers or {},
        )
        await self._topology.default_exchange.publish(message, routing_key=queue, timeout=30)

    async def dead_letter(self, body: bytes, reason: str, detail: str) -> None:
        """Park a message in ``webhooks.dead`` with why, for an operator to inspect."""
        await self.to_queue(
            topology.DEAD_QUEUE, body, {"x-reason": reason, "x-detail": detail[:1000]}
        )
        self._metrics.dead_lettered.labels(reason).inc()


def _state_for(decision: Decision) -> DeliveryState:
    if decision.verdict is Verdict.SUCCEEDED:
        return "succeeded"
    return "pending" if decision.verdict is Verdict.RETRY else "failed"


def _attempt(
    webhook: Webhook, event: dict[str, Any], number: int, sent: Sent, decision: Decision
) -> Attempt:
    return Attempt(
        id=new_id("att"),
        webhook_id=webhook.id,
        org_id=webhook.org_id,
        event_id=event["id"],
        event_type=event["type"],
        attempt=number,
        success=decision.verdict is Verdict.SUCCEEDED,
        status_code=sent.response.status,
        error_kind=decision.error_kind,
        error_message=decision.error_message,
        duration_ms=sent.duration_ms,
        response_body=sent.response_body,
        created_at=utcnow(),
    )


class Deliverer:
    """Makes attempts: from the queue (``on_message``) and on demand for the API."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        metrics: Metrics,
        settings: Settings,
        publisher: Publisher | None = None,
        writer: BatchWriter[PipelineRecord] | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._metrics = metrics
        self._settings = settings
        self._publisher = publisher
        self._writer = writer
        # Concurrent tasks read their endpoints in one query; each still reads after it
        # arrived, so a PATCH enabled=false or a DELETE that returned before is seen.
        self._webhooks: BatchLoader[str, Webhook | None] = BatchLoader(
            "webhooks", store.get_webhooks, None
        )
        self._cap = settings.endpoint_concurrency
        self._slots = EndpointSlots(self._cap, SLOT_WAIT_SECONDS)
        # Tasks queued by fan-out per endpoint and not yet come round (slots spoken for), and
        # when that count last changed.
        self._queued: dict[str, tuple[int, float]] = {}
        # When the next task deferred for an endpoint is likely to find a slot (monotonic).
        self._next_turn: dict[str, float] = {}
        self._response_times = ResponseTimes(DIRECT_SEND_MAX_SECONDS)
        self._sending = 0
        self._auto_disable_after = timedelta(seconds=settings.auto_disable_after_seconds)

    # --- from the queue ----------------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Consumer callback: settle the message in exactly one place."""
        async with message.process(requeue=True, ignore_processed=True):
            try:
                await riding_out_database_outages(
                    self._store, lambda: self._handle(message.body, dict(message.headers))
                )
            except Exception:
                log.exception("delivery task failed; it will be redelivered")
                # Back off a little so a broken dependency is not hammered; after
                # DELIVERY_LIMIT redeliveries RabbitMQ moves the task to webhooks.dead.
                await asyncio.sleep(1)
                raise

    async def _defer(self, body: bytes, headers: dict[str, Any]) -> None:
        """Put a task back for later: it waits in the broker, not in memory, and the slot
        goes to another endpoint. A deferral is not an attempt."""
        assert self._publisher is not None  # noqa: S101
        count = headers.get(topology.DEFERRALS_HEADER, 0)
        count = count if isinstance(count, int) else 0
        hinted = headers.get(topology.WEBHOOK_HEADER)
        delay = self._defer_delay(hinted if isinstance(hinted, str) else "", count)
        await self._publisher.to_queue(
            topology.deferred_queue_name(delay),
            body,
            {**headers, topology.DEFERRALS_HEADER: count + 1},
        )
        self._metrics.deferred.inc()

    def _defer_delay(self, webhook_id: str, deferrals: int) -> float:
        """The deferral tier for a task of a busy endpoint.

        A fast endpoint is busy because of this worker's own load and frees a slot soon: its
        tasks wait 1 s, then 5 s, then 30 s. A slow one finishes about one attempt per
        (response time / cap) seconds, so the tasks deferred for it are given successive
        turns that far apart, and each waits in the shortest tier that reaches its turn.
        """
        tiers = topology.DEFER_TIERS
        at_least = tiers[min(deferrals, FAST_ENDPOINT_TIERS - 1)]
        estimate = self._response_times.estimate(webhook_id)
        if estimate is None or estimate < DIRECT_SEND_MAX_SECONDS:
            return at_least
        now = time.monotonic()
        if len(self._next_turn) > MAX_TRACKED_ENDPOINTS:
            self._next_turn = {k: v for k, v in self._next_turn.items() if v > now}
        turn = max(now, self._next_turn.get(webhook_id, now)) + estimate / self._cap
        self._next_turn[webhook_id] = turn
        wait = max(turn - now, at_least)
        return next((tier for tier in tiers if tier >= wait), tiers[-1])

    async def _handle(self, body: bytes, headers: dict[str, Any]) -> None:
        assert self._publisher is not None, "queue deliveries need a publisher"  # noqa: S101
        hinted = headers.get(topology.WEBHOOK_HEADER)
        if (
            isinstance(hinted, str)
            and hinted in self._queued
            and topology.DEFERRALS_HEADER not in headers
        ):
            # One of the tasks fan-out queued has come round (or another worker's did; a
            # deferred one was counted down when it first came round).
            count, _ = self._queued[hinted]
            if count > 1:
                self._queued[hinted] = (count - 1, time.monotonic())
            else:
                del self._queued[hinted]
        if isinstance(hinted, str) and self._slots.full(hinted):
            # Decided from the header alone: a slow endpoint's backlog costs no parsing and
            # no database read each time it comes round.
            await self._defer(body, headers)
            return
        try:
            task = DeliveryTask.model_validate_json(body)
        except ValidationError as exc:
            await self._publisher.dead_letter(body, "invalid_task", str(exc))
            return
        structlog.contextvars.bind_contextvars(
            event_id=task.event_id, webhook_id=task.webhook_id, attempt=task.attempt
        )
        if not await self._slots.acquire(task.webhook_id):
            await self._defer(body, headers)
            return
        await self._attempt_in_slot(task, body)

    # --- from fan-out ------------------------------------------------------------------------

    def sends_directly(self, webhook_id: str) -> bool:
        """Whether fan-out should make this endpoint's first attempt itself.

        Yes when the endpoint answers fast and the worker is below its global concurrency:
        the attempt then costs no broker round trip and no second database read of the
        event. A slow endpoint's tasks go through ``webhooks.deliveries`` instead, so that no
        event waits on it.
        """
        return self._sending < self._settings.delivery_concurrency and self._response_times.fast(
            webhook_id, self._slots.busy(webhook_id)
        )

    async def queue_new(self, webhook_id: str, body: bytes) -> None:
        """Queue a first attempt that fan-out does not make itself."""
        assert self._publisher is not None  # noqa: S101
        await self._publisher.to_queue(topology.DELIVERIES_QUEUE, body, task_headers(webhook_id))
        now = time.monotonic()
        if len(self._queued) > MAX_TRACKED_ENDPOINTS:
            self._queued = {
                k: v for k, v in self._queued.items() if now - v[1] <= QUEUED_MEMORY_SECONDS
            }
        count, _ = self._queued.get(webhook_id, (0, 0.0))
        self._queued[webhook_id] = (count + 1, now)

    def saturated(self, webhook_id: str) -> bool:
        """Slow, and every slot taken or spoken for by a task queued from here: a new task
        could only wait."""
        claimed = self._slots.busy(webhook_id) + self._queued_recently(webhook_id)
        return claimed >= self._cap and not self._response_times.fast(webhook_id, self._cap)

    def _queued_recently(self, webhook_id: str) -> int:
        """Tasks fan-out queued for the endpoint that have not come round yet. Another worker
        may have taken them, so the count is forgotten once it stops moving."""
        count, changed = self._queued.get(webhook_id, (0, 0.0))
        if count and time.monotonic() - changed > QUEUED_MEMORY_SECONDS:
            del self._queued[webhook_id]
            return 0
        return count

    def room(self, webhook_id: str, seconds: float) -> int:
        """About how many new tasks the endpoint can finish within ``seconds``: its cap over
        its response time. An endpoint not measured here yet gets one cap's worth."""
        if self.saturated(webhook_id):
            return 0
        estimate = self._response_times.estimate(webhook_id)
        if estimate is None:
            return self._cap
        return min(MAX_RELEASE, max(1, round(self._cap * seconds / max(estimate, 0.001))))

    async def deliver_directly(self, task: DeliveryTask) -> bool:
        """Make ``task``'s attempt now, for fan-out, and settle it like a queued one.

        False, having done nothing, when no slot of the endpoint came free in time: the
        caller then queues the task.
        """
        if not await self._slots.acquire(task.webhook_id):
            return False
        await self._attempt_in_slot(task, None)
        return True

    async def _attempt_in_slot(self, task: DeliveryTask, body: bytes | None) -> None:
        """Make the attempt in a slot already taken; give the slot back before settling.

        The slot covers reading the endpoint and the request; recording the attempt and
        scheduling a retry happen after it is given back, so the cap bounds the load on the
        endpoint, not the worker's own bookkeeping.
        """
        self._metrics.in_flight.inc()
        self._sending += 1
        try:
            webhook = await self._webhooks.get(task.webhook_id)
            if webhook is None or not webhook.enabled:
                log.info(
                    "delivery skipped: endpoint deleted or disabled", webhook_id=task.webhook_id
                )
                self._metrics.attempts.labels(task.event["type"], "skipped", "none").inc()
                return
            started = self._response_times.started(task.webhook_id)
            try:
                sent = await self._send(webhook, task.event)
            finally:
                self._response_times.finished(task.webhook_id, started)
        finally:
            self._sending -= 1
            self._metrics.in_flight.dec()
            self._slots.release(task.webhook_id)
        await self._settle(task, body, webhook, sent)

    async def _settle(
        self, task: DeliveryTask, body: bytes | None, webhook: Webhook, sent: Sent
    ) -> None:
        """Record the attempt and, on a retryable failure, schedule the next one — both
        durable before the caller acks the task. ``body`` is the task as queued, if it was."""
        assert self._publisher is not None  # noqa: S101
        now = utcnow()
        decision = decide(sent.response, task.attempt, self._settings.retry_schedule, now)
        attempt = _attempt(webhook, task.event, task.attempt, sent, decision)
        next_at = now + timedelta(seconds=decision.next_delay) if decision.next_delay else None
        durable: list[Any] = [self._record(AttemptRecord(attempt, _state_for(decision), next_at))]
        if decision.verdict is Verdict.RETRY and decision.next_delay is not None:
            tier = topology.retry_queue_name(decision.next_delay)
            retry = task.model_copy(update={"attempt": task.attempt + 1})
            durable.append(
                self._publisher.to_queue(tier, retry.encode(), task_headers(task.webhook_id))
            )
            self._metrics.retries_scheduled.labels(f"{decision.next_delay:g}").inc()
        elif decision.verdict is Verdict.FAILED:
            durable.append(
                self._publisher.dead_letter(
                    task.encode() if body is None else body,
                    "exhausted",
                    decision.error_message or "",
                )
            )
        await asyncio.gather(*durable)
        await self._after(webhook, task.event, attempt, decision, now)

    async def _record(self, record: AttemptRecord) -> None:
        if self._writer is not None:
            await self._writer.write(record)
        else:
            await self._store.record_attempts([record])

    async def _send(self, webhook: Webhook, event: dict[str, Any]) -> Sent:
        return await self._sender.send(webhook.url, webhook.signing_secrets(utcnow()), event)

    async def _after(
        self,
        webhook: Webhook,
        event: dict[str, Any],
        attempt: Attempt,
        decision: Decision,
        now: datetime,
    ) -> None:
        """Log and count the attempt; disable the endpoint when it asked or kept failing."""
        outcome = decision.verdict.value
        self._metrics.attempts.labels(
            event["type"], outcome, status_class(attempt.status_code)
        ).inc()
        self._metrics.attempt_duration.labels(outcome).observe(attempt.duration_ms / 1000)
        log.info(
            "delivery attempt",
            event_id=attempt.event_id,
            webhook_id=attempt.webhook_id,
            attempt=attempt.attempt,
            outcome=outcome,
            status_code=attempt.status_code,
            error=decision.error_kind,
            duration_ms=attempt.duration_ms,
        )
        if decision.verdict is Verdict.SUCCEEDED:
            occurred = datetime.fromisoformat(event["occurred_at"])
            if event["type"] != TEST_EVENT_TYPE:
                self._metrics.delivery_lag.labels(event["type"]).observe(
                    max(0.0, (now - occurred).total_seconds())
                )
            return
        reason = None
        if decision.verdict is Verdict.GONE:
            reason, label = DISABLED_GONE, "gone"
        elif webhook.failing_since and now - webhook.failing_since >= self._auto_disable_after:
            days = self._auto_disable_after.total_seconds() / 86400
            reason, label = DISABLED_FAILING.format(days=days), "failing"
        if reason and await self._store.disable_webhook(webhook.id, reason):
            self._metrics.endpoints_disabled.labels(label).inc()
            log.warning("endpoint disabled", webhook_id=webhook.id, reason=reason)

    # --- on demand, for the API --------------------------------------------------------------

    async def send_test(self, webhook: Webhook) -> Attempt:
        """Send a signed ``webhook.test`` event now and record it as attempt 1."""
        occurred_at = datetime.now(UTC)
        event: dict[str, Any] = {
            "id": new_event_id(),
            "type": TEST_EVENT_TYPE,
            "organization_id": webhook.org_id,
            "occurred_at": occurred_at.isoformat(timespec="milliseconds"),
            "data": {"webhook_id": webhook.id, "message": "This is a test event."},
        }
        await self._store.store_event_and_deliveries(event, occurred_at, [webhook.id])
        return await self._attempt_now(webhook, event, 1)

    async def redeliver(self, webhook: Webhook, event: dict[str, Any]) -> Attempt:
        """Send a stored event to an endpoint again now, as its next attempt number."""
        number = await self._store.last_attempt_number(event["id"], webhook.id) + 1
        return await self._attempt_now(webhook, event, number)

    async def _attempt_now(self, webhook: Webhook, event: dict[str, Any], number: int) -> Attempt:
        # Sent now, at a customer's request: not counted against the endpoint's cap.
        sent = await self._send(webhook, event)
        now = utcnow()
        # A manual attempt is one attempt: it schedules no retries of its own.
        decision = decide(sent.response, number, (), now)
        attempt = _attempt(webhook, event, number, sent, decision)
        await self._store.record_attempts([AttemptRecord(attempt, _state_for(decision), None)])
        await self._after(webhook, event, attempt, decision, now)
        return attempt
