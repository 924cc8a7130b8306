"""Identifiers that sort by creation time, so that cursors over them are stable.

An id is a prefix and 26 Crockford base32 characters: 48 bits of Unix milliseconds and 80
random bits (the ULID layout). Ordering by id is ordering by creation, and a cursor "after
this id" stays correct when rows are inserted concurrently.
"""

from __future__ import annotations

import base64
import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# base64's base32 in C, its letters then mapped onto Crockford's: one id is made per attempt.
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    """Return ``{prefix}_{ulid}``, e.g. ``wh_01J9Z...``."""
    millis = int(time.time() * 1000) if now_ms is None else now_ms
    value = (millis << 80) | secrets.randbits(80)
    # 20 bytes are 32 base32 digits; the 128-bit value fills the last 26 (the first 6 are 0).
    digits = base64.b32encode(value.to_bytes(20, "big"))[6:].translate(_CROCKFORD)
    return f"{prefix}_{digits.decode()}"
