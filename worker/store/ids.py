"""Identifiers that sort by creation time, so that cursors over them are stable.

An id is a prefix and 26 Crockford base32 characters: 48 bits of Unix milliseconds and 80
random bits (the ULID layout). Ordering by id is ordering by creation, and a cursor "after
this id" stays correct when rows are inserted concurrently.
"""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# base64's base32 in C, its letters then mapped onto Crockford's: one id is made per attempt.
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


# The random parts come from the operating system's generator, as ``secrets`` takes them, but
# read for many ids at once: one system call per id was most of what an id cost.
RANDOM_BYTES = 10
IDS_PER_READ = 256


class _RandomPool:
    __slots__ = ("_bytes", "_offset")

    def __init__(self) -> None:
        self._bytes = b""
        self._offset = 0

    def next80(self) -> int:
        offset = self._offset
        if offset + RANDOM_BYTES > len(self._bytes):
            self._bytes, offset = os.urandom(RANDOM_BYTES * IDS_PER_READ), 0
        self._offset = offset + RANDOM_BYTES
        return int.from_bytes(self._bytes[offset : offset + RANDOM_BYTES], "big")

    def forget(self) -> None:
        """Drop what was read: a forked child must not make its parent's ids again."""
        self._bytes, self._offset = b"", 0


_random = _RandomPool()
os.register_at_fork(after_in_child=_random.forget)


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    """Return ``{prefix}_{ulid}``, e.g. ``wh_01J9Z...``."""
    millis = int(time.time() * 1000) if now_ms is None else now_ms
    value = (millis << 80) | _random.next80()
    # 20 bytes are 32 base32 digits; the 128-bit value fills the last 26 (the first 6 are 0).
    digits = base64.b32encode(value.to_bytes(20, "big"))[6:].translate(_CROCKFORD)
    return f"{prefix}_{digits.decode()}"
