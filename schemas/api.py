"""Resources of the management API, ``/api/v2``.

The same models validate requests, shape responses and generate the OpenAPI document, so the
three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from schemas.events import EVENT_TYPES, EventType, KnownEventType
from schemas.headers import CustomHeaders
from schemas.times import Rfc3339

MAX_URL_LENGTH = 2048

Url = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH)]
Description = Annotated[str, StringConstraints(max_length=1000)]
EventList = Annotated[
    list[EventType],
    Field(
        min_length=1,
        max_length=len(EVENT_TYPES),
        description="Event types to receive; duplicates are removed.",
    ),
]


MAX_RATE_LIMIT = 10_000
# DELIVERY_TIMEOUT's own upper bound; the API lowers it to the service's setting (below).
MAX_TIMEOUT_SECONDS = 300

Headers = Annotated[CustomHeaders | None, Field(description="null: none.")]
RateLimit = Annotated[
    int | None,
    Field(
        strict=True,
        ge=1,
        le=MAX_RATE_LIMIT,
        description="Attempts per second across all workers; null: no limit.",
    ),
]
TimeoutSeconds = Annotated[
    int | None,
    Field(
        strict=True,
        ge=1,
        le=MAX_TIMEOUT_SECONDS,
        description="Seconds one attempt may take, connect to last byte; at most the "
        "service's DELIVERY_TIMEOUT, which is also the default (null).",
    ),
]
# Strict, as Ordered: "no" or 0 read as a boolean would turn an endpoint on or off by accident.
Enabled = Annotated[bool, Field(strict=True)]
Ordered = Annotated[
    bool,
    Field(
        strict=True,
        description="Attempts start one at a time, in the order the events were received.",
    ),
]


def _dedupe(events: list[EventType]) -> list[EventType]:
    return list(dict.fromkeys(events))


def _within_delivery_timeout(timeout: int | None, info: ValidationInfo) -> int | None:
    """The API validates with its settings as context: an endpoint may only lower the
    service's ``DELIVERY_TIMEOUT``."""
    limit = (info.context or {}).get("delivery_timeout")
    if timeout is not None and limit is not None and timeout > limit:
        raise PydanticCustomError(
            "timeout", "at most DELIVERY_TIMEOUT, {limit} seconds here", {"limit": f"{limit:g}"}
        )
    return timeout


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", title="WebhookCreate")

    url: Url = Field(description="An https URL on a publicly reachable host.")
    events: EventList
    description: Description = ""
    enabled: Enabled = True
    headers: Headers = None
    rate_limit: RateLimit = None
    timeout_seconds: TimeoutSeconds = None
    ordered: Ordered = False

    _unique_events = field_validator("events")(_dedupe)
    _timeout = field_validator("timeout_seconds")(_within_delivery_timeout)


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", title="WebhookUpdate")

    url: Url | None = None
    events: EventList | None = Field(default=None, description="Replaces the whole list.")
    enabled: Enabled | None = Field(default=None, description="false pauses delivery at once.")
    description: Description | None = None
    headers: Headers = Field(default=None, description="Replaces the whole set; null: none.")
    rate_limit: RateLimit = None
    timeout_seconds: TimeoutSeconds = None
    ordered: Ordered | None = None

    @field_validator("events")
    @classmethod
    def _unique_events(cls, events: list[EventType] | None) -> list[EventType] | None:
        return _dedupe(events) if events is not None else None

    _timeout = field_validator("timeout_seconds")(_within_delivery_timeout)


class Webhook(BaseModel):
    model_config = ConfigDict(title="Webhook")

    id: str = Field(examples=["wh_01JDQ3V8J6W9E5X1T0M2ZC4R7K"])
    url: str
    events: list[str]
    enabled: bool
    description: str
    headers: dict[str, str] = Field(description="Extra request headers of every attempt.")
    rate_limit: int | None = Field(description="Attempts per second; null: no limit.")
    timeout_seconds: Annotated[int | float, WithJsonSchema({"type": "number"})] = Field(
        description="Seconds one attempt may take; the service's DELIVERY_TIMEOUT unless set."
    )
    ordered: bool
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None = Field(
        description="Why delivery was stopped by the service (410 Gone, 5 days of failures)."
    )


class WebhookWithSecret(Webhook):
    model_config = ConfigDict(title="WebhookWithSecret")

    secret: str = Field(
        description="The whsec_ signing secret; shown on creation and rotation only."
    )


class WebhookList(BaseModel):
    model_config = ConfigDict(title="WebhookList")

    data: list[Webhook]
    has_more: bool
    next_cursor: str | None


ErrorKind = Literal[
    "timeout",
    "connection_refused",
    "connection_error",
    "tls_error",
    "dns_error",
    "blocked_address",
    "http_status",
    "redirect_not_followed",
    "invalid_url",
]


class AttemptError(BaseModel):
    model_config = ConfigDict(title="AttemptError")

    kind: ErrorKind
    message: str


class Attempt(BaseModel):
    model_config = ConfigDict(title="Attempt")

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    attempt: int = Field(description="1 for the first attempt of this event to this endpoint.")
    success: bool
    status_code: int | None = Field(description="null when no response was received.")
    error: AttemptError | None = Field(description="null on success.")
    duration_ms: int
    response_body: str | None = Field(description="The first bytes of the response body.")
    created_at: datetime


class AttemptList(BaseModel):
    model_config = ConfigDict(title="AttemptList")

    data: list[Attempt]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True)
class ErrorCode:
    """One row of the API's error table: the status, the code in the body, and when."""

    status: int
    code: str
    when: str
    every_call: bool = True  # a possible answer of every call; else only of calls that say so


# The one list of error codes: the error responses take their status from here, and the
# OpenAPI document its responses and the enum of ``error.code``.
ERROR_CODES: tuple[ErrorCode, ...] = (
    ErrorCode(400, "validation_error", "the request is malformed or names something unknown."),
    ErrorCode(401, "invalid_token", "no token, or an unknown or revoked one."),
    ErrorCode(403, "missing_scope", "the token lacks webhooks:manage."),
    ErrorCode(404, "not_found", "no such resource in this organization.", every_call=False),
    ErrorCode(405, "method_not_allowed", "the path does not take this method."),
    ErrorCode(413, "payload_too_large", "the body is over 64 KiB.", every_call=False),
    ErrorCode(429, "rate_limited", "too many requests for this token; see Retry-After."),
    ErrorCode(500, "internal_error", "an unexpected failure; it has been logged."),
    ErrorCode(503, "unavailable", "reserved; no call answers it today.", every_call=False),
)
ERRORS_BY_CODE: dict[str, ErrorCode] = {error.code: error for error in ERROR_CODES}


class ErrorBody(BaseModel):
    code: str = Field(json_schema_extra={"enum": list(ERRORS_BY_CODE)})
    message: str

    @field_validator("code")
    @classmethod
    def _known_code(cls, code: str) -> str:
        if code not in ERRORS_BY_CODE:
            raise ValueError(f"not an error code of this API: {code!r}")
        return code


class ErrorResponse(BaseModel):
    model_config = ConfigDict(title="Error")

    error: ErrorBody


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=100)


class AttemptListQuery(ListQuery):
    status: Literal["succeeded", "failed"] | None = None
    event_id: str | None = Field(default=None, min_length=1, max_length=100)
    event_type: KnownEventType | None = Field(
        default=None, description="A subscribable type, or webhook.test."
    )
    since: Rfc3339 | None = Field(default=None, description="Attempts made at or after.")
    until: Rfc3339 | None = Field(default=None, description="Attempts made at or before.")
