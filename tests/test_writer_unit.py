"""The batch writer: one write per batch, and a failed batch raised in each of its callers."""

from __future__ import annotations

import asyncio

import pytest

from worker.ops.metrics import Metrics
from worker.pipeline.writer import BatchNotWrittenError, BatchWriter

pytestmark = pytest.mark.unit


class Store:
    """Keeps what it is given; fails the batches it is told to."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.failures: list[Exception] = []

    async def write(self, batch: list[int]) -> None:
        await asyncio.sleep(0)
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(batch)


async def test_items_submitted_together_are_written_as_one_batch() -> None:
    store = Store()
    async with BatchWriter("test", store.write, Metrics()) as writer:
        await asyncio.gather(*(writer.write(i) for i in range(5)))
    assert store.batches == [[0, 1, 2, 3, 4]]


async def test_a_failed_batch_raises_an_exception_of_its_own_in_each_caller() -> None:
    store = Store()
    cause = ConnectionResetError("the connection was reset")
    store.failures.append(cause)
    async with BatchWriter("test", store.write, Metrics()) as writer:
        results = await asyncio.gather(*(writer.write(i) for i in range(3)), return_exceptions=True)
        await writer.write(3)  # the next batch is written as usual

    assert all(isinstance(r, BatchNotWrittenError) for r in results)
    assert len({id(r) for r in results}) == 3  # not one object raised three times
    assert all(r.__cause__ is cause for r in results if isinstance(r, BaseException))
    assert str(results[0]) == "the test batch was not written: the connection was reset"
    assert store.batches == [[3]]


async def test_a_batch_holds_at_most_max_batch_items() -> None:
    store = Store()
    async with BatchWriter("test", store.write, Metrics(), max_batch=2) as writer:
        await asyncio.gather(*(writer.write(i) for i in range(5)))
    assert store.batches == [[0, 1], [2, 3], [4]]
