"""Contracts shared with publishers and API clients: event envelope, event types, API resources."""

from schemas.events import EVENT_TYPES, TEST_EVENT_TYPE, EventEnvelope, new_event_id

__all__ = ["EVENT_TYPES", "TEST_EVENT_TYPE", "EventEnvelope", "new_event_id"]
