"""The six original measurements; ``burst`` and ``live-isolation`` have modules of their own.

Every scenario starts from empty queues and tables, seeds its endpoints through
``worker.store.Store``, and runs its own ``python -m worker.cli worker`` process. Unless a
scenario says otherwise, events are published *before* the worker starts, and the clock runs
from the first event the worker stored (``events.received_at``) to the last attempt it
recorded (``attempts.created_at``): both are the worker's own timestamps in PostgreSQL, so
neither process start-up nor the harness's polling interval is counted. (RabbitMQ's queue
statistics cannot mark the start: for quorum queues they lag by seconds.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from bench.burst import burst
from bench.harness import (
    EVENT_TYPE,
    LATENCY_WAIT_SECONDS,
    POLL_SECONDS,
    Bench,
    Outcome,
    percentile,
    rate,
    ratio,
)
from bench.live import live_isolation
from bench.load import bare_client, order_event, wire_events
from bench.ordered import ordered
from bench.processes import processes
from bench.queries import queries
from bench.rate_limit import rate_limit
from bench.recovery import recovery
from bench.tracing_cost import tracing
from schemas.events import EVENT_TYPES
from worker.store.endpoints import new_signing_secret

OTHER_TYPES = tuple(t for t in EVENT_TYPES if t != EVENT_TYPE)
SLOW_MS = 2000
SLOW_ORG = "org_bench_slow"
FAST_ENDPOINTS = 10


Scenario = Callable[[Bench, dict[str, Outcome]], Awaitable[Outcome]]

ROUNDS_NOTE = (
    "each side ran {rounds} time(s), alternating, and its best rate counts: on a shared "
    "machine a passing slowdown hits one run, not the code"
)


def best(rates: Sequence[float]) -> float | None:
    return max(rates, default=None)


async def ceiling(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    sink = bench.nginx()
    outcome = Outcome("ceiling", sink=sink.name)
    say = bench.say("ceiling")
    events = wire_events(order_event("org_bench_ceiling", n=i) for i in range(bench.sizes.events))
    say(f"{len(events)} POSTs, {bench.concurrency} at a time, bare aiohttp client, to nginx")
    before = await sink.requests()
    # The harness does nothing else meanwhile: its CPU is the client's.
    cpu_before = time.process_time()
    ok, failed, seconds = await bare_client(
        sink.url("/ceiling"),
        bench.tls.ca,
        new_signing_secret(),
        events,
        bench.concurrency,
    )
    cpu_ms = (time.process_time() - cpu_before) * 1000 / ok if ok else None
    received = await sink.requests() - before
    outcome.add("deliveries/s", ok / seconds if ok else None, "/s")
    outcome.add("client CPU per delivery", cpu_ms, "ms")
    outcome.details = {
        "requests": len(events),
        "succeeded": ok,
        "failed": failed,
        "seconds": seconds,
        "received": received,
        "sink": f"nginx {sink.version}, worker_processes {sink.workers}",
    }
    outcome.notes.append(
        "the worker's signed payloads, concurrency = DELIVERY_CONCURRENCY, to nginx over HTTPS "
        "(return 200, access_log off), so the figure is the client's limit; the client runs in "
        "the harness process, whose CPU meanwhile is the client's CPU per delivery"
    )
    return outcome


async def throughput(bench: Bench, done: dict[str, Outcome]) -> Outcome:
    sink = bench.nginx()
    outcome = Outcome("throughput", sink=sink.name)
    say = bench.say("throughput")
    await bench.reset()
    org = "org_bench_throughput"
    await bench.seed([(org, "/throughput", [EVENT_TYPE])], say, sink.base_url)
    before = await sink.requests()
    envelopes = [order_event(org, n=i) for i in range(bench.sizes.events)]
    await bench.publisher.publish_all(envelopes, say)
    # The ceiling's bare client sends to its one receiver `concurrency` at a time; the worker
    # may do the same (its default cap per endpoint is lower), so the ratio compares like
    # with like.
    same_concurrency = {"ENDPOINT_CONCURRENCY": str(bench.concurrency)}
    per_second, count, cpu_ms, instructions = await bench.drain_rate(
        "throughput", len(envelopes), len(envelopes), None, same_concurrency
    )
    received = await sink.requests() - before
    ceiling_rate = done["ceiling"].value("deliveries/s") if "ceiling" in done else None
    client_ms = done["ceiling"].value("client CPU per delivery") if "ceiling" in done else None
    outcome.add("deliveries/s", per_second, "/s")
    outcome.add("ratio to ceiling", ratio(per_second, ceiling_rate), "x", at_least=0.30)
    outcome.add("worker CPU per delivery", cpu_ms, "ms")
    # The same machine's cost of a bare request, moments apart: steadier than either figure
    # alone when the machine's speed drifts.
    outcome.add("worker CPU over the client's", ratio(cpu_ms, client_ms), "x")
    if instructions is not None:  # BENCH_PROFILE=callgrind
        outcome.add("worker instructions per delivery", round(instructions / 1e3), "k")
    outcome.details = {
        "events": len(envelopes),
        "attempts": count.total,
        "failed_attempts": count.failed,
        "received": received,
    }
    outcome.notes.append(
        "events published before the worker starts, delivered to nginx (the ceiling's peer); "
        "clock from the first event it stored to the last attempt recorded in PostgreSQL"
    )
    return outcome


async def latency(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("latency")
    say = bench.say("latency")
    sizes = bench.sizes
    await bench.reset()
    org = "org_bench_latency"
    await bench.seed([(org, "/latency", [EVENT_TYPE])], say)
    async with bench.worker("latency") as worker:
        await bench.warm_up(worker, org, "/latency", say)
        say(f"publishing {sizes.latency_rate:g} events/s for {sizes.latency_seconds:g}s")
        cpu_before = worker.cpu_seconds()
        sent, seconds = await bench.publisher.publish_paced(
            lambda n: order_event(org, n=n), sizes.latency_rate, sizes.latency_seconds, say
        )
        deadline = time.monotonic() + LATENCY_WAIT_SECONDS
        while (await bench.receiver.stats()).count("/latency") < len(sent):
            worker.check_alive()
            if time.monotonic() > deadline:
                say(f"stopped waiting for the last deliveries after {LATENCY_WAIT_SECONDS}s")
                break
            await asyncio.sleep(POLL_SECONDS)
        stats = await bench.receiver.stats(ids=True)
        given_up = time.time()
        # At a steady, moderate rate the writer's batches hold a delivery or two: what a
        # delivery costs here is mostly what each batch costs.
        cpu_ms = (worker.cpu_seconds() - cpu_before) * 1000 / len(sent) if sent else None
    # An event not delivered by the time the harness gave up counts as delivered then: the
    # percentiles stay numbers, and are lower bounds whenever any is missing.
    lags = sorted(
        (stats.ids.get(event_id, given_up) - occurred) * 1000 for event_id, occurred in sent
    )
    missing = sum(1 for event_id, _ in sent if event_id not in stats.ids)
    outcome.add("p50", percentile(lags, 50), "ms")
    outcome.add("p99", percentile(lags, 99), "ms", at_most=50)
    outcome.add("achieved rate", len(sent) / seconds, "ev/s")
    outcome.add("delivered", (len(sent) - missing) / len(sent) * 100, "%")
    outcome.add("worker CPU per delivery", cpu_ms, "ms")
    outcome.details = {
        "events": len(sent),
        "received": len(sent) - missing,
        "duplicates": stats.duplicates,
        "max_ms": lags[-1] if lags else None,
    }
    outcome.notes.append(
        "worker running first; events published live; occurred_at to receipt at the receiver"
    )
    if missing:
        outcome.notes.append(
            f"{missing} of {len(sent)} events undelivered {LATENCY_WAIT_SECONDS}s after the last "
            "publish, counted as delivered then: p50/p99 are lower bounds"
        )
    return outcome


async def isolation(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("isolation")
    half = bench.sizes.isolation_events // 2
    runs: dict[str, list[float]] = {"isolation": [], "isolation+slow": []}
    for round_number in range(1, bench.sizes.rounds + 1):
        for label, rates in runs.items():
            with_slow = label == "isolation+slow"
            say = bench.say(f"{label} #{round_number}")
            await bench.reset()
            fast = [
                (f"org_bench_fast{i}", f"/fast/{i}", [EVENT_TYPE]) for i in range(FAST_ENDPOINTS)
            ]
            slow = [(SLOW_ORG, f"/delay/{SLOW_MS}/slow", [EVENT_TYPE])]
            # Both runs get the same events; without the slow endpoint, its organization's
            # events match no endpoint. The ratio then measures what the endpoint's slowness
            # costs the others, not the cost of consuming twice as many events.
            webhook_ids = await bench.seed(fast + slow if with_slow else fast, say)
            fast_events = [order_event(fast[i % FAST_ENDPOINTS][0], n=i) for i in range(half)]
            slow_events = [order_event(SLOW_ORG, n=i) for i in range(half)]
            envelopes = [e for pair in zip(fast_events, slow_events, strict=True) for e in pair]
            await bench.publisher.publish_all(envelopes, say)
            per_second, count, cpu_ms, _ = await bench.drain_rate(
                label, len(envelopes), half, webhook_ids[:FAST_ENDPOINTS]
            )
            if per_second is not None:
                rates.append(per_second)
            details: dict[str, object] = {
                "deliveries_per_second": per_second,
                "events": len(envelopes),
                "fast_attempts": count.total,
                "failed_attempts": count.failed,
                "worker_cpu_ms_per_fast_attempt": cpu_ms,
            }
            if with_slow:
                details["slow_attempts"] = (
                    await bench.attempts(webhook_ids[FAST_ENDPOINTS:])
                ).total
            outcome.details[f"{label} #{round_number}"] = details
    alone, beside = best(runs["isolation"]), best(runs["isolation+slow"])
    outcome.add("fast deliveries/s, slow endpoint absent", alone, "/s")
    outcome.add("fast deliveries/s beside slow", beside, "/s")
    outcome.add("ratio", ratio(beside, alone), "x", at_least=0.9)
    outcome.notes.append(
        f"{half} events over {FAST_ENDPOINTS} fast endpoints interleaved with {half} for one more "
        f"organization, whose one endpoint answers after {SLOW_MS} ms, against the same events "
        f"with that endpoint absent; pre-published; clock stops at the last fast attempt; "
        f"{ROUNDS_NOTE.format(rounds=bench.sizes.rounds)}"
    )
    return outcome


async def fanout(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("fanout")
    sizes = bench.sizes
    configs = {
        "fanout-small": (FAST_ENDPOINTS, 1),
        "fanout-large": (sizes.fanout_orgs, sizes.fanout_endpoints_per_org),
    }
    runs: dict[str, list[float]] = {label: [] for label in configs}
    for round_number in range(1, sizes.rounds + 1):
        for label, (orgs, per_org) in configs.items():
            say = bench.say(f"{label} #{round_number}")
            await bench.reset()
            endpoints: list[tuple[str, str, Sequence[str]]] = []
            for o in range(orgs):
                org = f"org_bench_fan{o}"
                # One endpoint per org takes the published type; the rest subscribe to others,
                # so they are matched against but never chosen: one delivery per event in both.
                endpoints.append((org, f"/fan/{o}", [EVENT_TYPE]))
                endpoints.extend(
                    (org, f"/other/{o}/{k}", [OTHER_TYPES[k % len(OTHER_TYPES)]])
                    for k in range(1, per_org)
                )
            say(f"seeding {len(endpoints)} endpoints over {orgs} organizations")
            await bench.seed(endpoints, say)
            envelopes = [
                order_event(f"org_bench_fan{i % orgs}", n=i) for i in range(sizes.fanout_events)
            ]
            await bench.publisher.publish_all(envelopes, say)
            per_second, count, cpu_ms, _ = await bench.drain_rate(
                label, len(envelopes), len(envelopes), None
            )
            if per_second is not None:
                runs[label].append(per_second)
            outcome.details[f"{label} #{round_number}"] = {
                "events_per_second": per_second,
                "endpoints": len(endpoints),
                "organizations": orgs,
                "events": len(envelopes),
                "attempts": count.total,
                "failed_attempts": count.failed,
                "worker_cpu_ms_per_attempt": cpu_ms,
            }
    small, large = configs["fanout-small"], configs["fanout-large"]
    few, many = best(runs["fanout-small"]), best(runs["fanout-large"])
    outcome.add(f"events/s, {small[0] * small[1]} endpoints", few, "/s")
    outcome.add(f"events/s, {large[0] * large[1]} endpoints", many, "/s")
    outcome.add("ratio", ratio(many, few), "x", at_least=0.9)
    outcome.notes.append(
        "events round-robin over organizations with one subscribed endpoint each; "
        f"pre-published; {ROUNDS_NOTE.format(rounds=sizes.rounds)}"
    )
    return outcome


async def backlog(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("backlog")
    say = bench.say("backlog")
    sizes = bench.sizes
    await bench.reset()
    org = "org_bench_backlog"
    await bench.seed([(org, "/backlog", [EVENT_TYPE])], say)
    envelopes = [order_event(org, n=i) for i in range(sizes.backlog_events)]
    await bench.publisher.publish_all(envelopes, say)
    samples: list[float] = []
    async with bench.worker("backlog") as worker:
        started = time.time()

        def sample() -> str:
            rss, peak = worker.memory_mb()
            samples.append(rss)
            return f"; worker RSS {rss:.0f} MB, peak {peak:.0f} MB"

        count = await bench.drain(
            worker, len(envelopes), started, say, timeout=sizes.backlog_seconds, on_poll=sample
        )
        peak = worker.memory_mb()[1]  # VmHWM: the kernel's own peak, not only our samples
        seconds = time.time() - started
    first = await bench.first_event_at()
    outcome.add("peak RSS", peak or None, "MB", at_most=200)
    outcome.add("drained", count.total, "events")
    outcome.add("drain rate", rate(count.total, first, count.last_at) if first else None, "/s")
    outcome.details = {
        "queued": len(envelopes),
        "measured_seconds": seconds,
        "rss_first_sample_mb": samples[0] if samples else None,
        "rss_samples_max_mb": max(samples, default=0),
        "failed_attempts": count.failed,
    }
    bounded = (
        ""
        if count.total >= len(envelopes)
        else (f"; measuring stopped after {sizes.backlog_seconds:g}s with {count.total} drained")
    )
    outcome.notes.append(
        f"{len(envelopes)} events queued before the worker starts; peak = VmHWM{bounded}"
    )
    return outcome


SCENARIOS: dict[str, Scenario] = {
    "ceiling": ceiling,
    "throughput": throughput,
    "burst": burst,
    "latency": latency,
    "isolation": isolation,
    "live-isolation": live_isolation,
    "fanout": fanout,
    "backlog": backlog,
    "queries": queries,
    "recovery": recovery,
    "ordered": ordered,
    "rate-limit": rate_limit,
    "processes": processes,
    "tracing": tracing,
}
# The scenarios whose deliveries go to nginx (bench.sink) rather than the Python receiver.
NGINX_SCENARIOS = frozenset(
    {
        "ceiling",
        "throughput",
        "burst",
        "recovery",
        "ordered",
        "rate-limit",
        "processes",
        "tracing",
    }
)
