"""Prometheus metrics, on the process's own registry.

Labels come from bounded sets only — event type, outcome, status class, reason, queue, route —
never a URL or an endpoint id, so the number of series stays small however many customers
there are.

With ``WORKER_PROCESSES`` above 1 (:mod:`worker.supervisor`) every process writes its values
to files in one directory (prometheus-client's multiprocess mode) and the parent serves their
sum. Each gauge says how its values combine: ``livesum`` for what each process holds now,
``livemostrecent`` for a figure every process reads from the same database or broker.
"""

from __future__ import annotations

from typing import Self

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

NAMESPACE = "sellfern_webhooks"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 300, 1800, 7200, 36000)


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


class _ChildrenByValues:
    """``labels(...)`` answered from a dict of the children it returned before.

    prometheus-client checks and converts the label values and takes a lock on every call;
    the pipeline asks for the same few children several times per delivery. The values are
    bounded sets (see above), so the dict is small; no metric here ever removes a child.
    """

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc, no-any-return]
        children: dict[tuple[object, ...], Self] = self.__dict__.setdefault("_by_values", {})
        child = children.get(labelvalues)
        if child is None:
            made: Self = super().labels(*labelvalues)  # type: ignore[misc]
            children[labelvalues] = child = made
        return child


class Counter(_ChildrenByValues, prometheus_client.Counter):
    pass


class Gauge(_ChildrenByValues, prometheus_client.Gauge):
    pass


class Histogram(_ChildrenByValues, prometheus_client.Histogram):
    pass


class Metrics:
    """Every metric the service exports. One instance per process, built at the entry point."""

    def __init__(
        self, registry: CollectorRegistry | None = None, exposition: Collector | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # What /metrics serves: this registry, or the sum of every process's files.
        self.exposition: Collector = exposition or self.registry
        r = self.registry
        self.events_consumed = Counter(
            "events_consumed", "Events taken from webhooks.events and fanned out.",
            ["event_type"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.events_rejected = Counter(
            "events_rejected", "Events dead-lettered at fan-out, by reason.",
            ["reason"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.deliveries_published = Counter(
            "deliveries_published",
            "Deliveries fanned out, one per subscribed endpoint; route=direct when fan-out made "
            "the first attempt itself, queued when it published a task, parked when it left "
            "the delivery in the database for a slow endpoint at its cap.",
            ["event_type", "route"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "delivery_attempts", "Delivery attempts, by outcome and response status class.",
            ["event_type", "outcome", "status_class"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.attempt_duration = Histogram(
            "delivery_attempt_duration_seconds", "Time from request start to response read.",
            ["outcome"], buckets=_LATENCY_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.delivery_lag = Histogram(
            "delivery_lag_seconds", "From an event's occurred_at to its first successful delivery.",
            ["event_type"], buckets=_LAG_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "deliveries_in_flight", "Delivery attempts under way now.",
            namespace=NAMESPACE, registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.parked = Gauge(
            "parked_deliveries",
            "Deliveries parked in the database for slow endpoints, all workers' (every 30 s).",
            namespace=NAMESPACE, registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.parked_released = Counter(
            "parked_released", "Parked deliveries released to the deliveries queue.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.recoveries_running = Gauge(
            "recoveries_running", "Recoveries under way, all workers' (as this worker last saw).",
            namespace=NAMESPACE, registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.deliveries_recovered = Counter(
            "deliveries_recovered",
            "Deliveries a recovery put back in line to be sent again (parked, then released).",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.already_recorded = Counter(
            "deliveries_already_recorded",
            "Redelivered or re-released deliveries the store had already succeeded (or parked): "
            "settled without sending them again.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.deferred = Counter(
            "deliveries_deferred", "Tasks put back: their endpoint was at its concurrency cap.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.retries_scheduled = Counter(
            "retries_scheduled", "Retries scheduled, by retry tier (delay in seconds).",
            ["tier"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.dead_lettered = Counter(
            "dead_lettered", "Messages sent to webhooks.dead, by reason.",
            ["reason"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.endpoints_disabled = Counter(
            "endpoints_disabled", "Endpoints disabled by the service, by reason.",
            ["reason"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.queue_messages = Gauge(
            "queue_messages", "Messages ready in each queue (polled).",
            ["queue"], namespace=NAMESPACE, registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.queue_consumers = Gauge(
            "queue_consumers", "Consumers attached to each queue (polled).",
            ["queue"], namespace=NAMESPACE, registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.store_batch_size = Histogram(
            "store_batch_size", "Items written per store batch, by writer (attempts, events).",
            ["writer"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.store_write_duration = Histogram(
            "store_write_duration_seconds", "Time to write one batch, by writer.",
            ["writer"], buckets=_LATENCY_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "http_requests", "Management API requests, by route template, method and status.",
            ["route", "method", "status"], namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "http_request_duration_seconds", "Management API request latency.",
            ["route", "method"], buckets=_LATENCY_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
