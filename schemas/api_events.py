"""Resources of the management API about events, endpoint health and recoveries.

Split from :mod:`schemas.api` (endpoints, attempts, errors) to keep each module readable;
the route table uses both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from schemas.api import ListQuery
from schemas.events import TEST_EVENT_TYPE, KnownEventType
from schemas.times import Rfc3339

EVENT_DESCRIPTIONS: dict[str, str] = {
    "order.created": "An order was placed.",
    "order.updated": "An order's details changed.",
    "order.status_changed": "An order moved to another status.",
    "order.fulfillment.shipped": "A fulfillment of an order was shipped.",
    "order.fulfillment.delivered": "A fulfillment of an order was delivered.",
    "expense.created": "An expense was recorded.",
    "ticket.created": "A support ticket was opened.",
    "ticket.updated": "A support ticket changed.",
    TEST_EVENT_TYPE: "Sent by POST /webhooks/{id}/test only; not subscribable.",
}
# Every subscribable type, then the test event: the types the event filters take.
LISTED_EVENT_TYPES: tuple[str, ...] = get_args(KnownEventType)


def delivered_body_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema of the body an endpoint receives for ``event_type``.

    ``data`` is the publisher's domain object, forwarded as is: this service holds no schema
    of its own for it, so it is any JSON object.
    """
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": event_type,
        "type": "object",
        "required": ["id", "type", "timestamp", "data"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "description": "The event id; the webhook-id header."},
            "type": {"const": event_type},
            "timestamp": {
                "type": "string",
                "format": "date-time",
                "description": "When the event occurred.",
            },
            "data": {"type": "object", "description": "The domain object, as published."},
        },
    }


class EventTypeInfo(BaseModel):
    model_config = ConfigDict(title="EventType", serialize_by_alias=True, validate_by_name=True)

    name: str
    description: str
    body_schema: dict[str, Any] = Field(
        alias="schema", description="JSON Schema of the body an endpoint receives."
    )


class EventTypeList(BaseModel):
    model_config = ConfigDict(title="EventTypeList")

    data: list[EventTypeInfo]


class Event(BaseModel):
    model_config = ConfigDict(title="Event")

    id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    data: dict[str, Any]


DeliveryStateName = Literal["pending", "parked", "succeeded", "failed"]


class EventDelivery(BaseModel):
    model_config = ConfigDict(title="EventDelivery")

    webhook_id: str
    state: DeliveryStateName
    attempts: int
    last_attempt_at: datetime | None
    last_status_code: int | None = Field(description="null without an attempt or a response.")
    next_attempt_at: datetime | None = Field(description="Set while the delivery is pending.")


class EventWithDeliveries(Event):
    model_config = ConfigDict(title="EventWithDeliveries")

    deliveries: list[EventDelivery]


class EventList(BaseModel):
    model_config = ConfigDict(title="EventList")

    data: list[Event]
    has_more: bool
    next_cursor: str | None


class EventListQuery(ListQuery):
    type: KnownEventType | None = Field(
        default=None, description="A subscribable type, or webhook.test."
    )
    since: Rfc3339 | None = Field(default=None, description="Received at or after.")
    until: Rfc3339 | None = Field(default=None, description="Received at or before.")


HealthState = Literal["healthy", "failing", "slow", "disabled"]


class StatsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: Rfc3339 | None = Field(default=None, description="Start of the window; 24 h ago.")


class AttemptCounts(BaseModel):
    model_config = ConfigDict(title="AttemptCounts")

    succeeded: int
    failed: int


class Durations(BaseModel):
    model_config = ConfigDict(title="Durations")

    p50: float | None
    p95: float | None


class Backlog(BaseModel):
    model_config = ConfigDict(title="Backlog")

    pending: int
    parked: int


class Stats(BaseModel):
    model_config = ConfigDict(title="Stats")

    webhook_id: str
    since: datetime
    until: datetime
    attempts: AttemptCounts
    success_ratio: float | None = Field(description="null without attempts in the window.")
    duration_ms: Durations = Field(description="Continuous percentiles of the window's.")
    last_success_at: datetime | None
    last_failure_at: datetime | None
    failing_since: datetime | None
    backlog: Backlog
    state: HealthState


RecoveryStatusName = Literal["failed", "all"]


class RecoveryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", title="RecoveryCreate")

    since: Rfc3339 = Field(description="Deliveries created at or after; within the retention.")
    until: Rfc3339 | None = Field(default=None, description="At or before; default now.")
    status: RecoveryStatusName = Field(
        default="failed", description="failed: deliveries whose last attempt failed; all."
    )


class Recovery(BaseModel):
    model_config = ConfigDict(title="Recovery")

    id: str = Field(examples=["rcv_01JDQ3V8J6W9E5X1T0M2ZC4R7K"])
    webhook_id: str
    since: datetime
    until: datetime
    status: RecoveryStatusName
    state: Literal["running", "done"]
    total: int = Field(description="Deliveries that matched when the recovery started.")
    queued: int = Field(description="Deliveries sent back to the pipeline so far.")
    created_at: datetime
    finished_at: datetime | None
