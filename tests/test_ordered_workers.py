"""Fault injection: an ordered endpoint served by three worker processes keeps its order through
a failing head and a kill -9 of the worker holding its lease, and loses nothing.

Three workers (``python -m worker.cli worker``) share the session's PostgreSQL database and
virtual host. Events for one ordered endpoint are published one after the other, each
confirmed, while they run; the receiver answers 500 to the first two attempts of an event in
the middle. A quarter of the way in, while the receiver holds one request open, the worker
that sent it — the one holding the endpoint's lease — is killed with SIGKILL and not
restarted: its advisory lock goes with its database connection and one of the other two takes
the lane over. At the end the receiver's requests are checked event by event
against the service's order (the events' ``occurred_at``, then the order they were stored)
and the publish order. It prints one line:

    chaos ordered_workers: … published=… delivered=… lost=… duplicates=… unrecorded_at_kill=…
    bound=… kill_at=…s resumed_after=…s requests=… most_open=…

A lane commits its successes in the background at most ``RECORD_AHEAD`` behind, so what the
killed worker had sent but not recorded — those records and the attempt in flight — is sent
again by the next holder: that, and no more, bounds the duplicates.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest
import sqlalchemy as sa
import standardwebhooks
from aiohttp import web

from schemas.publish import publish_event
from tests.chaos_support import SCALE, WorkerProcess, scaled, worker_env
from tests.conftest import TEST_SECRET_KEY, Figures, Receiver, eventually
from worker.pipeline.ordered import RECORD_AHEAD
from worker.store import Store
from worker.store.ordered import LEASE_CLASS
from worker.store.tables import attempts, deliveries, events

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120 * SCALE)]

WORKERS = 3
EVENTS = scaled(400)
FAILING = EVENTS // 2  # the index of the event whose first two attempts are answered 500
FAILURES = 2
PUBLISH_SECONDS = 16.0 * SCALE  # the publishing pace: moderate, and long enough to kill in
KILL_AT = EVENTS // 4  # the event whose request is in flight at the kill: before the head
SCHEDULE = "0.5,0.5,0.5"
# What a killed lane can have sent without recording it: the successes still committing in
# the background, and the attempt in flight.
DUPLICATE_BOUND = RECORD_AHEAD + 1
TAKEOVER_SECONDS = 10.0  # the lease's release, a lane scan, the settle time, and margin


@dataclass
class Request:
    event_id: str
    index: int
    status: int
    arrived: float  # monotonic, when the answer was decided


@dataclass
class OrderedReceiver:
    """A receiver path that records each request — its event, the status it answered — in
    arrival order, and how many requests were open at once (counted as each one opens).

    The first request for event ``hold`` is held open until :attr:`release` is set: the test
    kills the worker that sent it meanwhile, so that the kill finds an attempt in flight.
    """

    secret: str = ""
    fail: dict[int, int] = field(default_factory=dict)  # event index -> 500s to answer
    hold: int = -1
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[Request] = field(default_factory=list)
    bad_signatures: int = 0
    open: int = 0
    most_open: int = 0

    async def serve(self, request: web.Request, _seen: int) -> web.StreamResponse:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            body = await request.read()
            try:
                standardwebhooks.Webhook(self.secret).verify(body, dict(request.headers))
            except Exception:  # any failure to verify is counted and refused
                self.bad_signatures += 1
                return web.Response(status=400, text="bad signature")
            payload = json.loads(body)
            index = int(payload["data"]["i"])
            tried = sum(1 for r in self.requests if r.index == index)
            if index == self.hold and not self.holding.is_set():
                self.holding.set()
                await self.release.wait()
            else:
                # Long enough for a second request to overlap this one, if one was sent.
                await asyncio.sleep(0.003)
            status = 500 if tried < self.fail.get(index, 0) else 200
            self.requests.append(Request(payload["id"], index, status, time.monotonic()))
            return web.Response(status=status, text="ok" if status == 200 else "again")
        finally:
            self.open -= 1

    def first_successes(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.requests:
            if r.status == 200:
                seen.setdefault(r.event_id)
        return list(seen)

    def successes(self) -> Counter[str]:
        return Counter(r.event_id for r in self.requests if r.status == 200)


@dataclass(frozen=True)
class Kill:
    """The kill of the lease holder, as the test saw it."""

    at: float  # monotonic
    wall: datetime
    received: int  # requests the receiver had answered, the held one included
    successes: int  # of which 200s
    resumed_after: float  # seconds from the kill to the next holder's first request


@pytest.fixture
async def workers(
    postgres_url: str, amqp_url: str, ca_bundle: str, tmp_path: Path
) -> AsyncIterator[list[WorkerProcess]]:
    """Three worker processes on the session's database and vhost, not started yet."""
    env = worker_env(
        postgres_url, amqp_url, ca_bundle, secret_keys=TEST_SECRET_KEY, retry_schedule=SCHEDULE
    )
    processes = []
    for n in range(WORKERS):
        log_dir = tmp_path / f"worker-{n}"
        log_dir.mkdir()
        processes.append(WorkerProcess(dict(env), log_dir))
    yield processes
    for process in processes:
        await process.close()


def _last_attempt_logged(worker: WorkerProcess, webhook_id: str) -> str:
    """The time of the last "delivery attempt" line of ``worker``'s JSON log for the endpoint
    (ISO 8601 in UTC, so that times compare as strings), or "" if it has none."""
    last = ""
    for path in worker.log_dir.glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if webhook_id not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if entry.get("event") == "delivery attempt" and entry.get("webhook_id") == webhook_id:
                last = max(last, str(entry["timestamp"]))
    return last


async def _lease_holder(store: Store, webhook_id: str) -> int | None:
    """The backend pid holding the endpoint's advisory lock, or None."""
    # A two-key advisory lock shows its keys as classid and objid (an oid: hashtext's int4
    # taken unsigned), with objsubid 2.
    query = sa.text(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = :class AND objsubid = 2"
        " AND objid::bigint = (hashtext(:id)::bigint + 4294967296) % 4294967296"
    )
    async with store.engine.connect() as connection:
        pids = [
            row.pid
            for row in await connection.execute(query, {"class": LEASE_CLASS, "id": webhook_id})
        ]
    assert len(pids) <= 1, f"the lease is held by {pids}"
    return pids[0] if pids else None


async def _stored_order(store: Store, webhook_id: str) -> list[tuple[str, str]]:
    """The endpoint's deliveries in the service's order, (event id, state): by the events'
    ``occurred_at``, then by when they were stored (worker.store.ordered.OrderedBacklog)."""
    query = (
        sa.select(deliveries.c.event_id, deliveries.c.state)
        .join(events, events.c.id == deliveries.c.event_id)
        .where(deliveries.c.webhook_id == webhook_id)
        .order_by(events.c.occurred_at, deliveries.c.created_at, deliveries.c.event_id)
    )
    async with store.engine.connect() as connection:
        return [(row.event_id, row.state) for row in await connection.execute(query)]


async def _successes_recorded_before(store: Store, webhook_id: str, moment: datetime) -> int:
    query = sa.select(sa.func.count()).where(
        attempts.c.webhook_id == webhook_id, attempts.c.success, attempts.c.created_at < moment
    )
    async with store.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


async def _kill_lease_holder(
    store: Store,
    webhook_id: str,
    workers: list[WorkerProcess],
    receiver: Receiver,
    line: OrderedReceiver,
) -> Kill:
    """While the held request is open, SIGKILL the worker that sent it; then let the request
    answer 200 (to nobody) and wait until another worker holds the lease and sends again."""
    await asyncio.wait_for(line.holding.wait(), 60 * SCALE)
    # The holder logged the attempt before the held one; only it attempts to the endpoint.
    last = [_last_attempt_logged(w, webhook_id) for w in workers]
    assert max(last), "no worker logged an attempt to the ordered endpoint"
    victim = workers[last.index(max(last))]
    lock_pid = await _lease_holder(store, webhook_id)
    assert lock_pid is not None, "no worker holds the ordered endpoint's lease"
    await victim.kill()
    at, wall = time.monotonic(), datetime.now(UTC)
    # The killed worker's connection is gone: the held request's 200 reaches nobody, as a
    # receiver's answer does when its client dies after the receiver acted on the request.
    line.release.set()
    await receiver.wait_for(lambda _: any(r.index == line.hold for r in line.requests), 5)
    received, successes = len(line.requests), sum(line.successes().values())

    async def taken_over() -> bool:
        pid = await _lease_holder(store, webhook_id)
        return pid is not None and pid != lock_pid

    # The lock went with the killed worker's connection, and another worker took it (had the
    # kill missed the holder, the lock would stay where it was).
    await eventually(taken_over, timeout=TAKEOVER_SECONDS, what="the lease taken over")
    await receiver.wait_for(lambda _: len(line.requests) > received, TAKEOVER_SECONDS)
    resumed_after = line.requests[received].arrived - at
    assert not victim.running
    return Kill(at, wall, received, successes, resumed_after)


def _check_order(line: OrderedReceiver, stored: list[str], failing: str) -> None:
    """The receiver's requests, event by event, against the service's order ``stored``."""
    # The first success of each event is in the service's order.
    assert line.first_successes() == stored
    position = {event_id: n for n, event_id in enumerate(stored)}
    # The failing head was tried until it succeeded, and held every later event meanwhile.
    tries = [(n, r.status) for n, r in enumerate(line.requests) if r.event_id == failing]
    assert [status for _, status in tries] == [500] * FAILURES + [200]
    success_at = tries[-1][0]
    assert all(position[r.event_id] <= position[failing] for r in line.requests[:success_at]), (
        "an event after the failing head was sent before the head succeeded"
    )
    assert all(position[r.event_id] > position[failing] for r in line.requests[success_at + 1 :])
    # One lane at a time: the requests go forward in the stored order, one event at a time,
    # and go back at most once, when the next holder resumes at the first delivery the killed
    # one had not recorded.
    steps = [position[b.event_id] - position[a.event_id]
             for a, b in itertools.pairwise(line.requests)]  # fmt: skip
    backwards = [step for step in steps if step < 0]
    assert len(backwards) <= 1, f"the order went back {len(backwards)} times: {backwards}"
    assert all(step <= 1 for step in steps), "a delivery was skipped and sent later"


async def test_ordered_lane_survives_kill_9_across_three_workers(
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    pg_store: Store,
    org: str,
    workers: list[WorkerProcess],
    figures: Figures,
) -> None:
    line = OrderedReceiver(fail={FAILING: FAILURES}, hold=KILL_AT)
    # Created before the workers start, so that each loads it as ordered at start-up.
    webhook = await pg_store.endpoints.create(
        org, receiver.url("/ordered"), ["order.created"], "ordered chaos", enabled=True,
        ordered=True,
    )  # fmt: skip
    assert webhook.ordered
    line.secret = webhook.secret
    receiver.behaviours["/ordered"] = line.serve
    for worker in workers:
        await worker.start()
    for worker in workers:
        await eventually(worker.started, timeout=30, what="worker started")

    published: list[str] = []

    async def publish() -> None:
        """One after the other, each confirmed before the next is sent, at a steady pace."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(EVENTS):
            # Pacing the load, not synchronising with anything.
            await asyncio.sleep(max(0.0, start + i * PUBLISH_SECONDS / EVENTS - loop.time()))
            envelope = await publish_event(broker, "order.created", org, {"i": i}, timeout=10)
            published.append(envelope.id)

    load = asyncio.create_task(publish())
    started = time.monotonic()
    try:
        kill = await _kill_lease_holder(pg_store, webhook.id, workers, receiver, line)
        assert not load.done(), "the load ended before the kill"
        await load

        async def all_recorded() -> bool:
            states = Counter(s for _, s in await _stored_order(pg_store, webhook.id))
            return len(line.first_successes()) == EVENTS and states == {"succeeded": EVENTS}

        await eventually(all_recorded, timeout=60 * SCALE, what="every event delivered, recorded")
    finally:
        load.cancel()
        for worker in workers:
            if worker.running:
                code, _ = await worker.terminate()
                assert code == 0, worker.tail()

    stored = [event_id for event_id, _ in await _stored_order(pg_store, webhook.id)]
    received = line.successes()
    duplicates = sum(n - 1 for n in received.values())
    # Sent by the killed worker and answered 200, but not recorded: what may be sent again.
    unrecorded = kill.successes - await _successes_recorded_before(pg_store, webhook.id, kill.wall)
    figures(
        f"chaos ordered_workers: scale={SCALE} workers={WORKERS} published={len(published)} "
        f"delivered={len(received)} lost={len(set(published) - set(received))} "
        f"duplicates={duplicates} unrecorded_at_kill={unrecorded} bound={DUPLICATE_BOUND} "
        f"kill_at={kill.at - started:.1f}s resumed_after={kill.resumed_after:.1f}s "
        f"requests={len(line.requests)} most_open={line.most_open}"
    )

    assert line.bad_signatures == 0
    assert line.most_open == 1, "two requests to the ordered endpoint were open at once"
    assert sorted(stored) == sorted(published), "the stored deliveries are not the published"
    assert not set(published) - set(received), "an event was never delivered"
    _check_order(line, stored, published[FAILING])
    # What was sent again is what the killed lane had not recorded — the held attempt at
    # least — within the lane's bound; and nothing was sent a third time.
    assert received[published[KILL_AT]] == 2, "the attempt in flight at the kill was not resent"
    assert 1 <= unrecorded <= DUPLICATE_BOUND
    assert 1 <= duplicates <= unrecorded
    assert max(received.values()) == 2
    assert kill.resumed_after < TAKEOVER_SECONDS
    # Last, so that the lane's own checks above speak first: the service's order, for
    # confirmed publishes one after the other, is the publish order.
    index = {event_id: i for i, event_id in enumerate(published)}
    swapped = [(index[a], index[b]) for a, b in itertools.pairwise(stored) if index[a] > index[b]]
    assert stored == published, f"stored out of publish order (publish indexes): {swapped}"
