"""A running ``python -m worker.cli serve`` (API and worker in one process), seen from the harness.

It is set up as an operator would: a token from ``python -m worker.cli token create``, the
endpoint created through ``POST /api/v2/webhooks``, its Prometheus metrics read from
``/metrics``, which ``serve`` answers on its API port.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import WORKER_ROOT, WorkerProcess, free_port, run_worker, service_env

START_SECONDS = 60
SCOPE = "webhooks:manage"

# Samples of a /metrics page: (name, sorted label pairs) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_total(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels``; None if there is none."""
    values = [
        value
        for (sample, pairs), value in samples.items()
        if sample == name and labels.items() <= dict(pairs).items()
    ]
    return sum(values) if values else None


def metric_by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (sample, pairs), value in samples.items():
        key = dict(pairs).get(label)
        if sample == name and key is not None:
            totals[key] = totals.get(key, 0.0) + value
    return totals


async def create_token(settings: Mapping[str, str], org: str, log_path: Path) -> str:
    """``python -m worker.cli token create``; the token is the last line it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "token", "create",
        "--org", org, "--scope", SCOPE, "--name", "bench",
        cwd=WORKER_ROOT,
        env=service_env(settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), START_SECONDS)
    with log_path.open("ab") as log:
        log.write(err)
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"token create exited with {proc.returncode}:\n{tail}")
    return lines[-1].strip()


@dataclass
class Serve:
    process: WorkerProcess
    api_url: str
    http: aiohttp.ClientSession

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            self.process.check_alive()
            try:
                async with self.http.get(f"{self.api_url}/readyz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve not ready within {START_SECONDS}s")
            await asyncio.sleep(0.1)

    async def create_endpoint(self, token: str, url: str, events: Sequence[str]) -> str:
        """``POST /api/v2/webhooks``; the new endpoint's id."""
        async with self.http.post(
            f"{self.api_url}/api/v2/webhooks",
            json={"url": url, "events": list(events), "description": "bench"},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"POST /api/v2/webhooks answered {response.status}: {body}")
        return str(body["id"])

    async def metrics(self) -> Samples:
        async with self.http.get(f"{self.api_url}/metrics") as response:
            response.raise_for_status()
            return parse_metrics(await response.text())


@asynccontextmanager
async def run_serve(settings: Mapping[str, str], log_path: Path) -> AsyncIterator[Serve]:
    """``serve`` with its API on a free port (and METRICS_PORT on another, unused by serve:
    its metrics are on the API port); ready when the block starts, stopped when it ends."""
    api_port = free_port()
    settings = {**settings, "API_PORT": str(api_port), "METRICS_PORT": str(free_port())}
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        process = await stack.enter_async_context(run_worker(settings, log_path, "serve"))
        serve = Serve(process, f"http://127.0.0.1:{api_port}", http)
        await serve.wait_ready()
        yield serve
