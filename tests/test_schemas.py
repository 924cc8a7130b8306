"""The envelope contract shared with publishers."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.events import EVENT_TYPES, SCHEMA_FILE, EventEnvelope, envelope_json_schema
from schemas.publish import build_event

pytestmark = pytest.mark.unit


def test_checked_in_json_schema_is_current() -> None:
    on_disk = json.loads(SCHEMA_FILE.read_text())
    assert on_disk == envelope_json_schema(), (
        "schemas/event-envelope.schema.json is stale: run "
        "python -c 'from schemas.events import write_schema_file; write_schema_file()'"
    )


def test_schema_lists_the_eight_event_types() -> None:
    assert len(EVENT_TYPES) == 8
    assert envelope_json_schema()["properties"]["type"]["enum"] == list(EVENT_TYPES)


def test_build_event_is_valid_and_round_trips() -> None:
    envelope = build_event("order.created", "org_acme", {"order_id": "o1"})
    assert envelope.id.startswith("evt_")
    assert EventEnvelope.model_validate_json(envelope.model_dump_json()) == envelope


@pytest.mark.parametrize(
    "change",
    [
        {"type": "order.deleted"},
        {"organization_id": "org acme"},
        {"organization_id": ""},
        {"id": "evt/../1"},
        {"id": "x" * 101},
        {"occurred_at": "2026-11-28T10:00:00"},  # no offset
        {"data": [1, 2]},
        {"extra": True},
    ],
)
def test_invalid_envelopes(change: dict[str, object]) -> None:
    valid = build_event("order.created", "org_acme", {}).model_dump(mode="json")
    with pytest.raises(ValidationError):
        EventEnvelope.model_validate({**valid, **change})
