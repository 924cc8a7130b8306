"""``--tracing``: the service's processes export their spans to an OTLP/HTTP sink of the run.

What is measured is the worker's cost of tracing with a real exporter — spans made, batched,
encoded as protobuf and posted by the SDK's background thread — so the sink only counts what
it is sent and answers 200, as a collector that accepts everything would; it decodes nothing.
Compare the throughput scenario's "worker CPU per delivery" with and without the flag.

The services started by the harness inherit its environment (:func:`bench.procs.service_env`
drops only the ``SELLFERN_WEBHOOKS_`` variables), so the standard ``OTEL_*`` variables are set
in it for the length of the run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from aiohttp import web

HOST = "127.0.0.1"
SERVICE_NAME = "sellfern-webhooks-bench"


@dataclass
class OtlpSink:
    url: str = ""
    exports: int = 0
    bytes: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.bytes += len(await request.read())
        self.exports += 1
        # An empty ExportTraceServiceResponse: every span accepted.
        return web.Response(body=b"", content_type="application/x-protobuf")


@asynccontextmanager
async def run_otlp_sink() -> AsyncIterator[OtlpSink]:
    """An OTLP/HTTP traces endpoint on a free port of 127.0.0.1, in the harness's process."""
    sink = OtlpSink()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", sink.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    server = site._server  # noqa: SLF001 - the port the OS chose
    sockets = getattr(server, "sockets", None) or []
    sink.url = f"http://{HOST}:{sockets[0].getsockname()[1]}"
    try:
        yield sink
    finally:
        await runner.cleanup()


@contextmanager
def services_tracing(sink: OtlpSink | None) -> Iterator[None]:
    """Every service process started meanwhile exports its spans to ``sink``; without one,
    none traces, even if the shell running the harness has an OTLP endpoint set."""
    values: dict[str, str | None] = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url if sink else None,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None,
        "OTEL_SERVICE_NAME": SERVICE_NAME,
        "OTEL_SDK_DISABLED": None if sink else "true",
    }
    before = {name: os.environ.get(name) for name in values}
    _set(values)
    try:
        yield
    finally:
        _set(before)


def _set(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
