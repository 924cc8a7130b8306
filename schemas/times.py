"""RFC 3339 times in the API's query parameters and bodies."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_rfc3339(value: Any) -> datetime:  # noqa: ANN401 - whatever the request held
    """An RFC 3339 date-time with its offset, as an aware UTC datetime; ValueError if not.

    Stricter than pydantic's own parsing on purpose: no dates alone, no Unix numbers, no
    times without an offset.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("a time needs its UTC offset")
        return _utc(value)
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("not an RFC 3339 time, e.g. 2026-11-28T10:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.upper().replace(" ", "T"))
    except ValueError:
        raise ValueError("not a valid RFC 3339 time, e.g. 2026-11-28T10:00:00Z") from None
    return _utc(parsed)


def _utc(value: datetime) -> datetime:
    # A time at the edge of years 1 or 9999 (0001-01-01T00:00:00+01:00) is valid RFC 3339,
    # but its UTC instant lies outside what a datetime holds.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range: in UTC it falls outside the years 1 to 9999") from None


Rfc3339 = Annotated[
    datetime,
    BeforeValidator(parse_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
