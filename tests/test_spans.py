"""The pipeline's spans (:mod:`worker.ops.spans`) are what the SDK's tracer would have made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags, TraceState

from worker.ops import tracing
from worker.ops.spans import SpanMaker
from worker.ops.tracing import Tracing, parent_of

pytestmark = pytest.mark.unit

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
ATTRIBUTES: dict[str, str | int] = {tracing.EVENT_ID: "evt_1", tracing.ATTEMPT: 2}


def _provider(
    sampler: sampling.Sampler | None = None, limits: SpanLimits | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "spans-test"}),
        sampler=sampler,
        span_limits=limits,
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def made() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider, exporter = _provider()
    yield provider, exporter
    provider.shutdown()


def _both(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    carrier: dict[str, str] | None,
    status: Status | None = None,
) -> tuple[ReadableSpan, ReadableSpan]:
    """The same span made by the SDK's tracer and by a SpanMaker on it."""
    tracer = provider.get_tracer(tracing.TRACER_NAME, "1.0")
    parent = parent_of(carrier) if carrier else None
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
    sdk = tracer.start_span("webhooks attempt", context, SpanKind.CLIENT, dict(ATTRIBUTES))
    if status is not None:
        sdk.set_status(status)
    sdk.end()
    maker = SpanMaker(tracer)  # type: ignore[arg-type]
    ours = maker.start("webhooks attempt", SpanKind.CLIENT, parent)
    maker.end(ours, dict(ATTRIBUTES), *([status] if status else []))
    (theirs, mine) = exporter.get_finished_spans()
    return theirs, mine


def _same_but_ids_and_times(theirs: ReadableSpan, mine: ReadableSpan) -> None:
    assert (mine.name, mine.kind, mine.parent) == (theirs.name, theirs.kind, theirs.parent)
    assert mine.resource is theirs.resource
    assert mine.instrumentation_scope == theirs.instrumentation_scope
    assert dict(mine.attributes or {}) == dict(theirs.attributes or {})
    assert (mine.status.status_code, mine.status.description) == (
        theirs.status.status_code,
        theirs.status.description,
    )
    assert (mine.events, mine.links) == (theirs.events, theirs.links) == ((), ())
    ours, sdk = mine.get_span_context(), theirs.get_span_context()
    assert ours is not None
    assert sdk is not None
    assert (ours.trace_flags, ours.trace_state, ours.is_remote) == (
        sdk.trace_flags,
        sdk.trace_state,
        sdk.is_remote,
    )
    assert mine.start_time is not None
    assert mine.end_time is not None
    assert mine.start_time <= mine.end_time


@pytest.mark.parametrize("carrier", [None, {"traceparent": PARENT, "tracestate": "vendor=v1"}])
def test_a_span_is_what_the_sdk_makes(
    made: tuple[TracerProvider, InMemorySpanExporter], carrier: dict[str, str] | None
) -> None:
    theirs, mine = _both(*made, carrier)
    _same_but_ids_and_times(theirs, mine)
    if carrier is not None:
        assert mine.context.trace_id == theirs.context.trace_id, "the parent's trace"
        assert mine.context.trace_state == TraceState([("vendor", "v1")])


def test_an_error_status_is_kept(made: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    theirs, mine = _both(*made, None, Status(StatusCode.ERROR, "TimeoutError"))
    _same_but_ids_and_times(theirs, mine)
    assert mine.status.description == "TimeoutError"


def test_without_a_parent_the_current_span_is_the_parent(
    made: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = made
    api = provider.get_tracer("api")
    with (
        api.start_as_current_span("POST /api/v2/webhooks") as request,
        Tracing(provider).attempt({"id": "evt_1", "type": "t"}, "wh_1", 1, None),
    ):
        pass
    attempt = next(s for s in exporter.get_finished_spans() if s.name == "webhooks attempt")
    assert attempt.parent is not None
    assert attempt.parent.span_id == request.get_span_context().span_id


def test_an_unsampled_parent_makes_an_unrecorded_span_that_still_propagates(
    made: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = made
    with Tracing(provider).fanout({"traceparent": UNSAMPLED}) as fan:
        assert trace.get_current_span().get_span_context().trace_flags == TraceFlags.DEFAULT
    assert exporter.get_finished_spans() == ()
    assert fan.headers is not None
    assert fan.headers["traceparent"].startswith(UNSAMPLED[:36]), "the same trace"
    assert fan.headers["traceparent"].endswith("-00"), "not sampled"


@pytest.mark.parametrize(
    ("sampler", "recorded"),
    [
        (sampling.ALWAYS_OFF, 0),
        (sampling.ParentBasedTraceIdRatio(0.0), 1),  # the sampled parent decides
        (sampling.TraceIdRatioBased(0.0), 0),
        (sampling.ALWAYS_ON, 1),
    ],
)
def test_the_providers_sampler_decides(sampler: sampling.Sampler, recorded: int) -> None:
    provider, exporter = _provider(sampler)
    with Tracing(provider).fanout({"traceparent": PARENT}):
        pass
    assert len(exporter.get_finished_spans()) == recorded
    provider.shutdown()


def test_lowered_attribute_limits_apply() -> None:
    provider, exporter = _provider(limits=SpanLimits(max_span_attributes=1, max_attribute_length=3))
    with Tracing(provider).attempt({"id": "evt_123", "type": "order.created"}, "wh_1", 1, None):
        pass
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {}) == {tracing.METHOD: "POS"}, "the newest kept, cut short"
    assert span.dropped_attributes == 4
    provider.shutdown()
