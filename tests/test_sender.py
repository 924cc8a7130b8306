"""The sender's HTTP pool, against a real receiver: what one endpoint holds, another does not
wait for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import eventually, make_settings
from worker.pipeline.sender import Sender, create_session

EVENT = {"id": "evt_1", "type": "order.created", "occurred_at": "2026-12-08T00:00:00Z", "data": {}}


@pytest.fixture
async def hanging_and_fast() -> AsyncIterator[tuple[str, asyncio.Event, list[int]]]:
    """A plain-HTTP receiver on 127.0.0.1: ``/hang`` answers once the event is set, ``/fast``
    at once; the list counts the requests ``/hang`` holds."""
    release = asyncio.Event()
    held: list[int] = []

    async def hang(_request: web.Request) -> web.Response:
        held.append(1)
        await release.wait()
        return web.Response(text="late")

    async def fast(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hang", hang)
    app.router.add_post("/fast", fast)
    runner = web.AppRunner(app, shutdown_timeout=0.1, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", release, held
    finally:
        release.set()
        await runner.cleanup()


async def test_hanging_requests_beyond_delivery_concurrency_leave_others_their_connections(
    hanging_and_fast: tuple[str, asyncio.Event, list[int]], tmp_path: Path
) -> None:
    base, release, held = hanging_and_fast
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path}/unused.db", "amqp://unused", "",
        delivery_concurrency=2, delivery_timeout=5,
    )  # fmt: skip
    session = create_session(settings)
    sender = Sender(session, settings)
    try:
        # More hanging requests than DELIVERY_CONCURRENCY, as several slow endpoints at their
        # caps, queued tasks and a parked backlog may have together.
        hanging = [
            asyncio.create_task(sender.send(f"{base}/hang", ["whsec_dGVzdA=="], EVENT))
            for _ in range(3)
        ]

        async def all_at_the_receiver() -> bool:
            return len(held) == len(hanging)

        await eventually(all_at_the_receiver, what="every hanging request at the receiver")
        sent = await sender.send(f"{base}/fast", ["whsec_dGVzdA=="], EVENT, timeout_seconds=1)
        assert sent.response.status == 200, sent.response
        assert sent.duration_ms < 1000
        release.set()
        answered = await asyncio.gather(*hanging)
        assert [a.response.status for a in answered] == [200, 200, 200]
    finally:
        await session.close()
