"""Batched store writes: the hot paths cost one transaction per batch, not one per message.

A caller hands in an item and awaits it; it returns once the batch holding the item is
committed, so the caller acks its message only after what it produced is durable. A failed
batch raises :class:`BatchNotWrittenError` in every caller, whose messages then go back to the
queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Self, TypeVar

import structlog

from worker.ops.metrics import Metrics
from worker.store import Store
from worker.store.records import AttemptRecord, NewEvent

log = structlog.get_logger("sellfern_webhooks.writer")

T = TypeVar("T")


class BatchNotWrittenError(Exception):
    """The batch holding a caller's item was not committed; ``__cause__`` says why.

    Each caller gets an exception of its own: one shared object, raised in every caller,
    would gather each raise's frames in its traceback, and the log lines of a database fault
    would grow with every message it failed.
    """


class BatchWriter(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], Awaitable[None]],
        metrics: Metrics,
        max_batch: int = 500,
    ) -> None:
        self._name = name
        self._write = write
        self._metrics = metrics
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"{self._name}-writer")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Flush what is pending, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def write(self, item: T) -> None:
        """Queue ``item`` and wait until it is committed."""
        await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[None]:
        """Queue ``item``; the future is done once it is committed. Await it before acking."""
        if self._task is None or self._task.done():
            raise RuntimeError(f"the {self._name} writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._wakeup.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # While one batch is written, the next one gathers: the batch size follows the load
            # with no timer to tune, and one lone item is written at once.
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        started = time.perf_counter()
        try:
            await self._write([item for item, _ in batch])
        except Exception as exc:
            log.warning("batch not written; its messages will be redelivered",
                        writer=self._name, size=len(batch), error=str(exc))  # fmt: skip
            for _, future in batch:
                if not future.done():
                    failed = BatchNotWrittenError(f"the {self._name} batch was not written: {exc}")
                    failed.__cause__ = exc
                    future.set_exception(failed)
            return
        self._metrics.store_batch_size.labels(self._name).observe(len(batch))
        self._metrics.store_write_duration.labels(self._name).observe(time.perf_counter() - started)
        for _, future in batch:
            if not future.done():
                future.set_result(None)


PipelineRecord = NewEvent | AttemptRecord


def pipeline_writer(store: Store, metrics: Metrics) -> BatchWriter[PipelineRecord]:
    """The worker's one writer: fan-out's events and both stages' attempts share its batches."""
    return BatchWriter("pipeline", store.pipeline.write_batch, metrics)
