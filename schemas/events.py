"""The event envelope that upstream services publish to the ``sellfern.events`` exchange.

Publishers send it as the JSON body of a persistent message whose routing key is the event
type. ``data`` is the domain object as the publishing service defines it; this service
forwards it untouched and validates only the envelope around it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Final, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

EventType = Literal[
    "order.created",
    "order.updated",
    "order.status_changed",
    "order.fulfillment.shipped",
    "order.fulfillment.delivered",
    "expense.created",
    "ticket.created",
    "ticket.updated",
]
EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)

# Sent by `POST /webhooks/{id}/test`; never published upstream and not subscribable.
TEST_EVENT_TYPE: Final = "webhook.test"
# Every type an event or an attempt may have: what a filter of the API may name.
KnownEventType = Literal[EventType, "webhook.test"]

SCHEMA_FILE = Path(__file__).parent / "event-envelope.schema.json"
ORGANIZATION_ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


class EventEnvelope(BaseModel):
    """One domain event, as published by an upstream service."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="EventEnvelope")

    id: str = Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="Unique id chosen by the publisher (by convention evt_…); the webhook-id "
        "customers deduplicate on.",
        examples=["evt_5f1c2e9a7b3d4c8e9f0a1b2c"],
    )
    type: EventType = Field(description="The event type; also the message's routing key.")
    organization_id: str = Field(
        pattern=ORGANIZATION_ID_PATTERN,
        description="The customer organization the event belongs to (by convention org_…), "
        "as given to `token create --org`.",
        examples=["org_acme"],
    )
    occurred_at: AwareDatetime = Field(description="When it happened, RFC 3339 with an offset.")
    data: dict[str, Any] = Field(description="The domain object, forwarded as is.")

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _text_not_number(cls, value: object) -> object:
        # Pydantic would read a number as Unix seconds; the payload forwards ``occurred_at``
        # as published, as its ``timestamp``, and that must be RFC 3339 text.
        if isinstance(value, int | float):
            raise ValueError("must be an RFC 3339 string, not a number")  # noqa: TRY004
        return value


def envelope_json_schema() -> dict[str, Any]:
    """The JSON Schema of the envelope, as checked in at ``event-envelope.schema.json``."""
    schema = EventEnvelope.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://schemas.sellfern.com/webhooks/event-envelope.schema.json"
    return schema


def write_schema_file() -> None:
    SCHEMA_FILE.write_text(json.dumps(envelope_json_schema(), indent=2, sort_keys=True) + "\n")
