"""Dead letters, read: what one message in ``webhooks.dead`` is about, and where it came from.

The pure half of ``dead list`` and ``dead redrive`` (:mod:`worker.ops.dead_queue` walks the
queue): one dead message — its body and headers — becomes a :class:`DeadLetter`: why it died,
the event and endpoint it is about, and where it came from (:class:`Origin`), which decides
where a redrive sends it.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker.pipeline import topology

DETAIL_CHARS = 160
ID_CHARS = 100

# The reasons our own pipeline dead-letters with (worker.pipeline.fanout, .deliveries,
# .attempts); tests/test_dead_letters_unit.py checks them against fan-out's own verdicts.
EVENT_REASONS = frozenset(
    {"oversize", "invalid_encoding", "too_deep", "invalid_json", "invalid_envelope", "unknown_type"}
)
TASK_REASONS = frozenset({"exhausted", "invalid_task"})
# What our pipeline or RabbitMQ added on the way to webhooks.dead; a redriven message drops them.
_DEAD_HEADERS = frozenset(
    {"x-reason", "x-detail", "x-death", "x-delivery-count", topology.DEFERRALS_HEADER}
)
_DEAD_PREFIXES = ("x-first-death-", "x-last-death-")
_RABBITMQ_REASONS = {
    "delivery_limit": "redelivered past the queue's delivery limit (it failed the worker "
    "every time)",
    "expired": "its TTL expired",
    "rejected": "rejected without requeue",
    "maxlen": "the queue was full",
}


class Origin(StrEnum):
    EVENT = "event"
    TASK = "task"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DeadLetter:
    """One message of ``webhooks.dead``, as an operator reads it."""

    reason: str
    detail: str
    origin: Origin
    event_id: str | None
    webhook_id: str | None

    @property
    def target(self) -> str | None:
        """The queue a redrive sends it to; None when its origin cannot be told."""
        if self.origin is Origin.EVENT:
            return topology.EVENTS_QUEUE
        if self.origin is Origin.TASK:
            return topology.DELIVERIES_QUEUE
        return None

    def line(self) -> str:
        """Tab-separated: reason, detail, event id, endpoint (the contract's columns, in its
        order), then origin."""
        return "\t".join(
            (self.reason, self.detail, self.event_id or "-", self.webhook_id or "-", self.origin)
        )


def printable(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters, control characters escaped (a dead message
    may hold anything, terminal escapes included)."""
    cleaned = "".join(
        ch.encode("unicode_escape").decode() if unicodedata.category(ch).startswith("C") else ch
        for ch in " ".join(text.split())
    )
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, an int too long
        return None
    return value if isinstance(value, dict) else None


def _is_task(body: Mapping[str, Any]) -> bool:
    attempt = body.get("attempt")
    return (
        isinstance(body.get("event_id"), str)
        and isinstance(body.get("webhook_id"), str)
        and isinstance(attempt, int)
        and not isinstance(attempt, bool)
    )


def _is_event(body: Mapping[str, Any]) -> bool:
    return all(isinstance(body.get(key), str) for key in ("id", "type", "organization_id"))


def _death(headers: Mapping[str, object]) -> tuple[str | None, str | None, int | None]:
    """The latest of RabbitMQ's own dead-letterings: (reason, queue, count).

    ``x-death`` lists them newest first; ``x-first-death-*`` names the oldest, which for a task
    that went through a retry tier is the tier's TTL expiry, not why it ended here.
    """
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        latest = deaths[0]
        count = latest.get("count")
        return (
            _text(latest.get("reason")),
            _text(latest.get("queue")),
            count if isinstance(count, int) else None,
        )
    for prefix in ("x-last-death-", "x-first-death-"):
        reason = _text(headers.get(f"{prefix}reason"))
        if reason is not None:
            return reason, _text(headers.get(f"{prefix}queue")), None
    return None, None, None


def _origin_of_queue(queue: str | None) -> Origin:
    if queue == topology.EVENTS_QUEUE:
        return Origin.EVENT
    if queue == topology.DELIVERIES_QUEUE or (
        queue is not None and queue.startswith(("webhooks.retry.", "webhooks.deferred."))
    ):
        return Origin.TASK
    return Origin.UNKNOWN


def describe(
    body: bytes, headers: Mapping[str, object], message_id: str | None = None
) -> DeadLetter:
    """Read one dead message. Where it came from is decided by, in turn: the queue RabbitMQ
    dead-lettered it from, the shape of its body (a task or an event envelope), our reason
    header (each is set by one stage only); otherwise it is unknown."""
    death_reason, death_queue, death_count = _death(headers)
    own_reason = _text(headers.get("x-reason"))
    parsed = _json_object(body)

    origin = _origin_of_queue(death_queue)
    if origin is Origin.UNKNOWN and parsed is not None:
        origin = Origin.TASK if _is_task(parsed) else Origin.EVENT if _is_event(parsed) else origin
    if origin is Origin.UNKNOWN and own_reason is not None:
        if own_reason in EVENT_REASONS:
            origin = Origin.EVENT
        elif own_reason in TASK_REASONS:
            origin = Origin.TASK

    reason = own_reason or death_reason or "-"
    detail = _text(headers.get("x-detail"))
    if detail is None and death_reason is not None:
        why = _RABBITMQ_REASONS.get(death_reason, death_reason)
        times = f" ({death_count} times)" if death_count and death_count > 1 else ""
        detail = f"dead-lettered by RabbitMQ from {death_queue or '?'}: {why}{times}"

    event_id = webhook_id = None
    if parsed is not None:
        event_id = _text(parsed.get("event_id")) or _text(parsed.get("id"))
        if origin is Origin.TASK:
            webhook_id = _text(parsed.get("webhook_id"))
    if origin is Origin.TASK and webhook_id is None:
        webhook_id = _text(headers.get(topology.WEBHOOK_HEADER))
    if event_id is None and message_id is not None and message_id.startswith("evt_"):
        # schemas.publish sets the event id as message id; clients that set none get a
        # random one from their library, which names nothing.
        event_id = message_id
    return DeadLetter(
        reason=printable(reason, ID_CHARS),
        detail=printable(detail or "-", DETAIL_CHARS),
        origin=origin,
        event_id=printable(event_id, ID_CHARS) if event_id else None,
        webhook_id=printable(webhook_id, ID_CHARS) if webhook_id else None,
    )


def redrive_headers(letter: DeadLetter, headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of the republished message: the original ones without what dead-lettering
    added; a task's ``x-webhook-id`` is kept (or restored from its body)."""
    kept = {
        key: value
        for key, value in headers.items()
        if key not in _DEAD_HEADERS and not key.startswith(_DEAD_PREFIXES)
    }
    if letter.origin is Origin.TASK and letter.webhook_id is not None:
        kept[topology.WEBHOOK_HEADER] = letter.webhook_id
    return kept


def matches(letter: DeadLetter, reason: str | None) -> bool:
    return reason is None or letter.reason == reason


def limit_arg(value: str) -> int:
    """An argparse type: a count of at least 1."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of at least 1")
    return count


# --- I/O: the broker ---------------------------------------------------------------------------
