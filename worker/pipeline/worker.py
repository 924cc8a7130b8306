"""The worker half of a process: its consumers, the pipeline behind them, its background loops.

It is built complete by :meth:`PipelineWorker.start` and stopped by :meth:`PipelineWorker.stop`
in an order that loses nothing:

1. stop consuming, so no new message is taken, and stop leasing parked deliveries;
2. drain the handlers under way (the parked backlog's feeders among them), up to a bound kept
   below Kubernetes' ``terminationGracePeriodSeconds`` (a handler cancelled then rejects its
   message back to its queue, to be redone), and hand back the parked deliveries leased but
   not started;
3. stop the background loops (parked sweeper, recoveries, pruning, queue poll, scheduler
   review);
4. flush the batch writer, so every attempt handled is committed;
5. close the consumers' channels, once every message on them is settled and its ack written.

The broker connection, the publish channel, the HTTP session and the database engine belong
to the process (:mod:`worker.runtime`) and are closed after this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from worker.ops.metrics import Metrics
from worker.ops.tracing import Tracing
from worker.pipeline import topology
from worker.pipeline.attempts import AttemptEffects, AttemptRunner
from worker.pipeline.consuming import Delivered, DeliveredCallback, consume_directly
from worker.pipeline.deliveries import DeliveriesConsumer
from worker.pipeline.fanout import FanOut
from worker.pipeline.matcher import EndpointMatcher
from worker.pipeline.ordered import OrderedLanes
from worker.pipeline.parking import ParkingSweeper
from worker.pipeline.policies import EndpointPolicies
from worker.pipeline.publisher import Publisher, TaskQueue
from worker.pipeline.recovery import RecoveryRunner
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.sender import Sender
from worker.pipeline.settle import Settler
from worker.pipeline.writer import pipeline_writer
from worker.settings import Settings
from worker.store import Store
from worker.store.records import utcnow

log = structlog.get_logger("sellfern_webhooks.worker")

QUEUE_POLL_SECONDS = 15.0
PRUNE_INTERVAL_SECONDS = 3600.0
# How often the scheduler looks at its waiting lines: a hanging endpoint shows only through
# time passing, and what waits for it is sent on within this much of its turning slow.
REVIEW_SECONDS = 0.05
# How often the share of each rate limit is recomputed: a worker that joins or dies changes
# the others' shares within this long.
WORKER_COUNT_SECONDS = 5.0


async def _queue_counts(channel: AbstractChannel, name: str) -> tuple[int, int]:
    """The queue's (messages, consumers), asked of the broker now.

    Not through ``declare_queue(passive=True)``: a robust channel answers that, for a name it
    has declared before, with the queue object of the first time, without asking the broker,
    so every poll would see the counts of the first.
    """
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(name, passive=True)
    return declared.message_count or 0, declared.consumer_count or 0


class PipelineWorker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        connection: AbstractRobustConnection,
        topo: topology.Topology,
        sender: Sender,
        publisher: Publisher,
        effects: AttemptEffects,
        tracing: Tracing,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._connection = connection
        self._topology = topo
        self._sender = sender
        self._publisher = publisher
        self._effects = effects
        self._tracing = tracing
        self.policies = EndpointPolicies(store)
        self.scheduler = Scheduler(
            cap=settings.endpoint_concurrency,
            global_cap=settings.delivery_concurrency,
            defer_tiers=topology.DEFER_TIERS,
            rate_limits=self.policies.rate_limit,
            ordered=self.policies.ordered,
        )
        self._writer = pipeline_writer(store, metrics)
        self._channels: list[AbstractChannel] = []
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._background: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopped = False
        self._changes_queue = ""  # the server's name of this worker's change-notice queue
        self._sweeper: ParkingSweeper | None = None
        self._settlers: tuple[Settler, ...] = ()

    @property
    def handling(self) -> int:
        """Messages being handled now."""
        return len(self._handlers)

    async def start(self) -> None:
        settings, store, metrics = self._settings, self._store, self._metrics
        await self.policies.refresh()
        await self._writer.__aenter__()
        scheduler = self.scheduler
        tasks = TaskQueue(self._publisher, scheduler)
        runner = AttemptRunner(
            store, self._sender, scheduler, self._publisher, self._writer, self._effects,
            metrics, settings.retry_schedule, settings.retry_jitter, self._tracing,
        )  # fmt: skip
        matcher = EndpointMatcher(store, self.policies)
        fanout_settler, delivery_settler = (
            Settler(store.ping, "fan-out"),
            Settler(store.ping, "delivery"),
        )
        self._settlers = (fanout_settler, delivery_settler)
        fanout = FanOut(
            self._writer, self._publisher, scheduler, runner, tasks, matcher, fanout_settler,
            metrics, settings.max_event_bytes, self._tracing, store.events,
        )  # fmt: skip
        deliveries = DeliveriesConsumer(
            scheduler, runner, self._publisher, delivery_settler, metrics, self._tracing,
            store.parked,
        )  # fmt: skip
        sweeper = ParkingSweeper(
            store, scheduler, runner, metrics, cap=settings.endpoint_concurrency,
            global_cap=settings.delivery_concurrency, delivery_timeout=settings.delivery_timeout,
            spawn=self._handle,
        )  # fmt: skip
        self._sweeper = sweeper
        lanes = OrderedLanes(
            store, scheduler, self.policies, self._sender, self._writer, self._publisher,
            self._effects, (settings.retry_schedule, settings.retry_jitter), self._tracing,
        )  # fmt: skip

        changes_channel = await self._channel()
        policies = self.policies

        async def on_change(message: AbstractIncomingMessage) -> None:
            await matcher.on_change(message)
            policies.changed()

        async def listen_for_changes() -> None:
            # Server-named, exclusive and auto-deleted: each worker gets its own copy of every
            # notice. Declared afresh after each reconnect rather than restored by the robust
            # channel under its old name: on a cluster, that name stays locked while the node
            # that held it is down.
            queue = await changes_channel.declare_queue(
                "", exclusive=True, auto_delete=True, robust=False
            )
            await queue.bind(topology.CHANGES_EXCHANGE, robust=False)
            tag = await queue.consume(on_change, robust=False)
            self._consumers = [c for c in self._consumers if c[0].name != self._changes_queue]
            self._changes_queue = queue.name
            self._consumers.append((queue, tag))

        async def reconnected(_connection: object) -> None:
            # Notices sent while this worker was away are lost with its old queue.
            matcher.forget_all()
            policies.changed()
            if not self._stopped:
                await listen_for_changes()

        await listen_for_changes()
        self._connection.reconnect_callbacks.add(reconnected)
        # The prefetch of these channels bounds what the worker holds unacked, and so what may
        # wait in the scheduler's lines.
        await self._consume(topology.EVENTS_QUEUE, fanout.on_message)
        await self._consume(topology.DELIVERIES_QUEUE, deliveries.on_message)

        poll_channel = await self._channel()
        retention = timedelta(days=settings.retention_days)
        self._spawn(self._poll_queues(poll_channel), "queue-poll")
        self._spawn(self._count_workers(await self._channel()), "worker-count")
        self._spawn(policies.run(), "policies")
        self._spawn(lanes.run(), "ordered-lanes")
        self._spawn(sweeper.run(), "parking")
        self._spawn(RecoveryRunner(store, scheduler, metrics).run(), "recovery")
        self._spawn(self._prune_periodically(retention), "prune")
        self._spawn(self._review(), "scheduler-review")

    async def stop(self, drain_bound: float) -> int:
        """Stop in the order of the module's docstring; return how many handlers were cut."""
        if self._stopped:
            return 0
        self._stopped = True
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        if self._sweeper is not None:
            self._sweeper.stop()
        left = await self._drain(drain_bound)
        if self._sweeper is not None:
            with contextlib.suppress(Exception):
                await self._sweeper.hand_back()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._writer.__aexit__(None, None, None)
        await asyncio.gather(*(settler.flushed() for settler in self._settlers))
        for channel in reversed(self._channels):
            with contextlib.suppress(Exception):
                await channel.close()
        return left

    async def _drain(self, bound: float) -> int:
        if not self._handlers:
            return 0
        _, pending = await asyncio.wait(set(self._handlers), timeout=bound)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        return len(pending)

    async def _channel(self) -> AbstractRobustChannel:
        channel = await self._connection.channel()
        self._channels.append(channel)
        return channel

    async def _consume(self, queue_name: str, callback: DeliveredCallback) -> None:
        channel = await self._channel()
        await channel.set_qos(prefetch_count=self._settings.delivery_concurrency)
        self._consumers.append(await consume_directly(channel, queue_name, self._tracked(callback)))

    def _tracked(self, callback: DeliveredCallback) -> DeliveredCallback:
        """Wrap a consumer callback so that stop() can wait for the handlers under way."""

        async def tracked(message: Delivered) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._handlers.add(task)
            try:
                await callback(message)
            finally:
                if task is not None:
                    self._handlers.discard(task)

        return tracked

    def _handle(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a handler, like a consumer's: stop() waits for it."""
        task = asyncio.create_task(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._background.append(asyncio.create_task(coro, name=name))

    async def _review(self) -> None:
        while True:
            self.scheduler.review()
            await asyncio.sleep(REVIEW_SECONDS)

    async def _count_workers(self, channel: AbstractChannel) -> None:
        """Tell the scheduler how many workers share the rate limits: the consumers of
        ``webhooks.deliveries``, one per worker, as the broker counts them."""
        while True:
            try:
                _, consumers = await _queue_counts(channel, topology.DELIVERIES_QUEUE)
                self.scheduler.set_workers(consumers or 1)
            except Exception as exc:
                log.debug("counting workers failed", error=str(exc))
            await asyncio.sleep(WORKER_COUNT_SECONDS)

    async def _poll_queues(self, channel: AbstractChannel) -> None:
        """Export queue depth and consumer counts; a dead consumer shows as 0 here."""
        while True:
            for name in self._topology.queue_names:
                try:
                    messages, consumers = await _queue_counts(channel, name)
                except Exception as exc:
                    log.debug("queue poll failed", queue=name, error=str(exc))
                    continue
                self._metrics.queue_messages.labels(name).set(messages)
                self._metrics.queue_consumers.labels(name).set(consumers)
            await asyncio.sleep(QUEUE_POLL_SECONDS)

    async def _prune_periodically(self, retention: timedelta) -> None:
        """Apply the retention setting: delete old events and attempts, once an hour."""
        while True:
            try:
                events, attempts = await self._store.events.prune(utcnow() - retention)
            except Exception as exc:
                log.warning("pruning failed; trying again in an hour", error=str(exc))
            else:
                if events or attempts:
                    log.info("pruned old records", events=events, attempts=attempts)
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
