"""What an attempt's result means, and when to try again. Pure functions, table-tested."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Verdict(enum.StrEnum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"  # failed; try again on the schedule
    FAILED = "failed"  # failed; no further attempt (schedule exhausted)
    GONE = "gone"  # 410: the receiver asks us to stop; the endpoint is disabled


@dataclass(frozen=True, slots=True)
class Response:
    """What came back from one attempt: a status, or an error before any status."""

    status: int | None
    error_kind: str | None = None
    error_message: str | None = None
    retry_after: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    error_kind: str | None
    error_message: str | None
    next_delay: float | None  # seconds until the next attempt, for Verdict.RETRY


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def retry_tier(schedule: Sequence[float], attempt: int, retry_after: float | None) -> float | None:
    """The delay before attempt ``attempt + 1``, or None when the schedule is exhausted.

    ``schedule[i]`` is the wait after attempt ``i + 1``. A ``Retry-After`` longer than that is
    honoured by moving up to the shortest tier that covers it; delays are always one of the
    schedule's tiers because each tier is a queue with one fixed TTL.
    """
    if attempt < 1 or attempt > len(schedule):
        return None
    delay = schedule[attempt - 1]
    if retry_after is not None and retry_after > delay:
        covering = [tier for tier in sorted(set(schedule)) if tier >= retry_after]
        delay = covering[0] if covering else max(schedule)
    return delay


# Tiers around each scheduled delay: with the default jitter of 0.2, at 0.8, 0.9, 1, 1.1 and
# 1.2 times it. Each tier is a quorum queue, so their number is kept small.
JITTER_STEPS = 5


def jitter_tiers(delay: float, jitter: float) -> tuple[float, ...]:
    """The delays a retry scheduled ``delay`` from now may take, from ``delay * (1 - jitter)``
    to ``delay * (1 + jitter)`` (to the millisecond, as the queues' TTLs are)."""
    if jitter <= 0:
        return (delay,)
    steps = [-jitter + 2 * jitter * i / (JITTER_STEPS - 1) for i in range(JITTER_STEPS)]
    return tuple(sorted({round(delay * (1 + step), 3) for step in steps}))


def spread(delay: float, jitter: float, draw: float, at_least: float | None = None) -> float:
    """One of :func:`jitter_tiers` chosen by ``draw`` (uniform in [0, 1)); never below
    ``at_least`` (a receiver's Retry-After) when a tier covers it."""
    tiers = jitter_tiers(delay, jitter)
    if at_least is not None:
        tiers = tuple(t for t in tiers if t >= at_least) or (tiers[-1],)
    return tiers[min(int(draw * len(tiers)), len(tiers) - 1)]


def decide(
    response: Response,
    attempt: int,
    schedule: Sequence[float],
    now: datetime,
    jitter: float = 0.0,
    draw: float = 0.5,
) -> Decision:
    """Classify one attempt per the outcome rules: 2xx succeeds, 3xx fails (never followed),
    410 disables, 429/503 honour Retry-After, everything else retries on the schedule, each
    delay spread by ``jitter`` (``draw`` picks where: uniform in [0, 1), random in the worker,
    given in tests)."""
    status = response.status
    if status is not None and 200 <= status < 300:
        return Decision(Verdict.SUCCEEDED, None, None, None)
    if status == 410:
        return Decision(
            Verdict.GONE, "http_status", "HTTP 410 Gone: the endpoint asked to stop", None
        )
    kind, message = response.error_kind, response.error_message
    if status is not None:
        if 300 <= status < 400:
            kind, message = "redirect_not_followed", f"HTTP {status}: redirects are not followed"
        else:
            kind, message = "http_status", f"HTTP {status}"
    retry_after = parse_retry_after(response.retry_after, now) if status in (429, 503) else None
    delay = retry_tier(schedule, attempt, retry_after)
    if delay is None:
        return Decision(Verdict.FAILED, kind, message, None)
    return Decision(Verdict.RETRY, kind, message, spread(delay, jitter, draw, retry_after))
