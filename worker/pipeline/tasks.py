"""Delivery tasks: the messages of ``webhooks.deliveries``, its retry tiers and deferral tiers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.pipeline import topology


class DeliveryTask(BaseModel):
    """The body of a message on ``webhooks.deliveries`` and the retry tiers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(min_length=1, max_length=100)
    webhook_id: str = Field(min_length=1, max_length=40)
    attempt: int = Field(ge=1, le=1000)
    event: dict[str, Any]

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


def encode_task(event_id: str, webhook_id: str, attempt: int, event_json: bytes) -> bytes:
    """A :class:`DeliveryTask` body around an event already in JSON, without re-encoding it."""
    head = json.dumps({"event_id": event_id, "webhook_id": webhook_id, "attempt": attempt})
    return f'{head[:-1]}, "event": '.encode() + event_json + b"}"


def task_headers(webhook_id: str, trace: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Headers of a delivery task message: the endpoint, readable without parsing the body,
    and the trace context the attempt continues (``traceparent``, ``tracestate``), if any."""
    if trace:
        return {topology.WEBHOOK_HEADER: webhook_id, **trace}
    return {topology.WEBHOOK_HEADER: webhook_id}
