"""The pipeline's spans (an event's fan-out, an attempt), made without the SDK's mutable span.

The SDK's ``Tracer.start_span`` builds a ``_Span`` for every span: a lock, bounded lists for
events and links, attributes cleaned value by value as they are set, and at ``end()`` a copy
of it all into the ``ReadableSpan`` that the span processors get. A fan-out's or an attempt's
span needs none of that: its attributes are strings and integers this code sets, all at once,
as it ends, and it has no events and no links. Of the worker's cost of tracing, the mutable
span was the largest part (about 25 µs a span on the benchmark's machine).

:class:`SpanMaker` does what ``start_span`` and ``end()`` do for such a span, with the
provider's own parts: its sampler decides (and may change the trace state or add attributes),
its id generator makes the ids, and its span processors get the ended ``ReadableSpan``, with
the provider's resource and the tracer's scope. An exporter cannot tell the two apart. What
it does not do: call the processors' ``on_start`` (ours, the batch and simple processors,
do nothing there) and the SDK's own self-metrics, which are off unless
``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from time import time_ns

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanContext, SpanKind, Status, TraceFlags
from opentelemetry.util.types import AttributeValue

# Attributes the pipeline's spans hold at most: within the SDK's default limit (128), so
# they are passed on as they are unless the limits were lowered or values bounded.
_MOST_ATTRIBUTES = 8
_UNSET = Status()
_SAMPLE = Decision.RECORD_AND_SAMPLE
_DROP = Decision.DROP
# A span's trace flags, by (sampled, random trace id).
_FLAGS = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


@dataclass(slots=True)
class OpenSpan:
    """A started span: its context, as the current span while it runs, and what it ends with."""

    name: str
    kind: SpanKind
    context: SpanContext
    parent: SpanContext | None
    start_time: int
    recording: bool
    # What the sampler adds, if anything (the SDK's samplers add nothing).
    sampler_attributes: Mapping[str, AttributeValue] | None = None


class SpanMaker:
    """Starts and ends the pipeline's spans for one SDK tracer (see the module's docstring)."""

    def __init__(self, tracer: sdk_trace.Tracer) -> None:
        self._sampler = tracer.sampler
        # OTEL_TRACES_SAMPLER unset or parentbased_always_on: the SDK's own instance.
        self._parent_based_on = tracer.sampler is sampling.DEFAULT_ON
        self._ids = tracer.id_generator
        self._random_ids = tracer.id_generator.is_trace_id_random()
        self._processor = tracer.span_processor
        self._resource = tracer.resource
        self._scope = tracer._instrumentation_scope  # noqa: SLF001 - what _Span is given
        limits = tracer._span_limits  # noqa: SLF001
        # Lowered limits (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT)
        # are applied as the SDK applies them.
        self._bounded = limits.max_span_attribute_length is not None or (
            limits.max_span_attributes is not None and limits.max_span_attributes < _MOST_ATTRIBUTES
        )
        self._limits = limits

    def start(self, name: str, kind: SpanKind, parent: SpanContext | None) -> OpenSpan:
        """A span, child of ``parent`` (when None, of the current span if there is one, as
        the SDK does without a context), sampled by the provider's sampler."""
        context: Context | None = None
        if parent is None:
            parent = trace.get_current_span().get_span_context()
        elif not self._parent_based_on:
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self._ids.generate_trace_id()
            random_id = self._random_ids
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        added: Mapping[str, AttributeValue] | None = None
        if self._parent_based_on:
            # The default sampler's decision, without building its result: a root is sampled,
            # a child follows its parent and keeps its trace state.
            sampled = recording = parent is None or parent.trace_flags.sampled
            state = parent.trace_state if parent is not None else None
        else:
            decision = self._sampler.should_sample(context, trace_id, name, kind)
            sampled, recording = decision.decision is _SAMPLE, decision.decision is not _DROP
            state, added = decision.trace_state, decision.attributes or None
        own = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=_FLAGS[sampled, random_id],
            trace_state=state,
        )
        return OpenSpan(name, kind, own, parent, time_ns(), recording, added)

    def end(
        self, span: OpenSpan, attributes: Mapping[str, AttributeValue], status: Status = _UNSET
    ) -> None:
        """Hands the ended span to the provider's processors, if it was recorded."""
        if not span.recording:
            return
        end_time = time_ns()
        if span.sampler_attributes:
            attributes = {**span.sampler_attributes, **attributes}
        ended = sdk_trace.ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=self._resource,
            attributes=self._bound(attributes) if self._bounded else attributes,
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=end_time,
            instrumentation_scope=self._scope,
        )
        self._processor.on_end(ended)

    def _bound(self, attributes: Mapping[str, AttributeValue]) -> BoundedAttributes:
        return BoundedAttributes(
            self._limits.max_span_attributes,
            attributes,
            immutable=True,
            max_value_len=self._limits.max_span_attribute_length,
        )
