"""Process lifecycle: build the resources, run the API and/or the worker, shut down in order.

A process owns its database engine, broker connection and publish channel, HTTP session and
servers through one ``AsyncExitStack``; the worker half (:class:`PipelineWorker`) owns its
consumers' channels, the batch writer and its background loops. On SIGTERM (or ``stop``):

1. the worker stops consuming, drains the handlers under way (at most
   ``SHUTDOWN_DRAIN_SECONDS``, which the Kubernetes manifests keep below
   ``terminationGracePeriodSeconds``), flushes the writer and closes its channels — see
   :mod:`worker.pipeline.worker`;
2. then the exit stack unwinds what the process opened, newest first: the API server, the
   health checks, the HTTP session, the publish channel, the broker connection, the database
   engine and, last, the tracer provider, which exports the spans it still holds.

A message is settled before its channel goes, so nothing is lost and nothing is redone.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Literal

import structlog
from aiohttp import web

from worker.api import routes as api
from worker.api import table
from worker.api.appkeys import ATTEMPTS, JWT_VERIFIER, METRICS, NOTIFIER, SETTINGS, STORE
from worker.api.jwt_tokens import JwksFetcher, JwtVerifier
from worker.api.ratelimit import RateLimiter
from worker.ops.health import Health, health_routes
from worker.ops.metrics import Metrics
from worker.ops.tracing import Tracing, open_tracing
from worker.pipeline import topology
from worker.pipeline.attempts import AttemptEffects
from worker.pipeline.manual import ManualAttempts
from worker.pipeline.matcher import ChangeNotifier
from worker.pipeline.publisher import Publisher
from worker.pipeline.sender import Sender, create_session
from worker.pipeline.worker import PipelineWorker
from worker.settings import Settings
from worker.startup import reach_broker, reach_database
from worker.store import Store, crypto, database

Role = Literal["serve", "api", "worker"]

log = structlog.get_logger("sellfern_webhooks.runtime")

# Allocations (less deallocations) between collections of the youngest generation; 700 by
# default.
GC_YOUNG_THRESHOLD = 20_000


@dataclass
class Running:
    """What a started process exposes, for tests and operators' tools."""

    settings: Settings
    store: Store
    metrics: Metrics
    api_port: int | None = None
    metrics_port: int | None = None
    health: Health | None = None
    worker: PipelineWorker | None = None
    api_app: web.Application | None = None
    tracing: Tracing | None = None


async def _start_site(stack: AsyncExitStack, app: web.Application, host: str, port: int) -> int:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # noqa: SLF001 - the bound port when 0 asked for any free one
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else port


def build_api_app(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    attempts: ManualAttempts,
    notifier: ChangeNotifier,
    health: Health,
    tracing: Tracing,
) -> web.Application:
    # Tracing outermost: its span covers the whole request and sees the final status.
    middlewares = [*tracing.middlewares(api.BASE), *api.api_middlewares()]
    app = web.Application(client_max_size=api.MAX_BODY_BYTES, middlewares=middlewares)
    app[SETTINGS] = settings
    app[STORE] = store
    app[METRICS] = metrics
    app[ATTEMPTS] = attempts
    app[NOTIFIER] = notifier
    app[api.RATE_LIMITER] = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    if settings.jwt_jwks_url:
        # Keys are fetched on the first JWT, not at start-up: the API serves local tokens
        # even while the identity provider is unreachable.
        fetcher = JwksFetcher(settings.jwt_jwks_url, settings.ca_bundle)
        app.cleanup_ctx.append(fetcher.session_context)
        app[JWT_VERIFIER] = JwtVerifier.from_settings(settings, fetcher)
    table.add_routes(app)
    app.router.add_routes(health_routes(health, metrics))
    return app


def _health_app(health: Health, metrics: Metrics) -> web.Application:
    """The worker's own server: health checks and metrics only."""
    app = web.Application()
    app.router.add_routes(health_routes(health, metrics))
    return app


def _settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the hot path.

    Everything built at start-up (modules, SQLAlchemy's and pydantic's structures) lives as
    long as the process: frozen, it is never scanned again. Deliveries allocate many
    short-lived objects, almost none in cycles; a larger first generation means fewer
    collections, each over young objects only. Called before the process takes requests or
    messages, so that none waits behind the full collection (40 ms on an idle core, three
    times that beside a busy worker process).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def run(
    settings: Settings,
    role: Role,
    *,
    box: crypto.SecretBox | None = None,
    stop: asyncio.Event | None = None,
    started: Callable[[Running], None] | None = None,
    handle_signals: bool = True,
    metrics: Metrics | None = None,
) -> None:
    """Run one process until ``stop`` is set or SIGTERM/SIGINT arrives (if ``handle_signals``).

    ``box`` seals the signing secrets; the entry point builds it from ``settings`` (and so does
    this function when it is not given). ``metrics`` is the process's own unless given (the
    supervisor's, whose /metrics sums every worker process).
    """
    box = box or crypto.load_box(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        # Closed last, once every span has ended.
        tracing = await stack.enter_async_context(open_tracing(settings))
        metrics = metrics or Metrics()
        engine = database.create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        await reach_database(
            settings.database_url,
            database.ensure_schema(engine, auto_migrate=settings.is_sqlite),
        )
        store = Store(engine, box)
        running = Running(settings, store, metrics, tracing=tracing)

        connection = await reach_broker(
            settings.amqp_url, client_properties={"connection_name": f"sellfern-webhooks {role}"}
        )
        stack.push_async_callback(connection.close)
        publish_channel = await connection.channel(publisher_confirms=True)
        stack.push_async_callback(publish_channel.close)
        topo = await topology.declare(
            publish_channel, settings.retry_schedule, settings.retry_jitter
        )

        session = create_session(settings)
        stack.push_async_callback(session.close)
        sender = Sender(session, settings)
        publisher = Publisher(topo, metrics)
        effects = AttemptEffects(store, metrics, settings)
        health = await stack.enter_async_context(Health(store, connection))
        running.health = health

        _settle_garbage_collector()
        if role in ("api", "serve"):
            attempts = ManualAttempts(store, sender, effects, tracing)
            app = running.api_app = build_api_app(
                settings, store, metrics, attempts, ChangeNotifier(topo), health, tracing
            )
            running.api_port = await _start_site(stack, app, settings.api_host, settings.api_port)
        if role == "worker":
            running.metrics_port = await _start_site(
                stack, _health_app(health, metrics), settings.api_host, settings.metrics_port
            )
        worker = None
        if role in ("worker", "serve"):
            worker = PipelineWorker(
                settings, store, metrics, connection, topo, sender, publisher, effects, tracing
            )
            # Registered last, so that on a failed start it is stopped first; on a normal stop
            # it is stopped below, explicitly, before anything it uses is closed.
            stack.push_async_callback(worker.stop, settings.shutdown_drain_seconds)
            await worker.start()
            running.worker = worker

        log.info(
            "started",
            role=role,
            api_port=running.api_port,
            metrics_port=running.metrics_port,
            database=settings.database_url.split("://", 1)[0],
        )
        if started is not None:
            started(running)
        await stop.wait()

        if worker is not None:
            log.info(
                "stopping: no new messages; draining in-flight work", in_flight=worker.handling
            )
            left = await worker.stop(settings.shutdown_drain_seconds)
            if left:
                log.warning(
                    "drain bound reached; unfinished messages return to their queues", left=left
                )
    log.info("stopped")
