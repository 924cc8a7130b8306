"""Ordered endpoints: attempts start one at a time, oldest delivery first, across all workers.

Fan-out parks every delivery to an ordered endpoint (the scheduler answers PARK), in the same
transaction as its event, so the backlog and its order live in the database. One worker at a
time holds the endpoint's lease (:mod:`worker.store.ordered`) and runs its *lane*: it reads the
oldest parked deliveries, and for each in turn asks the scheduler for a start (so the
endpoint's rate limit holds), sends it, and decides:

- a success lets the next one go at once; its record is committed in the background, at most
  :data:`RECORD_AHEAD` behind, and always before the lane reads the backlog again;
- a failure with retries left stays at the head, parked with its next time, and holds every
  later delivery (not attempted) until it succeeds or fails for good;
- a failure for good is recorded ``failed`` (and dead-lettered as ``exhausted``); the next goes.

A paused, deleted or no longer ordered endpoint ends its lane; its parked deliveries keep their
order for when it resumes. The lane reads its endpoint for each batch of heads and again after
any change notice (see :class:`~worker.pipeline.policies.EndpointPolicies`), so a PATCH shows
from the next attempt after its notice arrives.

A recovery parks its deliveries again with their original times, so it replays them in order
too. When the lane's worker dies, its lease goes with its database connection, and another
worker's lane resumes at the first delivery not recorded: nothing is lost or reordered, and at
most the attempts in flight or not yet recorded are sent again.

The order is the publisher's: the events' ``occurred_at``, then the order the workers stored
them (:meth:`~worker.store.ordered.OrderedBacklog.heads`). A delivery is sent only once it has
been stored for :data:`SETTLE_SECONDS`, so that an event a slower worker took a moment later
from the queue, or whose transaction is still committing, is not overtaken.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from datetime import timedelta

import structlog

from worker.ops.tracing import Tracing
from worker.pipeline.attempts import AttemptEffects, build_attempt
from worker.pipeline.offers import Route, Source
from worker.pipeline.outcome import Verdict, decide
from worker.pipeline.policies import EndpointPolicies
from worker.pipeline.publisher import Publisher
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.sender import Sender
from worker.pipeline.tasks import encode_task
from worker.pipeline.writer import BatchWriter, PipelineRecord
from worker.store import Store
from worker.store.ordered import Head, Leases
from worker.store.records import AttemptRecord, DeliveryState, Webhook, utcnow

log = structlog.get_logger("sellfern_webhooks.ordered")

SETTLE_SECONDS = 1.0
HEADS = 50  # parked deliveries read at a time
SCAN_SECONDS = 1.0  # how often ordered endpoints without a lane anywhere are looked for
IDLE_POLL_SECONDS = 0.1
IDLE_SECONDS = 10.0  # a lane with nothing to send for this long lets its lease go
RECORD_AHEAD = 32
LONGEST_NAP = 1.0  # a waiting lane looks again this often: a PATCH or a pause may change things


class OrderedLanes:
    """Takes the lease of each ordered endpoint it can and runs its lane."""

    def __init__(
        self, store: Store, scheduler: Scheduler, policies: EndpointPolicies, sender: Sender,
        writer: BatchWriter[PipelineRecord], publisher: Publisher, effects: AttemptEffects,
        retry: tuple[tuple[float, ...], float], tracing: Tracing,
    ) -> None:  # fmt: skip
        self._store = store
        self._policies = policies
        self._leases = store.ordered.leases()
        self._lane_parts = (store, scheduler, sender, writer, publisher, effects, retry, tracing)
        self._lanes: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Look for ordered endpoints to serve until cancelled; then end every lane."""
        try:
            while True:
                try:
                    await self._scan()
                except Exception as exc:
                    log.warning("looking for ordered endpoints failed", error=str(exc))
                await asyncio.sleep(SCAN_SECONDS)
        finally:
            for lane in self._lanes.values():
                lane.cancel()
            await asyncio.gather(*self._lanes.values(), return_exceptions=True)
            await self._leases.close()

    async def _scan(self) -> None:
        for webhook_id in self._policies.ordered_ids():
            if webhook_id not in self._lanes and await self._leases.acquire(webhook_id):
                self._lanes[webhook_id] = asyncio.create_task(self._serve(webhook_id))

    async def _serve(self, webhook_id: str) -> None:
        try:
            lane = Lane(webhook_id, self._policies, *self._lane_parts)
            await lane.run(self._leases)
        except Exception as exc:
            log.warning("ordered lane stopped", webhook_id=webhook_id, error=str(exc))
        finally:
            self._lanes.pop(webhook_id, None)
            await self._leases.release(webhook_id)


class Lane:
    """One ordered endpoint's deliveries, one at a time, while this worker holds its lease."""

    def __init__(
        self, webhook_id: str, policies: EndpointPolicies, store: Store, scheduler: Scheduler,
        sender: Sender, writer: BatchWriter[PipelineRecord], publisher: Publisher,
        effects: AttemptEffects, retry: tuple[tuple[float, ...], float], tracing: Tracing,
    ) -> None:  # fmt: skip
        self._webhook_id = webhook_id
        self._policies = policies
        self._store = store
        self._scheduler = scheduler
        self._sender = sender
        self._writer = writer
        self._publisher = publisher
        self._effects = effects
        self._schedule, self._jitter = retry
        self._tracing = tracing
        # Records of successful attempts still committing, oldest first.
        self._recording: collections.deque[asyncio.Future[None]] = collections.deque()
        # The endpoint as read at the start of a batch of heads, and the change notices seen
        # then: a PATCH or DELETE since makes the next attempt read it again.
        self._webhook: Webhook | None = None
        self._read_at_generation = -1

    async def run(self, leases: Leases) -> None:
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        try:
            while leases.holds(self._webhook_id) and self._policies.ordered(self._webhook_id):
                stored_before = utcnow() - timedelta(seconds=SETTLE_SECONDS)
                heads = await self._store.ordered.heads(self._webhook_id, stored_before, HEADS)
                if not heads:
                    if loop.time() - idle_since >= IDLE_SECONDS:
                        return
                    await asyncio.sleep(IDLE_POLL_SECONDS)
                    continue
                idle_since = loop.time()
                self._webhook = None  # read again for every batch
                if not await self._send_in_turn(heads, leases):
                    return
                await self._recorded()  # before the backlog is read again
        finally:
            await self._recorded()

    async def _send_in_turn(self, heads: list[Head], leases: Leases) -> bool:
        """Send ``heads`` in order until one must wait; False once the lane should end."""
        for head in heads:
            if head.next_attempt_at is not None and head.next_attempt_at > utcnow():
                wait = (head.next_attempt_at - utcnow()).total_seconds()
                await self._recorded()
                await asyncio.sleep(min(wait, LONGEST_NAP))
                return True
            webhook = await self._endpoint()
            # Confirmed before each attempt: a lease whose connection was lost unnoticed may
            # already be another worker's, whose lane would run beside this one.
            if webhook is None or not webhook.enabled or not await leases.confirm(webhook.id):
                return False
            decision = await self._scheduler.admit(self._webhook_id, Source.LANE)
            if decision.route is not Route.START:  # at its rate limit: its turn comes later
                await self._recorded()
                await asyncio.sleep(min(decision.delay, LONGEST_NAP))
                return True
            if not await self._attempt(webhook, head, decision.ticket):
                return True  # a retry holds the line: read the backlog again when it is due
        return True

    async def _attempt(self, webhook: Webhook, head: Head, ticket: int) -> bool:
        """One attempt of the head; True if the next delivery may go now."""
        number = head.attempts + 1
        with self._tracing.attempt(head.event, webhook.id, number, None) as span:
            try:
                sent = await self._sender.send_to(webhook, head.event, span.headers)
            finally:
                self._scheduler.finished(webhook.id, ticket)
            now = utcnow()
            verdict = decide(
                sent.response, number, self._schedule, now,
                self._jitter, random.random(),  # noqa: S311 - spreading load, not secrecy
            )  # fmt: skip
            span.finished(verdict.verdict.value, sent.response.status)
        attempt = build_attempt(webhook, head.event, number, sent, verdict)
        next_at = now + timedelta(seconds=verdict.next_delay) if verdict.next_delay else None
        # A retry stays parked at the head of the line, with its next time.
        state: DeliveryState = "failed"
        if verdict.verdict is Verdict.SUCCEEDED:
            state = "succeeded"
        elif verdict.verdict is Verdict.RETRY:
            state = "parked"
        self._recording.append(self._writer.submit(AttemptRecord(attempt, state, next_at)))
        go_on = verdict.verdict is Verdict.SUCCEEDED
        if not go_on or len(self._recording) > RECORD_AHEAD:
            await self._recorded(keep=0 if not go_on else RECORD_AHEAD)
        if verdict.verdict in (Verdict.FAILED, Verdict.GONE):
            body = encode_task(head.event_id, webhook.id, number, _event_bytes(head))
            await self._publisher.dead_letter(body, "exhausted", verdict.error_message or "")
            go_on = verdict.verdict is Verdict.FAILED
        await self._effects.after(webhook, head.event, attempt, verdict, now)
        return go_on

    async def _endpoint(self) -> Webhook | None:
        if self._webhook is None or self._read_at_generation != self._policies.generation:
            self._read_at_generation = self._policies.generation
            self._webhook = await self._store.endpoints.get(self._webhook_id)
        return self._webhook

    async def _recorded(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` records are still committing."""
        while len(self._recording) > keep:
            await self._recording.popleft()


def _event_bytes(head: Head) -> bytes:
    return json.dumps(head.event, separators=(",", ":")).encode()
