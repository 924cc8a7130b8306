"""The state every scenario runs on, and what a scenario reports.

``Bench`` holds this run's services (vhost, database, receiver, nginx sink, publisher) and the
helpers the scenarios share: empty everything, seed endpoints, start a worker, count attempts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from aio_pika.abc import AbstractChannel

from bench.infra import Progress, TlsFiles
from bench.load import EventPublisher, order_event
from bench.procs import WorkerProcess, run_worker
from bench.receiver import Receiver
from bench.sink import Sink
from worker.store import Store
from worker.store.tables import attempts, events

EVENT_TYPE = "order.created"
POLL_SECONDS = 0.25
REPORT_EVERY = 2.0
SEED_CONCURRENCY = 10
WARM_UP_SECONDS = 60
LATENCY_WAIT_SECONDS = 30
# Which peer answered the deliveries behind a figure (the table's "sink" column).
PYTHON_SINK = "python"


@dataclass(frozen=True)
class Sizes:
    events: int = 20_000  # ceiling and throughput
    latency_rate: float = 300
    latency_seconds: float = 30
    # Half for the fast endpoints, half for the slow one's organization (in both runs). Runs
    # of several seconds each, so start-up (an endpoint's first probes, cold lookups) is a
    # small part of what is measured.
    isolation_events: int = 20_000
    fanout_events: int = 20_000  # 20 per organization in the large run
    # Isolation and fan-out compare two runs; each side runs this many times, alternating.
    rounds: int = 2
    fanout_orgs: int = 1_000
    fanout_endpoints_per_org: int = 10
    backlog_events: int = 100_000
    backlog_seconds: float = 180  # stop measuring after this long, drained or not
    burst_events: int = 10_000  # published at once to one endpoint of a running serve
    live_isolation_rate: float = 200
    live_isolation_seconds: float = 20
    drain_timeout: float = 600  # give up waiting for a drain after this long
    query_attempts: int = 1_000_000  # the store the find-and-search calls run over
    query_endpoints: int = 1_000  # organizations of 10
    ordered_events: int = 3_000  # for one ordered endpoint
    query_requests: int = 200  # of each call
    rate_limit_seconds: float = 30  # measured at one endpoint's limit


# Small enough for a smoke run of the whole harness in well under a minute on a busy machine.
QUICK = Sizes(
    events=400,
    latency_rate=50,
    latency_seconds=2,
    isolation_events=300,
    fanout_events=300,
    fanout_orgs=20,
    fanout_endpoints_per_org=10,
    rounds=1,
    backlog_events=1_000,
    backlog_seconds=6,
    burst_events=300,
    live_isolation_rate=100,
    live_isolation_seconds=2,
    drain_timeout=20,
    query_attempts=20_000,
    query_endpoints=20,
    ordered_events=100,
    query_requests=20,
    rate_limit_seconds=3,
)


@dataclass
class Figure:
    scenario: str
    name: str
    value: float | None
    unit: str
    target: str = ""
    passed: bool | None = None
    sink: str = ""  # the peer that answered: nginx, or the Python receiver


@dataclass
class Outcome:
    """One scenario's figures, the raw numbers behind them, and how it was measured."""

    scenario: str
    sink: str = PYTHON_SINK  # of every figure unless ``add`` says otherwise
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float | None,
        unit: str,
        *,
        at_least: float | None = None,
        at_most: float | None = None,
        sink: str | None = None,
    ) -> None:
        target, passed = "", None
        if at_least is not None:
            target, passed = f">= {at_least:g}", value is not None and value >= at_least
        elif at_most is not None:
            target, passed = f"<= {at_most:g}", value is not None and value <= at_most
        self.figures.append(
            Figure(self.scenario, name, value, unit, target, passed, sink or self.sink)
        )

    def value(self, name: str) -> float | None:
        return next((f.value for f in self.figures if f.name == name), None)


@dataclass(frozen=True)
class AttemptCount:
    total: int
    failed: int
    last_at: float | None  # Unix time of the newest attempt


class Drained(NamedTuple):
    """What :meth:`Bench.drain_rate` measured."""

    per_second: float | None
    attempts: AttemptCount
    cpu_ms: float | None  # worker CPU per attempt
    instructions: float | None  # worker instructions per attempt, under callgrind only


def rate(count: int, started: float, ended: float | None) -> float | None:
    if not count or ended is None or ended <= started:
        return None
    return count / (ended - started)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def percentile(ordered: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass
class Bench:
    """What every scenario uses: the services of this run and a few helpers over them."""

    sizes: Sizes
    concurrency: int
    worker_settings: dict[str, str]  # from --set, over the harness's own
    amqp_url: str
    database_url: str
    secret_key: str  # the Fernet key sealing signing secrets, for the harness and the worker
    retry_schedule: tuple[float, ...]
    queue_names: list[str]
    tls: TlsFiles
    receiver: Receiver
    sink: Sink | None  # started only when a scenario that uses it is selected
    store: Store
    channel: AbstractChannel
    publisher: EventPublisher
    log_dir: Path
    progress: Progress

    def say(self, scenario: str) -> Callable[[str], None]:
        return lambda message: self.progress(f"{scenario}: {message}")

    def nginx(self) -> Sink:
        if self.sink is None:
            raise RuntimeError("the nginx sink was not started for this run")
        return self.sink

    def service_settings(self, database_url: str | None = None) -> dict[str, str]:
        """What any process of the service needs to run here; no tuning knob."""
        return {
            "DATABASE_URL": database_url or self.database_url,
            "SECRET_KEYS": self.secret_key,
            "AMQP_URL": self.amqp_url,
            "CA_BUNDLE": str(self.tls.ca),
            "ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8",
            "API_HOST": "127.0.0.1",
            "METRICS_PORT": "0",
            "LOG_LEVEL": "warning",
        }

    @asynccontextmanager
    async def worker(
        self, label: str, extra: Mapping[str, str] | None = None
    ) -> AsyncIterator[WorkerProcess]:
        settings = {
            **self.service_settings(),
            "DELIVERY_CONCURRENCY": str(self.concurrency),
            "RETRY_SCHEDULE": ",".join(f"{d:g}" for d in self.retry_schedule),
            # The isolation run stops with 2-second answers in flight; do not wait for them.
            "SHUTDOWN_DRAIN_SECONDS": "3",
            **(extra or {}),
            **self.worker_settings,
        }
        async with run_worker(settings, self.log_dir / f"worker-{label}.log") as worker:
            self.progress(f"{label}: worker started (pid {worker.pid})")
            yield worker

    async def warm_up(
        self, worker: WorkerProcess, org: str, path: str, say: Callable[[str], None]
    ) -> None:
        """Send one event through the whole pipeline: the worker is consuming, TLS is set up."""
        await self.publisher.publish(order_event(org))
        deadline = time.monotonic() + WARM_UP_SECONDS
        while (await self.receiver.stats()).count(path) < 1:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no delivery to {path} within {WARM_UP_SECONDS}s of start")
            await asyncio.sleep(0.05)
        await self.receiver.reset()
        say("worker consuming (one warm-up event delivered)")

    async def first_event_at(self) -> float | None:
        """When the worker stored the first event of this run (Unix time)."""
        async with self.store.engine.connect() as connection:
            first = (
                await connection.execute(sa.select(sa.func.min(events.c.received_at)))
            ).scalar()
        return first.timestamp() if first is not None else None

    async def reset(self) -> None:
        """Empty every queue and table and the receiver's counts (no worker is running)."""
        for name in self.queue_names:
            queue = await self.channel.declare_queue(name, passive=True)
            await queue.purge()
        async with self.store.engine.begin() as connection:
            await connection.execute(
                sa.text("TRUNCATE attempts, deliveries, events, webhook_subscriptions, webhooks")
            )
        await self.receiver.reset()

    async def seed(
        self,
        endpoints: Sequence[tuple[str, str, Sequence[str]]],
        say: Callable[[str], None],
        base_url: str | None = None,
    ) -> list[str]:
        """Create (org, path, event types) endpoints at ``base_url`` (the Python receiver's
        unless given); return their ids in the same order."""
        base = base_url or self.receiver.base_url
        ids: list[str] = [""] * len(endpoints)
        gate = asyncio.Semaphore(SEED_CONCURRENCY)
        done = 0

        async def create(index: int, org: str, path: str, types: Sequence[str]) -> None:
            nonlocal done
            async with gate:
                webhook = await self.store.endpoints.create(
                    org, f"{base}{path}", types, "bench", enabled=True
                )
            ids[index] = webhook.id
            done += 1

        task = asyncio.gather(*(create(i, *e) for i, e in enumerate(endpoints)))
        while not task.done():
            await asyncio.wait([task], timeout=REPORT_EVERY)
            if not task.done():
                say(f"seeded {done}/{len(endpoints)} endpoints")
        await task
        return ids

    async def attempts(self, webhook_ids: Sequence[str] | None = None) -> AttemptCount:
        query = sa.select(
            sa.func.count(),
            sa.func.count().filter(attempts.c.success.is_(False)),
            sa.func.max(attempts.c.created_at),
        )
        if webhook_ids is not None:
            query = query.where(attempts.c.webhook_id.in_(webhook_ids))
        async with self.store.engine.connect() as connection:
            total, failed, last = (await connection.execute(query)).one()
        return AttemptCount(total, failed, last.timestamp() if last is not None else None)

    async def drain(
        self,
        worker: WorkerProcess,
        expected: int,
        started: float,
        say: Callable[[str], None],
        webhook_ids: Sequence[str] | None = None,
        timeout: float | None = None,
        on_poll: Callable[[], str] | None = None,
    ) -> AttemptCount:
        """Wait until ``expected`` attempts are recorded, or ``timeout`` passes."""
        deadline = time.monotonic() + (timeout or self.sizes.drain_timeout)
        next_report = time.monotonic() + REPORT_EVERY
        while True:
            worker.check_alive()
            status = on_poll() if on_poll is not None else ""
            count = await self.attempts(webhook_ids)
            if count.total >= expected:
                return count
            if time.monotonic() >= deadline:
                say(f"stopped waiting: {count.total}/{expected} attempts recorded")
                return count
            if time.monotonic() >= next_report:
                next_report += REPORT_EVERY
                elapsed = time.time() - started
                say(f"{count.total}/{expected} attempts recorded, {elapsed:.0f}s{status}")
            await asyncio.sleep(POLL_SECONDS)

    async def drain_rate(
        self,
        label: str,
        envelopes_count: int,
        expected: int,
        webhook_ids: Sequence[str] | None,
        extra: Mapping[str, str] | None = None,
    ) -> Drained:
        """Start a worker on the queued events and wait until ``expected`` are done.

        Returns deliveries a second, the attempts counted, and the worker's CPU milliseconds
        per attempt (start-up excluded): a figure steadier than the rate on a shared machine.
        The CPU clock starts once the first attempt is recorded, so that importing modules
        and connecting are not spread over the deliveries; it counts the attempts recorded
        after that. Under ``BENCH_PROFILE=callgrind``, the instructions per attempt too,
        counted over the same span.
        """
        say = self.say(label)
        async with self.worker(label, extra) as worker:
            say(f"draining {envelopes_count} queued events")
            started = time.time()
            first_count = await self._first_attempts(worker, webhook_ids)
            await worker.zero_instructions()
            cpu_before = worker.cpu_seconds()
            count = await self.drain(worker, expected, started, say, webhook_ids)
            cpu = worker.cpu_seconds() - cpu_before
            instructions = await worker.instructions()
        first = await self.first_event_at()
        measured = count.total - first_count
        cpu_ms = cpu * 1000 / measured if measured > 0 else None
        per_attempt = instructions / measured if instructions and measured > 0 else None
        return Drained(
            rate(count.total, first, count.last_at) if first else None, count, cpu_ms, per_attempt
        )

    async def _first_attempts(
        self, worker: WorkerProcess, webhook_ids: Sequence[str] | None
    ) -> int:
        """Wait (up to the drain timeout) for the worker's first recorded attempt; return how
        many are recorded by then."""
        deadline = time.monotonic() + self.sizes.drain_timeout
        while time.monotonic() < deadline:
            worker.check_alive()
            total = (await self.attempts(webhook_ids)).total
            if total:
                return total
            await asyncio.sleep(0.02)
        return 0
