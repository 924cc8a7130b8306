"""Batched attempt writes: the delivery hot path costs one transaction per batch, not per attempt.

A caller hands in a record and awaits it; it returns once the batch holding the record is
committed, so the caller acks its message only after the attempt is durable. A failed batch
raises in every caller, whose messages then go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Self

import structlog

from worker.metrics import Metrics
from worker.store import AttemptRecord, Store

log = structlog.get_logger("sellfern_webhooks.writer")


class AttemptWriter:
    def __init__(self, store: Store, metrics: Metrics, max_batch: int = 500) -> None:
        self._store = store
        self._metrics = metrics
        self._max_batch = max_batch
        self._pending: list[tuple[AttemptRecord, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="attempt-writer")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Flush what is pending, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def record(self, record: AttemptRecord) -> None:
        """Queue ``record`` and wait until it is committed."""
        if self._closing and self._task is not None and self._task.done():
            raise RuntimeError("the attempt writer is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wakeup.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # While one batch is written, the next one gathers: the batch size follows the load
            # with no timer to tune, and one lone attempt is written at once.
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[AttemptRecord, asyncio.Future[None]]]) -> None:
        started = time.perf_counter()
        try:
            await self._store.record_attempts([record for record, _ in batch])
        except Exception as exc:
            log.warning("attempt batch not written; its messages will be redelivered",
                        size=len(batch), error=str(exc))  # fmt: skip
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self._metrics.store_batch_size.observe(len(batch))
        self._metrics.store_write_duration.observe(time.perf_counter() - started)
        for _, future in batch:
            if not future.done():
                future.set_result(None)
