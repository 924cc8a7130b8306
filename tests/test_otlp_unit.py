"""The OTLP request written by worker.ops.otlp is the one the SDK's encoder makes.

Each case records real spans with the SDK and compares our bytes with ``encode_spans``: parsed,
as messages (what a collector reads; unknown fields count), and as bytes, which also see a
zero written where the SDK writes nothing.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.util.types import AnyValue

from worker.ops import otlp

pytestmark = pytest.mark.unit

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
REMOTE = SpanContext(
    TRACE_ID,
    0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "t61rcWkgMzE"), ("other", "1")]),
)
LINKED = SpanContext(0xA1B2C3D4E5F60718293A4B5C6D7E8F90, 0x1122334455667788, is_remote=False)
# Values of every kind an attribute may hold, and the edges of their encodings.
VALUES: dict[str, AnyValue] = {
    "str": "order.created",
    "empty": "",
    "unicode": "Größe 🚀 注文 ñ",
    "125": "z" * 125,  # the last whose KeyValue.value has a one-byte length
    "126": "z" * 126,
    "long": "x" * 200,  # a two-byte length
    "longer": "y" * 20_000,  # a three-byte length
    "true": True,
    "false": False,
    "zero": 0,
    "small": 127,
    "two bytes": 128,
    "status": 503,
    "negative": -1,
    "int64 max": 2**63 - 1,
    "int64 min": -(2**63),
    "float": -1.5,
    "float zero": 0.0,
    "huge": 1e300,
    "inf": float("inf"),
    "bytes": b"\x00\xff",
    "no bytes": b"",
    "none": None,
    "strs": ("a", "ü", ""),
    "bools": (True, False),
    "ints": (1, -2, 2**40),
    "floats": (1.5, -0.25),
    "with none": ("x", None),
    "no items": (),
    "mapping": {"a": 1, "b": {"c": ("d", 2.5)}},
    "ключ 🔑": "unicode key",
}


def recorder(
    resource: Resource | None = None, limits: SpanLimits | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(resource=resource or Resource.create({}), span_limits=limits)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def assert_as_sdk(spans: Sequence[ReadableSpan]) -> None:
    """Our own bytes (no fallback to the SDK) are the SDK's request."""
    ours = otlp.Encoder().encode_own(spans)
    sdk = encode_spans(spans)
    assert ExportTraceServiceRequest.FromString(ours) == sdk
    assert ours == sdk.SerializeToString()


@pytest.fixture
def spans() -> Iterator[list[ReadableSpan]]:
    """The worker's two spans, and one of everything else the SDK records."""
    provider, exporter = recorder(
        Resource.create({"service.name": "sellfern-webhooks", "service.version": "0.1.0"}),
        SpanLimits(max_span_attributes=40, max_events=3, max_links=2, max_event_attributes=2),
    )
    tracer = provider.get_tracer("sellfern_webhooks", "0.1.0")
    parent = set_span_in_context(NonRecordingSpan(REMOTE))
    with tracer.start_as_current_span("webhooks fan-out", parent, SpanKind.CONSUMER) as fanout:
        fanout.set_attributes({"webhooks.event.id": "evt_01", "webhooks.endpoints": 3})
        attempt = tracer.start_span("webhooks attempt", kind=SpanKind.CLIENT)
        attempt.set_attributes({"webhooks.attempt": 1, "http.request.method": "POST"})
        attempt.set_attribute("http.response.status_code", 503)
        attempt.set_status(Status(StatusCode.ERROR, "ServerDisconnectedError"))
        attempt.end()
    for kind in SpanKind:
        tracer.start_span(f"kind {kind.name}", kind=kind).end()
    everything = tracer.start_span(
        "everything ✓",
        parent,
        attributes=VALUES,
        links=[
            Link(REMOTE, {"link": "remote"}),  # its trace state is left out, as by the SDK
            Link(LINKED),
            Link(LINKED, {"third": "one too many"}),
        ],
        start_time=1,
    )
    everything.add_event("dropped: the oldest of four")
    everything.add_event("événement", {"a": 1, "b": (True,), "c": "one too many"}, timestamp=2**62)
    everything.add_event("no attributes", {})
    everything.add_event("plain")
    everything.set_status(Status(StatusCode.OK))
    everything.end(end_time=2**64 - 1)
    tracer.start_span("").end()  # an empty name is not written, as an empty string is not
    yield list(exporter.get_finished_spans())
    provider.shutdown()


def test_the_recorded_spans_are_encoded_as_by_the_sdk(spans: list[ReadableSpan]) -> None:
    assert_as_sdk(spans)
    # What the cases above are meant to cover did happen.
    everything = next(s for s in spans if s.name == "everything ✓")
    assert (everything.dropped_links, everything.dropped_events) == (1, 1)
    assert everything.events[0].dropped_attributes == 1
    assert everything.context is not None
    assert everything.context.trace_state.get("vendor") == "t61rcWkgMzE"
    assert len(everything.attributes or {}) == len(VALUES)


def test_each_span_alone_and_no_span(spans: list[ReadableSpan]) -> None:
    for span in spans:
        assert_as_sdk([span])
    assert otlp.Encoder().encode_own([]) == b""


def test_dropped_attributes_and_a_status_without_a_description() -> None:
    provider, exporter = recorder(limits=SpanLimits(max_span_attributes=2))
    span = provider.get_tracer("t").start_span("s", attributes={"a": 1, "b": 2, "c": 3})
    span.set_status(Status(StatusCode.ERROR))
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert finished.dropped_attributes == 1
    assert_as_sdk([finished])


def test_spans_are_grouped_by_resource_then_scope_as_by_the_sdk() -> None:
    first, exporter = recorder(Resource({"service.name": "a"}, schema_url="https://r/1"))
    second = TracerProvider(resource=Resource({"service.name": "b", "n": 2}))
    # Equal to the first resource, yet another object: the SDK puts them together.
    twin = TracerProvider(resource=Resource({"service.name": "a"}, schema_url="https://r/1"))
    for provider in (second, twin):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracers = [
        first.get_tracer("one", "1.0", schema_url="https://s/1", attributes={"scope": "x"}),
        second.get_tracer("two"),  # no version
        first.get_tracer("one", "1.0", schema_url="https://s/1", attributes={"scope": "x"}),
        twin.get_tracer("three", "3"),
        first.get_tracer("four ☃"),
    ]
    for round_ in range(3):
        for number, tracer in enumerate(tracers):
            tracer.start_span(f"{round_}.{number}").end()
    finished = exporter.get_finished_spans()
    request = encode_spans(finished)
    assert [len(r.scope_spans) for r in request.resource_spans] == [3, 1]
    assert_as_sdk(finished)


def test_blocks_kept_from_batch_to_batch_are_still_right(spans: list[ReadableSpan]) -> None:
    encoder = otlp.Encoder()
    for batch in (spans, spans[:1], spans[::-1], spans):
        assert encoder.encode_own(batch) == encode_spans(batch).SerializeToString()


# Values as the SDK keeps them; no NaN, which no message equals, and int64 for int_value.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(min_size=1), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(attributes=st.dictionaries(st.text(min_size=1), values, max_size=6), name=st.text())
def test_any_attributes_are_encoded_as_by_the_sdk(
    attributes: dict[str, AnyValue], name: str
) -> None:
    provider, exporter = recorder()
    span = provider.get_tracer("t").start_span(name, attributes=attributes)
    span.add_event(name, attributes)
    span.end()
    assert_as_sdk(exporter.get_finished_spans())


def test_the_comparison_sees_a_wrong_field(
    spans: list[ReadableSpan], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks above could not pass an encoder that is wrong in one field."""
    wrong = {
        "_KIND": dict.fromkeys(SpanKind, b"\x30" + otlp._ONE_BYTE[1]),  # all INTERNAL
        "_REMOTE": otlp._LOCAL,  # a remote parent's flag lost
        "_FIXED64": lambda n: (n ^ 1).to_bytes(8, "little"),  # times off by a nanosecond
    }
    for name, value in wrong.items():
        with monkeypatch.context() as patch:
            patch.setattr(otlp, name, value)
            with pytest.raises(AssertionError):
                assert_as_sdk(spans)
    # A field of a number the request does not have: kept as unknown, and seen.
    extra = otlp.Encoder().encode_own(spans) + b"\xa0\x06\x01"
    assert ExportTraceServiceRequest.FromString(extra) != encode_spans(spans)


def readable(attributes: Mapping[str, object]) -> ReadableSpan:
    """A span holding what the SDK's own API would not have let through."""
    context = SpanContext(TRACE_ID, 0x0102030405060708, is_remote=False)
    return ReadableSpan(
        "odd",
        context,
        attributes=attributes,  # type: ignore[arg-type]  # what the test is about
        resource=Resource({}),
        start_time=1,
        end_time=2,
    )


def test_a_span_without_a_scope() -> None:
    span = readable({"fine": "yes"})
    assert span.instrumentation_scope is None
    assert_as_sdk([span, span])


@pytest.mark.parametrize(
    "value",
    [2**63, -(2**63) - 1, "\ud800", object(), ("ok", 2**64)],
    ids=["over int64", "under int64", "lone surrogate", "unknown type", "in a sequence"],
)
def test_what_is_not_written_here_is_left_to_the_sdk(
    value: object, caplog: pytest.LogCaptureFixture
) -> None:
    spans = [readable({"fine": "yes", "odd": value})]
    with pytest.raises((OverflowError, UnicodeEncodeError, TypeError)):
        otlp.Encoder().encode_own(spans)
    with caplog.at_level(logging.CRITICAL):  # the SDK logs the attribute it drops
        sdk = encode_spans(spans)
        assert otlp.Encoder().encode(spans) == sdk.SerializePartialToString()
    assert [a.key for a in sdk.resource_spans[0].scope_spans[0].spans[0].attributes] == ["fine"]


# --- the exporter: the SDK's, with our bytes ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer(BaseHTTPResult):
    def content(self) -> bytes:
        return b""

    def headers(self) -> Mapping[str, str]:
        return {}


@dataclass
class Collector(BaseHTTPTransport):
    """Takes the exporter's requests and answers ``status``."""

    status: int = 200
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        assert method == "POST"
        assert timeout is not None
        self.requests.append((url, dict(headers or {}), data or b""))
        return Answer(status_code=self.status, reason="")

    def close(self) -> None:
        pass

    def is_connection_error(self, exception: Exception | None) -> bool:
        return isinstance(exception, ConnectionError)


def test_the_exporter_posts_our_request_with_the_sdks_settings(
    spans: list[ReadableSpan], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=sellfern")
    collector = Collector()
    exporter = otlp.SpanExporter(
        "http://collector:4318/v1/traces", compression=Compression.Gzip, _transport=collector
    )
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    ((url, headers, body),) = collector.requests
    assert url == "http://collector:4318/v1/traces"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["x-tenant"] == "sellfern"
    assert gzip.decompress(body) == encode_spans(spans).SerializeToString()


def test_the_exporter_fails_as_the_sdks_does(spans: list[ReadableSpan]) -> None:
    refused = Collector(status=400)
    exporter = otlp.SpanExporter(_transport=refused)
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert len(refused.requests) == 1  # a 400 is not retried

    small = Collector()
    too_large = otlp.SpanExporter(max_request_size=100, _transport=small)
    assert too_large.export(spans) is SpanExportResult.FAILURE
    assert small.requests == []

    closed = Collector()
    exporter = otlp.SpanExporter(_transport=closed)
    exporter.shutdown()  # type: ignore[no-untyped-call]  # the SDK's, unannotated
    assert exporter.export(spans) is SpanExportResult.FAILURE
    assert closed.requests == []
