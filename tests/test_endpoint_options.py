"""An endpoint's own options: headers, rate_limit, timeout_seconds, ordered.

Over real HTTP, on SQLite and on PostgreSQL: what the API accepts, stores and shows, that the
headers reach the receiver on every kind of attempt, and that timeout_seconds bounds one.
The rules themselves are pure and tested first, without any service (``-m unit``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa
import standardwebhooks
from aiohttp import web
from alembic import command
from pydantic import ValidationError
from structlog.testing import capture_logs

from schemas import api as models
from schemas import headers as rules
from schemas.publish import publish_event
from tests.conftest import (
    TEST_SECRET_KEY,
    Received,
    Receiver,
    Service,
    ServiceFactory,
    eventually,
    fresh_postgres,
    make_settings,
)
from worker.api.resources import webhook_resource
from worker.ops.logging import LIBRARY_LOGGERS, redact_secrets
from worker.store import Store, database
from worker.store.crypto import SecretBox
from worker.store.records import Webhook, utcnow
from worker.store.tables import UTCDateTime, webhook_subscriptions

pytestmark = pytest.mark.timeout(60)

# Each a string the receiver must get byte for byte: inner space and tab, UTF-8, empty.
CUSTOM = {"X-Api-Key": "k_live_51H8 secret\tpart", "X-Tenant": "café-acme", "X-Empty": ""}
RESERVED = [
    "webhook-id", "Webhook-Signature", "WEBHOOK-TIMESTAMP", "webhook-anything",
    "Content-Type", "content-length", "HOST", "User-Agent", "traceparent", "TraceState",
    "Connection", "Transfer-Encoding", "TE", "Upgrade", "Keep-Alive", "Proxy-Authorization",
    "proxy-connection",
]  # fmt: skip


# --- the rules, pure -------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", RESERVED)
def test_reserved_names_are_refused_in_any_case(name: str) -> None:
    assert rules.reserved(name)
    assert rules.reserved(name.swapcase())
    problem = rules.name_problem(name)
    assert problem is not None
    assert "set by the service" in problem


@pytest.mark.unit
@pytest.mark.parametrize(
    "name", ["X-Api-Key", "x_tenant", "Authorization", "Cookie", "A", "!#$%&'*+-.^_`|~9", "Hosts",
             "X-Webhook-Id", "Contents-Type", "Proxy"],
)  # fmt: skip
def test_other_tokens_are_names(name: str) -> None:
    assert rules.name_problem(name) is None


@pytest.mark.unit
@pytest.mark.parametrize("name", ["", "X Foo", "X:Foo", "X-Föo", "X\r\nFoo", "(x)", "x/y", 'a"b'])
def test_non_tokens_are_not_names(name: str) -> None:
    problem = rules.name_problem(name)
    assert problem is not None
    assert "RFC 9110 token" in problem


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("a\r\nX-Injected: 1", "CR, LF or NUL"),
        ("a\rb", "CR, LF or NUL"),
        ("a\nb", "CR, LF or NUL"),
        ("a\x00b", "CR, LF or NUL"),
        ("a\x07b", "control characters"),
        ("a\x7fb", "control characters"),
        (" leading", "begin or end"),
        ("trailing\t", "begin or end"),
        ("\ud800", "Unicode"),
    ],
)
def test_bad_values(value: str, fragment: str) -> None:
    problem = rules.value_problem(value)
    assert problem is not None
    assert fragment in problem


@pytest.mark.unit
@pytest.mark.parametrize("value", ["", "k_live_1", "a b\tc", "café", "x" * 8000, "Bearer a=="])
def test_good_values(value: str) -> None:
    assert rules.value_problem(value) is None


@pytest.mark.unit
def test_at_most_twenty_headers_and_eight_kib() -> None:
    twenty = {f"X-{i}": "v" for i in range(20)}
    assert rules.headers_problem(twenty) is None
    problem = rules.headers_problem({**twenty, "X-20": "v"})
    assert problem is not None
    assert "at most 20 headers, not 21" in problem
    # Names count too: 8192 bytes exactly is allowed, one more is not.
    assert rules.headers_problem({"X-A": "v" * (8192 - 3)}) is None
    problem = rules.headers_problem({"X-A": "v" * (8192 - 2)})
    assert problem is not None
    assert "8192 bytes" in problem
    # Bytes, not characters: é is two.
    assert rules.headers_problem({"X-A": "é" * 4095}) is not None
    problem = rules.headers_problem({"X-Key": "1", "x-key": "2"})
    assert problem is not None
    assert "case-insensitive" in problem


@pytest.mark.unit
def test_the_model_names_the_field_and_the_header() -> None:
    body = {
        "url": "https://example.com/h",
        "events": ["order.created"],
        "headers": {"X Foo": "1", "Host": "evil", "X-Bar": "a\r\nb", "X-Num": 3},
    }
    with pytest.raises(ValidationError) as error:
        models.WebhookCreate.model_validate(body)
    found = {item["loc"]: item["msg"] for item in error.value.errors()}
    assert set(found) == {
        ("headers", "X Foo", "[key]"),
        ("headers", "Host", "[key]"),
        ("headers", "X-Bar"),
        ("headers", "X-Num"),
    }
    assert "CR, LF or NUL" in found[("headers", "X-Bar")]
    assert "valid string" in found[("headers", "X-Num")]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("rate_limit", 1, True), ("rate_limit", 10_000, True), ("rate_limit", None, True),
        ("rate_limit", 0, False), ("rate_limit", 10_001, False), ("rate_limit", -5, False),
        ("rate_limit", 2.0, False), ("rate_limit", "5", False), ("rate_limit", True, False),
        ("timeout_seconds", 1, True), ("timeout_seconds", 15, True),
        ("timeout_seconds", None, True), ("timeout_seconds", 0, False),
        ("timeout_seconds", 16, False), ("timeout_seconds", 1.5, False),
        ("ordered", True, True), ("ordered", False, True),
        ("ordered", "true", False), ("ordered", 1, False),
    ],
)  # fmt: skip
def test_bounds_of_the_other_options(field: str, value: object, ok: bool) -> None:
    body = {"url": "https://example.com/h", "events": ["order.created"], field: value}
    context = {"delivery_timeout": 15.0}
    for model in (models.WebhookCreate, models.WebhookUpdate):
        if ok:
            assert getattr(model.model_validate(body, context=context), field) == value
        else:
            with pytest.raises(ValidationError) as error:
                model.model_validate(body, context=context)
            assert [item["loc"] for item in error.value.errors()] == [(field,)]


@pytest.mark.unit
def test_the_timeout_bound_is_the_services_setting() -> None:
    body = {"url": "https://example.com/h", "events": ["order.created"], "timeout_seconds": 10}
    assert models.WebhookCreate.model_validate(body, context={"delivery_timeout": 10.0})
    with pytest.raises(ValidationError, match=r"at most DELIVERY_TIMEOUT, 9\.5 seconds"):
        models.WebhookCreate.model_validate(body, context={"delivery_timeout": 9.5})


def _record(**options: Any) -> Webhook:  # noqa: ANN401
    now = utcnow()
    return Webhook(
        id="wh_1", org_id="org_1", url="https://example.com/h", events=("order.created",),
        enabled=True, description="", secret="whsec_x", previous_secret=None,
        previous_secret_expires_at=None, created_at=now, updated_at=now, disabled_reason=None,
        failing_since=None, **options,
    )  # fmt: skip


@pytest.mark.unit
def test_the_resource_shows_the_timeout_an_attempt_gets() -> None:
    settings = make_settings("sqlite+aiosqlite:///x.db", "amqp://x/", "", delivery_timeout=15)
    shown = webhook_resource(_record(), settings)
    assert (shown.headers, shown.rate_limit, shown.timeout_seconds, shown.ordered) == (
        {}, None, 15, False,
    )  # fmt: skip
    assert '"timeout_seconds":15,' in shown.model_dump_json()  # an integer, as it is set
    assert webhook_resource(_record(timeout_seconds=3), settings).timeout_seconds == 3
    # DELIVERY_TIMEOUT lowered below what the endpoint set: the setting is what applies.
    lowered = make_settings("sqlite+aiosqlite:///x.db", "amqp://x/", "", delivery_timeout=2)
    assert webhook_resource(_record(timeout_seconds=3), lowered).timeout_seconds == 2


@pytest.mark.unit
def test_headers_are_kept_out_of_reprs_and_logs() -> None:
    record = _record(headers={"X-Api-Key": "k_live_hidden"})
    assert "k_live_hidden" not in repr(record)
    logged = redact_secrets(None, "info", {"event": "x", "headers": {"X-Api-Key": "k_live_1"}})
    assert logged["headers"] == "[redacted]"


# --- over HTTP -------------------------------------------------------------------------------


async def _create(service: Service, url: str, **fields: Any) -> dict[str, Any]:  # noqa: ANN401
    status, created = await service.call(
        "POST", "/webhooks", {"url": url, "events": ["order.created"], **fields}
    )
    assert status == 201, created
    return created  # type: ignore[no-any-return]


def _custom(received: Received, names: dict[str, str]) -> dict[str, str]:
    """The headers the receiver got of those named, as named (case and all)."""
    return {name: received.headers[name] for name in names if name in received.headers}


def _service_headers_intact(received: Received, secret: str) -> None:
    standardwebhooks.Webhook(secret).verify(received.body, received.headers)
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["User-Agent"].startswith("Sellfern-Webhooks/")


async def test_headers_arrive_on_every_kind_of_attempt(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def fails_first(_request: web.Request, seen: int) -> web.StreamResponse:
        return web.Response(status=500 if seen == 0 else 200)

    receiver.behaviours["/flaky"] = fails_first
    created = await _create(service, receiver.url("/h"), headers=CUSTOM)
    flaky = await _create(service, receiver.url("/flaky"), headers=CUSTOM)
    assert created["headers"] == CUSTOM

    # A test send, through the API.
    status, attempt = await service.call("POST", f"/webhooks/{created['id']}/test")
    assert (status, attempt["status_code"]) == (200, 200)
    # A delivery through the pipeline, and one that the pipeline retries after a 500.
    await publish_event(broker, "order.created", service.org, {"n": 1})
    await receiver.wait_for(
        lambda _: len(receiver.at("/h")) >= 2 and len(receiver.at("/flaky")) >= 2
    )
    # A redelivery of that attempt, through the API.
    status, again = await service.call(
        "POST", f"/webhooks/{created['id']}/deliveries/{attempt['id']}/retry"
    )
    assert (status, again["attempt"]) == (200, 2)

    got = receiver.at("/h") + receiver.at("/flaky")
    assert len(got) == 5
    for received in got:
        assert _custom(received, CUSTOM) == CUSTOM
    for received in receiver.at("/h"):
        _service_headers_intact(received, created["secret"])
    for received in receiver.at("/flaky"):
        _service_headers_intact(received, flaky["secret"])


async def test_reserved_names_are_refused_case_insensitively(
    service: Service, receiver: Receiver
) -> None:
    created = await _create(service, receiver.url("/h"))
    for name in [*RESERVED, "wEbHoOk-Id", "PROXY-anything"]:
        for method, path in (("POST", "/webhooks"), ("PATCH", f"/webhooks/{created['id']}")):
            body = {"url": receiver.url("/h"), "events": ["order.created"]}
            status, answer = await service.call(
                method, path, {**body, "headers": {"X-Fine": "1", name: "value"}}
            )
            assert status == 400, (name, answer)
            assert answer["error"]["code"] == "validation_error"
            assert answer["error"]["message"].startswith(f"headers.{name}: set by the service")
    # Nothing of that was stored.
    assert (await service.call("GET", f"/webhooks/{created['id']}"))[1]["headers"] == {}
    listed = (await service.call("GET", "/webhooks"))[1]["data"]
    assert [w["id"] for w in listed] == [created["id"]]


async def test_bad_headers_are_refused_naming_the_field(
    service: Service, receiver: Receiver
) -> None:
    cases: list[tuple[object, str]] = [
        ({"X Foo": "1"}, "headers.X Foo: not a valid header name"),
        ({"X-Foo": "a\r\nX-Injected: yes"}, "headers.X-Foo: must not contain CR, LF or NUL"),
        ({"X-Foo": "a\nb"}, "headers.X-Foo: must not contain CR, LF or NUL"),
        ({"X-Foo": "a\u0000b"}, "headers.X-Foo: must not contain CR, LF or NUL"),
        ({"X-Foo": 42}, "headers.X-Foo: Input should be a valid string"),
        ({"X-Foo": ["a"]}, "headers.X-Foo: Input should be a valid string"),
        ({f"X-{i}": "v" for i in range(21)}, "headers: at most 20 headers, not 21"),
        ({"X-Big": "v" * 8190}, "headers: at most 8192 bytes"),
        ({"X-Key": "1", "x-key": "2"}, "headers: X-Key and x-key are the same header"),
        (["X-Foo", "1"], "headers: Input should be a valid dictionary"),
    ]
    created = await _create(service, receiver.url("/h"))
    for headers, message in cases:
        for method, path in (("POST", "/webhooks"), ("PATCH", f"/webhooks/{created['id']}")):
            body = {"url": receiver.url("/h"), "events": ["order.created"], "headers": headers}
            status, answer = await service.call(method, path, body)
            assert status == 400, (headers, answer)
            assert answer["error"]["code"] == "validation_error"
            assert answer["error"]["message"].startswith(message), answer
            assert "X-Injected" not in answer["error"]["message"]  # the value is not echoed


async def test_rate_limit_and_timeout_bounds(service: Service, receiver: Receiver) -> None:
    # The service of these tests has DELIVERY_TIMEOUT=5.
    refused: list[tuple[dict[str, object], str]] = [
        ({"rate_limit": 0}, "rate_limit: Input should be greater than or equal to 1"),
        ({"rate_limit": 10_001}, "rate_limit: Input should be less than or equal to 10000"),
        ({"rate_limit": 2.5}, "rate_limit: Input should be a valid integer"),
        ({"rate_limit": "10"}, "rate_limit: Input should be a valid integer"),
        ({"timeout_seconds": 0}, "timeout_seconds: Input should be greater than or equal to 1"),
        ({"timeout_seconds": 6}, "timeout_seconds: at most DELIVERY_TIMEOUT, 5 seconds here"),
        ({"timeout_seconds": 3.0}, "timeout_seconds: Input should be a valid integer"),
        ({"ordered": "yes"}, "ordered: Input should be a valid boolean"),
        ({"ordered": None}, "ordered: may not be null"),
    ]
    created = await _create(service, receiver.url("/h"))
    for change, message in refused:
        for method, path in (("POST", "/webhooks"), ("PATCH", f"/webhooks/{created['id']}")):
            if method == "POST" and change == {"ordered": None}:
                message_now = "ordered: Input should be a valid boolean"
            else:
                message_now = message
            body = {"url": receiver.url("/h"), "events": ["order.created"], **change}
            status, answer = await service.call(method, path, body)
            assert status == 400, (change, answer)
            assert answer["error"]["message"].startswith(message_now), answer

    highest = await _create(service, receiver.url("/h"), rate_limit=10_000, timeout_seconds=5)
    assert (highest["rate_limit"], highest["timeout_seconds"]) == (10_000, 5)
    lowest = await _create(service, receiver.url("/h"), rate_limit=1, timeout_seconds=1,
                           ordered=True)  # fmt: skip
    assert (lowest["rate_limit"], lowest["timeout_seconds"], lowest["ordered"]) == (1, 1, True)
    # Null takes an option back to its default: no limit, DELIVERY_TIMEOUT.
    status, reset = await service.call(
        "PATCH", f"/webhooks/{lowest['id']}", {"rate_limit": None, "timeout_seconds": None}
    )
    assert status == 200, reset
    assert (reset["rate_limit"], reset["timeout_seconds"], reset["ordered"]) == (None, 5, True)


async def test_get_shows_the_defaults_and_the_store_holds_the_options(
    service: Service, receiver: Receiver
) -> None:
    plain = await _create(service, receiver.url("/plain"))
    defaults: dict[str, object] = {
        "headers": {}, "rate_limit": None, "timeout_seconds": 5, "ordered": False,
    }  # fmt: skip
    assert {k: plain[k] for k in defaults} == defaults
    assert isinstance(plain["timeout_seconds"], int)
    status, fetched = await service.call("GET", f"/webhooks/{plain['id']}")
    assert status == 200
    assert {k: fetched[k] for k in defaults} == defaults
    options = {"headers": CUSTOM, "rate_limit": 50, "timeout_seconds": 2, "ordered": True}
    full = await _create(service, receiver.url("/full"), **options)
    status, listed = await service.call("GET", "/webhooks")
    assert status == 200
    by_id = {w["id"]: w for w in listed["data"]}
    assert {k: by_id[full["id"]][k] for k in options} == options
    assert {k: by_id[plain["id"]][k] for k in defaults} == defaults
    # The pipeline's read (asyncpg on PostgreSQL) sees what the API's read sees.
    one = await service.store.endpoints.get(full["id"])
    many = await service.store.endpoints.get_many([full["id"], plain["id"]])
    assert one is not None
    assert many[full["id"]] == one
    assert (one.headers, one.rate_limit, one.timeout_seconds, one.ordered) == (
        CUSTOM, 50, 2, True,
    )  # fmt: skip
    bare = many[plain["id"]]
    assert (bare.headers, bare.rate_limit, bare.timeout_seconds, bare.ordered) == (
        {}, None, None, False,
    )  # fmt: skip


async def test_patch_replaces_the_headers_for_the_next_attempts(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    created = await _create(service, receiver.url("/h"), headers={"X-A": "1", "X-B": "2"})
    path = f"/webhooks/{created['id']}"
    await service.call("POST", f"{path}/test")
    await publish_event(broker, "order.created", service.org, {"n": 1})
    await receiver.wait_for(lambda r: len(r) >= 2)

    status, patched = await service.call("PATCH", path, {"headers": {"X-C": "3"}})
    assert status == 200, patched
    assert patched["headers"] == {"X-C": "3"}  # replaced, not merged
    status, patched = await service.call("PATCH", path, {"description": "kept"})
    assert patched["headers"] == {"X-C": "3"}  # a PATCH without headers leaves them
    await service.call("POST", f"{path}/test")
    await publish_event(broker, "order.created", service.org, {"n": 2})
    await receiver.wait_for(lambda r: len(r) >= 4)
    names = {"X-A": "", "X-B": "", "X-C": ""}
    assert [_custom(r, names) for r in receiver.received] == [
        {"X-A": "1", "X-B": "2"}, {"X-A": "1", "X-B": "2"}, {"X-C": "3"}, {"X-C": "3"},
    ]  # fmt: skip

    status, cleared = await service.call("PATCH", path, {"headers": None})
    assert (status, cleared["headers"]) == (200, {})
    status, fetched = await service.call("GET", path)
    assert fetched["headers"] == {}
    await service.call("POST", f"{path}/test")
    await receiver.wait_for(lambda r: len(r) >= 5)
    assert _custom(receiver.received[-1], names) == {}


async def test_timeout_seconds_bounds_the_whole_attempt(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    async def answers_after_3s(_request: web.Request, _seen: int) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response(text="late")

    receiver.behaviours["/slow"] = answers_after_3s
    receiver.behaviours["/slow-default"] = answers_after_3s
    service = await service_factory(delivery_timeout=10, retry_schedule="60")
    short = await _create(service, receiver.url("/slow"), timeout_seconds=1)
    default = await _create(service, receiver.url("/slow-default"))
    assert default["timeout_seconds"] == 10

    (_, timed_out), (_, waited) = await asyncio.gather(
        service.call("POST", f"/webhooks/{short['id']}/test"),
        service.call("POST", f"/webhooks/{default['id']}/test"),
    )
    assert timed_out["success"] is False
    assert timed_out["status_code"] is None
    assert timed_out["error"]["kind"] == "timeout"
    assert 900 <= timed_out["duration_ms"] < 2000, timed_out
    # The same receiver within DELIVERY_TIMEOUT: the endpoint's own timeout made the difference.
    assert (waited["success"], waited["status_code"]) == (True, 200)
    assert waited["duration_ms"] >= 3000

    # The pipeline's attempt gets the same bound.
    await publish_event(broker, "order.created", service.org, {"n": 1})
    attempts: list[dict[str, Any]] = []

    async def recorded() -> bool:
        nonlocal attempts
        _, page = await service.call("GET", f"/webhooks/{short['id']}/deliveries")
        attempts = [a for a in page["data"] if a["event_type"] == "order.created"]
        return bool(attempts)

    await eventually(recorded, what="the pipeline's attempt recorded")
    assert attempts[0]["error"]["kind"] == "timeout"
    assert 900 <= attempts[0]["duration_ms"] < 2000, attempts[0]


async def test_header_values_never_reach_logs_or_metrics(
    service: Service,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    values = {"X-Api-Key": "k_live_never_logged_7f3a", "X-Other": "also-private-91c2"}
    # The levels the service gives libraries at LOG_LEVEL=debug (worker.ops.logging): those it
    # knows follow it, but SQLAlchemy and Alembic, which echo statements' parameters, stay at
    # warning, as does every other library (aiosqlite's debug lines carry parameters too).
    for name in LIBRARY_LOGGERS:
        floor = logging.WARNING if name in {"sqlalchemy", "alembic"} else logging.DEBUG
        caplog.set_level(floor, logger=name)
    with capture_logs() as logs:
        created = await _create(service, receiver.url("/h"), headers=values)
        path = f"/webhooks/{created['id']}"
        status, attempt = await service.call("POST", f"{path}/test")
        assert status == 200
        await publish_event(broker, "order.created", service.org, {"n": 1})
        await receiver.wait_for(lambda r: len(r) >= 2)
        await service.call("POST", f"{path}/deliveries/{attempt['id']}/retry")
        await service.call("PATCH", path, {"headers": {**values, "X-Third": "private-too-44"}})
        await service.call("POST", f"{path}/test")
        await receiver.wait_for(lambda r: len(r) >= 4)

        async def all_logged() -> bool:
            return sum(1 for entry in logs if entry.get("event") == "delivery attempt") >= 4

        await eventually(all_logged, what="every attempt logged")
    async with service.http.get(f"{service.base}/metrics") as response:
        metrics = await response.text()

    assert all(_custom(r, values) == values for r in receiver.received[:3])
    updated = [entry for entry in logs if entry["event"] == "webhook updated"]
    assert updated[0]["fields"] == ["headers"]  # the names of the fields changed, no more
    secrets = [*values.values(), "private-too-44"]
    for entry in logs:
        for secret in secrets:
            assert secret not in str(entry), entry
    for record in caplog.records:
        for secret in secrets:
            assert secret not in record.getMessage(), record
    for secret in secrets:
        assert secret not in metrics


async def test_the_openapi_document_shows_the_options(service: Service) -> None:
    async with service.http.get(f"{service.base}/api/v2/openapi.json") as response:
        document = await response.json()
    schemas = document["components"]["schemas"]
    for name in ("WebhookCreate", "WebhookUpdate"):
        properties = schemas[name]["properties"]
        assert {"headers", "rate_limit", "timeout_seconds", "ordered"} <= set(properties)
        headers = next(v for v in properties["headers"]["anyOf"] if v.get("type") == "object")
        assert headers["maxProperties"] == 20
        assert headers["propertyNames"]["pattern"] == rules.NAME_PATTERN
        assert headers["additionalProperties"] == {"type": "string", "pattern": rules.VALUE_PATTERN}
        for reserved in ("webhook-*", "proxy-*", "traceparent", "transfer-encoding"):
            assert reserved in headers["description"]
        rate = next(v for v in properties["rate_limit"]["anyOf"] if v.get("type") == "integer")
        assert (rate["minimum"], rate["maximum"]) == (1, 10_000)
        timeout = next(
            v for v in properties["timeout_seconds"]["anyOf"] if v.get("type") == "integer"
        )
        assert timeout["minimum"] == 1
        assert "DELIVERY_TIMEOUT" in properties["timeout_seconds"]["description"]
    shown = schemas["Webhook"]
    assert {"headers", "rate_limit", "timeout_seconds", "ordered"} <= set(shown["required"])
    assert shown["properties"]["ordered"]["type"] == "boolean"
    example = document["paths"]["/webhooks"]["post"]["requestBody"]["content"]["application/json"]
    assert set(example["example"]) >= {"headers", "timeout_seconds"}


# --- the migration ---------------------------------------------------------------------------


# The webhooks table as migration 0003 left it (the columns an insert needs).
OLD_WEBHOOKS = sa.table(
    "webhooks",
    *(sa.column(name, sa.String) for name in ("id", "org_id", "url", "description", "secret")),
    sa.column("events", sa.JSON),
    sa.column("enabled", sa.Boolean),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
)


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own, with no schema yet, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrate.db'}"
        return
    async with fresh_postgres("sfw_options") as url:
        yield url


async def test_migration_0004_adds_the_options_to_existing_endpoints(empty_database: str) -> None:
    engine = database.create_engine(empty_database)

    def to(revision: str, down: bool = False) -> Any:  # noqa: ANN401
        def run(connection: sa.Connection) -> None:
            config = database._alembic_config()
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)

        return run

    def columns(connection: sa.Connection) -> set[str]:
        return {c["name"] for c in sa.inspect(connection).get_columns("webhooks")}

    try:
        async with engine.begin() as connection:
            await connection.run_sync(to("0003"))
        # An endpoint registered before the upgrade, by the version before it.
        box = SecretBox([TEST_SECRET_KEY])
        store = Store(engine, box)
        async with engine.begin() as connection:
            now = utcnow()
            await connection.execute(
                OLD_WEBHOOKS.insert().values(
                    id="wh_old", org_id="org_old", url="https://example.com/h",
                    events=["order.created"], enabled=True, description="",
                    secret=box.seal("whsec_old"), created_at=now, updated_at=now,
                )
            )  # fmt: skip
            await connection.execute(
                webhook_subscriptions.insert().values(
                    webhook_id="wh_old", event_type="order.created", org_id="org_old"
                )
            )
        async with engine.begin() as connection:
            await connection.run_sync(to("head"))
            assert await connection.run_sync(columns) >= {
                "headers", "rate_limit", "timeout_seconds", "ordered",
            }  # fmt: skip
        old = await store.endpoints.get("wh_old")
        assert old is not None
        assert (old.headers, old.rate_limit, old.timeout_seconds, old.ordered) == (
            {}, None, None, False,
        )  # fmt: skip
        changed = await store.endpoints.update(
            "org_old", "wh_old", {"headers": {"X-A": "1"}, "rate_limit": 7, "ordered": True}
        )
        assert changed is not None
        assert (changed.headers, changed.rate_limit, changed.ordered) == ({"X-A": "1"}, 7, True)

        async with engine.begin() as connection:
            await connection.run_sync(to("0003", down=True))
            remaining = await connection.run_sync(columns)
        assert not remaining & {"headers", "rate_limit", "timeout_seconds", "ordered"}
        assert "failing_since" in remaining
        async with engine.connect() as connection:
            ids = (await connection.execute(sa.text("SELECT id FROM webhooks"))).scalars().all()
            subscribed = await connection.execute(
                sa.text("SELECT webhook_id FROM webhook_subscriptions")
            )
            assert ids == ["wh_old"]  # the downgrade kept the rows,
            assert subscribed.scalars().all() == ["wh_old"]  # and those that refer to them
    finally:
        await engine.dispose()
