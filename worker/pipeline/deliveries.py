"""The deliveries consumer: one task from ``webhooks.deliveries`` becomes one attempt.

Each task is offered to the per-endpoint scheduler first, by the endpoint named in its header
and before its body is parsed, so a slow endpoint's backlog costs no parsing and no database
read each time it comes round. The scheduler starts it, makes it wait in memory for a fast
endpoint's next free slot, or defers it through the broker for a slow endpoint at its cap. A
task for an ordered endpoint (one that turned ordered while the task was queued) is not sent
here: its delivery is parked into the endpoint's backlog, which the endpoint's lane sends one at
a time, in order.
"""

from __future__ import annotations

from typing import Any

import structlog
from pydantic import ValidationError

from worker.ops.metrics import Metrics
from worker.ops.tracing import Tracing
from worker.pipeline import topology
from worker.pipeline.attempts import AttemptRunner
from worker.pipeline.consuming import Delivered, headers_of
from worker.pipeline.offers import Route, Source
from worker.pipeline.publisher import Publisher
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.settle import Settler
from worker.pipeline.tasks import DeliveryTask
from worker.store.parked import ParkedDeliveries

log = structlog.get_logger("sellfern_webhooks.deliveries")


class DeliveriesConsumer:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: AttemptRunner,
        publisher: Publisher,
        settler: Settler,
        metrics: Metrics,
        tracing: Tracing,
        backlog: ParkedDeliveries,
    ) -> None:
        self._scheduler = scheduler
        self._backlog = backlog
        self._runner = runner
        self._publisher = publisher
        self._settler = settler
        self._metrics = metrics
        self._tracing = tracing

    async def on_message(self, message: Delivered) -> None:
        """Consumer callback; aiormq runs each in a task of its own, so the log context
        bound for one task ends with it."""
        await self._settler.settle(
            message,
            lambda: self._handle(message.body, dict(headers_of(message) or {})),
        )

    async def _handle(self, body: bytes, headers: dict[str, Any]) -> None:
        hinted = headers.get(topology.WEBHOOK_HEADER)
        deferrals = headers.get(topology.DEFERRALS_HEADER)
        if isinstance(hinted, str) and deferrals is None:
            # A task queued by fan-out has come round (a deferred one was counted when it
            # first came round).
            self._scheduler.came_round(hinted)
        task: DeliveryTask | None = None
        if not isinstance(hinted, str):
            task = self._parse(body)
            if task is None:
                await self._dead_letter_unreadable(body)
                return
            hinted = task.webhook_id
        count = deferrals if isinstance(deferrals, int) else 0
        decision = await self._scheduler.admit(hinted, Source.TASK, count)
        if decision.route is Route.DEFER:
            await self._defer(body, headers, decision.delay, count)
            return
        task = task or self._parse(body)
        if task is None or task.webhook_id != hinted:
            if decision.route is Route.START:
                self._scheduler.finished(hinted, decision.ticket, answered=False)
            await self._dead_letter_unreadable(body)
            return
        if decision.route is Route.PARK:
            if not await self._backlog.park(hinted, task.event_id, task.attempt):
                # A sweep's attempt published this retry and is still recording the attempt
                # before it: parked now, the delivery would be left pending by that record.
                await self._defer(body, headers, topology.DEFER_TIERS[0], count)
            return
        structlog.contextvars.bind_contextvars(
            event_id=task.event_id, webhook_id=task.webhook_id, attempt=task.attempt
        )
        # The attempt continues the fan-out's trace, which the task carries in its headers.
        # Every task is checked against the store first, not only one the broker marks
        # redelivered: an event fanned out but not acked before a crash is fanned out again,
        # and a delivery of it whose first task was still queued then gets a second one.
        await self._runner.run(
            task, decision.ticket, body, self._tracing.incoming(headers), recheck=True
        )

    async def _defer(
        self, body: bytes, headers: dict[str, Any], delay: float, deferrals: int
    ) -> None:
        await self._publisher.to_queue(
            topology.deferred_queue_name(delay),
            body,
            {**headers, topology.DEFERRALS_HEADER: deferrals + 1},
        )
        self._metrics.deferred.inc()

    @staticmethod
    def _parse(body: bytes) -> DeliveryTask | None:
        try:
            return DeliveryTask.model_validate_json(body)
        except ValidationError:
            return None

    async def _dead_letter_unreadable(self, body: bytes) -> None:
        try:
            DeliveryTask.model_validate_json(body)
        except ValidationError as exc:
            detail = str(exc)
        else:
            detail = "the task's endpoint differs from its x-webhook-id header"
        await self._publisher.dead_letter(body, "invalid_task", detail)
