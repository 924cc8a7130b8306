"""The ack window: finished runs acked with one ``multiple`` frame, nothing acked that is open."""

from __future__ import annotations

import asyncio

import pytest

from worker.pipeline.acks import AckWindow

pytestmark = pytest.mark.unit


class Channel:
    """Records the acks a window sends; optionally fails them."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.fail = fail

    async def send(self, tag: int, *, multiple: bool) -> None:
        if self.fail:
            raise ConnectionError("channel closed")
        await asyncio.sleep(0)  # a write that yields, as aiormq's queue put may
        self.sent.append((tag, multiple))

    def acked(self) -> set[int]:
        """Every tag the frames sent so far settle, as the broker reads them."""
        done: set[int] = set()
        for tag, multiple in self.sent:
            done |= set(range(1, tag + 1)) if multiple else {tag}
        return done


async def settled(window: AckWindow) -> None:
    await window.flushed()


async def test_a_burst_finished_in_order_is_one_frame() -> None:
    channel = Channel()
    window = AckWindow(channel.send)
    for tag in range(1, 101):
        window.received(tag)
    for tag in range(1, 101):
        window.finished(tag)
    await settled(window)
    assert channel.sent == [(100, True)]


async def test_a_message_still_open_is_never_covered_by_multiple() -> None:
    channel = Channel()
    window = AckWindow(channel.send)
    for tag in range(1, 6):
        window.received(tag)
    for tag in (2, 3, 5):  # 1 and 4 still being handled
        window.finished(tag)
    await settled(window)
    assert channel.sent == [(2, False), (3, False), (5, False)]
    assert 1 not in channel.acked()
    assert 4 not in channel.acked()
    window.finished(1)
    await settled(window)
    assert channel.sent[-1] == (1, True)  # 2 and 3 are acked already; 4 is still open
    assert 4 not in channel.acked()
    window.finished(4)
    await settled(window)
    assert channel.acked() == {1, 2, 3, 4, 5}


async def test_a_run_after_the_head_finishes_is_acked_in_one_frame() -> None:
    channel = Channel()
    window = AckWindow(channel.send)
    for tag in range(1, 11):
        window.received(tag)
    for tag in (1, 2, 3, 4, 6, 7):
        window.finished(tag)
    await settled(window)
    assert channel.sent == [(4, True), (6, False), (7, False)]
    assert 5 not in channel.acked()


async def test_a_rejected_message_does_not_hold_the_run_up() -> None:
    channel = Channel()
    window = AckWindow(channel.send)
    for tag in (1, 2, 3):
        window.received(tag)
    window.rejected(1)
    window.finished(2)
    window.finished(3)
    await settled(window)
    assert channel.sent == [(3, True)]


async def test_messages_finished_while_acks_are_sent_are_acked_in_a_second_round() -> None:
    channel = Channel()
    window = AckWindow(channel.send)
    for tag in range(1, 5):
        window.received(tag)
    window.finished(1)
    # One step of the loop (not a wait on time): the flush task starts and is writing tag 1.
    await asyncio.sleep(0)
    window.finished(2)
    window.finished(3)
    await window.flushed()
    assert channel.acked() == {1, 2, 3}
    assert 4 not in channel.acked()


async def test_unknown_or_repeated_tags_are_ignored() -> None:
    channel = Channel()
    window = AckWindow(channel.send)
    window.received(1)
    window.finished(7)  # never received on this channel
    window.finished(1)
    await settled(window)
    window.finished(1)  # acked already
    await settled(window)
    assert channel.sent == [(1, True)]


async def test_a_closed_channel_loses_the_acks_and_not_the_window() -> None:
    channel = Channel(fail=True)
    window = AckWindow(channel.send)
    window.received(1)
    window.finished(1)
    await settled(window)  # logged, not raised: the broker redelivers the message
    assert channel.sent == []
    channel.fail = False
    window.received(2)
    window.finished(2)
    await settled(window)
    assert channel.sent == [(2, True)]
