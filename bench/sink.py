"""The native HTTPS sink: nginx answering every request with ``200 ok``, as a child process.

For the figures that should show the *sender's* limit — the bare client's ceiling, the
worker's throughput, the burst — the Python receiver is too slow a peer: on two cores it
spends about as much CPU per request as the client does, so both figures would measure it.
nginx answers from C, with TLS on the same certificate as the Python receiver, and keeps no
per-request state (``access_log off``). What it cannot do — count receipts per path or per
event, delay, fail — the scenarios that need it leave to :mod:`bench.receiver`; the ones on
this sink count attempts in the database, and nginx's ``stub_status`` gives the total of
requests it answered (a check, not a clock).

``worker_processes 1``: one nginx worker answers far more keep-alive requests a second than
one Python process can send, and on a machine of two cores a second worker would only take
CPU from the client being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.procs import free_port, stop_process

HOST = "127.0.0.1"
START_SECONDS = 15
WORKER_PROCESSES = 1
NAME = "nginx"

CONFIG = """\
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type text/plain;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_max_body_size 1m;

    server {{
        listen {host}:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            return 200 "ok";
        }}
        # An endpoint that is down: every request under /fail/ gets a 500.
        location /fail/ {{
            return 500 "down";
        }}
    }}

    server {{
        listen {host}:{status_port};
        location = /status {{
            stub_status;
        }}
    }}
}}
"""


class SinkError(RuntimeError):
    pass


def _nginx_path() -> str | None:
    found = shutil.which("nginx")
    if found is not None:
        return found
    # /usr/sbin is not on every PATH, e.g. a non-login shell of an ordinary user.
    return next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(  # noqa: S603 - fixed arguments
        ["apt-get", *args],  # noqa: S607 - the system's package tool, on PATH
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=600,
    )


def ensure_nginx(say: Callable[[str], None]) -> str:
    """The nginx binary; installed with ``apt-get install -y nginx`` when missing and root."""
    found = _nginx_path()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SinkError(
            "nginx is not installed, and the harness installs it only as root with apt-get: "
            "install it (e.g. `sudo apt-get install -y nginx`) or run without the scenarios "
            "that use the native sink (ceiling, throughput, burst)"
        )
    say("nginx not found; apt-get install -y nginx")
    done = _apt_get("install", "-y", "nginx")
    if done.returncode != 0:  # most often package lists not fetched yet
        say("apt-get install failed; apt-get update, then again")
        _apt_get("update")
        done = _apt_get("install", "-y", "nginx")
    found = _nginx_path()
    if done.returncode != 0 or found is None:
        raise SinkError(f"apt-get install -y nginx failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return found


def nginx_version(binary: str) -> str:
    done = subprocess.run(  # noqa: S603 - the binary found above
        [binary, "-v"], capture_output=True, text=True, check=False, timeout=10
    )
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


@dataclass
class Sink:
    """The running nginx, seen from the harness."""

    base_url: str
    status_url: str
    version: str
    workers: int
    http: aiohttp.ClientSession
    name: str = NAME
    status_requests: int = 0  # nginx counts these too

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def requests(self) -> int:
        """Requests nginx has answered since it started, its status requests excluded."""
        async with self.http.get(self.status_url) as response:
            self.status_requests += 1  # answered, so counted
            response.raise_for_status()
            text = await response.text()
        # The third line holds the counts: accepted, handled connections; requests.
        lines = text.splitlines()
        return int(lines[2].split()[2]) - self.status_requests


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _write_config(work: Path, port: int, status_port: int, cert: Path, key: Path) -> Path:
    # Its workers drop root for nobody when started as root; they only need to traverse.
    work.chmod(0o755)
    config = work / "nginx.conf"
    config.write_text(
        CONFIG.format(
            workers=WORKER_PROCESSES,
            dir=work,
            host=HOST,
            port=port,
            status_port=status_port,
            cert=cert.resolve(),
            key=key.resolve(),
        )
    )
    return config


async def _wait_ready(proc: asyncio.subprocess.Process, sink: Sink, error_log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        if proc.returncode is not None:
            raise SinkError(
                f"nginx exited with {proc.returncode}; {error_log}:\n{_tail(error_log)}"
            )
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await sink.requests()
            return
        if time.monotonic() > deadline:
            raise SinkError(f"nginx did not answer within {START_SECONDS}s; see {error_log}")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def run_sink(
    cert: Path, key: Path, log_dir: Path, say: Callable[[str], None]
) -> AsyncIterator[Sink]:
    """nginx on a free port of 127.0.0.1, its config, pid and logs in a temporary directory
    (the error log copied to ``log_dir`` at the end); stopped when the block ends."""
    binary = await asyncio.to_thread(ensure_nginx, say)
    version = await asyncio.to_thread(nginx_version, binary)
    async with AsyncExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sfw-bench-nginx-")))
        error_log = work / "error.log"

        def keep_error_log() -> None:
            if error_log.exists():
                shutil.copyfile(error_log, log_dir / "nginx-error.log")

        stack.callback(keep_error_log)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        port, status_port = free_port(), free_port()
        config = _write_config(work, port, status_port, cert, key)
        # Its own pid and error log from the command line too: the compiled-in defaults
        # (/var/log/nginx, /run) are not this run's.
        proc = await asyncio.create_subprocess_exec(
            binary, "-p", str(work), "-e", str(error_log), "-c", str(config),
            "-g", "daemon off;",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stack.enter_context((log_dir / "nginx.log").open("wb")),
        )  # fmt: skip
        stack.push_async_callback(stop_process, proc, 10)
        sink = Sink(
            f"https://{HOST}:{port}",
            f"http://{HOST}:{status_port}/status",
            version,
            WORKER_PROCESSES,
            http,
        )
        await _wait_ready(proc, sink, error_log)
        say(f"nginx {version} (pid {proc.pid}) listening at {sink.base_url}")
        yield sink
