"""The service's records as the rest of the code sees them: plain, immutable values."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    org_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    org_id: str
    url: str
    events: tuple[str, ...]
    enabled: bool
    description: str
    # Plaintext in memory only (sealed in the database); kept out of reprs, hence of logs.
    secret: str = field(repr=False)
    previous_secret: str | None = field(repr=False)
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None
    failing_since: datetime | None
    # Sent on every attempt. Customer data (an API key, often): kept out of reprs, hence logs.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    rate_limit: int | None = None  # attempts per second, across all workers; None: none
    timeout_seconds: int | None = None  # None: the service's DELIVERY_TIMEOUT
    ordered: bool = False

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign a payload now: the current one, and during a rotation the old."""
        keys = [self.secret]
        if (
            self.previous_secret
            and self.previous_secret_expires_at
            and self.previous_secret_expires_at > now
        ):
            keys.append(self.previous_secret)
        return keys


@dataclass(frozen=True, slots=True)
class Attempt:
    id: str
    webhook_id: str
    org_id: str
    event_id: str
    event_type: str
    attempt: int
    success: bool
    status_code: int | None
    error_kind: str | None
    error_message: str | None
    duration_ms: int
    response_body: str | None
    created_at: datetime


DeliveryState = Literal["pending", "succeeded", "failed", "parked"]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt and what it changes: the delivery's state and the endpoint's failure run."""

    attempt: Attempt
    delivery_state: DeliveryState
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as received, and the endpoints it is to be delivered to."""

    event: dict[str, Any]
    occurred_at: datetime
    webhook_ids: tuple[str, ...]
    # Those of ``webhook_ids`` whose deliveries wait in the database (state "parked").
    parked: frozenset[str] = frozenset()
    # ``event`` as the JSON text it arrived in, if it did: stored as is, not encoded again.
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    data: list[T]
    has_more: bool
    next_cursor: str | None


def page_of(items: list[T], limit: int, cursor_of: Callable[[T], str]) -> Page[T]:
    """The first ``limit`` of ``items``, fetched as ``limit + 1`` rows: the extra one, if
    present, only says that there is a next page, whose cursor is the last item kept."""
    has_more = len(items) > limit
    items = items[:limit]
    return Page(items, has_more, cursor_of(items[-1]) if has_more and items else None)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as received: its envelope's fields and when this service received it."""

    id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventDelivery:
    """An event's delivery to one endpoint, with its latest attempt."""

    webhook_id: str
    state: DeliveryState
    attempts: int
    last_attempt_at: datetime | None
    last_status_code: int | None
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """One endpoint's health over ``[since, until]`` (see :mod:`worker.store.stats`)."""

    since: datetime
    until: datetime
    succeeded: int
    failed: int
    p50_ms: float | None
    p95_ms: float | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    pending: int
    parked: int


RecoveryStatus = Literal["failed", "all"]
RecoveryState = Literal["running", "done"]


@dataclass(frozen=True, slots=True)
class Recovery:
    id: str
    org_id: str
    webhook_id: str
    since: datetime
    until: datetime
    until_given: bool
    status: RecoveryStatus
    state: RecoveryState
    total: int
    queued: int
    created_at: datetime
    finished_at: datetime | None
