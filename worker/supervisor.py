"""Several worker processes on one machine: ``WORKER_PROCESSES`` above 1.

One Python process delivers with one core. With ``WORKER_PROCESSES=N`` the ``worker`` (or
``serve``) process becomes a parent that starts N children, each ``python -m worker.cli
worker`` with ``WORKER_PROCESSES=1``: a complete worker with its own broker connection,
consumers, scheduler and database pool. Per-endpoint limits hold across them as they do across
replicas — rate limits are divided by the consumers of ``webhooks.deliveries``, ordered lanes
take PostgreSQL advisory locks — which is why SQLite (one file, one writer) is refused.

The parent

- restarts a child that exits, after a back-off (0.5 s, doubling to 10 s; back to 0.5 s once a
  child has run a minute), logs it and counts it in ``worker_restarts_total``; a child that
  exits with status 2 (it could not start: settings, database, broker) before any child was
  ever ready ends the parent with status 2 instead;
- on SIGTERM or SIGINT passes SIGTERM on to every child, waits while each drains as a single
  worker does (``SHUTDOWN_DRAIN_SECONDS``; killed if still there 10 s past that), then exits 0;
- serves one ``/metrics`` with every process's figures: each writes its values to files in a
  fresh temporary directory (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``)
  which the parent sums, forgets a dead child's live gauges and removes at exit;
- answers ``/healthz`` while it runs, and ``/readyz`` when every child is running and its own
  ``/readyz`` (database and broker reachable) said ready at the last poll, once a second, on a
  loopback port the parent gave it.

For ``worker`` these are served on ``METRICS_PORT``. For ``serve`` the parent also runs the API
(:func:`worker.runtime.run`, role ``api``), whose ``/metrics`` and ``/readyz`` are these.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker import runtime
from worker.ops.metrics import NAMESPACE, Metrics
from worker.settings import Settings, SettingsError
from worker.store import crypto

ENV_PREFIX = "SELLFERN_WEBHOOKS_"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
STEADY_SECONDS = 60.0  # a child that ran this long starts the back-off over
POLL_SECONDS = 1.0
KILL_MARGIN_SECONDS = 10.0  # past the drain bound, for closing connections and exiting

log = structlog.get_logger("sellfern_webhooks.supervisor")


def check_supported(settings: Settings) -> None:
    """Refuse what several processes cannot do: share one SQLite file."""
    if settings.worker_processes > 1 and settings.is_sqlite:
        raise SettingsError(
            f"{ENV_PREFIX}WORKER_PROCESSES={settings.worker_processes} needs PostgreSQL: several "
            f"processes cannot write one SQLite file; set it to 1 or use a postgresql+asyncpg:// "
            f"{ENV_PREFIX}DATABASE_URL"
        )


def backoff(failures: int) -> float:
    """Seconds to wait before restarting a child that exited ``failures`` times in a row."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, failures - 1)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_metrics_to(directory: Path) -> CollectorRegistry:
    """Switch this process to multiprocess metrics; return the registry that sums them all.

    prometheus-client picks where values live when it is imported; the children read the
    variable then, this process switches here, before it creates any metric.
    """
    os.environ[MULTIPROCESS_DIR_ENV] = str(directory)  # where this process's files are opened
    # prometheus-client's multiprocess helpers carry no annotations.
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue()  # type: ignore[no-untyped-call]
    exposition = CollectorRegistry()
    MultiProcessCollector(exposition, str(directory))  # type: ignore[no-untyped-call]
    return exposition


@dataclass
class Child:
    index: int
    process: asyncio.subprocess.Process | None = None
    port: int = 0  # its health server, on 127.0.0.1
    started_at: float = 0.0
    problem: str | None = "starting"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """The children, their restarts and their readiness."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self._settings = settings
        self._directory = directory
        self.children = [Child(i) for i in range(settings.worker_processes)]
        self.stopping = asyncio.Event()
        self.gave_up = asyncio.Event()
        self.exit_code = 0
        self._ever_ready = False
        self.restarts = Counter(
            "worker_restarts", "Worker processes restarted by the supervisor after they exited.",
            namespace=NAMESPACE, registry=None,
        )  # fmt: skip

    def _env(self, child: Child) -> dict[str, str]:
        # A child's settings are this process's environment, but for its own overrides.
        return {
            **os.environ,
            f"{ENV_PREFIX}WORKER_PROCESSES": "1",
            f"{ENV_PREFIX}API_HOST": "127.0.0.1",
            f"{ENV_PREFIX}METRICS_PORT": str(child.port),
            MULTIPROCESS_DIR_ENV: str(self._directory),
        }

    async def _start(self, child: Child) -> asyncio.subprocess.Process:
        child.port = _free_port()
        child.problem = "starting"
        process = child.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", "worker",
            env=self._env(child), stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        child.started_at = time.monotonic()
        log.info("worker process started", index=child.index, pid=process.pid)
        if self.stopping.is_set():
            process.send_signal(signal.SIGTERM)
        return process

    async def keep(self, child: Child) -> None:
        """Run ``child`` until the supervisor stops, restarting it whenever it exits."""
        failures = 0
        while not self.stopping.is_set():
            process = await self._start(child)
            code = await process.wait()
            child.problem = f"exited with status {code}"
            # Its live gauges (in flight now) go; its counters stay in the sum.
            mark_process_dead(process.pid, str(self._directory))  # type: ignore[no-untyped-call]
            if self.stopping.is_set():
                return
            if code == 2 and not self._ever_ready:  # the CLI's status for "cannot start"
                log.error("worker process could not start", index=child.index, exit_code=code)
                self.exit_code = code
                self.gave_up.set()
                return
            ran = time.monotonic() - child.started_at
            failures = 1 if ran >= STEADY_SECONDS else failures + 1
            delay = backoff(failures)
            self.restarts.inc()
            log.warning(
                "worker process exited; restarting", index=child.index, pid=process.pid,
                exit_code=code, ran_seconds=round(ran, 1), restart_in=delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Ask each child's /readyz, once a second."""
        while True:
            await asyncio.gather(*(self._poll_one(session, c) for c in self.children))
            if all(c.problem is None for c in self.children):
                self._ever_ready = True
            await asyncio.sleep(POLL_SECONDS)

    async def _poll_one(self, session: aiohttp.ClientSession, child: Child) -> None:
        if not child.running:
            return  # its problem says why
        url = f"http://127.0.0.1:{child.port}/readyz"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=6)) as response:
                if response.status == web.HTTPOk.status_code:
                    child.problem = None
                    return
                body = await response.json(content_type=None)
                child.problem = f"not ready: {'; '.join(body.get('problems', []))}"[:300]
        except (aiohttp.ClientError, TimeoutError, ValueError):
            child.problem = "starting"

    async def problems(self) -> list[str]:
        """What keeps the parent from being ready; nothing when every child is."""
        return [
            f"worker process {c.index}: {c.problem or 'not running'}"
            for c in self.children
            if c.problem is not None or not c.running
        ]

    async def stop(self, keepers: list[asyncio.Task[None]]) -> None:
        """SIGTERM to every child; wait for their drain, within the bound."""
        self.stopping.set()
        for child in self.children:
            if child.running and child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        bound = self._settings.shutdown_drain_seconds + KILL_MARGIN_SECONDS
        _, late = await asyncio.wait(keepers, timeout=bound)
        for child in self.children:
            if late and child.running and child.process is not None:
                log.warning("worker process still running past the drain bound; killing it",
                            index=child.index, pid=child.process.pid)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        await asyncio.gather(*keepers, return_exceptions=True)


def _health_app(supervisor: Supervisor, exposition: CollectorRegistry) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        problems = await supervisor.problems()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_view(_request: web.Request) -> web.Response:
        body = generate_latest(exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_routes([
        web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_view)
    ])  # fmt: skip
    return app


async def run(
    settings: Settings,
    role: Literal["serve", "worker"],
    *,
    box: crypto.SecretBox | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Supervise ``WORKER_PROCESSES`` workers (and, for ``serve``, run the API) until ``stop``
    or SIGTERM/SIGINT; return the exit status."""
    check_supported(settings)
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    directory = Path(tempfile.mkdtemp(prefix="sellfern-webhooks-metrics-"))
    try:
        exposition = _write_metrics_to(directory)
        supervisor = Supervisor(settings, directory)
        keepers = [asyncio.create_task(supervisor.keep(c)) for c in supervisor.children]
        async with aiohttp.ClientSession() as session:
            poller = asyncio.create_task(supervisor.poll(session))
            waits: list[asyncio.Task[object]] = [
                asyncio.create_task(stop.wait()),
                asyncio.create_task(supervisor.gave_up.wait()),
            ]
            api_stop = asyncio.Event()
            runner: web.AppRunner | None = None
            if role == "serve":

                def started(running: runtime.Running) -> None:
                    if running.health is not None:
                        running.health.add_check(supervisor.problems)

                api = asyncio.create_task(runtime.run(
                    settings, "api", box=box, stop=api_stop, started=started,
                    handle_signals=False, metrics=Metrics(exposition=exposition),
                ))  # fmt: skip
                waits.append(api)
            else:
                runner = web.AppRunner(_health_app(supervisor, exposition), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, settings.api_host, settings.metrics_port).start()
            log.info("started", role=role, processes=len(supervisor.children),
                     metrics_port=settings.metrics_port if runner else None)  # fmt: skip
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            log.info("stopping: passing SIGTERM on to the worker processes")
            # Workers first, as in one process: the API keeps answering while they drain.
            await supervisor.stop(keepers)
            for task in (poller, *waits[:2]):
                task.cancel()
            await asyncio.gather(poller, *waits[:2], return_exceptions=True)
            if runner is not None:
                await runner.cleanup()
            if role == "serve":
                api_stop.set()
                await waits[2]  # raises what stopped the API from starting
        log.info("stopped", exit_code=supervisor.exit_code)
        return supervisor.exit_code
    finally:
        prometheus_values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]
        shutil.rmtree(directory, ignore_errors=True)
