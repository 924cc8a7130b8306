"""Confirmed publishes of the pipeline: tasks, deferrals and dead letters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aio_pika

from worker.ops.metrics import Metrics
from worker.pipeline import topology
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.tasks import task_headers


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
        """Put a message in ``webhooks.dead`` with why, for an operator to inspect."""
        await self.to_queue(
            topology.DEAD_QUEUE, body, {"x-reason": reason, "x-detail": detail[:1000]}
        )
        self._metrics.dead_lettered.labels(reason).inc()


class TaskQueue:
    """Queues first attempts to ``webhooks.deliveries`` and tells the scheduler, which counts
    each as a slot spoken for until it comes round."""

    def __init__(self, publisher: Publisher, scheduler: Scheduler) -> None:
        self._publisher = publisher
        self._scheduler = scheduler

    async def queue(
        self,
        webhook_id: str,
        body: bytes,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """Publish a task for the endpoint."""
        headers = task_headers(webhook_id, trace)
        await self._publisher.to_queue(topology.DELIVERIES_QUEUE, body, headers)
        self._scheduler.queued(webhook_id)
