"""``burst``: a spike of events for one endpoint of a running ``serve``, at default settings.

``--burst-events`` (10,000) events are published at once — as fast as the publisher goes,
each confirmed — for one endpoint on nginx, of a ``python -m worker.cli serve`` process that
is already running and has delivered one warm-up event. Once on SQLite (a fresh file) and
once on PostgreSQL; each with the default settings and with ``ENDPOINT_CONCURRENCY`` raised to
the bench concurrency, alternating, each ``rounds`` times (its best drain rate counts).

Per run: drain rate = events / (first publish -> last attempt recorded); the worst delivery
lag, max over events of (first successful attempt's ``created_at`` - the event's
``occurred_at``), from the database; the deferrals (the worker's counter of tasks put back for
an endpoint at its cap) and the deliveries by route, from ``/metrics`` before it stops.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import EVENT_TYPE, POLL_SECONDS, REPORT_EVERY, Bench, Outcome, ratio
from bench.load import order_event
from bench.serve import Samples, Serve, create_token, metric_by_label, metric_total, run_serve
from worker.settings import Settings
from worker.store import database
from worker.store.tables import attempts, events

ORG = "org_bench_burst"
PATH = "/burst"
DEFERRED = "sellfern_webhooks_deliveries_deferred_total"
PUBLISHED = "sellfern_webhooks_deliveries_published_total"
WARM_UP_SECONDS = 60
DEFAULT_CAP = Settings.model_fields["endpoint_concurrency"].default
BACKENDS = ("SQLite", "PostgreSQL")


async def _successes(engine: AsyncEngine, exclude: str) -> tuple[int, int, float | None]:
    """Successful attempts, all attempts and the newest attempt's time, but ``exclude``'s."""
    query = sa.select(
        sa.func.count().filter(attempts.c.success.is_(True)),
        sa.func.count(),
        sa.func.max(attempts.c.created_at),
    ).where(attempts.c.event_id != exclude)
    async with engine.connect() as connection:
        ok, total, last = (await connection.execute(query)).one()
    return ok, total, last.timestamp() if last is not None else None


async def _worst_lag(engine: AsyncEngine, exclude: str) -> float | None:
    """Max over events of first successful attempt - occurred_at, in seconds."""
    first = (
        sa.select(attempts.c.event_id, sa.func.min(attempts.c.created_at).label("first_at"))
        .where(attempts.c.success.is_(True), attempts.c.event_id != exclude)
        .group_by(attempts.c.event_id)
        .subquery()
    )
    query = sa.select(first.c.first_at, events.c.occurred_at).join(
        events, events.c.id == first.c.event_id
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return max(((at - occurred).total_seconds() for at, occurred in rows), default=None)


async def _wait(
    bench: Bench,
    serve: Serve,
    engine: AsyncEngine,
    exclude: str,
    expected: int,
    say: Callable[[str], None],
) -> None:
    deadline = time.monotonic() + bench.sizes.drain_timeout
    next_report = time.monotonic() + REPORT_EVERY
    while True:
        serve.process.check_alive()
        ok, _total, _last = await _successes(engine, exclude)
        if ok >= expected:
            return
        if time.monotonic() >= deadline:
            say(f"stopped waiting: {ok}/{expected} delivered")
            return
        if time.monotonic() >= next_report:
            next_report += REPORT_EVERY
            say(f"{ok}/{expected} delivered")
        await asyncio.sleep(POLL_SECONDS)


def _delta(after: Samples, before: Samples) -> tuple[float | None, dict[str, float]]:
    deferred_after = metric_total(after, DEFERRED)
    deferred = (
        None if deferred_after is None else deferred_after - (metric_total(before, DEFERRED) or 0)
    )
    routes_before = metric_by_label(before, PUBLISHED, "route")
    routes = {
        route: count - routes_before.get(route, 0)
        for route, count in metric_by_label(after, PUBLISHED, "route").items()
    }
    return deferred, routes


async def _one_burst(
    bench: Bench, label: str, database_url: str, extra: Mapping[str, str], token: str
) -> dict[str, Any]:
    say = bench.say(label)
    sink = bench.nginx()
    settings = {**bench.service_settings(database_url), **extra, **bench.worker_settings}
    engine = bench.store.engine if database_url == bench.database_url else None
    async with AsyncExitStack() as stack:
        if engine is None:
            engine = database.create_engine(database_url)
            stack.push_async_callback(engine.dispose)
        async with run_serve(settings, bench.log_dir / f"serve-{label}.log") as serve:
            say(f"serve started (pid {serve.process.pid}) at {serve.api_url}")
            await serve.create_endpoint(token, sink.url(PATH), [EVENT_TYPE])
            warm = order_event(ORG)
            await bench.publisher.publish(warm)
            deadline = time.monotonic() + WARM_UP_SECONDS
            while (await _successes(engine, ""))[0] < 1:
                serve.process.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{label}: no warm-up delivery within {WARM_UP_SECONDS}s")
                await asyncio.sleep(0.05)
            before = await serve.metrics()
            envelopes = [order_event(ORG, n=i) for i in range(bench.sizes.burst_events)]
            first_occurred = min(e.occurred_at.timestamp() for e in envelopes)
            cpu_before = serve.process.cpu_seconds()
            started = time.time()
            publish_seconds = await bench.publisher.publish_all(envelopes, say)
            await _wait(bench, serve, engine, warm.id, len(envelopes), say)
            cpu = serve.process.cpu_seconds() - cpu_before
            after = await serve.metrics()
        ok, total, last_at = await _successes(engine, warm.id)
        worst = await _worst_lag(engine, warm.id)
    deferred, routes = _delta(after, before)
    drain = last_at - started if last_at is not None else None
    return {
        "events": len(envelopes),
        "delivered": ok,
        "attempts": total,
        "drain_seconds": drain,
        "drain_rate": ok / drain if ok and drain else None,
        "worst_lag_seconds": worst,
        "worst_lag_over_drain": ratio(worst, drain),
        "deferrals": deferred,
        "routes": routes,
        "publish_seconds": publish_seconds,
        "built_before_first_publish_seconds": started - first_occurred,
        "serve_cpu_ms_per_delivery": cpu * 1000 / ok if ok else None,
        "settings": dict(extra),
    }


async def burst(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    sink = bench.nginx()
    outcome = Outcome("burst", sink=sink.name)
    raised = {"ENDPOINT_CONCURRENCY": str(bench.concurrency)}
    configs: dict[str, Mapping[str, str]] = {"defaults": {}, "raised": raised}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {
        (backend, config): [] for backend in BACKENDS for config in configs
    }
    with tempfile.TemporaryDirectory(prefix="sfw-bench-burst-") as scratch_dir:
        scratch = Path(scratch_dir)
        # `token create` also migrates a new SQLite file: each SQLite run gets a fresh copy of
        # this one, token included. PostgreSQL's tokens outlive the harness's TRUNCATEs.
        template = scratch / "template.db"
        log = bench.log_dir / "token-burst.log"
        tokens = {
            "SQLite": await create_token(bench.service_settings(_sqlite(template)), ORG, log),
            "PostgreSQL": await create_token(bench.service_settings(), ORG, log),
        }
        for round_number in range(1, bench.sizes.rounds + 1):
            for backend in BACKENDS:
                for config, extra in configs.items():
                    label = f"burst-{backend.lower()}-{config}-{round_number}"
                    await bench.reset()  # queues, and the PostgreSQL tables
                    url = bench.database_url
                    if backend == "SQLite":
                        url = _sqlite(await asyncio.to_thread(_fresh_copy, template, label))
                    run = await _one_burst(bench, label, url, extra, tokens[backend])
                    results[backend, config].append(run)
                    outcome.details[f"{backend} {config} #{round_number}"] = run
                    bench.say(label)(
                        f"{run['delivered']} delivered at {_fmt(run['drain_rate'])}/s, "
                        f"{_fmt(run['deferrals'])} deferrals, routes {run['routes']}"
                    )
    _figures(outcome, results, bench.concurrency)
    return outcome


def _sqlite(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _fresh_copy(template: Path, name: str) -> Path:
    copy = template.with_name(f"{name}.db")
    shutil.copyfile(template, copy)
    wal = template.with_name(f"{template.name}-wal")  # gone once its last connection closed
    if wal.exists():
        shutil.copyfile(wal, copy.with_name(f"{copy.name}-wal"))
    return copy


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _figures(
    outcome: Outcome, results: dict[tuple[str, str], list[dict[str, Any]]], concurrency: int
) -> None:
    def pick(runs: list[dict[str, Any]], key: str, choose: Callable[..., Any]) -> float | None:
        values = [run[key] for run in runs if run[key] is not None]
        return choose(values) if values else None

    for backend in BACKENDS:
        defaults, raised = results[backend, "defaults"], results[backend, "raised"]
        rate_default = pick(defaults, "drain_rate", max)
        rate_raised = pick(raised, "drain_rate", max)
        outcome.add(f"drain rate, {backend}, defaults", rate_default, "/s")
        outcome.add(f"drain rate, {backend}, cap {concurrency}", rate_raised, "/s")
        outcome.add(
            f"ratio defaults/raised, {backend}",
            ratio(rate_default, rate_raised),
            "x",
            at_least=0.8,
        )
        deferrals = pick(defaults, "deferrals", max)
        outcome.add(f"deferrals at defaults, {backend}", deferrals, "tasks", at_most=0)
        outcome.add(
            f"worst lag / drain time, {backend}",
            pick(defaults + raised, "worst_lag_over_drain", max),
            "x",
            at_most=1.2,
        )
        routes = [run["routes"] for run in defaults]
        outcome.notes.append(f"{backend}, deliveries by route at defaults, per run: {routes}")
    events = next((runs[0]["events"] for runs in results.values() if runs), 0)
    outcome.notes.append(
        f"{events} events published at once (confirmed) to one endpoint of a running `serve`, "
        f"created through its API, warmed up with one event; defaults (ENDPOINT_CONCURRENCY "
        f"{DEFAULT_CAP}) against ENDPOINT_CONCURRENCY={concurrency}, alternating, best drain "
        "rate of each; drain = first publish to last attempt recorded; lag = first successful "
        "attempt - occurred_at, worst of all runs; deferrals = max over the default runs "
        f"of {DEFERRED}"
    )
