"""Matching an event to its endpoints, and the policies that come with a fresh match."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest

from worker.pipeline.matcher import EndpointMatcher
from worker.pipeline.policies import EndpointPolicies
from worker.store import Store

pytestmark = pytest.mark.unit

KEY = ("org_1", "order.created")


class Endpoints:
    """The endpoints table as the matcher and the policies read it."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int | None, bool]] = []  # id, rate_limit, ordered
        self.subscription_reads = 0

    async def subscriptions(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], list[str]]:
        self.subscription_reads += 1
        return {key: [webhook_id for webhook_id, _, _ in self.rows] for key in keys}

    async def policies(self) -> list[tuple[str, int | None, bool]]:
        return [row for row in self.rows if row[1] is not None or row[2]]


def _store(endpoints: Endpoints) -> Store:
    class FakeStore:
        pass

    store: Any = FakeStore()
    store.endpoints = endpoints
    return cast("Store", store)


async def test_an_endpoint_matched_fresh_is_matched_with_its_policies() -> None:
    """An endpoint created ordered just before an event, its change notice not yet taken: the
    event's match reads it, and the scheduler must know it is ordered (and its rate limit)."""
    endpoints = Endpoints()
    store = _store(endpoints)
    policies = EndpointPolicies(store)
    await policies.refresh()  # at start-up, before the endpoint existed
    matcher = EndpointMatcher(store, policies)

    endpoints.rows = [
        ("wh_ordered", None, True),
        ("wh_limited", 5, False),
        ("wh_plain", None, False),
    ]
    assert await matcher.lookup(*KEY) == ["wh_ordered", "wh_limited", "wh_plain"]
    assert policies.ordered("wh_ordered")
    assert policies.rate_limit("wh_limited") == 5.0
    assert not policies.ordered("wh_plain")
    assert policies.rate_limit("wh_plain") is None

    # A cached match reads nothing again.
    assert await matcher.lookup(*KEY) == ["wh_ordered", "wh_limited", "wh_plain"]
    assert endpoints.subscription_reads == 1
