"""Process lifecycle: build the resources, run the API and/or the worker, shut down in order.

One ``AsyncExitStack`` owns everything a process opens — database engine, broker connection,
HTTP session, servers — and closes it in reverse order.

On SIGTERM the worker stops consuming first, then waits for the attempts in flight (at most
``SHUTDOWN_DRAIN_SECONDS``, which the Kubernetes manifests keep below
``terminationGracePeriodSeconds``), flushes the attempt writer, and only then closes channels:
a message is settled before its channel goes, so nothing is lost and nothing is redone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web

from worker.api import routes as api
from worker.api.appkeys import DELIVERER, METRICS, NOTIFIER, SETTINGS, STORE
from worker.api.ratelimit import RateLimiter
from worker.ops.health import Health, health_routes
from worker.ops.metrics import Metrics
from worker.pipeline import topology
from worker.pipeline.delivery import Deliverer, Publisher
from worker.pipeline.fanout import ChangeNotifier, EndpointMatcher, FanOut
from worker.pipeline.parking import Parking
from worker.pipeline.sender import Sender, create_session
from worker.pipeline.writer import pipeline_writer
from worker.settings import Settings
from worker.store import crypto, database
from worker.store.records import utcnow
from worker.store.store import Store

Role = Literal["serve", "api", "worker"]
Callback = Callable[[AbstractIncomingMessage], Awaitable[None]]

log = structlog.get_logger("sellfern_webhooks.runtime")

QUEUE_POLL_SECONDS = 15.0
PRUNE_INTERVAL_SECONDS = 3600.0
# Allocations (less deallocations) between collections of the youngest generation; 700 by
# default.
GC_YOUNG_THRESHOLD = 20_000


@dataclass
class Running:
    """What a started process exposes, for tests and for the shutdown sequence."""

    settings: Settings
    store: Store
    metrics: Metrics
    api_port: int | None = None
    metrics_port: int | None = None
    health: Health | None = None
    consumers: list[tuple[AbstractChannel, aio_pika.abc.AbstractQueue, str]] = field(
        default_factory=list
    )
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)

    def track(self, callback: Callback) -> Callback:
        """Wrap a consumer callback so shutdown can wait for the handlers under way."""

        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                self.in_flight.add(task)
            try:
                await callback(message)
            finally:
                if task is not None:
                    self.in_flight.discard(task)

        return tracked

    async def stop_consuming(self) -> None:
        for _channel, queue, tag in self.consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self.consumers.clear()

    async def drain(self, bound: float) -> int:
        """Wait for handlers under way, up to ``bound`` seconds; return how many were left."""
        if not self.in_flight:
            return 0
        _, pending = await asyncio.wait(set(self.in_flight), timeout=bound)
        for task in pending:
            # Cancelled handlers reject their messages back to the queue, to be redone.
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        return len(pending)


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
    deliverer: Deliverer,
    notifier: ChangeNotifier,
    health: Health,
) -> web.Application:
    app = web.Application(client_max_size=api.MAX_BODY_BYTES, middlewares=api.api_middlewares())
    app[SETTINGS] = settings
    app[STORE] = store
    app[METRICS] = metrics
    app[DELIVERER] = deliverer
    app[NOTIFIER] = notifier
    app[api.RATE_LIMITER] = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    api.add_routes(app)
    app.router.add_routes(health_routes(health, metrics))
    return app


async def _poll_queues(channel: AbstractChannel, topo: topology.Topology, metrics: Metrics) -> None:
    """Export queue depth and consumer counts; a dead consumer shows as 0 here."""
    while True:
        for name in topo.queue_names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except Exception as exc:
                log.debug("queue poll failed", queue=name, error=str(exc))
                continue
            result = queue.declaration_result
            metrics.queue_messages.labels(name).set(result.message_count or 0)
            metrics.queue_consumers.labels(name).set(result.consumer_count or 0)
        await asyncio.sleep(QUEUE_POLL_SECONDS)


async def _prune_periodically(store: Store, retention: timedelta) -> None:
    """Apply the retention setting: delete old events and attempts, once an hour."""
    while True:
        try:
            events, attempts = await store.prune(utcnow() - retention)
        except Exception as exc:
            log.warning("pruning failed; trying again in an hour", error=str(exc))
        else:
            if events or attempts:
                log.info("pruned old records", events=events, attempts=attempts)
        await asyncio.sleep(PRUNE_INTERVAL_SECONDS)


async def _background(stack: AsyncExitStack, coro: Awaitable[None], name: str) -> None:
    task = asyncio.ensure_future(coro)
    task.set_name(name)

    async def _cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    stack.push_async_callback(_cancel)


async def _start_worker(
    stack: AsyncExitStack,
    running: Running,
    connection: AbstractRobustConnection,
    deliverer_parts: tuple[Store, Sender, Publisher],
    topo: topology.Topology,
) -> None:
    settings, metrics = running.settings, running.metrics
    store, sender, publisher = deliverer_parts
    writer = await stack.enter_async_context(pipeline_writer(store, metrics))
    deliverer = Deliverer(store, sender, metrics, settings, publisher, writer)
    matcher = EndpointMatcher(store)
    parking = Parking(store, deliverer, metrics)
    fanout = FanOut(
        store, writer, publisher, deliverer, parking, matcher, metrics, settings.max_event_bytes
    )

    changes_channel = await connection.channel()
    stack.push_async_callback(changes_channel.close)
    # Server-named, exclusive and auto-deleted: each worker gets its own copy of every notice.
    changes = await changes_channel.declare_queue(exclusive=True, auto_delete=True)
    await changes.bind(topology.CHANGES_EXCHANGE)
    running.consumers.append((changes_channel, changes, await changes.consume(matcher.on_change)))

    events_channel = await connection.channel()
    stack.push_async_callback(events_channel.close)
    await events_channel.set_qos(prefetch_count=settings.delivery_concurrency)
    # declare_queue (passive), not get_queue: only a declared queue is registered with its
    # robust channel, which re-consumes it after a reconnect; a get_queue one stays silent.
    events_queue = await events_channel.declare_queue(topology.EVENTS_QUEUE, passive=True)
    running.consumers.append(
        (events_channel, events_queue, await events_queue.consume(running.track(fanout.on_message)))
    )

    # The prefetch of this channel is the global bound on concurrent deliveries.
    deliveries_channel = await connection.channel()
    stack.push_async_callback(deliveries_channel.close)
    await deliveries_channel.set_qos(prefetch_count=settings.delivery_concurrency)
    deliveries_queue = await deliveries_channel.declare_queue(
        topology.DELIVERIES_QUEUE, passive=True
    )
    running.consumers.append(
        (
            deliveries_channel,
            deliveries_queue,
            await deliveries_queue.consume(running.track(deliverer.on_message)),
        )
    )

    poll_channel = await connection.channel()
    stack.push_async_callback(poll_channel.close)
    await _background(stack, _poll_queues(poll_channel, topo, metrics), "queue-poll")
    await _background(stack, parking.run(), "parking")
    retention = timedelta(days=settings.retention_days)
    await _background(stack, _prune_periodically(store, retention), "prune")


def _settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the hot path.

    Everything built at start-up (modules, SQLAlchemy's and pydantic's structures) lives as
    long as the process: frozen, it is never scanned again. Deliveries allocate many
    short-lived objects, almost none in cycles; a larger first generation means fewer
    collections, each over young objects only.
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
) -> None:
    """Run one process until ``stop`` is set or SIGTERM/SIGINT arrives (if ``handle_signals``).

    ``box`` seals the signing secrets; the entry point builds it from ``settings`` (and so does
    this function when it is not given).
    """
    box = box or crypto.load_box(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        metrics = Metrics()
        engine = database.create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        await database.ensure_schema(engine, auto_migrate=settings.is_sqlite)
        store = Store(engine, box)
        running = Running(settings, store, metrics)

        connection = await aio_pika.connect_robust(
            settings.amqp_url, client_properties={"connection_name": f"sellfern-webhooks {role}"}
        )
        stack.push_async_callback(connection.close)
        publish_channel = await connection.channel(publisher_confirms=True)
        stack.push_async_callback(publish_channel.close)
        topo = await topology.declare(publish_channel, settings.retry_schedule)

        session = create_session(settings)
        stack.push_async_callback(session.close)
        sender = Sender(session, settings)
        publisher = Publisher(topo, metrics)
        health = await stack.enter_async_context(Health(store, connection))
        running.health = health

        if role in ("api", "serve"):
            app = build_api_app(
                settings,
                store,
                metrics,
                Deliverer(store, sender, metrics, settings),
                ChangeNotifier(topo),
                health,
            )
            running.api_port = await _start_site(stack, app, settings.api_host, settings.api_port)
        if role == "worker":
            health_app = web.Application()
            health_app.router.add_routes(health_routes(health, metrics))
            running.metrics_port = await _start_site(
                stack, health_app, settings.api_host, settings.metrics_port
            )
        if role in ("worker", "serve"):
            # Registered last, so it is closed first: consumers stop before anything they use.
            worker_stack = await stack.enter_async_context(AsyncExitStack())
            await _start_worker(worker_stack, running, connection, (store, sender, publisher), topo)

        _settle_garbage_collector()
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

        log.info(
            "stopping: no new messages; draining in-flight work", in_flight=len(running.in_flight)
        )
        await running.stop_consuming()
        left = await running.drain(settings.shutdown_drain_seconds)
        if left:
            log.warning(
                "drain bound reached; unfinished messages return to their queues", left=left
            )
    log.info("stopped")
