"""The rows a batch writes (:func:`worker.store.pipeline_writes.prepare`), without a database.

What those rows leave in the tables, on every implementation, is tests/test_store_writes.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.store import pipeline_writes
from worker.store.pipeline_writes import prepare
from worker.store.records import Attempt, AttemptRecord, DeliveryState, NewEvent

pytestmark = pytest.mark.unit

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _event(event_id: str, to: tuple[str, ...], parked: frozenset[str] = frozenset()) -> NewEvent:
    envelope = {"id": event_id, "type": "order.created", "organization_id": "org_1",
                "occurred_at": NOW.isoformat(), "data": {}}  # fmt: skip
    return NewEvent(envelope, NOW, to, parked)


def _attempt(event_id: str, webhook_id: str, state: DeliveryState, seconds: float) -> AttemptRecord:
    success = state == "succeeded"
    return AttemptRecord(
        Attempt(
            id=f"att_{event_id}_{webhook_id}", webhook_id=webhook_id, org_id="org_1",
            event_id=event_id, event_type="order.created", attempt=1, success=success,
            status_code=200 if success else 503, error_kind=None, error_message=None,
            duration_ms=3, response_body=None, created_at=NOW + timedelta(seconds=seconds),
        ),
        state,
        None if success else NOW + timedelta(seconds=60),
    )  # fmt: skip


def test_a_pending_delivery_attempted_in_its_events_batch_is_written_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline_writes, "utcnow", lambda: NOW)
    batch: list[NewEvent | AttemptRecord] = [
        _event("evt_1", ("wh_fast", "wh_other")),
        _attempt("evt_1", "wh_fast", "succeeded", 0.004),
        _attempt("evt_0", "wh_fast", "pending", 0.005),  # its event was written before
    ]
    prepared = prepare(batch)

    # Only the delivery with no attempt here is opened.
    assert prepared.opened == [("evt_1", "wh_other", "pending", NOW)]
    # The attempted one is inserted by its advance, created when its event was received.
    advances = {row[:2]: row for row in prepared.advances}
    assert advances["evt_1", "wh_fast"] == (
        "evt_1", "wh_fast", "succeeded", 1, None, NOW, NOW + timedelta(seconds=0.004)
    )  # fmt: skip
    # One whose event is not in the batch keeps its attempt's time (it is not inserted).
    assert advances["evt_0", "wh_fast"][5] == NOW + timedelta(seconds=0.005)
    assert len(prepared.attempts) == 2


def test_a_parked_delivery_is_still_opened_when_its_event_is_redelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The opening is what parks an existing pending row again (see PipelineWrites); an
    attempt of the same delivery in the batch does not replace it."""
    monkeypatch.setattr(pipeline_writes, "utcnow", lambda: NOW)
    batch: list[NewEvent | AttemptRecord] = [
        _event("evt_1", ("wh_slow",), parked=frozenset({"wh_slow"})),
        _attempt("evt_1", "wh_slow", "pending", 0.002),
    ]
    prepared = prepare(batch)

    assert prepared.opened == [("evt_1", "wh_slow", "parked", NOW)]
    assert [row[:3] for row in prepared.advances] == [("evt_1", "wh_slow", "pending")]
