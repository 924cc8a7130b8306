"""Tools for the fault-injection suite (``tests/test_chaos.py``).

- :class:`Ledger` keeps what a scenario published and confirmed, which endpoints each event
  must reach, and what the receiver answered 2xx to a validly signed request; at the end it
  tallies every (event, endpoint) pair as delivered, recorded failed or lost, and counts
  duplicates.
- :class:`WorkerProcess` runs ``python -m worker.cli worker`` as a child process that can be
  killed with SIGKILL or stopped with SIGTERM.
- :class:`TcpProxy` stands between the worker and PostgreSQL and can cut every connection.
- :func:`publish_load` publishes a paced stream of events with publisher confirms.
- :func:`close_vhost_connections`, :func:`terminate_backends` and :func:`rss_mb` serve the
  soak (``tests/test_soak.py``): broker and database faults confined to the run's own
  vhost and database, and a process's resident memory.

``CHAOS_SCALE`` (default 1) multiplies event counts, load durations and the number of faults,
for manual soak runs; ``CHAOS_SEED`` replays one run's random choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
import standardwebhooks
from aio_pika.abc import AbstractConnection
from aiohttp import web

from schemas.events import new_event_id
from schemas.publish import PublishError, publish_event
from tests.conftest import PG_ADMIN_DSN, Receiver
from worker.pipeline import topology
from worker.pipeline.outcome import jitter_tiers
from worker.settings import Settings
from worker.store import Store
from worker.store.tables import deliveries

SCALE = max(1, int(os.environ.get("CHAOS_SCALE", "1")))
# The workers' RETRY_JITTER: the chaos suite leaves it at its default.
DEFAULT_JITTER = Settings.model_fields["retry_jitter"].default
# After a kill -9, for the requests the worker had written to arrive at the receiver.
IN_THE_SOCKETS_SECONDS = 0.3
# How often a settle check may query the database; the receiver side is checked every time.
STATE_POLL_SECONDS = 0.25
# Below this many open pairs a settle check reads only their rows, not every delivery.
FEW_OPEN_PAIRS = 2000

Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


def seed() -> int:
    """``CHAOS_SEED`` if set, else a fresh random seed (printed by the tests, to replay)."""
    value = os.environ.get("CHAOS_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


def scaled(value: int) -> int:
    return value * SCALE


async def _ok(_request: web.Request, _n: int) -> web.StreamResponse:
    return web.Response(text="ok")


# --- what was sent, what arrived ------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    org: str
    path: str
    webhook_id: str
    secret: str
    events: frozenset[str]


@dataclass(frozen=True)
class Tally:
    name: str
    seed: int
    published: int
    confirmed: int
    pairs: int
    delivered: int
    failed: int
    lost: int
    duplicates: int
    unstored: int
    lost_examples: tuple[str, ...]

    @property
    def duplicate_ratio(self) -> float:
        return self.duplicates / self.pairs if self.pairs else 0.0

    def line(self) -> str:
        return (
            f"chaos {self.name}: seed={self.seed} scale={SCALE} published={self.published} "
            f"confirmed={self.confirmed} pairs={self.pairs} delivered={self.delivered} "
            f"recorded-failed={self.failed} lost={self.lost} duplicates={self.duplicates} "
            f"({self.duplicate_ratio:.2%})"
        )


@dataclass
class Ledger:
    """Published and confirmed events, their endpoints, and what the receiver accepted.

    A pair is *delivered* when the receiver answered 2xx to a request for it whose Standard
    Webhooks signature verified; every further 2xx answer to the same pair is a *duplicate*.
    """

    name: str
    seed: int
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    published: int = 0
    confirmed: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (org, type)
    publish_errors: list[str] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    accepted: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent_at: dict[str, float] = field(default_factory=dict)  # event id -> publish started
    accepted_at: dict[tuple[str, str], float] = field(default_factory=dict)  # the first 2xx
    bad_signatures: int = 0
    _states: dict[tuple[str, str], str] = field(default_factory=dict)
    _states_read_at: float = 0.0
    # Settle checks: the pairs not yet settled, and what they were computed from (events
    # confirmed, endpoints) so that a pair added since is not missed.
    _open: list[tuple[str, Endpoint]] = field(default_factory=list)
    _open_from: tuple[int, int] = (0, 0)

    async def add_endpoint(
        self,
        store: Store,
        receiver: Receiver,
        org: str,
        path: str,
        events: Sequence[str],
        behaviour: Behaviour | None = None,
    ) -> Endpoint:
        """Register an endpoint at ``receiver.url(path)`` and serve it with ``behaviour``.

        ``behaviour`` gets the request and how many requests for the same event this path
        had before (so "500 then 200" is per event, as a retry sees it).
        """
        webhook = await store.endpoints.create(
            org, receiver.url(path), list(events), "chaos", enabled=True
        )
        endpoint = Endpoint(org, path, webhook.id, webhook.secret, frozenset(events))
        self.track(receiver, endpoint, behaviour)
        return endpoint

    def track(
        self, receiver: Receiver, endpoint: Endpoint, behaviour: Behaviour | None = None
    ) -> None:
        """Count ``endpoint`` (registered some other way, say through the API) in the tally,
        and serve its path at ``receiver`` with ``behaviour``."""
        self.endpoints[endpoint.path] = endpoint
        receiver.behaviours[endpoint.path] = self._recording(endpoint, behaviour or _ok)

    def _recording(self, endpoint: Endpoint, behaviour: Behaviour) -> Behaviour:
        verifier = standardwebhooks.Webhook(endpoint.secret)

        async def serve(request: web.Request, _seen: int) -> web.StreamResponse:
            body = await request.read()
            key = (request.headers.get("webhook-id", ""), endpoint.path)
            earlier = self.requests[key]
            self.requests[key] += 1
            response = await behaviour(request, earlier)
            if 200 <= response.status < 300:
                try:
                    verifier.verify(body, dict(request.headers))
                except Exception:
                    self.bad_signatures += 1
                else:
                    self.accepted[key] += 1
                    self.accepted_at.setdefault(key, time.monotonic())
            return response

        return serve

    def pairs(self) -> Iterator[tuple[str, Endpoint]]:
        for event_id, (org, event_type) in self.confirmed.items():
            for endpoint in self.endpoints.values():
                if endpoint.org == org and event_type in endpoint.events:
                    yield event_id, endpoint

    def delivered_to(self, paths: Sequence[str]) -> bool:
        """Every confirmed event reached each of ``paths`` it is subscribed to (in memory)."""
        return all(
            self.accepted[(event_id, endpoint.path)]
            for event_id, endpoint in self.pairs()
            if endpoint.path in paths
        )

    def latencies(self, paths: Sequence[str]) -> list[float]:
        """Seconds from publishing each event to its first 2xx at each of ``paths``, sorted."""
        return sorted(
            self.accepted_at[(event_id, endpoint.path)] - self.sent_at[event_id]
            for event_id, endpoint in self.pairs()
            if endpoint.path in paths and (event_id, endpoint.path) in self.accepted_at
        )

    async def _read_states(self, store: Store) -> None:
        ids = [e.webhook_id for e in self.endpoints.values()]
        query = sa.select(deliveries.c.event_id, deliveries.c.webhook_id, deliveries.c.state).where(
            deliveries.c.webhook_id.in_(ids)
        )
        async with store.engine.connect() as connection:
            rows = await connection.execute(query)
            self._states = {(r.event_id, r.webhook_id): r.state for r in rows}
        self._states_read_at = time.monotonic()

    def _state(self, event_id: str, endpoint: Endpoint) -> str | None:
        return self._states.get((event_id, endpoint.webhook_id))

    async def unrecorded(self, store: Store) -> set[tuple[str, str]]:
        """The pairs the receiver has had a request for that the store does not have
        succeeded. Read just after a worker's kill, they are its attempts in flight: sent,
        answered or still being answered (a slow endpoint's), not recorded; each may be sent
        once more."""
        await self._read_states(store)
        return {
            (event_id, path)
            for (event_id, path), requests in self.requests.items()
            if requests
            and self._states.get((event_id, self.endpoints[path].webhook_id)) != "succeeded"
        }

    async def settled(self, store: Store) -> bool:
        """Every pair is delivered and recorded succeeded, or recorded failed.

        Each check looks again only at the pairs still open: a 30-minute soak has most of a
        million, and reading them all four times a second starves the receiver it waits on.
        """
        if time.monotonic() - self._states_read_at < STATE_POLL_SECONDS:
            return False
        self._open_new_pairs()
        if len(self._open) > FEW_OPEN_PAIRS:
            await self._read_states(store)
        else:
            await self._read_states_of(store, self._open)
        self._open = [
            (event_id, endpoint)
            for event_id, endpoint in self._open
            if not self._pair_settled(event_id, endpoint)
        ]
        return not self._open

    def _open_new_pairs(self) -> None:
        events, endpoints = self._open_from
        if endpoints != len(self.endpoints):  # an endpoint added since: start again
            self._open, events = [], 0
        for event_id, (org, event_type) in itertools.islice(self.confirmed.items(), events, None):
            self._open.extend(
                (event_id, endpoint)
                for endpoint in self.endpoints.values()
                if endpoint.org == org and event_type in endpoint.events
            )
        self._open_from = (len(self.confirmed), len(self.endpoints))

    def _pair_settled(self, event_id: str, endpoint: Endpoint) -> bool:
        state = self._state(event_id, endpoint)
        return state == "failed" or (
            state == "succeeded" and bool(self.accepted[(event_id, endpoint.path)])
        )

    async def _read_states_of(self, store: Store, pairs: Sequence[tuple[str, Endpoint]]) -> None:
        event_ids = sorted({event_id for event_id, _ in pairs})
        ids = [e.webhook_id for e in self.endpoints.values()]
        async with store.engine.connect() as connection:
            for start in range(0, len(event_ids), 500):
                query = sa.select(
                    deliveries.c.event_id, deliveries.c.webhook_id, deliveries.c.state
                ).where(
                    deliveries.c.event_id.in_(event_ids[start : start + 500]),
                    deliveries.c.webhook_id.in_(ids),
                )
                for r in await connection.execute(query):
                    self._states[(r.event_id, r.webhook_id)] = r.state
        self._states_read_at = time.monotonic()

    async def tally(self, store: Store) -> Tally:
        await self._read_states(store)
        pairs = delivered = failed = lost = duplicates = unstored = 0
        lost_examples: list[str] = []
        for event_id, endpoint in self.pairs():
            pairs += 1
            accepted = self.accepted[(event_id, endpoint.path)]
            state = self._state(event_id, endpoint)
            if accepted:
                delivered += 1
                duplicates += accepted - 1
                # Acked only once stored: a delivered pair must be recorded as succeeded.
                unstored += state != "succeeded"
            elif state == "failed":
                failed += 1
            else:
                lost += 1
                if len(lost_examples) < 5:
                    lost_examples.append(f"{event_id}->{endpoint.path} state={state}")
        return Tally(
            self.name,
            self.seed,
            self.published,
            len(self.confirmed),
            pairs,
            delivered,
            failed,
            lost,
            duplicates,
            unstored,
            tuple(lost_examples),
        )


# --- load ------------------------------------------------------------------------------------


async def publish_load(
    connection: AbstractConnection,
    ledger: Ledger,
    org: str,
    event_types: Sequence[str],
    count: int,
    seconds: float,
    *,
    timeout: float = 5.0,
    concurrency: int = 4,
) -> None:
    """Publish ``count`` events spread over ``seconds``, each confirmed by the broker.

    The types follow ``event_types`` in turn. A publish that fails raises
    :class:`PublishError`; it is counted as published but not confirmed, and the load goes on
    (as an upstream service would, after logging it).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    interval = seconds / count
    indices = iter(range(count))

    async def publisher() -> None:
        for i in indices:
            # Pacing the load, not synchronising with anything.
            await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
            event_type = event_types[i % len(event_types)]
            event_id = new_event_id()
            ledger.published += 1
            ledger.sent_at[event_id] = time.monotonic()
            try:
                envelope = await publish_event(
                    connection, event_type, org, {"i": i}, event_id=event_id, timeout=timeout
                )
            except PublishError as exc:
                ledger.publish_errors.append(str(exc))
                continue
            ledger.confirmed[envelope.id] = (org, event_type)

    await asyncio.gather(*(publisher() for _ in range(concurrency)))


async def queues_idle(
    amqp_url: str, retry_schedule: Sequence[float], jitter: float = DEFAULT_JITTER
) -> bool:
    """No ready message in the events, deliveries, deferred and retry queues: every tier of
    each retry delay, spread by the workers' ``RETRY_JITTER`` (the default unless given)."""
    tiers = {tier for delay in retry_schedule for tier in jitter_tiers(delay, jitter)}
    names = [
        topology.EVENTS_QUEUE,
        topology.DELIVERIES_QUEUE,
        *(topology.deferred_queue_name(d) for d in topology.DEFER_TIERS),
        *(topology.retry_queue_name(d) for d in sorted(tiers)),
    ]
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            if queue.declaration_result.message_count:
                return False
    finally:
        await connection.close()
    return True


async def rabbitmqctl(*args: str) -> None:
    """Run the broker's CLI without blocking the event loop (receivers keep answering)."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {(out + err).decode()[-500:]}")


# --- the worker as a child process -----------------------------------------------------------


def worker_env(database_url: str, amqp_url: str, ca_bundle: str, **settings: str) -> dict[str, str]:
    """The environment of a worker process: the test settings plus ``settings`` overrides."""
    values = {
        "database_url": database_url,
        "amqp_url": amqp_url,
        "ca_bundle": ca_bundle,
        "allowed_private_networks": "127.0.0.0/8",
        "metrics_port": "0",
        "api_host": "127.0.0.1",
        "retry_schedule": "0.3,0.3",
        "delivery_timeout": "5",
        "shutdown_drain_seconds": "5",
        "log_format": "json",
        **settings,
    }
    return {**os.environ, **{f"SELLFERN_WEBHOOKS_{k.upper()}": v for k, v in values.items()}}


@dataclass
class WorkerProcess:
    """``python -m worker.cli worker``, restartable; its stderr goes to ``log_dir``."""

    env: dict[str, str]
    log_dir: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    kills: int = 0
    log_path: Path | None = None

    async def start(self) -> None:
        self.starts += 1
        self.log_path = self.log_dir / f"worker-{self.starts}.log"
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker.cli", "worker", env=self.env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    async def started(self) -> bool:
        """The worker logged that its consumers are running (for ``eventually``)."""
        if self.process is not None and self.process.returncode is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}: {self.tail()}")
        return self.log_path is not None and '"started"' in self.log_path.read_text()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no drain, no flush, nothing settled."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)
        self.kills += 1

    async def terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; return the exit code and how long the process took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        return code, time.monotonic() - started

    async def close(self) -> None:
        """Teardown: kill a process a failed test left running."""
        if self.running:
            await self.kill()

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_count(self, needle: str) -> int:
        """How many lines of every log of this worker contain ``needle``."""
        return sum(
            path.read_text(errors="replace").count(needle)
            for path in self.log_dir.glob("worker-*.log")
        )


# --- a TCP proxy that can fail -------------------------------------------------------------


@dataclass
class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; :meth:`cut` drops every connection and
    refuses new ones until :meth:`restore` (as a database host going away would look)."""

    target_host: str
    target_port: int
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))
            if task is not None:
                self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    async def cut(self) -> None:
        """Stop listening (new connections are refused) and reset every open connection."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()


# --- hostile receivers -----------------------------------------------------------------------


async def hang(request: web.Request, _n: int) -> web.StreamResponse:
    """Never answers: waits until the client gives up and closes the connection."""
    await _until_closed(request, limit=60)
    return web.Response(status=504)


async def reset(request: web.Request, _n: int) -> web.StreamResponse:
    """Resets the TCP connection (RST) instead of answering."""
    import socket  # noqa: PLC0415 - only this receiver needs it
    import struct  # noqa: PLC0415

    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return web.Response(status=599)


async def error_then_ok(_request: web.Request, n: int) -> web.StreamResponse:
    """500 on an event's first request, 200 on its retry."""
    return web.Response(status=500 if n == 0 else 200, text="again" if n == 0 else "ok")


def redirect_to(location: str) -> Behaviour:
    async def redirect(_request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    return redirect


BIG_BODY_BYTES = 50 * 1024 * 1024


async def big_body(request: web.Request, _n: int) -> web.StreamResponse:
    """200 with a 50 MB body, written until the client stops reading."""
    response = web.StreamResponse(status=200)
    response.content_length = BIG_BODY_BYTES
    await response.prepare(request)
    chunk = b"x" * 65536
    with contextlib.suppress(ConnectionError):
        for _ in range(BIG_BODY_BYTES // len(chunk)):
            await response.write(chunk)
    return response


async def trickle(request: web.Request, _n: int) -> web.StreamResponse:
    """Sends the status line and endless headers one byte every 50 ms: bytes keep coming, so
    only a total deadline (not a per-read one) ends the attempt."""
    transport = request.transport
    assert transport is not None
    data = b"HTTP/1.1 200 OK\r\n" + b"x-slow: 1\r\n" * 1000
    for i in range(len(data)):
        if transport.is_closing():
            break
        transport.write(data[i : i + 1])
        await asyncio.sleep(0.05)
    transport.abort()
    return web.Response(status=599)


async def _until_closed(request: web.Request, limit: float) -> None:
    transport = request.transport
    deadline = time.monotonic() + limit
    # Polling the connection state: aiohttp gives a handler no event for "client went away".
    while transport is not None and not transport.is_closing() and time.monotonic() < deadline:  # noqa: ASYNC110 - see above
        await asyncio.sleep(0.1)


# --- faults of a run's own vhost and database; a process's memory ---------------------------


async def close_vhost_connections(amqp_url: str, reason: str = "chaos") -> int:
    """Close every broker connection of ``amqp_url``'s virtual host, and only of that one
    (other sessions share the broker); return how many the broker closed."""
    vhost = unquote(urlsplit(amqp_url).path.removeprefix("/"))
    if not vhost or "," in amqp_url:
        raise ValueError(f"not one test virtual host: {amqp_url!r}")
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "close_all_connections", "-p", vhost, reason,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode:
        raise RuntimeError(f"close_all_connections -p {vhost}: {(out + err).decode()[-500:]}")
    closed = re.search(r"Closed (\d+) connection", out.decode())
    return int(closed.group(1)) if closed else 0


async def terminate_backends(database_url: str) -> int:
    """``pg_terminate_backend`` every session of ``database_url``'s database (as a failover or
    an administrator would), from the admin database; return how many were terminated."""
    name = sa.make_url(database_url).database
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        terminated = await admin.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await admin.close()
    return int(terminated)


def rss_mb(pid: int) -> float:
    """The resident set size of process ``pid`` now (``VmRSS``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)
