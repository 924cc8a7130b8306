"""``tracing``: the worker's CPU per delivery with spans exported, over the same without.

The throughput scenario's load (``--events`` events published before the worker starts, one
endpoint on nginx, ``ENDPOINT_CONCURRENCY`` at the bench concurrency) is drained by a worker
that traces nothing and by one that exports every span to an OTLP/HTTP sink of the run
(:mod:`bench.otlp`), alternating, each ``rounds`` times. Each side's lowest CPU per delivery
counts: on a shared machine a passing slowdown raises one run's figure, not the code's, and
two runs of the same code a few minutes apart differ by a tenth or more, which is as much as
the cost measured. The ratio of the two is the cost of tracing with an exporter on.
"""

from __future__ import annotations

from bench.harness import EVENT_TYPE, Bench, Outcome, ratio
from bench.load import order_event
from bench.otlp import OtlpSink, run_otlp_sink, services_tracing

ORG = "org_bench_tracing"
PATH = "/tracing"
TARGET_RATIO = 1.15
SIDES = ("untraced", "traced")


async def _one_drain(bench: Bench, label: str, sink: OtlpSink | None) -> float | None:
    """The worker's CPU milliseconds per delivery draining the throughput load."""
    say = bench.say(label)
    await bench.reset()
    await bench.seed([(ORG, PATH, [EVENT_TYPE])], say, bench.nginx().base_url)
    envelopes = [order_event(ORG, n=i) for i in range(bench.sizes.events)]
    await bench.publisher.publish_all(envelopes, say)
    same_concurrency = {"ENDPOINT_CONCURRENCY": str(bench.concurrency)}
    with services_tracing(sink):
        _rate, count, cpu_ms, _ = await bench.drain_rate(
            label, len(envelopes), len(envelopes), None, same_concurrency
        )
    if count.failed:
        say(f"{count.failed} attempts failed")
    return cpu_ms


async def tracing(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("tracing", sink=bench.nginx().name)
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    async with run_otlp_sink() as sink:
        for round_number in range(1, bench.sizes.rounds + 1):
            for side in SIDES:
                label = f"tracing-{side}-{round_number}"
                ms = await _one_drain(bench, label, sink if side == "traced" else None)
                outcome.details[f"{side} #{round_number}, ms"] = ms
                if ms is not None:
                    cpu[side].append(ms)
        outcome.details["otlp_posts"], outcome.details["otlp_bytes"] = sink.exports, sink.bytes
    untraced, traced = min(cpu["untraced"], default=None), min(cpu["traced"], default=None)
    outcome.add("worker CPU per delivery, untraced", untraced, "ms")
    outcome.add("worker CPU per delivery, traced", traced, "ms")
    outcome.add("ratio traced/untraced", ratio(traced, untraced), "x", at_most=TARGET_RATIO)
    outcome.notes.append(
        f"{bench.sizes.events} events pre-published for one endpoint on nginx, drained by a "
        "worker without tracing and by one exporting every span (two a delivery) to an "
        f"OTLP/HTTP sink of the run, alternating; lowest CPU per delivery of "
        f"{bench.sizes.rounds} each"
    )
    return outcome
