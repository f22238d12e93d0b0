"""Items from producer threads to an asyncio event loop, one wake-up per burst.

`loop.call_soon_threadsafe` wakes the event loop through its self-pipe on every call: an
engine step that streams a token to each of 256 requests would write to the pipe 256 times
from the engine's loop thread. A `LoopMailbox` queues the items and wakes the loop once; the
loop then hands every queued item to its callback, in the order they were posted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = (
    weakref.WeakKeyDictionary()
)
_mailboxes_lock = threading.Lock()


class LoopMailbox:
    """Runs `deliver(item)` on `loop` for items posted from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weak: the registry's key must not be kept alive by its own value
        self._loop: weakref.ref[asyncio.AbstractEventLoop] = weakref.ref(loop)
        self._items: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False  # a drain is queued on the loop and has not started
        self.wakeups = 0  # loop wake-ups asked for (the items posted are many more)

    def post(self, deliver: Callable[[Any], None], item: Any) -> None:
        """Thread-safe: `deliver(item)` runs on the loop soon, after every item posted
        before it. RuntimeError when the loop is closed."""
        self._items.append((deliver, item))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
            self.wakeups += 1
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:
        """On the loop: deliver everything queued. An item posted while this runs is either
        delivered here or has queued another drain (`_scheduled` is cleared first)."""
        with self._lock:
            self._scheduled = False
        items = self._items
        while items:
            deliver, item = items.popleft()
            try:
                deliver(item)
            except Exception:
                logger.exception("mailbox delivery failed")


def loop_mailbox(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    """The mailbox of `loop` (one per loop, made on first use)."""
    with _mailboxes_lock:
        mailbox = _mailboxes.get(loop)
        if mailbox is None:
            mailbox = _mailboxes[loop] = LoopMailbox(loop)
        return mailbox
