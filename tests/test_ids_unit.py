"""Identifiers: the ULID layout, digit by digit, and order by creation time."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

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
        monkeypatch.setattr(ids, "_random", SimpleNamespace(next80=lambda r=randomness: r))
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


def test_random_parts_differ_across_reads_of_the_operating_systems_generator() -> None:
    # Three reads' worth: every id of one read, and the ids either side of a new read.
    randoms = [ids.new_id("att", now_ms=0)[4:] for _ in range(3 * ids.IDS_PER_READ)]
    assert len(set(randoms)) == len(randoms)


def test_a_forked_child_does_not_make_its_parents_ids() -> None:
    ids.new_id("att")  # the parent has random bytes read and not yet used
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(writer, " ".join(ids.new_id("att", now_ms=0) for _ in range(8)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as pipe:
        childs = set(pipe.read().split())
    parents = {ids.new_id("att", now_ms=0) for _ in range(8)}
    assert len(childs) == 8
    assert not childs & parents
