"""``live-isolation``: the fast endpoints' latency while another endpoint hangs, live.

Events are published to a running worker at ``--live-isolation-rate`` (200/s) for
``--live-isolation-seconds`` (20 s), alternating: half to ten fast endpoints (the Python
receiver, answering at once), half to one more organization whose one endpoint hangs past the
delivery timeout (``DELIVERY_TIMEOUT`` is set to 2 s in both runs; it answers after 10 s). The
other run publishes the same stream with that organization's endpoint absent, so its events
match nothing. The figure is the fast endpoints' p99 latency (receipt at the receiver -
``occurred_at``, as in ``latency``) with the hanging endpoint over without it.
"""

from __future__ import annotations

import asyncio
import time

from bench.harness import (
    EVENT_TYPE,
    LATENCY_WAIT_SECONDS,
    POLL_SECONDS,
    WARM_UP_SECONDS,
    Bench,
    Outcome,
    percentile,
    ratio,
)
from bench.load import order_event
from bench.procs import WorkerProcess
from schemas.events import EventEnvelope

FAST_ENDPOINTS = 10
HANG_ORG = "org_bench_hang"
DELIVERY_TIMEOUT_SECONDS = 2
HANG_MS = 5 * DELIVERY_TIMEOUT_SECONDS * 1000
FAST_PREFIX = "/live/"


def _fast_org(index: int) -> str:
    return f"org_bench_live{index}"


async def _warm_up(bench: Bench, worker: WorkerProcess) -> None:
    """One event through each fast endpoint: consuming, lookups cached, TLS set up."""
    for index in range(FAST_ENDPOINTS):
        await bench.publisher.publish(order_event(_fast_org(index)))
    deadline = time.monotonic() + WARM_UP_SECONDS
    while (await bench.receiver.stats()).count(FAST_PREFIX) < FAST_ENDPOINTS:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm-up deliveries within {WARM_UP_SECONDS}s of start")
        await asyncio.sleep(0.05)
    await bench.receiver.reset()


async def _run(bench: Bench, label: str, *, with_hang: bool) -> dict[str, float | int | None]:
    say = bench.say(label)
    sizes = bench.sizes
    await bench.reset()
    fast = [(_fast_org(i), f"{FAST_PREFIX}{i}", [EVENT_TYPE]) for i in range(FAST_ENDPOINTS)]
    hang = [(HANG_ORG, f"/delay/{HANG_MS}/hang", [EVENT_TYPE])]
    await bench.seed(fast + hang if with_hang else fast, say)

    def make(n: int) -> EventEnvelope:
        if n % 2:
            return order_event(HANG_ORG, n=n)
        return order_event(_fast_org(n // 2 % FAST_ENDPOINTS), n=n)

    timeout = {"DELIVERY_TIMEOUT": str(DELIVERY_TIMEOUT_SECONDS)}
    async with bench.worker(label, timeout) as worker:
        await _warm_up(bench, worker)
        say(f"publishing {sizes.live_isolation_rate:g} events/s for "
            f"{sizes.live_isolation_seconds:g}s, every other one for {HANG_ORG}")  # fmt: skip
        sent, seconds = await bench.publisher.publish_paced(
            make,
            sizes.live_isolation_rate,
            sizes.live_isolation_seconds,
            say,
        )
        fast_sent = sent[0::2]
        deadline = time.monotonic() + LATENCY_WAIT_SECONDS
        while (await bench.receiver.stats()).count(FAST_PREFIX) < len(fast_sent):
            worker.check_alive()
            if time.monotonic() > deadline:
                say(f"stopped waiting for the last deliveries after {LATENCY_WAIT_SECONDS}s")
                break
            await asyncio.sleep(POLL_SECONDS)
        stats = await bench.receiver.stats(ids=True)
        given_up = time.time()
    lags = sorted((stats.ids.get(i, given_up) - occurred) * 1000 for i, occurred in fast_sent)
    missing = sum(1 for event_id, _ in fast_sent if event_id not in stats.ids)
    return {
        "p50_ms": percentile(lags, 50),
        "p99_ms": percentile(lags, 99),
        "max_ms": lags[-1] if lags else None,
        "fast_events": len(fast_sent),
        "fast_missing": missing,
        "events": len(sent),
        "achieved_rate": len(sent) / seconds,
        "requests_to_hanging_endpoint": stats.count("/delay/"),
    }


async def live_isolation(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("live-isolation")
    runs: dict[str, list[float]] = {"live-isolation": [], "live-isolation+hang": []}
    missing = 0
    for round_number in range(1, bench.sizes.rounds + 1):
        for label, p99s in runs.items():
            result = await _run(bench, label, with_hang=label.endswith("+hang"))
            outcome.details[f"{label} #{round_number}"] = result
            missing += int(result["fast_missing"] or 0)
            if result["p99_ms"] is not None:
                p99s.append(float(result["p99_ms"]))
    alone = min(runs["live-isolation"], default=None)
    beside = min(runs["live-isolation+hang"], default=None)
    outcome.add("fast p99, hanging endpoint absent", alone, "ms")
    outcome.add("fast p99 beside hanging endpoint", beside, "ms")
    outcome.add("ratio", ratio(beside, alone), "x", at_most=3)
    outcome.notes.append(
        f"{bench.sizes.live_isolation_rate:g} events/s for {bench.sizes.live_isolation_seconds:g}"
        f"s published live, alternating between {FAST_ENDPOINTS} fast endpoints and one more "
        f"organization whose endpoint answers after {HANG_MS} ms, past DELIVERY_TIMEOUT="
        f"{DELIVERY_TIMEOUT_SECONDS}s (set in both runs), against the same stream with that "
        "endpoint absent; occurred_at to receipt of the fast events; each side ran "
        f"{bench.sizes.rounds} time(s), alternating, and its lowest p99 counts"
    )
    if missing:
        outcome.notes.append(
            f"{missing} fast events undelivered {LATENCY_WAIT_SECONDS}s after the last publish, "
            "counted as delivered then: the p99s are lower bounds"
        )
    return outcome
