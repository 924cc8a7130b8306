"""The attempt runner: one started attempt becomes a signed POST, a recorded attempt and, on
a retryable failure, a confirmed retry.

The runner is handed a slot the scheduler already gave (its ticket) and gives it back when
the request ends, before the bookkeeping: the cap bounds the load on the endpoint, not the
worker's own writes. The caller acks its message only after :meth:`AttemptRunner.run` returns,
so the attempt is committed and any retry confirmed by then.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

import structlog

from schemas.events import TEST_EVENT_TYPE
from worker.ops.metrics import Metrics, status_class
from worker.ops.tracing import Carrier, Traced, Tracing
from worker.pipeline import topology
from worker.pipeline.loader import BatchLoader
from worker.pipeline.outcome import Decision, Verdict, decide
from worker.pipeline.publisher import Publisher
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.sender import Sender, Sent
from worker.pipeline.tasks import DeliveryTask, task_headers
from worker.pipeline.writer import BatchWriter, PipelineRecord
from worker.settings import Settings
from worker.store import Store
from worker.store.ids import new_id
from worker.store.records import Attempt, AttemptRecord, DeliveryState, Webhook, utcnow

log = structlog.get_logger("sellfern_webhooks.attempts")

DISABLED_GONE = "the endpoint answered 410 Gone"
DISABLED_FAILING = "every delivery failed for {days:g} days"


def delivery_state(decision: Decision) -> DeliveryState:
    if decision.verdict is Verdict.SUCCEEDED:
        return "succeeded"
    return "pending" if decision.verdict is Verdict.RETRY else "failed"


def storable(text: str | None) -> str | None:
    """``text`` with NUL characters replaced (U+FFFD): PostgreSQL's text refuses them, and one
    binary response body would fail every batch its attempt was written in."""
    if text is not None and "\x00" in text:
        return text.replace("\x00", "\ufffd")
    return text


def build_attempt(
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
        error_message=storable(decision.error_message),
        duration_ms=sent.duration_ms,
        response_body=storable(sent.response_body),
        created_at=utcnow(),
    )


class AttemptEffects:
    """What follows any attempt, queued or manual: its log line and metrics, and disabling an
    endpoint that answered 410 or has only failed for ``AUTO_DISABLE_AFTER_SECONDS``."""

    def __init__(self, store: Store, metrics: Metrics, settings: Settings) -> None:
        self._store = store
        self._metrics = metrics
        self._auto_disable_after = timedelta(seconds=settings.auto_disable_after_seconds)

    async def after(
        self,
        webhook: Webhook,
        event: dict[str, Any],
        attempt: Attempt,
        decision: Decision,
        now: datetime,
    ) -> None:
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
            if event["type"] != TEST_EVENT_TYPE:
                occurred = datetime.fromisoformat(event["occurred_at"])
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
        if reason and await self._store.endpoints.disable(webhook.id, reason):
            self._metrics.endpoints_disabled.labels(label).inc()
            log.warning("endpoint disabled", webhook_id=webhook.id, reason=reason)


class AttemptRunner:
    """Makes the attempts the scheduler started, for fan-out and the deliveries consumer."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        scheduler: Scheduler,
        publisher: Publisher,
        writer: BatchWriter[PipelineRecord],
        effects: AttemptEffects,
        metrics: Metrics,
        retry_schedule: tuple[float, ...],
        retry_jitter: float,
        tracing: Tracing,
    ) -> None:
        self._store = store
        self._sender = sender
        self._scheduler = scheduler
        # Attempts being sent or recorded here now, by delivery and number: a second task for
        # one (the broker redelivered it after a lost connection) is settled unsent, as the
        # first one's outcome, its success or its retry, stands for both. The number is part
        # of the key: the retry that attempt publishes may come round before its record is
        # written, and is the delivery's only way on.
        self._under_way: set[tuple[str, str, int]] = set()
        self._publisher = publisher
        self._writer = writer
        self._effects = effects
        self._metrics = metrics
        self._retry_schedule = retry_schedule
        self._retry_jitter = retry_jitter
        self._tracing = tracing
        # Concurrent attempts read their endpoints in one query; each still reads after it
        # started, so a PATCH enabled=false or a DELETE that returned before is seen.
        self._webhooks: BatchLoader[str, Webhook | None] = BatchLoader(
            "webhooks", store.endpoints.get_many, None
        )
        # Every task's recheck, one query for those asked together.
        self._succeeded: BatchLoader[tuple[str, str], bool] = BatchLoader(
            "succeeded", store.events.succeeded, default=False
        )

    async def run(
        self,
        task: DeliveryTask,
        ticket: int,
        body: bytes | None,
        trace: Carrier | None = None,
        *,
        recheck: bool = False,
        parked: bool = False,
        released: Callable[[], None] | None = None,
    ) -> bool:
        """Make ``task``'s attempt in the slot of ``ticket``, then record and settle it; return
        whether it was sent (not skipped).

        ``body`` is the task as it was queued, if it was (dead-lettered as is when exhausted);
        ``trace`` the context of the fan-out that made the delivery (W3C headers), if known;
        ``recheck`` for a task, which may have been attempted already (the broker redelivered
        it, or its event was fanned out twice): it is settled unsent if the store has it
        succeeded. ``parked`` for a delivery
        the sweeper leased from the parked backlog: no message stands for it, so its retry or
        dead letter is confirmed before its attempt is recorded, which takes it out of the
        backlog. ``released`` is called once the attempt's slot is given back (its request ended,
        or it was skipped), before the attempt is recorded.
        """
        with self._tracing.attempt(task.event, task.webhook_id, task.attempt, trace) as span:
            return await self._attempt(
                task, ticket, body, span, recheck=recheck, parked=parked, released=released
            )

    async def _already_recorded(self, task: DeliveryTask) -> bool:
        """The delivery succeeded already. Only that: a failure may have been recorded while
        its retry (or dead letter) was not yet confirmed, and then this task is its only way
        on."""
        return await self._succeeded.get((task.event_id, task.webhook_id))

    async def _attempt(
        self, task: DeliveryTask, ticket: int, body: bytes | None, span: Traced, *,
        recheck: bool, parked: bool, released: Callable[[], None] | None,
    ) -> bool:  # fmt: skip
        self._metrics.in_flight.inc()
        answered = False
        sent: Sent | None = None
        key = (task.event_id, task.webhook_id, task.attempt)
        try:
            if recheck and key not in self._under_way:
                # Both reads at once: the endpoint's slot is held while they run.
                webhook, done = await asyncio.gather(
                    self._webhooks.get(task.webhook_id), self._already_recorded(task)
                )
            else:
                webhook, done = await self._webhooks.get(task.webhook_id), recheck
            if webhook is None or not webhook.enabled:
                log.info(
                    "delivery skipped: endpoint deleted or disabled", webhook_id=task.webhook_id
                )
                self._metrics.attempts.labels(task.event["type"], "skipped", "none").inc()
                span.finished("skipped", None)
                return False
            if done:
                log.info("delivery skipped: done or under way already", webhook_id=webhook.id)
                self._metrics.already_recorded.inc()
                span.finished("skipped", None)
                return False
            answered = True
            self._under_way.add(key)
            sent = await self._sender.send_to(webhook, task.event, span.headers)
        except BaseException:
            if answered:
                self._under_way.discard(key)
            raise
        finally:
            self._metrics.in_flight.dec()
            self._scheduler.finished(
                task.webhook_id,
                ticket,
                answered=answered,
                seconds=sent.duration_ms / 1000 if sent is not None else None,
            )
            if released is not None:
                released()
        try:
            await self._settle(task, body, webhook, sent, span, parked=parked)
        finally:
            self._under_way.discard(key)
        return True

    async def _settle(
        self, task: DeliveryTask, body: bytes | None, webhook: Webhook, sent: Sent, span: Traced,
        *, parked: bool,
    ) -> None:  # fmt: skip
        """Record the attempt and, on a retryable failure, schedule the next one — both
        durable before the caller acks (for a ``parked`` delivery, the record last)."""
        now = utcnow()
        decision = decide(
            sent.response, task.attempt, self._retry_schedule, now,
            self._retry_jitter, random.random(),  # noqa: S311 - spreading load, not secrecy
        )  # fmt: skip
        span.finished(decision.verdict.value, sent.response.status)
        attempt = build_attempt(webhook, task.event, task.attempt, sent, decision)
        next_at = now + timedelta(seconds=decision.next_delay) if decision.next_delay else None
        record = AttemptRecord(attempt, delivery_state(decision), next_at)
        follow_up: Coroutine[Any, Any, None] | None = None
        if decision.verdict is Verdict.RETRY and decision.next_delay is not None:
            tier = topology.retry_queue_name(decision.next_delay)
            retry = task.model_copy(update={"attempt": task.attempt + 1})
            # The next attempt continues the same parent: attempts are siblings in a trace.
            headers = task_headers(task.webhook_id, span.parent)
            follow_up = self._publisher.to_queue(tier, retry.encode(), headers)
        elif decision.verdict is Verdict.FAILED:
            follow_up = self._publisher.dead_letter(
                task.encode() if body is None else body, "exhausted", decision.error_message or ""
            )
        if follow_up is None:
            await self._writer.write(record)
        elif parked:
            # No message stands for a parked delivery: what follows it is confirmed before the
            # record takes it out of the backlog.
            await follow_up
            await self._writer.write(record)
        else:
            # The record first: a write that fails has the message handled again from the
            # start, and a retry confirmed beside it would have started a second chain of
            # retries. Should the publish fail instead, the message comes back all the same.
            try:
                await self._writer.write(record)
            except BaseException:
                follow_up.close()  # not to be sent now: closed, not left unawaited
                raise
            await follow_up
        if decision.verdict is Verdict.RETRY and decision.next_delay is not None:
            self._metrics.retries_scheduled.labels(f"{decision.next_delay:g}").inc()
        await self._effects.after(webhook, task.event, attempt, decision, now)
