"""Metrics and logs, as an SRE reads them after real deliveries."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from schemas.publish import publish_event
from tests.conftest import Receiver, Service, eventually, make_settings, run_service
from worker.ops.logging import LIBRARY_LOGGERS, configure_logging

EXPECTED_FAMILIES = {
    "sellfern_webhooks_events_consumed",
    "sellfern_webhooks_delivery_attempts",
    "sellfern_webhooks_delivery_attempt_duration_seconds",
    "sellfern_webhooks_delivery_lag_seconds",
    "sellfern_webhooks_deliveries_in_flight",
    "sellfern_webhooks_store_batch_size",
    "sellfern_webhooks_http_requests",
    "sellfern_webhooks_http_request_duration_seconds",
}


async def _webhook(service: Service, receiver: Receiver, path: str) -> dict[str, Any]:
    status, webhook = await service.call(
        "POST", "/webhooks", {"url": receiver.url(path), "events": ["order.created"]}
    )
    assert status == 201, webhook
    return webhook  # type: ignore[no-any-return]


async def test_metrics_after_a_delivery(
    service: Service, receiver: Receiver, amqp_url: str
) -> None:
    webhook = await _webhook(service, receiver, "/m")
    connection = await aio_pika.connect(amqp_url)
    try:
        await publish_event(connection, "order.created", service.org, {})
    finally:
        await connection.close()
    await receiver.wait_for(lambda r: len(r) == 1)

    async def counted() -> bool:
        # This attempt's own counter, which follows its durable write: a count of batches
        # would also count events left in the session's queue by earlier tests (test_cli's
        # `publish`), consumed when this worker starts.
        succeeded = service.running.metrics.attempts.labels("order.created", "succeeded", "2xx")
        return bool(succeeded._value.get() >= 1)

    await eventually(counted, what="attempt recorded")
    async with service.http.get(f"{service.base}/metrics") as response:
        assert response.status == 200
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    assert set(families) >= EXPECTED_FAMILIES
    attempts = [s for s in families["sellfern_webhooks_delivery_attempts"].samples
                if s.name.endswith("_total")]  # fmt: skip
    assert any(
        s.labels == {"event_type": "order.created", "outcome": "succeeded", "status_class": "2xx"}
        and s.value >= 1
        for s in attempts
    )
    # A fast, free endpoint gets its first attempt straight from fan-out.
    fanned_out = families["sellfern_webhooks_deliveries_published"].samples
    assert any(s.labels.get("route") == "direct" and s.value == 1 for s in fanned_out)
    routes = {s.labels.get("route") for s in families["sellfern_webhooks_http_requests"].samples}
    assert "/api/v2/webhooks" in routes
    # Labels come from bounded sets: no endpoint id or URL in any label value.
    for family in families.values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert webhook["id"] not in value
                assert "https://" not in value


async def test_one_log_line_per_attempt_without_secrets(
    service: Service, receiver: Receiver
) -> None:
    webhook = await _webhook(service, receiver, "/l")
    with capture_logs() as logs:
        status, _ = await service.call("POST", f"/webhooks/{webhook['id']}/test")
        assert status == 200
    # The service is shared: another test's retry may be logged meanwhile, for its own endpoint.
    attempts = [entry for entry in logs if entry["event"] == "delivery attempt"]
    lines = [entry for entry in attempts if entry.get("webhook_id") == webhook["id"]]
    assert len(lines) == 1, attempts
    line = lines[0]
    assert line["event_id"].startswith("evt_")
    assert line["attempt"] == 1
    assert line["outcome"] == "succeeded"
    assert line["status_code"] == 200
    assert isinstance(line["duration_ms"], int)
    for entry in logs:
        assert webhook["secret"] not in str(entry)
        assert service.token not in str(entry)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_answer_json(service: Service, path: str) -> None:
    async with service.http.get(f"{service.base}{path}") as response:
        assert response.status == 200
        assert (await response.json())["status"] in {"ok", "ready"}


async def test_worker_serves_probes_and_metrics_on_its_port(
    database_url: str, amqp_url: str, ca_bundle: str
) -> None:
    settings = make_settings(database_url, amqp_url, ca_bundle)
    async with run_service(settings, role="worker") as worker, aiohttp.ClientSession() as http:
        assert worker.api_port is None
        base = f"http://127.0.0.1:{worker.metrics_port}"
        for path in ("/healthz", "/readyz"):
            async with http.get(f"{base}{path}") as response:
                assert response.status == 200
        async with http.get(f"{base}/metrics") as response:
            assert "sellfern_webhooks_queue_messages" in await response.text()
        async with http.get(f"{base}/api/v2/webhooks") as response:
            assert response.status == 404  # the worker serves no API


async def test_healthz_fails_when_the_event_loop_stalls(service: Service) -> None:
    health = service.running.health
    assert health is not None
    assert health._task is not None
    health._task.cancel()
    health._beat -= 60
    async with service.http.get(f"{service.base}/healthz") as response:
        assert response.status == 503
        assert "stalled" in (await response.json())["problem"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back for the tests after."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, previous in levels.items():
        logging.getLogger(name).setLevel(previous)


def test_library_logs_are_the_same_json_lines(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    configure_logging("json", "info", stream=out)  # again: still one handler, one line each
    logging.getLogger("aiormq.connection").warning("connection to %s lost", "broker:5672")
    logging.getLogger("aiormq.connection").debug("below LOG_LEVEL")
    # SQLAlchemy's INFO echoes statements with their parameters: never at LOG_LEVEL=info.
    logging.getLogger("sqlalchemy.engine.Engine").info("INSERT ... ('whsec_x',)")
    structlog.get_logger("sellfern_webhooks.test").info("own line", secret="whsec_y")

    library, own = (json.loads(line) for line in out.getvalue().splitlines())
    for line in (library, own):
        stamp = datetime.fromisoformat(line.pop("timestamp"))
        assert stamp.utcoffset() == timedelta(0)
    assert library == {
        "event": "connection to broker:5672 lost",
        "level": "warning",
        "logger": "aiormq.connection",
    }
    assert own == {"event": "own line", "level": "info", "secret": "[redacted]"}


def test_library_logs_on_the_console_follow_log_level(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("console", "error", stream=out)
    logging.getLogger("aiohttp.client").warning("below LOG_LEVEL")
    logging.getLogger("alembic.runtime.migration").error("migration %s failed", "0007")
    (line,) = out.getvalue().splitlines()
    assert "migration 0007 failed" in line
    assert "alembic.runtime.migration" in line
    assert "error" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
