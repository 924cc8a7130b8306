"""Outcome classification and retry scheduling: pure, table-driven."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.pipeline.outcome import (
    Response,
    Verdict,
    decide,
    jitter_tiers,
    parse_retry_after,
    retry_tier,
    spread,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@pytest.mark.parametrize(
    ("response", "attempt", "verdict", "kind", "delay"),
    [
        (Response(200), 1, Verdict.SUCCEEDED, None, None),
        (Response(204), 8, Verdict.SUCCEEDED, None, None),
        (Response(299), 1, Verdict.SUCCEEDED, None, None),
        (Response(301), 1, Verdict.RETRY, "redirect_not_followed", 5),
        (Response(308), 2, Verdict.RETRY, "redirect_not_followed", 300),
        (Response(400), 1, Verdict.RETRY, "http_status", 5),
        (Response(404), 3, Verdict.RETRY, "http_status", 1800),
        (Response(410), 1, Verdict.GONE, "http_status", None),
        (Response(500), 7, Verdict.RETRY, "http_status", 36000),
        (Response(500), 8, Verdict.FAILED, "http_status", None),
        (Response(429, retry_after="60"), 1, Verdict.RETRY, "http_status", 300),
        (Response(503, retry_after="2"), 1, Verdict.RETRY, "http_status", 5),
        (Response(503, retry_after="99999999"), 1, Verdict.RETRY, "http_status", 36000),
        (Response(500, retry_after="3000"), 1, Verdict.RETRY, "http_status", 5),  # only 429/503
        (Response(None, "timeout", "slow"), 1, Verdict.RETRY, "timeout", 5),
        (Response(None, "connection_refused", "no"), 8, Verdict.FAILED, "connection_refused", None),
        (Response(None, "blocked_address", "10.0.0.1"), 2, Verdict.RETRY, "blocked_address", 300),
    ],
)
def test_decide(
    response: Response, attempt: int, verdict: Verdict, kind: str | None, delay: float | None
) -> None:
    decision = decide(response, attempt, SCHEDULE, NOW)
    assert (decision.verdict, decision.error_kind, decision.next_delay) == (verdict, kind, delay)
    if verdict is not Verdict.SUCCEEDED:
        assert decision.error_message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Sat, 28 Nov 2026 12:01:00 GMT", 60.0),
        ("Sat, 28 Nov 2026 11:00:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("", None),
        (None, None),
        ("-5", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_tier_bounds() -> None:
    assert retry_tier(SCHEDULE, 0, None) is None
    assert retry_tier((), 1, None) is None
    assert retry_tier((1.0, 2.0), 2, 1.5) == 2.0


def test_jitter_tiers_surround_the_delay() -> None:
    assert jitter_tiers(5.0, 0.2) == (4.0, 4.5, 5.0, 5.5, 6.0)
    assert jitter_tiers(300.0, 0.1) == (270.0, 285.0, 300.0, 315.0, 330.0)
    assert jitter_tiers(5.0, 0.0) == (5.0,)


@pytest.mark.parametrize(
    ("draw", "expected"), [(0.0, 4.0), (0.19, 4.0), (0.2, 4.5), (0.5, 5.0), (0.99, 6.0)]
)
def test_spread_picks_a_tier_uniformly(draw: float, expected: float) -> None:
    assert spread(5.0, 0.2, draw) == expected


def test_spread_never_undercuts_retry_after() -> None:
    assert spread(5.0, 0.2, 0.0, at_least=5.2) == 5.5
    assert spread(5.0, 0.2, 0.0, at_least=9.0) == 6.0  # none covers it: the longest


def test_decide_spreads_a_retry_but_honours_retry_after() -> None:
    low = decide(Response(500), 1, SCHEDULE, NOW, jitter=0.2, draw=0.0)
    assert low.next_delay == 4.0
    limited = decide(Response(429, retry_after="5"), 1, SCHEDULE, NOW, jitter=0.2, draw=0.0)
    assert limited.next_delay == 5.0
