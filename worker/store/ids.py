"""Identifiers that sort by creation time, so that cursors over them are stable.

An id is a prefix and 26 Crockford base32 characters: 48 bits of Unix milliseconds and 80
random bits (the ULID layout). Ordering by id is ordering by creation, and a cursor "after
this id" stays correct when rows are inserted concurrently.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    """Return ``{prefix}_{ulid}``, e.g. ``wh_01J9Z...``."""
    millis = int(time.time() * 1000) if now_ms is None else now_ms
    value = (millis << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
