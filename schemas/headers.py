"""An endpoint's own request headers: which names and values the API accepts.

A customer's headers go on every attempt beside the ones the service sets itself, so the
rules keep them from ever changing how a delivery is framed, signed, routed or traced, and
keep every value one that arrives at the receiver exactly as it was given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

MAX_HEADERS = 20
MAX_HEADERS_BYTES = 8 * 1024  # names and values together, UTF-8

# Names the service sets on every attempt (Standard Webhooks, the body's framing, the
# client's identity, W3C trace context) and the hop-by-hop ones of RFC 9110 §7.6.1, which
# govern the connection or the egress proxy rather than the request. Compared lower-cased.
RESERVED_NAMES: frozenset[str] = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "traceparent",
        "tracestate",
        "connection",
        "transfer-encoding",
        "te",
        "upgrade",
        "keep-alive",
    }
)
RESERVED_PREFIXES: tuple[str, ...] = ("webhook-", "proxy-")

# RFC 9110 §5.6.2: token = 1*tchar.
NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
# RFC 9110 §5.5: no CR, LF, NUL or other control character but HTAB; no leading or trailing
# whitespace, which receivers strip (so the value would not arrive as given).
VALUE_PATTERN = r"^(?:[^\x00-\x20\x7f](?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)?$"
_NAME = re.compile(NAME_PATTERN)
_FORBIDDEN_CHARACTERS = re.compile(r"[\r\n\x00]")
_CONTROL_CHARACTERS = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


def reserved(name: str) -> bool:
    """Whether ``name`` is one the service sets or that governs the connection."""
    lowered = name.lower()
    return lowered in RESERVED_NAMES or lowered.startswith(RESERVED_PREFIXES)


def name_problem(name: str) -> str | None:
    """Why ``name`` may not be an endpoint's header, or None if it may."""
    if not _NAME.fullmatch(name):
        return "not a valid header name (an RFC 9110 token: letters, digits, !#$%&'*+-.^_`|~)"
    if reserved(name):
        return "set by the service itself; a header may not be webhook-*, proxy-*, " + ", ".join(
            sorted(RESERVED_NAMES)
        )
    return None


def value_problem(value: str) -> str | None:
    """Why ``value`` may not be a header's value, or None if it may."""
    if _FORBIDDEN_CHARACTERS.search(value):
        return "must not contain CR, LF or NUL"
    if _CONTROL_CHARACTERS.search(value):
        return "must not contain control characters (a tab is allowed)"
    if value != value.strip(" \t"):
        return "must not begin or end with a space or tab"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "not valid Unicode"
    return None


def headers_problem(headers: Mapping[str, str]) -> str | None:
    """Why the set of ``headers`` is not allowed as a whole, or None if it is."""
    if len(headers) > MAX_HEADERS:
        return f"at most {MAX_HEADERS} headers, not {len(headers)}"
    size = sum(len(name.encode()) + len(value.encode()) for name, value in headers.items())
    if size > MAX_HEADERS_BYTES:
        return f"at most {MAX_HEADERS_BYTES} bytes of names and values in all, not {size}"
    seen: dict[str, str] = {}
    for name in headers:
        first = seen.setdefault(name.lower(), name)
        if first != name:
            return f"{first} and {name} are the same header (names are case-insensitive)"
    return None


def _check(problem: str | None) -> None:
    if problem is not None:
        raise PydanticCustomError("header", problem)


def _valid_name(name: str) -> str:
    _check(name_problem(name))
    return name


def _valid_value(value: str) -> str:
    _check(value_problem(value))
    return value


def _valid_headers(headers: dict[str, str]) -> dict[str, str]:
    _check(headers_problem(headers))
    return headers


_DESCRIPTION = (
    f"Extra request headers sent on every attempt, at most {MAX_HEADERS} and "
    f"{MAX_HEADERS_BYTES} bytes of names and values in all. Names are RFC 9110 tokens, "
    "compared case-insensitively; the ones the service sets or that govern the connection "
    "are refused: webhook-*, proxy-*, " + ", ".join(sorted(RESERVED_NAMES)) + ". Values "
    "hold no CR, LF, NUL or other control character but a tab, and no leading or trailing "
    "whitespace."
)
_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": _DESCRIPTION,
    "maxProperties": MAX_HEADERS,
    "propertyNames": {"pattern": NAME_PATTERN},
    "additionalProperties": {"type": "string", "pattern": VALUE_PATTERN},
    "examples": [{"X-Api-Key": "k_live_1234", "X-Tenant": "acme"}],
}

HeaderName = Annotated[str, AfterValidator(_valid_name)]
HeaderValue = Annotated[str, AfterValidator(_valid_value)]
# Errors carry the header's name in their location (``headers.X-Foo``), so the API's
# message says which header is wrong.
CustomHeaders = Annotated[
    dict[HeaderName, HeaderValue], AfterValidator(_valid_headers), WithJsonSchema(_SCHEMA)
]
