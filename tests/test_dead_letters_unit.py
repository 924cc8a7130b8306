"""Reading dead messages: reason, origin, ids, and the headers a redrive sends them with."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.ops.dead_letters import (
    EVENT_REASONS,
    DeadLetter,
    Origin,
    describe,
    limit_arg,
    matches,
    printable,
    redrive_headers,
)
from worker.ops.dead_queue import where
from worker.pipeline import topology
from worker.pipeline.fanout import RejectedEventError, parse_event

pytestmark = pytest.mark.unit

TASK = json.dumps(
    {"event_id": "evt_1", "webhook_id": "wh_1", "attempt": 3, "event": {"type": "order.created"}}
).encode()
EVENT = json.dumps(
    {
        "id": "evt_2",
        "type": "order.created",
        "organization_id": "org_a",
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": {},
    }
).encode()
WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def _death(queue: str, reason: str = "delivery_limit", count: int = 1) -> dict[str, Any]:
    return {"count": count, "exchange": "", "queue": queue, "reason": reason,
            "routing-keys": [queue], "time": WHEN}  # fmt: skip


# What RabbitMQ 3.10 put on a task that expired out of a retry tier, then passed the delivery
# limit of webhooks.deliveries: the first death is the tier's TTL, the latest is the limit.
RABBIT_TASK_HEADERS: dict[str, Any] = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-death": [_death(topology.DELIVERIES_QUEUE), _death("webhooks.retry.5s", "expired")],
    "x-delivery-count": 0,
    "x-first-death-exchange": "",
    "x-first-death-queue": "webhooks.retry.5s",
    "x-first-death-reason": "expired",
    topology.WEBHOOK_HEADER: "wh_1",
}


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        pytest.param(
            TASK, {"x-reason": "exhausted", "x-detail": "HTTP 500"},
            DeadLetter("exhausted", "HTTP 500", Origin.TASK, "evt_1", "wh_1"), id="exhausted",
        ),
        pytest.param(
            TASK, RABBIT_TASK_HEADERS,
            DeadLetter(
                "delivery_limit",
                "dead-lettered by RabbitMQ from webhooks.deliveries: redelivered past the "
                "queue's delivery limit (it failed the worker every time)",
                Origin.TASK, "evt_1", "wh_1",
            ),
            id="rabbitmq-task-after-a-retry-tier",
        ),
        pytest.param(
            EVENT, {"x-death": [_death(topology.EVENTS_QUEUE, count=2)]},
            DeadLetter(
                "delivery_limit",
                "dead-lettered by RabbitMQ from webhooks.events: redelivered past the queue's "
                "delivery limit (it failed the worker every time) (2 times)",
                Origin.EVENT, "evt_2", None,
            ),
            id="rabbitmq-event",
        ),
        pytest.param(
            b"garbage", {"x-first-death-queue": b"webhooks.events",
                         "x-first-death-reason": b"delivery_limit"},
            DeadLetter(
                "delivery_limit",
                "dead-lettered by RabbitMQ from webhooks.events: redelivered past the queue's "
                "delivery limit (it failed the worker every time)",
                Origin.EVENT, None, None,
            ),
            id="rabbitmq-headers-as-bytes-without-x-death",
        ),
        pytest.param(
            b"{not json", {"x-reason": "invalid_json", "x-detail": "Expecting property name"},
            DeadLetter("invalid_json", "Expecting property name", Origin.EVENT, None, None),
            id="invalid-event-by-reason",
        ),
        pytest.param(
            b'{"id": "evt_3", "type": "order.deleted"}', {"x-reason": "invalid_envelope"},
            DeadLetter("invalid_envelope", "-", Origin.EVENT, "evt_3", None),
            id="invalid-envelope-keeps-its-id",
        ),
        pytest.param(
            b"[1, 2]", {"x-reason": "invalid_task", "x-detail": "not an object"},
            DeadLetter("invalid_task", "not an object", Origin.TASK, None, None),
            id="unreadable-task-by-reason",
        ),
        pytest.param(
            TASK, {"x-death": [_death("webhooks.events")]},
            DeadLetter(
                "delivery_limit",
                "dead-lettered by RabbitMQ from webhooks.events: redelivered past the queue's "
                "delivery limit (it failed the worker every time)",
                Origin.EVENT, "evt_1", None,
            ),
            id="the-broker-knows-best",
        ),
        pytest.param(
            b"\x00hello", {}, DeadLetter("-", "-", Origin.UNKNOWN, None, None), id="unknown",
        ),
        pytest.param(
            b'{"hello": 1}', {"x-reason": "manual", "x-death": [_death("orders.other")]},
            DeadLetter(
                "manual",
                "dead-lettered by RabbitMQ from orders.other: redelivered past the queue's "
                "delivery limit (it failed the worker every time)",
                Origin.UNKNOWN, None, None,
            ),
            id="a-foreign-queue-and-reason",
        ),
    ],
)  # fmt: skip
def test_describe(body: bytes, headers: dict[str, Any], expected: DeadLetter) -> None:
    assert describe(body, headers) == expected


def test_targets_are_the_queues_of_origin() -> None:
    assert describe(TASK, {}).target == topology.DELIVERIES_QUEUE
    assert describe(EVENT, {}).target == topology.EVENTS_QUEUE
    assert describe(b"?", {}).target is None


def test_the_message_id_names_an_event_whose_body_does_not() -> None:
    assert describe(b"{", {"x-reason": "invalid_json"}, "evt_9").event_id == "evt_9"
    assert describe(b"{", {"x-reason": "invalid_json"}, "9c0ee8b62ddf").event_id is None
    assert describe(EVENT, {}, "evt_other").event_id == "evt_2"


def test_a_task_without_its_header_gets_it_back_and_loses_dead_letter_headers() -> None:
    headers = {**RABBIT_TASK_HEADERS, "x-reason": "exhausted", "x-detail": "HTTP 500",
               "x-last-death-queue": "q", topology.DEFERRALS_HEADER: 3}  # fmt: skip
    del headers[topology.WEBHOOK_HEADER]
    letter = describe(TASK, headers)
    assert redrive_headers(letter, headers) == {
        "traceparent": RABBIT_TASK_HEADERS["traceparent"],
        topology.WEBHOOK_HEADER: "wh_1",
    }


def test_an_event_keeps_its_own_headers_and_gets_no_endpoint() -> None:
    headers = {"traceparent": "00-x", "x-publisher": "orders", "x-death": [_death("q")]}
    letter = describe(EVENT, headers)
    assert redrive_headers(letter, headers) == {"traceparent": "00-x", "x-publisher": "orders"}


def test_event_reasons_are_fan_outs_own() -> None:
    """Every reason fan-out rejects with is known to come from webhooks.events."""
    bodies = [
        b"{not json",
        b"\xff\xfe",
        b"[1]",
        b'{"id": "evt_1"}',
        (
            b'{"id": "e", "type": "order.deleted", "organization_id": "o", "occurred_at": '
            b'"2026-01-01T00:00:00Z", "data": {}}'
        ),
        b'{"d": ' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"pad": "' + b"x" * 2000 + b'"}',
    ]
    reasons = set()
    for body in bodies:
        with pytest.raises(RejectedEventError) as caught:
            parse_event(body, max_bytes=1024)
        reasons.add(caught.value.reason)
    assert reasons == EVENT_REASONS


def test_printable_is_one_bounded_line_without_control_characters() -> None:
    assert printable("a\n b\t\tc", 100) == "a b c"
    assert printable("\x1b[31mred\x9b", 100) == "\\x1b[31mred\\x9b"
    assert printable("x" * 50, 10) == "x" * 9 + "…"


def test_line_and_filter() -> None:
    letter = DeadLetter("exhausted", "HTTP 500", Origin.TASK, "evt_1", None)
    assert letter.line() == "exhausted\tHTTP 500\tevt_1\t-\ttask"
    assert matches(letter, None)
    assert matches(letter, "exhausted")
    assert not matches(letter, "invalid_json")


def test_where_never_shows_credentials() -> None:
    assert where("amqp://user:s3cret@rabbit.internal/prod") == "rabbit.internal:5672 (vhost prod)"
    assert where("amqps://u:p@r:5999/") == "r:5999 (vhost /)"
    assert where("amqps://u:p@r") == "r:5671 (vhost /)"


@pytest.mark.parametrize("value", ["0", "-3", "many", ""])
def test_limit_must_be_a_positive_count(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        limit_arg(value)
    assert limit_arg("7") == 7
