"""Tracing with OpenTelemetry: one trace from the publisher to the receiver.

The publisher's context arrives in the AMQP headers ``traceparent`` and ``tracestate`` of the
event (W3C Trace Context, DESIGN §6). Fan-out continues it in one span per event; the tasks it
queues, and the retries of their attempts, carry the fan-out's context in the same headers;
every attempt is a span of its own, child of the fan-out's, and its POST carries the attempt's
``traceparent``. API requests are spans too, and so are the attempts made through the API.

Spans are exported (OTLP over HTTP, in batches, off the event loop) only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set and
``OTEL_SDK_DISABLED`` is not ``true``. Otherwise no span is made at all, which keeps the hot
path as it was: a message without trace headers costs one dictionary lookup, and one with them
has its context passed on unchanged, so the receiver still sees the publisher's trace.

Spans name events, endpoints and outcomes by id and never hold a URL, a header value, an
exception message (a database error may quote parameters) or a secret.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import Token
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker import __version__
from worker.ops.otlp import SpanExporter
from worker.ops.spans import OpenSpan, SpanMaker
from worker.settings import Settings

# W3C headers, in AMQP messages and HTTP requests alike: a trace's context and nothing else.
Carrier = dict[str, str]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
DEFAULT_SERVICE_NAME = "sellfern-webhooks"
TRACER_NAME = "sellfern_webhooks"
# How long a stopping process waits for its last spans to be exported: with the worker's drain
# (SHUTDOWN_DRAIN_SECONDS, 20 s) it stays well inside the pods' grace period (45 s).
SHUTDOWN_EXPORT_SECONDS = 5.0
# What an incoming traceparent may look like before its value is parsed or passed on: anything
# else (a line break, say) would otherwise end up in a header of a customer's request.
_TRACEPARENT_SHAPE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_W3C = TraceContextTextMapPropagator()

# Span attributes: the semantic conventions' names where they have one.
EVENT_ID = "webhooks.event.id"
EVENT_TYPE = "webhooks.event.type"
ENDPOINT_ID = "webhooks.endpoint.id"
ENDPOINTS = "webhooks.endpoints"
ATTEMPT = "webhooks.attempt"
OUTCOME = "webhooks.outcome"
STATUS_CODE = "http.response.status_code"
METHOD = "http.request.method"
ROUTE = "http.route"
ERROR_TYPE = "error.type"


def traces_endpoint(settings: Settings) -> str | None:
    """Where spans go: the traces endpoint as given, or ``/v1/traces`` under the base one."""
    if settings.otel_exporter_otlp_traces_endpoint:
        return settings.otel_exporter_otlp_traces_endpoint
    if settings.otel_exporter_otlp_endpoint:
        return settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    return None


def enabled(settings: Settings) -> bool:
    """Whether this process records spans: an exporter is configured and the SDK not disabled."""
    disabled = settings.otel_sdk_disabled.strip().lower() == "true"
    return not disabled and traces_endpoint(settings) is not None


def carrier_from(headers: Mapping[str, Any] | None) -> Carrier | None:
    """The trace headers of an AMQP message, or None when it has no well-formed traceparent.

    The broker may hand header values over as bytes; a ``tracestate`` travels only with the
    ``traceparent`` it belongs to.
    """
    if not headers:
        return None
    parent = _text(headers.get(TRACEPARENT))
    if parent is None or not _TRACEPARENT_SHAPE.fullmatch(parent):
        return None
    carrier = {TRACEPARENT: parent}
    state = _text(headers.get(TRACESTATE))
    if state and state.isprintable() and len(state) <= 512:
        carrier[TRACESTATE] = state
    # The shape allows what the standard does not (an all-zero id, version ff): parse it.
    if not parent_of(carrier).is_valid:
        return None
    return carrier


# The span contexts of the carriers met lately. An event's is parsed where its message is
# read and needed again where its span starts, and a fan-out's is needed by each attempt it
# makes: parsing a traceparent costs about as much as starting a span.
_PARENTS: dict[tuple[str, str | None], SpanContext] = {}
_PARENTS_KEPT = 4096


def parent_of(carrier: Carrier) -> SpanContext:
    """The (remote) span context that W3C headers carry, as the propagator extracts it;
    invalid when they carry none."""
    key = (carrier[TRACEPARENT], carrier.get(TRACESTATE))
    parent = _PARENTS.get(key)
    if parent is None:
        extracted = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
        parent = _remember(key, extracted)
    return parent


def _remember(key: tuple[str, str | None], parent: SpanContext) -> SpanContext:
    if len(_PARENTS) >= _PARENTS_KEPT:
        _PARENTS.clear()  # cheaper than keeping an order; the next ones are parsed again
    _PARENTS[key] = parent
    return parent


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def current_carrier() -> Carrier:
    """The W3C headers of the current span; empty when no span is current."""
    carrier: Carrier = {}
    _W3C.inject(carrier)
    return carrier


def carrier_of(context: SpanContext, trace_hex: str | None = None) -> Carrier:
    """The W3C headers of a span, as :func:`current_carrier` would give them while it is
    current, formatted directly; what they parse to is remembered for its children."""
    carrier = _headers(context, trace_hex)
    remote = SpanContext(
        context.trace_id,
        context.span_id,
        is_remote=True,
        trace_flags=context.trace_flags,
        trace_state=context.trace_state,
    )
    _remember((carrier[TRACEPARENT], carrier.get(TRACESTATE)), remote)
    return carrier


def _headers(context: SpanContext, trace_hex: str | None = None) -> Carrier:
    """``trace_hex``: the trace id as the parent's traceparent writes it, if there is one."""
    if trace_hex is None:
        trace_hex = f"{context.trace_id:032x}"
    parent = f"00-{trace_hex}-{context.span_id:016x}-{context.trace_flags:02x}"
    carrier = {TRACEPARENT: parent}
    state = context.trace_state.to_header() if context.trace_state else None
    if state:
        carrier[TRACESTATE] = state
    return carrier


class Traced:
    """One unit of work's span, or its stand-in when none is recorded.

    ``parent`` is the context it continues, ``headers`` the context to send on (W3C headers,
    or None): with a span, the span's own; without one, the parent's, passed through. The span
    is current while the block runs, so log lines name it (:func:`worker.ops.logging`).
    ``children``: spans of this process will continue ``headers`` (a fan-out's attempts), so
    the context they parse to is remembered; an attempt's only go out with its request.

    The span's attributes are gathered here and handed over as it ends (:mod:`worker.ops.spans`:
    nothing reads them before, the SDK's samplers included).
    """

    __slots__ = (
        "_attributes", "_children", "_kind", "_maker", "_name", "_span", "_token", "headers",
        "parent",
    )  # fmt: skip

    def __init__(
        self,
        parent: Carrier | None,
        maker: SpanMaker | None = None,
        name: str = "",
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, str | int] | None = None,
        *,
        children: bool = False,
    ) -> None:
        self.parent = parent
        self.headers = parent
        self._maker = maker
        self._name = name
        self._kind = kind
        self._attributes = {} if attributes is None else attributes
        self._children = children
        self._span: OpenSpan | None = None
        self._token: Token[Context] | None = None

    def __enter__(self) -> Self:
        if self._maker is not None:
            parent = self.parent
            if parent is None:
                span = self._span = self._maker.start(self._name, self._kind, None)
                trace_hex = None
            else:
                span = self._span = self._maker.start(self._name, self._kind, parent_of(parent))
                trace_hex = parent[TRACEPARENT][3:35]  # the span's trace is its parent's
            context = span.context
            # Made current, so that log lines name it and a span started beneath it without a
            # parent of its own is its child.
            self._token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(context)))
            if self._children:
                self.headers = carrier_of(context, trace_hex)
            else:
                self.headers = _headers(context, trace_hex)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if span is None or self._maker is None:
            return
        if self._token is not None:
            otel_context.detach(self._token)
        if exc_type is None:
            self._maker.end(span, self._attributes)
            return
        # The type only: the message may quote a URL or a statement's parameters.
        self._attributes[ERROR_TYPE] = exc_type.__qualname__
        self._maker.end(span, self._attributes, Status(StatusCode.ERROR, exc_type.__qualname__))

    def fanned_out(self, event_id: str, event_type: str, endpoints: int) -> None:
        if self._span is not None:
            attributes = self._attributes
            attributes[EVENT_ID], attributes[EVENT_TYPE] = event_id, event_type
            attributes[ENDPOINTS] = endpoints

    def finished(self, outcome: str, status_code: int | None) -> None:
        if self._span is not None:
            self._attributes[OUTCOME] = outcome
            if status_code is not None:
                self._attributes[STATUS_CODE] = status_code


class Tracing:
    """The process's tracer, or none: built once at start-up and handed to what makes spans."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.on = provider is not None
        self._tracer = provider.get_tracer(TRACER_NAME, __version__) if provider else None
        self._spans = SpanMaker(self._tracer) if isinstance(self._tracer, SdkTracer) else None

    def incoming(self, headers: Mapping[str, Any] | None) -> Carrier | None:
        """The context a message carries, if any (see :func:`carrier_from`)."""
        if headers is None or TRACEPARENT not in headers:
            return None  # the common case without tracing: nothing more to look at
        return carrier_from(headers)

    def fanout(self, headers: Mapping[str, Any] | None) -> Traced:
        """The span of one event's fan-out, continuing the publisher's context."""
        parent = self.incoming(headers)
        if self._spans is None:
            return Traced(parent)
        return Traced(parent, self._spans, "webhooks fan-out", SpanKind.CONSUMER, children=True)

    def attempt(
        self, event: Mapping[str, Any], webhook_id: str, number: int, parent: Carrier | None
    ) -> Traced:
        """The span of one attempt; without ``parent``, a child of the current span (an API
        request's) or the root of a trace of its own (a parked or recovered delivery's)."""
        if self._spans is None:
            return Traced(parent)
        attributes: dict[str, str | int] = {
            EVENT_ID: str(event["id"]),
            EVENT_TYPE: str(event["type"]),
            ENDPOINT_ID: webhook_id,
            ATTEMPT: number,
            METHOD: "POST",
        }
        return Traced(parent, self._spans, "webhooks attempt", SpanKind.CLIENT, attributes)

    def middlewares(self, prefix: str) -> list[Middleware]:
        """The API's tracing middleware (none without a tracer): one span per request under
        ``prefix``, named by method and route pattern (never the path, which holds ids)."""
        if self._tracer is None:
            return []
        tracer = self._tracer

        @web.middleware
        async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith(prefix):
                return await handler(request)
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            with tracer.start_as_current_span(
                f"{request.method} {route}",
                context=_W3C.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={METHOD: request.method, ROUTE: route},
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    _answered(span, exc.status)
                    raise
                except BaseException as exc:
                    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
                    raise
                _answered(span, response.status)
                return response

        return [tracing_middleware]

    def shutdown(self, timeout: float = SHUTDOWN_EXPORT_SECONDS) -> None:
        """Export what is still buffered, waiting at most ``timeout`` seconds (blocking: call
        it off the event loop).

        The SDK would wait up to 30 s for a collector that does not answer; past the bound its
        daemon thread is left to the process's exit, and only spans are lost.
        """
        if self.provider is None:
            return
        closing = threading.Thread(
            target=self.provider.shutdown, name="tracing-shutdown", daemon=True
        )
        closing.start()
        closing.join(timeout)


def _answered(span: Span, status: int) -> None:
    span.set_attribute(STATUS_CODE, status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def setup_tracing(settings: Settings) -> Tracing:
    """The process's tracing, from the ``OTEL_*`` settings: a tracer provider exporting over
    OTLP/HTTP in batches when an endpoint is set, nothing otherwise.

    The SDK reads the other standard variables itself (``OTEL_EXPORTER_OTLP_HEADERS``,
    ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_TRACES_SAMPLER``, ``OTEL_RESOURCE_ATTRIBUTES``, the
    ``OTEL_BSP_*`` batch limits). The provider is this process's own, not the global one, so
    that several services started in one process (the tests) each have theirs.
    """
    if not enabled(settings):
        return Tracing(None)
    service = settings.otel_service_name.strip() or DEFAULT_SERVICE_NAME
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service, SERVICE_VERSION: __version__})
    )
    # The SDK's exporter with the request written by worker.ops.otlp: a quarter of the CPU.
    provider.add_span_processor(BatchSpanProcessor(SpanExporter(traces_endpoint(settings))))
    return Tracing(provider)


@asynccontextmanager
async def open_tracing(settings: Settings) -> AsyncIterator[Tracing]:
    """The process's tracing (:func:`setup_tracing`) until the block ends; then what is still
    buffered is exported, off the event loop (an HTTP post, bounded by the export timeout)."""
    tracing = setup_tracing(settings)
    try:
        yield tracing
    finally:
        await asyncio.to_thread(tracing.shutdown)
