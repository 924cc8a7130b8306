"""Standard Webhooks signatures: ``v1,`` and base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret: the base64-decoded part after the prefix."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


# Each secret's HMAC with its key already taken in, copied for every signature: setting a key
# up (decoding it, hashing its two padded blocks) was half of what a signature cost.
_KEYED: dict[str, hmac.HMAC] = {}
KEYED_CACHE_SIZE = 10_000


def _keyed(secret: str) -> hmac.HMAC:
    keyed = _KEYED.get(secret)
    if keyed is None:
        if len(_KEYED) >= KEYED_CACHE_SIZE:
            _KEYED.clear()
        keyed = _KEYED[secret] = hmac.new(secret_key(secret), digestmod=hashlib.sha256)
    return keyed


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature."""
    mac = _keyed(secret).copy()
    mac.update(f"{message_id}.{timestamp}.".encode())
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(secrets: Sequence[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per live secret, space-separated."""
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets)


def verify(secret: str, message_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """True if any signature in ``header`` was made with ``secret`` (constant-time compare)."""
    expected = sign(secret, message_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in header.split())
