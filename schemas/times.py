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
        return value.astimezone(UTC)
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("not an RFC 3339 time, e.g. 2026-11-28T10:00:00Z")
    try:
        return datetime.fromisoformat(value.upper().replace(" ", "T")).astimezone(UTC)
    except ValueError:
        raise ValueError("not a valid RFC 3339 time, e.g. 2026-11-28T10:00:00Z") from None


Rfc3339 = Annotated[
    datetime,
    BeforeValidator(parse_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
