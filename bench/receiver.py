"""The benchmark's HTTPS receiver: a separate process that answers webhooks and counts them.

    python -m bench.receiver --cert server.pem --key server.key [--port 0] [--reuse-port]

When it listens it prints one JSON line ``{"port": ..., "control_port": ...}`` and serves:

- any request on the TLS port: read the body, record the receipt time (``time.time()``,
  the same clock as ``occurred_at``) under the path and under the ``webhook-id``, answer
  200 ``ok``; a path ``/delay/<ms>/...`` answers only after ``ms`` milliseconds (the
  receipt is still recorded on arrival);
- ``GET /stats[?ids=1]`` and ``POST /reset`` on a plain-HTTP control port on 127.0.0.1.

Several processes can share the TLS port (``--reuse-port``); :class:`Receiver` starts them
and merges their counts. The harness side of this module is :class:`Receiver`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.procs import REPO_ROOT, stop_process

HOST = "127.0.0.1"
DELAY_PREFIX = "/delay/"


class Tally:
    """What one receiver process has seen since the last reset."""

    def __init__(self) -> None:
        self.requests = 0
        self.duplicates = 0
        # path -> [count, first receipt, last receipt]
        self.paths: dict[str, list[float]] = {}
        # webhook-id -> first receipt; in the benchmark every event goes to one endpoint, so a
        # repeated id is a redelivery.
        self.ids: dict[str, float] = {}

    def record(self, path: str, webhook_id: str | None, now: float) -> None:
        self.requests += 1
        entry = self.paths.get(path)
        if entry is None:
            self.paths[path] = [1, now, now]
        else:
            entry[0] += 1
            entry[2] = now
        if webhook_id is not None:
            if webhook_id in self.ids:
                self.duplicates += 1
            else:
                self.ids[webhook_id] = now

    def snapshot(self, *, ids: bool) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duplicates": self.duplicates,
            "paths": self.paths,
            "ids": self.ids if ids else {},
        }


def _delay_seconds(path: str) -> float:
    if not path.startswith(DELAY_PREFIX):
        return 0.0
    millis = path[len(DELAY_PREFIX) :].split("/", 1)[0]
    return int(millis) / 1000 if millis.isdigit() else 0.0


async def _serve(args: argparse.Namespace) -> None:
    tally = Tally()

    async def webhook(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        tally.record(request.path, request.headers.get("webhook-id"), time.time())
        delay = _delay_seconds(request.path)
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(tally.snapshot(ids=request.query.get("ids") == "1"))

    async def reset(_request: web.Request) -> web.Response:
        nonlocal tally
        tally = Tally()
        return web.json_response({})

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    control_app = web.Application()
    control_app.router.add_get("/stats", stats)
    control_app.router.add_post("/reset", reset)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        # The low-level server: no router or middleware between the socket and the handler.
        runner = web.ServerRunner(web.Server(webhook), handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(
            runner, HOST, args.port, ssl_context=context, reuse_port=args.reuse_port, backlog=2048
        )
        await site.start()
        control_runner = web.AppRunner(control_app, access_log=None, handle_signals=False)
        await control_runner.setup()
        stack.push_async_callback(control_runner.cleanup)
        control_site = web.TCPSite(control_runner, HOST, 0)
        await control_site.start()
        print(json.dumps({"port": _port(site), "control_port": _port(control_site)}), flush=True)

        parent = os.getppid()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
            if os.getppid() != parent:  # the harness died without stopping us
                break


def _port(site: web.TCPSite) -> int:
    server = site._server  # noqa: SLF001 - the bound port when 0 asked for any free one
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__)
    parser.add_argument("--cert", required=True, help="PEM certificate chain for 127.0.0.1")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--port", type=int, default=0, help="TLS port (0: any free one)")
    parser.add_argument("--reuse-port", action="store_true", help="share the port (SO_REUSEPORT)")
    asyncio.run(_serve(parser.parse_args(argv)))


# --- the harness side ------------------------------------------------------------------------


@dataclass
class ReceiverStats:
    """The merged counts of every receiver process."""

    requests: int = 0
    duplicates: int = 0
    paths: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    ids: dict[str, float] = field(default_factory=dict)

    def merge(self, snapshot: dict[str, Any]) -> None:
        self.requests += int(snapshot["requests"])
        self.duplicates += int(snapshot["duplicates"])
        for path, (count, first, last) in snapshot["paths"].items():
            seen = self.paths.get(path)
            if seen is None:
                self.paths[path] = (int(count), first, last)
            else:
                self.paths[path] = (seen[0] + int(count), min(seen[1], first), max(seen[2], last))
        for webhook_id, at in snapshot["ids"].items():
            known = self.ids.get(webhook_id)
            if known is None:
                self.ids[webhook_id] = at
            else:  # the same id at two processes: a redelivery
                self.duplicates += 1
                self.ids[webhook_id] = min(known, at)

    def count(self, prefix: str = "/") -> int:
        return sum(c for path, (c, _, _) in self.paths.items() if path.startswith(prefix))


@dataclass
class Receiver:
    """The running receiver processes, seen from the harness."""

    base_url: str
    control_urls: list[str]
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def stats(self, *, ids: bool = False) -> ReceiverStats:
        merged = ReceiverStats()
        for control in self.control_urls:
            query = "?ids=1" if ids else ""
            async with self.http.get(f"{control}/stats{query}") as response:
                response.raise_for_status()
                merged.merge(await response.json())
        return merged

    async def reset(self) -> None:
        for control in self.control_urls:
            async with self.http.post(f"{control}/reset") as response:
                response.raise_for_status()


@asynccontextmanager
async def run_receiver(
    cert: Path, key: Path, processes: int, log_dir: Path
) -> AsyncIterator[Receiver]:
    """Start ``processes`` receiver processes on one TLS port; stop them when the block ends."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        port = 0
        controls: list[str] = []
        for index in range(processes):
            log = stack.enter_context((log_dir / f"receiver-{index}.log").open("wb"))
            command = [
                sys.executable,
                "-m",
                "bench.receiver",
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--port",
                str(port),
            ]
            if processes > 1:
                command.append("--reuse-port")
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=log
            )
            stack.push_async_callback(stop_process, proc, 5)
            assert proc.stdout is not None  # noqa: S101 - asked for a pipe above
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                ports = json.loads(line)
            except (TimeoutError, ValueError):
                raise RuntimeError(
                    f"receiver did not start; see {log_dir / f'receiver-{index}.log'}"
                ) from None
            port = int(ports["port"])
            controls.append(f"http://{HOST}:{ports['control_port']}")
        yield Receiver(f"https://{HOST}:{port}", controls, http)


if __name__ == "__main__":
    main()
