"""Tracing: one trace from the publisher, through fan-out and each attempt, to the receiver.

The service runs with an OTLP endpoint (a local sink answering 200, so the exporter is really
on) and, for the assertions, an in-memory exporter added to its own tracer provider. The
unit tests at the end cover the context helpers without a broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import aio_pika
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from structlog.testing import capture_logs

from schemas.publish import publish_event, trace_headers
from tests.conftest import Receiver, Service, ServiceFactory, eventually
from worker.ops import tracing
from worker.ops.logging import add_trace_ids
from worker.ops.tracing import Tracing, carrier_from, setup_tracing
from worker.settings import Settings

pytestmark = pytest.mark.timeout(90)

FANOUT = "webhooks fan-out"
ATTEMPT = "webhooks attempt"
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class OtlpSink:
    """Accepts OTLP/HTTP exports as a collector would, and keeps them."""

    url: str = ""
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.content_type, await request.read()))
        # An empty ExportTraceServiceResponse: everything accepted.
        return web.Response(body=b"", content_type="application/x-protobuf")


@pytest.fixture
async def otlp_sink() -> AsyncIterator[OtlpSink]:
    sink = OtlpSink()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield sink
    await runner.cleanup()


@dataclass
class Traced:
    service: Service
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self, name: str | None = None, **where: str) -> list[ReadableSpan]:
        """Ended spans named ``name`` whose attributes hold ``where`` (an event's or an
        endpoint's id: events left in the session's queue by other tests make spans too)."""
        keys = {"event_id": tracing.EVENT_ID, "endpoint_id": tracing.ENDPOINT_ID}
        return [
            s
            for s in self.exporter.get_finished_spans()
            if (name is None or s.name == name)
            and all((s.attributes or {}).get(keys[k]) == v for k, v in where.items())
        ]

    async def wait_spans(self, name: str, count: int = 1, **where: str) -> list[ReadableSpan]:
        async def enough() -> bool:
            return len(self.spans(name, **where)) >= count

        await eventually(enough, what=f"{count} {name!r} span(s) ended")
        return self.spans(name, **where)


@pytest.fixture
async def traced(otlp_sink: OtlpSink, service_factory: ServiceFactory) -> Traced:
    # The sink first, so it outlives the service: the last export happens at its shutdown.
    service = await service_factory(
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_sink.url, OTEL_SERVICE_NAME="sfw-tracing-test"
    )
    assert service.running.tracing is not None
    provider = service.running.tracing.provider
    assert provider is not None, "an OTLP endpoint turns tracing on"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Traced(service, provider, exporter)


async def _webhook(service: Service, url: str) -> dict[str, str]:
    status, body = await service.call(
        "POST", "/webhooks", {"url": url, "events": ["order.created"]}
    )
    assert status == 201, body
    return body  # type: ignore[no-any-return]


def _ids(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent."""
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def _hex(span: ReadableSpan | trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def _parent_id(span: ReadableSpan) -> str | None:
    return trace.format_span_id(span.parent.span_id) if span.parent else None


def _everything_recorded(spans: Sequence[ReadableSpan]) -> str:
    """Every name, attribute, event and status text of ``spans``, as one string to search."""
    parts: list[str] = []
    for span in spans:
        parts += [span.name, str(span.status.description), repr(dict(span.attributes or {}))]
        parts += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
        parts += [repr(dict(span.resource.attributes))]
    return "\n".join(parts)


# --- end to end ------------------------------------------------------------------------------


async def test_one_trace_from_publish_to_receipt(
    traced: Traced,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    otlp_sink: OtlpSink,
) -> None:
    service = traced.service
    # A query that a customer may use as a credential: it must never reach a span.
    webhook = await _webhook(service, receiver.url("/traced?key=q-credential-7781"))
    publisher = traced.provider.get_tracer("an upstream service")
    with capture_logs(processors=[add_trace_ids]) as logs:
        with publisher.start_as_current_span("place order", kind=SpanKind.PRODUCER) as publish:
            envelope = await publish_event(broker, "order.created", service.org, {"n": 1})
        (received,) = await receiver.wait_for(lambda r: len(r) >= 1)
        (attempt,) = await traced.wait_spans(ATTEMPT, event_id=envelope.id)
    trace_id, publish_id = _hex(publish)

    (fanout,) = traced.spans(FANOUT, event_id=envelope.id)
    assert _hex(fanout)[0] == trace_id
    assert _parent_id(fanout) == publish_id, "fan-out continues the publisher's span"
    assert fanout.kind is SpanKind.CONSUMER
    assert fanout.attributes == {
        tracing.EVENT_ID: envelope.id,
        tracing.EVENT_TYPE: "order.created",
        tracing.ENDPOINTS: 1,
    }

    attempt_trace, attempt_id = _hex(attempt)
    assert attempt_trace == trace_id
    assert _parent_id(attempt) == _hex(fanout)[1], "each attempt is a child of the fan-out"
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes == {
        tracing.EVENT_ID: envelope.id,
        tracing.EVENT_TYPE: "order.created",
        tracing.ENDPOINT_ID: webhook["id"],
        tracing.ATTEMPT: 1,
        tracing.METHOD: "POST",
        tracing.OUTCOME: "succeeded",
        tracing.STATUS_CODE: 200,
    }
    assert attempt.status.status_code is StatusCode.UNSET

    # The receiver's request names the attempt's span, in the publisher's trace.
    assert _ids(received.headers["traceparent"]) == (trace_id, attempt_id)

    # The log line of the attempt carries the same trace and the attempt's span.
    (line,) = [
        e for e in logs if e["event"] == "delivery attempt" and e.get("event_id") == envelope.id
    ]
    assert line["event_id"] == envelope.id
    assert (line["trace_id"], line["span_id"]) == (trace_id, attempt_id)

    recorded = _everything_recorded(traced.spans(event_id=envelope.id))
    for value in (
        "q-credential-7781",
        receiver.base_url,
        webhook["secret"],
        received.headers["webhook-signature"],
        service.token,
    ):
        assert value not in recorded

    # The configured exporter posts the same spans over OTLP/HTTP, as protobuf.
    assert await asyncio.to_thread(traced.provider.force_flush, 10_000)
    exported = [ExportTraceServiceRequest.FromString(body) for _, _, body in otlp_sink.requests]
    assert {(path, kind) for path, kind, _ in otlp_sink.requests} == {
        ("/v1/traces", "application/x-protobuf")
    }
    names = {
        (attr.value.string_value, span.name)
        for request in exported
        for resource in request.resource_spans
        for attr in resource.resource.attributes
        if attr.key == "service.name"
        for scope in resource.scope_spans
        for span in scope.spans
    }
    assert {("sfw-tracing-test", FANOUT), ("sfw-tracing-test", ATTEMPT)} <= names


async def test_a_retry_is_a_sibling_attempt_in_the_same_trace(
    traced: Traced, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def fail_first(_request: web.Request, seen: int) -> web.StreamResponse:
        return web.Response(status=500) if seen == 0 else web.Response(text="ok")

    receiver.behaviours["/flaky"] = fail_first
    webhook = await _webhook(traced.service, receiver.url("/flaky"))
    publisher = traced.provider.get_tracer("an upstream service")
    with publisher.start_as_current_span("place order") as publish:
        envelope = await publish_event(broker, "order.created", traced.service.org, {"n": 2})
    received = await receiver.wait_for(lambda r: len(r) >= 2)
    ended = await traced.wait_spans(ATTEMPT, 2, event_id=envelope.id)
    attempts = sorted(ended, key=lambda s: s.start_time or 0)
    (fanout,) = traced.spans(FANOUT, event_id=envelope.id)
    trace_id = _hex(publish)[0]

    outcomes = [
        (
            a.attributes[tracing.ATTEMPT],
            a.attributes[tracing.OUTCOME],
            a.attributes[tracing.STATUS_CODE],
        )
        for a in attempts
        if a.attributes is not None
    ]
    assert outcomes == [(1, "retry", 500), (2, "succeeded", 200)]
    for span, request in zip(attempts, received, strict=True):
        assert span.attributes is not None
        assert span.attributes[tracing.ENDPOINT_ID] == webhook["id"]
        # The retry went through its tier and the deliveries queue with the fan-out's context.
        assert _parent_id(span) == _hex(fanout)[1]
        assert _ids(request.headers["traceparent"]) == (trace_id, _hex(span)[1])


async def test_api_requests_and_manual_attempts_are_spans(
    traced: Traced, receiver: Receiver
) -> None:
    service = traced.service
    webhook = await _webhook(service, receiver.url("/manual"))
    status, _ = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200
    status, _ = await service.call("GET", "/webhooks/wh_does_not_exist")
    assert status == 404
    async with service.http.get(f"{service.base}/healthz") as response:
        assert response.status == 200
    (received,) = receiver.at("/manual")

    servers = {
        (s.name, s.attributes[tracing.STATUS_CODE]): s
        for s in traced.spans()
        if s.kind is SpanKind.SERVER and s.attributes is not None
    }
    # Named by route pattern, never by the path with its ids; probes make no span.
    assert set(servers) == {
        ("POST /api/v2/webhooks", 201),
        ("POST /api/v2/webhooks/{webhook_id}/test", 200),
        ("GET /api/v2/webhooks/{webhook_id}", 404),
    }
    test_call = servers["POST /api/v2/webhooks/{webhook_id}/test", 200]
    assert test_call.attributes is not None
    assert test_call.attributes[tracing.ROUTE] == "/api/v2/webhooks/{webhook_id}/test"
    assert test_call.attributes[tracing.METHOD] == "POST"

    (attempt,) = traced.spans(ATTEMPT, endpoint_id=webhook["id"])
    assert _parent_id(attempt) == _hex(test_call)[1], "the test send is part of the request"
    assert attempt.attributes is not None
    assert attempt.attributes[tracing.EVENT_TYPE] == "webhook.test"
    assert attempt.attributes[tracing.OUTCOME] == "succeeded"
    assert _ids(received.headers["traceparent"]) == _hex(attempt)
    assert webhook["id"] not in _everything_recorded(list(servers.values()))


async def test_without_an_exporter_the_publishers_context_passes_through(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    assert service.running.tracing is not None
    assert not service.running.tracing.on
    await _webhook(service, receiver.url("/untraced"))
    publisher = TracerProvider().get_tracer("an upstream service")
    with publisher.start_as_current_span("place order"):
        sent = trace_headers()
        await publish_event(broker, "order.created", service.org, {"n": 3})
    (received,) = await receiver.wait_for(lambda r: len(r) >= 1)
    # No span of its own: the receiver sees the publisher's context unchanged.
    assert received.headers["traceparent"] == sent["traceparent"]


async def test_without_any_context_nothing_is_added(service: Service, receiver: Receiver) -> None:
    webhook = await _webhook(service, receiver.url("/plain"))
    status, _ = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200
    (received,) = receiver.at("/plain")
    assert "traceparent" not in {name.lower() for name in received.headers}


# --- units -----------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider), exporter
    provider.shutdown()


@pytest.mark.unit
def test_trace_headers_name_the_current_span() -> None:
    assert trace_headers() == {}, "outside a span: nothing to send"
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        trace_id, span_id = _hex(span)
        (name, traceparent), *more = trace_headers().items()
    assert (name, more) == ("traceparent", [])
    assert _ids(traceparent) == (trace_id, span_id)
    assert int(traceparent[-2:], 16) & 1, "sampled"
    state = TraceState([("vendor", "v1")])
    context = trace.SpanContext(
        int(trace_id, 16),
        0x1234,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
        trace_state=state,
    )
    with trace.use_span(trace.NonRecordingSpan(context)):
        assert trace_headers() == {
            "traceparent": f"00-{trace_id}-{0x1234:016x}-01",
            "tracestate": "vendor=v1",
        }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-webhook-id": "wh_1"}, None),
        ({"traceparent": PARENT}, {"traceparent": PARENT}),
        ({"traceparent": PARENT.encode()}, {"traceparent": PARENT}),  # as the broker may give it
        (
            {"traceparent": PARENT, "tracestate": b"vendor=v1"},
            {"traceparent": PARENT, "tracestate": "vendor=v1"},
        ),
        ({"tracestate": "vendor=v1"}, None),  # a state without its parent means nothing
        ({"traceparent": PARENT, "tracestate": "a=1\r\nx-evil: 1"}, {"traceparent": PARENT}),
        ({"traceparent": PARENT + "\r\nx-evil: 1"}, None),  # never a header injection
        ({"traceparent": PARENT.upper()}, None),
        ({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}, None),  # invalid trace id
        ({"traceparent": "ff" + PARENT[2:]}, None),  # version ff is invalid
        ({"traceparent": 42}, None),
        ({"traceparent": b"\xff\xfe"}, None),
    ],
)
def test_the_context_a_message_carries(
    headers: dict[str, object], expected: dict[str, str] | None
) -> None:
    assert carrier_from(headers) == expected
    assert Tracing(None).incoming(headers) == expected


@pytest.mark.unit
def test_without_a_tracer_the_context_passes_through_unchanged() -> None:
    off = Tracing(None)
    assert not off.on
    assert off.middlewares("/api/v2") == []
    with off.fanout({"traceparent": PARENT}) as fan:
        assert fan.headers == {"traceparent": PARENT}
        assert not trace.get_current_span().get_span_context().is_valid, "no span made"
        fan.fanned_out("evt_1", "order.created", 3)
    with off.attempt({"id": "evt_1", "type": "order.created"}, "wh_1", 1, fan.headers) as one:
        one.finished("succeeded", 200)
        assert one.headers == one.parent == {"traceparent": PARENT}
    with off.fanout(None) as nothing:
        assert nothing.headers is None


@pytest.mark.unit
def test_fan_out_and_attempt_spans_continue_the_incoming_context(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    on, exporter = memory
    with on.fanout({"traceparent": PARENT, "tracestate": "vendor=v1"}) as fan:
        fan.fanned_out("evt_1", "order.created", 2)
    assert fan.parent == {"traceparent": PARENT, "tracestate": "vendor=v1"}
    assert fan.headers is not None
    with on.attempt({"id": "evt_1", "type": "order.created"}, "wh_1", 3, fan.headers) as one:
        one.finished("retry", 503)
    (fanout, attempt) = exporter.get_finished_spans()
    parent_trace, parent_span = _ids(PARENT)
    assert _hex(fanout)[0] == _hex(attempt)[0] == parent_trace
    assert _parent_id(fanout) == parent_span
    assert fan.headers == {
        "traceparent": f"00-{parent_trace}-{_hex(fanout)[1]}-01",
        "tracestate": "vendor=v1",
    }
    assert _parent_id(attempt) == _hex(fanout)[1]
    assert one.parent == fan.headers, "a retry is published with the fan-out's context"
    assert one.headers is not None
    assert _ids(one.headers["traceparent"]) == _hex(attempt)
    assert attempt.attributes is not None
    assert attempt.attributes[tracing.ATTEMPT] == 3
    assert attempt.attributes[tracing.OUTCOME] == "retry"
    assert attempt.attributes[tracing.STATUS_CODE] == 503


@pytest.mark.unit
def test_a_failure_is_recorded_by_its_type_only(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    on, exporter = memory

    class StatementError(Exception):
        pass

    with pytest.raises(StatementError), on.fanout(None):
        raise StatementError("INSERT ... parameters: ('whsec_secret',)")
    (span,) = exporter.get_finished_spans()
    assert span.parent is None, "no incoming context: a trace of its own"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes == {tracing.ERROR_TYPE: StatementError.__qualname__}
    assert "whsec_secret" not in _everything_recorded([span])


@pytest.mark.unit
def test_a_failed_attempt_keeps_its_attributes(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    on, exporter = memory
    event = {"id": "evt_1", "type": "order.created"}
    one = on.attempt(event, "wh_1", 2, None)

    def fail() -> None:
        with one:
            assert trace.get_current_span().get_span_context().is_valid, "current as it runs"
            raise TimeoutError

    with pytest.raises(TimeoutError):
        fail()
    (span,) = exporter.get_finished_spans()
    assert span.attributes == {
        tracing.EVENT_ID: "evt_1",
        tracing.EVENT_TYPE: "order.created",
        tracing.ENDPOINT_ID: "wh_1",
        tracing.ATTEMPT: 2,
        tracing.METHOD: "POST",
        tracing.ERROR_TYPE: "TimeoutError",
    }
    assert one.headers is not None
    assert _ids(one.headers["traceparent"]) == _hex(span)


@pytest.mark.unit
def test_log_lines_carry_the_current_span() -> None:
    assert add_trace_ids(None, "info", {"event": "x"}) == {"event": "x"}
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        line = add_trace_ids(None, "info", {"event": "x"})
    trace_id, span_id = _hex(span)
    assert line == {"event": "x", "trace_id": trace_id, "span_id": span_id}
    json.dumps(line)  # renders as JSON as it is


def _settings(**values: str) -> Settings:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        "OTEL_SERVICE_NAME": "",
        "OTEL_SDK_DISABLED": "",
    }
    return Settings.model_validate({**otel, **values})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "endpoint"),
    [
        ({}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            "http://collector:4318/v1/traces",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
            "http://collector:4318/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/custom",
            },
            "http://traces:4318/custom",
        ),
    ],
)
def test_where_spans_are_exported(values: dict[str, str], endpoint: str | None) -> None:
    settings = _settings(**values)
    assert tracing.traces_endpoint(settings) == endpoint
    assert tracing.enabled(settings) is (endpoint is not None)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "service"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "sellfern-webhooks"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SERVICE_NAME": "hooks-eu"},
            "hooks-eu",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "TRUE"}, None),
        ({}, None),
    ],
)
def test_setup_follows_the_otel_variables(values: dict[str, str], service: str | None) -> None:
    built = setup_tracing(_settings(**values))
    try:
        assert built.on is (service is not None)
        if service is not None:
            assert built.provider is not None
            assert built.provider.resource.attributes["service.name"] == service
    finally:
        built.shutdown()


@pytest.mark.unit
@pytest.mark.parametrize("state", [None, TraceState([("vendor", "v1")])])
def test_a_spans_headers_are_what_the_propagator_writes_and_parse_back_to_it(
    state: TraceState | None,
) -> None:
    """The headers formatted for a span, and the context remembered for them, are what the
    W3C propagator would write while the span is current and read back from them."""
    span_context = trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(1),
        trace_state=state,
    )
    with trace.use_span(trace.NonRecordingSpan(span_context)):
        written = tracing.current_carrier()
    carrier = tracing.carrier_of(span_context)
    assert carrier == written
    remembered = tracing.parent_of(carrier)
    extracted = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier))
    assert remembered == extracted.get_span_context()
    assert remembered.is_remote
