"""What one harness run creates and removes: a RabbitMQ vhost, a PostgreSQL database, TLS files."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import trustme

from worker.store import database


class Progress:
    """Timestamped progress lines on stderr, for the person waiting."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self._started:6.1f}s] {message}", file=sys.stderr, flush=True)


def _rabbitmqctl(*args: str) -> None:
    # The broker's own CLI, on PATH; the arguments are the harness's.
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)  # noqa: S603, S607


@asynccontextmanager
async def vhost(amqp_base: str, user: str = "guest") -> AsyncIterator[str]:
    """A fresh virtual host for this run; yields its AMQP URL and deletes it afterwards."""
    name = f"sfw-bench-{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(_rabbitmqctl, "add_vhost", name)
    try:
        await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield f"{amqp_base.rstrip('/')}/{name}"
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_vhost", name)


@asynccontextmanager
async def postgres_database(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this run; yields its SQLAlchemy URL and drops it after."""
    name = f"sfw_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        url = f"{base}/{name}"
        engine = database.create_engine(url)
        try:
            await database.migrate(engine)
        finally:
            await engine.dispose()
        yield url
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca))
    server.private_key_pem.write_to_path(str(files.key))
    with files.cert.open("wb") as out:
        for blob in server.cert_chain_pems:
            out.write(blob.bytes())
    return files
