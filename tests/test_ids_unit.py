"""Identifiers: the ULID layout, digit by digit, and order by creation time."""

from __future__ import annotations

import random
import secrets

import pytest

from worker.store import ids

pytestmark = pytest.mark.unit

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def reference_ulid(value: int) -> str:
    """The 128-bit ``value`` as 26 Crockford base32 digits, most significant first."""
    return "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


@pytest.mark.parametrize("seed", range(5))
def test_an_id_is_its_prefix_and_the_ulid_of_its_milliseconds_and_random_bits(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    for _ in range(2000):
        millis, randomness = rng.getrandbits(48), rng.getrandbits(80)
        monkeypatch.setattr(secrets, "randbits", lambda _bits, r=randomness: r)
        made = ids.new_id("att", now_ms=millis)
        assert made == f"att_{reference_ulid((millis << 80) | randomness)}"


def test_the_extremes_of_the_layout() -> None:
    assert ids.new_id("wh", now_ms=0).startswith("wh_0000000000")
    top = ids.new_id("wh", now_ms=2**48 - 1)
    assert top.startswith("wh_7ZZZZZZZZZ")
    assert len(top) == len("wh_") + 26


def test_ids_sort_by_creation_time() -> None:
    made = [ids.new_id("evt", now_ms=ms) for ms in (1, 2, 1_000, 10**12, 2**47)]
    assert made == sorted(made)
