"""Metrics and logs, as an SRE reads them after real deliveries."""

from __future__ import annotations

import aio_pika
import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from schemas.publish import publish_event
from tests.conftest import Receiver, Service, eventually, make_settings, run_service

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


async def test_metrics_after_a_delivery(
    service: Service, receiver: Receiver, amqp_url: str
) -> None:
    status, webhook = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/m"), "events": ["order.created"]}
    )
    assert status == 201
    connection = await aio_pika.connect(amqp_url)
    try:
        await publish_event(connection, "order.created", service.org, {})
    finally:
        await connection.close()
    await receiver.wait_for(lambda r: len(r) == 1)

    async def counted() -> bool:
        batches = service.running.metrics.store_batch_size.labels("pipeline")
        return bool(batches._sum.get() >= 2)  # the event and its attempt

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
    status, webhook = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/l"), "events": ["order.created"]}
    )
    assert status == 201
    with capture_logs() as logs:
        status, _ = await service.call("POST", f"/webhooks/{webhook['id']}/test")
        assert status == 200
    lines = [entry for entry in logs if entry["event"] == "delivery attempt"]
    assert len(lines) == 1
    line = lines[0]
    assert line["webhook_id"] == webhook["id"]
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
