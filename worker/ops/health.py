"""Liveness, readiness and metrics, served by every process.

``/healthz`` answers whether the process can still work — its event loop turns and its broker
connection is up or recovering — so that Kubernetes restarts it when not. ``/readyz`` answers
whether it can serve now: database and broker reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Self

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.ops.metrics import Metrics
from worker.store import Store

HEARTBEAT_SECONDS = 1.0
STALL_SECONDS = 10.0
# connect_robust reconnects by itself; only a broker gone this long makes the process unhealthy.
BROKER_DOWN_SECONDS = 120.0


class Health:
    def __init__(self, store: Store, connection: AbstractRobustConnection) -> None:
        self._store = store
        self._connection = connection
        self._beat = time.monotonic()
        self._broker_down_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._checks: list[Callable[[], Awaitable[list[str]]]] = []

    def add_check(self, check: Callable[[], Awaitable[list[str]]]) -> None:
        """Make readiness also depend on ``check`` (its problems; none when ready)."""
        self._checks.append(check)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._heartbeat(), name="health-heartbeat")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _heartbeat(self) -> None:
        while True:
            now = time.monotonic()
            self._beat = now
            if self._connection.is_closed:
                self._broker_down_since = self._broker_down_since or now
            else:
                self._broker_down_since = None
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def liveness_problem(self) -> str | None:
        now = time.monotonic()
        if now - self._beat > STALL_SECONDS:
            return f"event loop stalled for {now - self._beat:.0f}s"
        if self._broker_down_since and now - self._broker_down_since > BROKER_DOWN_SECONDS:
            return f"broker connection down for {now - self._broker_down_since:.0f}s"
        return None

    async def readiness_problems(self) -> list[str]:
        problems = []
        try:
            await asyncio.wait_for(self._store.ping(), 5)
        except Exception as exc:
            problems.append(f"database: {type(exc).__name__}: {exc}"[:300])
        if self._connection.is_closed:
            problems.append("broker: connection closed (reconnecting)")
        for check in self._checks:
            problems.extend(await check())
        return problems


def health_routes(health: Health, metrics: Metrics) -> list[web.RouteDef]:
    async def healthz(_request: web.Request) -> web.Response:
        problem = health.liveness_problem()
        if problem:
            return web.json_response({"status": "unhealthy", "problem": problem}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        problems = await health.readiness_problems()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_view(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.exposition), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    handler = Callable[[web.Request], Awaitable[web.Response]]
    routes: list[tuple[str, handler]] = [
        ("/healthz", healthz),
        ("/readyz", readyz),
        ("/metrics", metrics_view),
    ]
    return [web.get(path, view) for path, view in routes]
