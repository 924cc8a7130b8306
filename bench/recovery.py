"""``recovery``: an outage's failed deliveries sent again, beside another endpoint's live traffic.

One ``serve`` on PostgreSQL, at default settings but a one-retry schedule, with two endpoints:
the recovering one on nginx, the live one on the Python receiver (which notes when each
delivery arrives). In order:

1. **Outage.** ``--burst-events`` (10,000) events for the recovering endpoint while it answers
   500; each fails its attempt and its one retry, and is then failed for good.
2. **Recovery.** The endpoint is healthy again (a PATCH of its URL); ``POST .../recover``
   sends every failed delivery again while events for the live endpoint are published at
   ``--latency-rate`` (300/s). Its rate = deliveries / (recovery created -> last recovered
   attempt recorded).
3. **Burst.** The same number of fresh events for the recovering endpoint, the live stream still
   on: the endpoint's burst rate, first publish -> last attempt recorded.

Figures: recovery rate / burst rate (≥ 0.8), and the live endpoint's p99 latency (receipt -
``occurred_at``) during the recovery (≤ 50 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from bench.harness import EVENT_TYPE, POLL_SECONDS, REPORT_EVERY, Bench, Outcome, percentile
from bench.load import order_event
from bench.serve import Serve, create_token, run_serve
from schemas.events import EventEnvelope
from worker.store.tables import attempts, deliveries

RECOVERING_ORG = "org_bench_recovering"
LIVE_ORG = "org_bench_live"
LIVE_PATH = "/recovery-live"
TARGET_RATIO = 0.8
TARGET_P99_MS = 50


async def _count(bench: Bench, webhook_id: str, *conditions: Any) -> tuple[int, float | None]:  # noqa: ANN401
    """Attempts to the endpoint matching ``conditions``, and the newest one's Unix time."""
    query = sa.select(sa.func.count(), sa.func.max(attempts.c.created_at)).where(
        attempts.c.webhook_id == webhook_id, *conditions
    )
    async with bench.store.engine.connect() as connection:
        count, last = (await connection.execute(query)).one()
    return int(count), last.timestamp() if last is not None else None


async def _failed_for_good(bench: Bench, webhook_id: str) -> int:
    query = sa.select(sa.func.count()).where(
        deliveries.c.webhook_id == webhook_id, deliveries.c.state == "failed"
    )
    async with bench.store.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


async def _until(
    serve: Serve,
    check: Callable[[], Awaitable[int]],
    expected: int,
    timeout: float,
    say: Callable[[str], None],
    what: str,
) -> None:
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + REPORT_EVERY
    while (done := await check()) < expected:
        serve.process.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {done}/{expected} after {timeout:g}s")
        if time.monotonic() >= next_report:
            next_report += REPORT_EVERY
            say(f"{what}: {done}/{expected}")
        await asyncio.sleep(POLL_SECONDS)


async def _call(
    serve: Serve, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    async with serve.http.request(
        method,
        f"{serve.api_url}/api/v2{path}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        answer: dict[str, Any] = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path} answered {response.status}: {answer}")
        return answer


@dataclass
class _Timeline:
    recovery_started: float = 0.0
    recovered_at: float | None = None
    recovery_ended: float = 0.0
    burst_started: float = 0.0
    burst_at: float | None = None
    burst_ended: float = 0.0
    recovery: dict[str, Any] = field(default_factory=dict)


async def _outage(
    bench: Bench, serve: Serve, token: str, say: Callable[[str], None]
) -> tuple[str, datetime]:
    """The recovering endpoint, with ``burst_events`` deliveries failed for good, healthy again."""
    sink = bench.nginx()
    count = bench.sizes.burst_events
    webhook = await serve.create_endpoint(token, sink.url("/fail/recovering"), [EVENT_TYPE])
    outage_started = datetime.now(UTC) - timedelta(seconds=1)
    await bench.publisher.publish_all([order_event(RECOVERING_ORG, n=i) for i in range(count)], say)
    await _until(
        serve, lambda: _failed_for_good(bench, webhook), count,
        bench.sizes.drain_timeout, say, "failed for good",
    )  # fmt: skip
    await _call(serve, token, "PATCH", f"/webhooks/{webhook}", {"url": sink.url("/ok/recovering")})
    return webhook, outage_started


async def _recover_then_burst(
    bench: Bench, serve: Serve, token: str, webhook: str, since: datetime,
    say: Callable[[str], None],
) -> _Timeline:  # fmt: skip
    count = bench.sizes.burst_events
    timeline = _Timeline(recovery_started=time.time())
    started = await _call(
        serve, token, "POST", f"/webhooks/{webhook}/recover", {"since": since.isoformat()}
    )
    say(f"recovery {started['id']} of {started['total']} deliveries started")
    await _until(
        serve, lambda: _successes(bench, webhook), count,
        bench.sizes.drain_timeout, say, "recovered",
    )  # fmt: skip
    timeline.recovered_at = (await _count(bench, webhook, attempts.c.success.is_(True)))[1]
    timeline.recovery_ended = time.time()
    timeline.recovery = await _call(
        serve, token, "GET", f"/webhooks/{webhook}/recoveries/{started['id']}"
    )
    timeline.burst_started = time.time()
    await bench.publisher.publish_all(
        [order_event(RECOVERING_ORG, n=count + i) for i in range(count)], say
    )
    await _until(
        serve, lambda: _successes(bench, webhook), 2 * count,
        bench.sizes.drain_timeout, say, "burst delivered",
    )  # fmt: skip
    timeline.burst_at = (await _count(bench, webhook, attempts.c.success.is_(True)))[1]
    timeline.burst_ended = time.time()
    return timeline


async def recovery(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    sink = bench.nginx()
    outcome = Outcome("recovery", sink=sink.name)
    say = bench.say("recovery")
    sizes = bench.sizes
    count = sizes.burst_events
    await bench.reset()
    log = bench.log_dir / "serve-recovery.log"
    tokens = {
        org: await create_token(bench.service_settings(), org, log)
        for org in (RECOVERING_ORG, LIVE_ORG)
    }
    settings = {**bench.service_settings(), "RETRY_SCHEDULE": "1", **bench.worker_settings}
    live_sent: list[tuple[str, float]] = []

    def live_event(n: int) -> EventEnvelope:
        envelope = order_event(LIVE_ORG, n=n)
        live_sent.append((envelope.id, envelope.occurred_at.timestamp()))
        return envelope

    async with run_serve(settings, log) as serve:
        say(f"serve started (pid {serve.process.pid}) at {serve.api_url}")
        await serve.create_endpoint(tokens[LIVE_ORG], bench.receiver.url(LIVE_PATH), [EVENT_TYPE])
        webhook, since = await _outage(bench, serve, tokens[RECOVERING_ORG], say)
        live = asyncio.create_task(
            bench.publisher.publish_paced(live_event, sizes.latency_rate, 3_600, lambda _m: None)
        )
        try:
            await asyncio.sleep(2)  # the live stream settles before the recovery starts
            timeline = await _recover_then_burst(
                bench, serve, tokens[RECOVERING_ORG], webhook, since, say
            )
        finally:
            live.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live
        stats = await bench.receiver.stats(ids=True)

    def lags(start: float, end: float) -> list[float]:
        return sorted(
            (stats.ids.get(event_id, end) - occurred) * 1000
            for event_id, occurred in live_sent
            if start <= occurred <= end
        )

    t = timeline
    recovery_rate = count / (t.recovered_at - t.recovery_started) if t.recovered_at else None
    burst_rate = count / (t.burst_at - t.burst_started) if t.burst_at else None
    during_recovery = lags(t.recovery_started, t.recovery_ended)
    during_burst = lags(t.burst_started, t.burst_ended)
    outcome.add("recovery rate", recovery_rate, "/s")
    outcome.add("burst rate of the same endpoint", burst_rate, "/s")
    outcome.add(
        "ratio recovery/burst",
        recovery_rate / burst_rate if recovery_rate and burst_rate else None,
        "x",
        at_least=TARGET_RATIO,
    )
    outcome.add(
        "live p99 during recovery", percentile(during_recovery, 99), "ms",
        at_most=TARGET_P99_MS, sink="python",
    )  # fmt: skip
    outcome.add("live p99 during burst", percentile(during_burst, 99), "ms", sink="python")
    outcome.details = {
        "recovery": t.recovery,
        "recovery_seconds": t.recovered_at - t.recovery_started if t.recovered_at else None,
        "burst_seconds": t.burst_at - t.burst_started if t.burst_at else None,
        "live_events_during_recovery": len(during_recovery),
        "live_events_during_burst": len(during_burst),
        "live_p50_during_recovery_ms": percentile(during_recovery, 50),
    }
    outcome.notes.append(
        f"{count} deliveries failed for good (500s, RETRY_SCHEDULE=1) to an nginx endpoint, "
        "then recovered with POST /recover once it answers 200, then a fresh burst of as many "
        f"for it; meanwhile {sizes.latency_rate:g} events/s for a second endpoint (the Python "
        "receiver); one serve on PostgreSQL, default settings"
    )
    return outcome


async def _successes(bench: Bench, webhook_id: str) -> int:
    return (await _count(bench, webhook_id, attempts.c.success.is_(True)))[0]
