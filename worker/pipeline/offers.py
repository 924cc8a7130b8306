"""What the per-endpoint scheduler answers with: routes, decisions, offers and its view of an
endpoint (:mod:`worker.pipeline.scheduler` decides; these are the values it hands out)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass


class Route(enum.Enum):
    START = "start"
    WAIT = "wait"
    QUEUE = "queue"
    DEFER = "defer"
    PARK = "park"


class Source(enum.Enum):
    NEW = "new"  # fan-out's first attempt of a delivery
    TASK = "task"  # a message from webhooks.deliveries
    BACKLOG = "backlog"  # a parked delivery the sweeper leased
    LANE = "lane"  # the head of an ordered endpoint's backlog, offered by its lane


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    ticket: int = -1  # for START: pass it to Scheduler.finished
    delay: float = 0.0  # for DEFER: the deferral tier


class Offer:
    """An attempt offered to the scheduler; ``decision`` is None while it waits for a slot."""

    __slots__ = ("_future", "deadline", "decision", "source", "webhook_id")

    def __init__(self, webhook_id: str, source: Source, deadline: float | None) -> None:
        self.webhook_id = webhook_id
        self.source = source
        self.deadline = deadline
        self.decision: Decision | None = None
        self._future: asyncio.Future[Decision] | None = None

    def settle(self, decision: Decision) -> None:
        self.decision = decision
        if self._future is not None and not self._future.done():
            self._future.set_result(decision)

    async def wait(self) -> Decision:
        """The decision, once made; returns at once when it was made on offer."""
        if self.decision is not None:
            return self.decision
        self._future = asyncio.get_running_loop().create_future()
        return await self._future


@dataclass(frozen=True, slots=True)
class EndpointView:
    """What the scheduler knows of an endpoint, for health answers and metrics."""

    in_flight: int
    waiting: int
    queued: int
    parked: bool
    response_seconds: float | None
    slow: bool
