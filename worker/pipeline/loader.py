"""Coalesced reads: lookups made concurrently share one query.

Lookups that arrive while a query is under way wait for the next one, so a batch grows with
the load and a lone lookup goes out at once — no timer to tune. Every lookup is answered by a
query made after it was asked, so nothing read is older than the question.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchLoader(Generic[K, V]):
    def __init__(
        self,
        name: str,
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        default: V,
        max_batch: int = 500,
    ) -> None:
        self._name = name
        self._load_many = load_many
        self._default = default
        self._max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._running: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._running is None:
            self._running = asyncio.create_task(self._load(), name=f"{self._name}-loader")
        return await future

    async def _load(self) -> None:
        try:
            while self._waiting:
                keys = list(self._waiting)[: self._max_batch]
                batch = {key: self._waiting.pop(key) for key in keys}
                try:
                    found = await self._load_many(keys)
                except Exception as exc:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(key, self._default))
        finally:
            self._running = None
