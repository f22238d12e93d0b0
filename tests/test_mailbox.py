"""Items from producer threads reach the event loop complete, in order, in few wake-ups."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.mailbox import LoopMailbox, loop_mailbox

PRODUCERS = 4
ITEMS = 5_000


def test_every_item_arrives_in_each_producers_order_with_few_wakeups() -> None:
    async def run() -> tuple[dict[int, list[int]], LoopMailbox]:
        loop = asyncio.get_running_loop()
        mailbox = loop_mailbox(loop)
        assert loop_mailbox(loop) is mailbox
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def produce(producer: int) -> None:
            for i in range(ITEMS):
                mailbox.post(queue.put_nowait, (producer, i))

        threads = [threading.Thread(target=produce, args=(p,)) for p in range(PRODUCERS)]
        for thread in threads:
            thread.start()
        received: dict[int, list[int]] = {p: [] for p in range(PRODUCERS)}
        for _ in range(PRODUCERS * ITEMS):
            producer, i = await asyncio.wait_for(queue.get(), timeout=30)
            received[producer].append(i)
        for thread in threads:
            thread.join()
        return received, mailbox

    received, mailbox = asyncio.run(run())
    assert all(items == list(range(ITEMS)) for items in received.values())
    assert 1 <= mailbox.wakeups < PRODUCERS * ITEMS // 10


def test_a_failing_delivery_does_not_stop_the_others() -> None:
    async def run() -> list[int]:
        mailbox = loop_mailbox(asyncio.get_running_loop())
        got: list[int] = []
        done = asyncio.Event()

        def deliver(item: int) -> None:
            if item == 1:
                raise ValueError("broken consumer")
            got.append(item)
            if item == 2:
                done.set()

        def produce() -> None:
            for item in range(3):
                mailbox.post(deliver, item)

        thread = threading.Thread(target=produce)
        thread.start()
        await asyncio.wait_for(done.wait(), timeout=10)
        thread.join()
        return got

    assert asyncio.run(run()) == [0, 2]


def test_posting_to_a_closed_loop_raises_and_the_mailbox_recovers() -> None:
    loop = asyncio.new_event_loop()
    mailbox = LoopMailbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        mailbox.post(print, "late")
    with pytest.raises(RuntimeError):  # not silently swallowed as "already scheduled"
        mailbox.post(print, "later")


def test_a_mailbox_does_not_keep_its_loop_alive() -> None:
    """The registry holds loops weakly; a mailbox must not hold its own loop strongly."""
    import gc
    import weakref

    async def touch() -> None:
        loop_mailbox(asyncio.get_running_loop())

    loops = []
    for _ in range(3):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(touch())
        loop.close()
        loops.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert all(ref() is None for ref in loops)
