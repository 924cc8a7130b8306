"""OTLP/HTTP span export with the protobuf request written directly.

The SDK's encoder builds a protobuf message object per span, per attribute and per value, and
then serialises the tree: about 30 µs a span, in the batch thread and holding the GIL, which
the worker's delivery loop pays for. The wire format of an ``ExportTraceServiceRequest`` is
simple enough to write as bytes straight from the finished spans (opentelemetry-proto's
trace.proto, common.proto and resource.proto; field numbers below), with what repeats from
span to span (a resource's and a scope's blocks, attribute keys) encoded once.

The bytes mirror the SDK's encoder field for field, including what it leaves out (a link's
trace state, the dropped count of a resource or a scope), so a collector sees the same
request. A batch holding anything this encoder does not know how to write (an integer
beyond int64, a string with a lone surrogate, a value of an unknown type) is encoded by the
SDK instead, which decides what becomes of it (it drops the attribute and logs).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from functools import cached_property
from types import MappingProxyType

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http._common import (
    RequestPayloadTooLargeError,
    _is_request_too_large,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode

_logger = logging.getLogger(__name__)

_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_ONE_BYTE = [bytes((n,)) for n in range(128)]
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Span.kind: the API's SpanKind numbers from 0, the protocol's from 1 (0 is "unspecified").
_KIND = {kind: b"\x30" + _ONE_BYTE[kind.value + 1] for kind in SpanKind}
# Span.flags and Link.flags: "has is_remote" always, "is remote" for a remote parent or target,
# as the SDK sets them (it leaves the W3C trace flags out).
_LOCAL = _FIXED32(0x100)
_REMOTE = _FIXED32(0x300)

# An encoded attribute key (KeyValue.key, field 1), by key: a process uses few keys, often.
_KEYS: dict[str, bytes] = {}
_KEYS_KEPT = 1024
# Encoded attributes (KeyValue fields with their tag), by tag, key, type and value: most of a
# span's repeat from span to span (an event type, an endpoint, an outcome, a status code).
_PAIRS: dict[tuple[bytes, str, type, object], bytes] = {}
_PAIRS_KEPT = 4096
_BLOCKS_KEPT = 64
# Mappings that iterate through the Mapping ABC's methods, in Python; their copy is a dict.
_ABC_MAPPINGS = frozenset({MappingProxyType, BoundedAttributes})
# What counts what it dropped: a span's attributes, events and links when limits applied.
_BOUNDED = frozenset({BoundedAttributes, BoundedList})
# Span.name, encoded, by name.
_NAMES: dict[str, bytes] = {}


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:  # most lengths: two bytes, without the loop
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


def _value(value: object) -> bytes:
    """An AnyValue's body; the checks in the SDK's order, so that a value of two kinds (a
    bool is an int, bytes are a sequence) becomes what the SDK would make of it. A oneof
    member is written even when it is zero: it is present all the same."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _delimited(b"\x0a", value.encode())
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise OverflowError("int_value is an int64")
        return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)  # two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    return _composite(value)


def _composite(value: object) -> bytes:
    if isinstance(value, bytes):
        return _delimited(b"\x3a", value)
    if isinstance(value, Sequence):
        return _delimited(b"\x2a", b"".join(_delimited(b"\x0a", _value(v)) for v in value))
    if isinstance(value, Mapping):
        # One pair at a time: keys that str() makes equal stay apart, as in the SDK's.
        pairs = b"".join(_attributes(b"\x0a", {str(k): v}) for k, v in value.items())
        return _delimited(b"\x32", pairs)
    raise TypeError(f"no AnyValue for {type(value).__qualname__}")


def _attributes(tag: bytes, attributes: Mapping[str, object] | None) -> bytes:
    """KeyValue fields, each with ``tag``; one loop without calls for the common values."""
    if not attributes:
        return b""
    if type(attributes) in _ABC_MAPPINGS:
        attributes = attributes.copy()  # type: ignore[attr-defined]
    pairs, out = _PAIRS, []
    for key, value in attributes.items():
        kind = type(value)
        # By type as well: True == 1, and they are written differently.
        remembered = kind is str or kind is int
        if remembered:
            field = pairs.get((tag, key, kind, value))
            if field is not None:
                out.append(field)
                continue
        field = _pair(tag, key, value)
        if remembered:
            if len(pairs) >= _PAIRS_KEPT:
                pairs.clear()  # unique values (event ids) fill it; the common ones come back
            pairs[tag, key, kind, value] = field
        out.append(field)
    return b"".join(out)


def _pair(tag: bytes, key: str, value: object) -> bytes:
    """One KeyValue field with ``tag``; no calls for a short string or a small integer."""
    head = _KEYS.get(key)  # KeyValue.key, and the tag of KeyValue.value
    if head is None:
        if len(_KEYS) >= _KEYS_KEPT:
            _KEYS.clear()  # keys that vary without bound: each is encoded again, that is all
        head = _KEYS[key] = _delimited(b"\x0a", key.encode()) + b"\x12"
    if type(value) is str:
        text = value.encode()
        n = len(text)
        # Lengths under 128 are one byte: AnyValue's and KeyValue.value's alike.
        if n < 126:
            body = head + bytes((n + 2, 0x0A, n)) + text
        else:
            body = head + _delimited(b"", _delimited(b"\x0a", text))
    elif type(value) is int and 0 <= value < 0x80:
        body = head + b"\x02\x18" + _ONE_BYTE[value]
    else:
        body = head + _delimited(b"", _value(value))
    return tag + _varint(len(body)) + body


def _count(tag: bytes, count: int) -> bytes:
    return tag + _varint(count) if count else b""


def _flags(context: SpanContext | None) -> bytes:
    return _REMOTE if context is not None and context.is_remote else _LOCAL


def _dropped(bounded: object) -> int:
    return int(bounded.dropped) if type(bounded) in _BOUNDED else 0  # type: ignore[attr-defined]


def _span(span: ReadableSpan) -> bytes:
    context = span.context
    if context is None:
        raise TypeError("a span without a context")  # not recorded: the SDK's encoder decides
    if type(span) is ReadableSpan:
        # The SDK's own class: its fields as they are, without the copies its properties make
        # (a mapping proxy, tuples), which cost more than writing a span without them.
        attributes, events, links = span._attributes, span._events, span._links  # noqa: SLF001
        dropped = (_dropped(attributes), _dropped(events), _dropped(links))
    else:
        attributes, events, links = span.attributes, span.events, span.links
        dropped = (span.dropped_attributes, span.dropped_events, span.dropped_links)
    out: bytes = b"\x0a\x10" + context.trace_id.to_bytes(16, "big")
    out += b"\x12\x08" + context.span_id.to_bytes(8, "big")
    if context.trace_state:
        state = ",".join([f"{key}={value}" for key, value in context.trace_state.items()])
        out += _delimited(b"\x1a", state.encode())
    parent = span.parent
    if parent is not None:
        out += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
    name = span.name
    if name:
        out += _NAMES.get(name) or _name(name)
    out += _KIND[span.kind]
    start, end = span.start_time, span.end_time
    if start:
        out += b"\x39" + _FIXED64(start)
    if end:
        out += b"\x41" + _FIXED64(end)
    out += _contents(attributes, events, links, dropped)
    status = span.status
    if status is not None and status.status_code is not StatusCode.UNSET:
        body = _delimited(b"\x12", status.description.encode()) if status.description else b""
        out += _delimited(b"\x7a", body + b"\x18" + _varint(status.status_code.value))
    elif status is not None:
        out += b"\x7a\x00"
    out += b"\x85\x01" + _flags(parent)
    return b"\x12" + _varint(len(out)) + out  # as ScopeSpans.spans


def _contents(
    attributes: Mapping[str, object] | None,
    events: Sequence[Event],
    links: Sequence[Link],
    dropped: tuple[int, int, int],
) -> bytes:
    """Span fields 9 to 14: attributes, events and links, each with the count it dropped."""
    out = _attributes(b"\x4a", attributes) if attributes else b""
    out += _count(b"\x50", dropped[0])
    if events:
        out += _events(events)
    out += _count(b"\x60", dropped[1])
    if links:
        out += _links(links)
    out += _count(b"\x70", dropped[2])
    return out


def _name(name: str) -> bytes:
    """Span.name (field 5), kept: a process names its spans with few names."""
    if len(_NAMES) >= _KEYS_KEPT:
        _NAMES.clear()
    encoded = _NAMES[name] = _delimited(b"\x2a", name.encode())
    return encoded


def _events(events: Sequence[Event]) -> bytes:
    out = b""
    for event in events:
        body = b"\x09" + _FIXED64(event.timestamp) if event.timestamp else b""
        body += _delimited(b"\x12", event.name.encode()) if event.name else b""
        body += _attributes(b"\x1a", event.attributes) + _count(b"\x20", event.dropped_attributes)
        out += _delimited(b"\x5a", body)
    return out


def _links(links: Sequence[Link]) -> bytes:
    out = b""
    for link in links:
        # No trace_state (field 3): the SDK's encoder does not write a link's either.
        body = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
        body += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
        body += _attributes(b"\x22", link.attributes) + _count(b"\x28", link.dropped_attributes)
        out += _delimited(b"\x6a", body + b"\x35" + _flags(link.context))
    return out


class Encoder:
    """Writes ``ExportTraceServiceRequest`` bytes; keeps the blocks of the resources and
    scopes it met last, which seldom change in a process (one resource, a tracer or two)."""

    def __init__(self) -> None:
        # By id, with the object itself so that the id stays its own; both are immutable.
        self._resources: dict[int, tuple[Resource, bytes, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes, bytes]] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The request, or the SDK's encoding of it when a span holds what is not written
        here (see the module's docstring)."""
        try:
            return self.encode_own(spans)
        except Exception:  # the SDK's encoder logs, drops or fails as it sees fit
            _logger.debug("span batch left to the SDK's encoder", exc_info=True)
            return bytes(encode_spans(spans).SerializePartialToString())

    def encode_own(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The request written here; raises on what is not (no fallback)."""
        # Grouped as the SDK groups them: by equal resource, then equal scope, in the order
        # first met. Equality is looked at once per object met, not per span (a resource's
        # hash serialises its attributes to JSON).
        groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
        seen: dict[tuple[int, int], list[bytes]] = {}
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope or None
            group = seen.get((id(resource), id(scope)))
            if group is None:
                scopes = groups.setdefault(resource, {})
                group = seen[id(resource), id(scope)] = scopes.setdefault(scope, [])
            group.append(_span(span))
        out = []
        for resource, scopes in groups.items():
            head, tail = self._resource(resource)
            body = [head]
            for scope, encoded in scopes.items():
                scope_head, scope_tail = self._scope(scope)
                body.append(_delimited(b"\x12", scope_head + b"".join(encoded) + scope_tail))
            out.append(_delimited(b"\x0a", b"".join(body) + tail))
        return b"".join(out)

    def _resource(self, resource: Resource) -> tuple[bytes, bytes]:
        """ResourceSpans.resource (field 1) and ResourceSpans.schema_url (field 3)."""
        hit = self._resources.get(id(resource))
        if hit is None or hit[0] is not resource:
            if len(self._resources) >= _BLOCKS_KEPT:
                self._resources.clear()
            url = resource.schema_url
            hit = self._resources[id(resource)] = (
                resource,
                _delimited(b"\x0a", _attributes(b"\x0a", resource.attributes)),
                _delimited(b"\x1a", url.encode()) if url else b"",
            )
        return hit[1], hit[2]

    def _scope(self, scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
        """ScopeSpans.scope (field 1), written even when there is none (as the SDK's encoder
        does), and ScopeSpans.schema_url (field 3)."""
        hit = self._scopes.get(id(scope))
        if hit is None or hit[0] is not scope:
            if len(self._scopes) >= _BLOCKS_KEPT:
                self._scopes.clear()
            body = url = b""
            if scope is not None:
                body += _delimited(b"\x0a", scope.name.encode()) if scope.name else b""
                body += _delimited(b"\x12", scope.version.encode()) if scope.version else b""
                body += _attributes(b"\x1a", scope.attributes)
                url = _delimited(b"\x1a", scope.schema_url.encode()) if scope.schema_url else b""
            hit = self._scopes[id(scope)] = (scope, _delimited(b"\x0a", body), url)
        return hit[1], hit[2]


class SpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, encoding with :class:`Encoder`.

    Only ``export`` is replaced, since the SDK calls its encoder inline there; the rest of it
    is the SDK's, step for step: its HTTP client (endpoint, headers, timeout, compression and
    retries, from the same arguments and ``OTEL_*`` variables), the size bound and its metrics.
    """

    @cached_property
    def _encoder(self) -> Encoder:
        return Encoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return super().export(spans)  # the SDK's warning and failure
        with self._metrics.export_operation(len(spans)) as result:
            try:
                data = self._encoder.encode(spans)
            except Exception as error:  # as the SDK: a failed batch, not a dead export thread
                _logger.exception("Failed to encode span batch")
                result.error = error
                return SpanExportResult.FAILURE
            if _is_request_too_large(data, self._max_request_size):
                _logger.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size %d.",
                    len(data),
                    self._max_request_size,
                )
                result.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(data)} bytes exceeds max_request_size "
                    f"{self._max_request_size} bytes."
                )
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                result.error_attrs = (
                    {HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                    if sent.status_code is not None
                    else None
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
