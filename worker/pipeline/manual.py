"""Attempts made on a customer's request through the API: a test event, or a redelivery.

They are sent at once and recorded, outside the per-endpoint scheduler (a person is waiting for
the answer, and one request at a time cannot overload an endpoint), and schedule no retries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.events import TEST_EVENT_TYPE, new_event_id
from worker.ops.tracing import Traced, Tracing
from worker.pipeline.attempts import AttemptEffects, build_attempt, delivery_state
from worker.pipeline.outcome import decide
from worker.pipeline.sender import Sender
from worker.store import Store
from worker.store.records import Attempt, AttemptRecord, NewEvent, Webhook, utcnow


class ManualAttempts:
    def __init__(
        self, store: Store, sender: Sender, effects: AttemptEffects, tracing: Tracing
    ) -> None:
        self._store = store
        self._sender = sender
        self._effects = effects
        self._tracing = tracing

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
        await self._store.pipeline.write_batch([NewEvent(event, occurred_at, (webhook.id,))])
        return await self._attempt_now(webhook, event, 1)

    async def redeliver(self, webhook: Webhook, event: dict[str, Any]) -> Attempt:
        """Send a stored event to an endpoint again now, as its next attempt number."""
        number = await self._store.attempts.last_number(event["id"], webhook.id) + 1
        return await self._attempt_now(webhook, event, number)

    async def _attempt_now(self, webhook: Webhook, event: dict[str, Any], number: int) -> Attempt:
        # A span of its own, child of the API request's.
        with self._tracing.attempt(event, webhook.id, number, None) as span:
            return await self._send_now(webhook, event, number, span)

    async def _send_now(
        self, webhook: Webhook, event: dict[str, Any], number: int, span: Traced
    ) -> Attempt:
        sent = await self._sender.send_to(webhook, event, span.headers)
        now = utcnow()
        # One attempt: it schedules no retries of its own.
        decision = decide(sent.response, number, (), now)
        span.finished(decision.verdict.value, sent.response.status)
        attempt = build_attempt(webhook, event, number, sent, decision)
        record = AttemptRecord(attempt, delivery_state(decision), None)
        await self._store.pipeline.write_batch([record])
        await self._effects.after(webhook, event, attempt, decision, now)
        return attempt
