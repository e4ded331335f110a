"""Engine RequestHandles (filled by the step-loop thread) consumed from asyncio without a thread per request."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable

from server.engine.request import RequestHandle, TokenEvent
from server.lifecycle import drain


async def events(handles: list[RequestHandle], idle_s: float = 0.5
                 ) -> AsyncIterator[tuple[int, TokenEvent] | None]:
    """(index into handles, event) as events arrive, several queued events of one handle merged into one
    (as the gRPC path coalesces them). Yields None after `idle_s` without any event, so the caller can
    check that its client is still there and the engine alive. Ends when every handle has finished."""
    wake = asyncio.Event()
    signal = _notifier(asyncio.get_running_loop()).listener(wake)
    for h in handles:
        h.set_listener(signal)
    open_ = set(range(len(handles)))
    try:
        while open_:
            wake.clear()  # cleared before draining: a put after this point sets it again
            got = False
            for item in drain(handles, open_):
                got = True
                yield item
            if got or not open_:
                continue
            try:
                await asyncio.wait_for(wake.wait(), timeout=idle_s)
            except TimeoutError:
                yield None
    finally:
        for h in handles:
            h.drop_listener(signal)


class LoopNotifier:
    """Wakes asyncio consumers from the engine thread with one `call_soon_threadsafe` per burst of events (an
    engine step puts one event per running sequence; waking the loop once for all of them saves its self-pipe
    writes and loop passes, which matter with many concurrent streams)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[asyncio.Event] = []
        self._scheduled = False

    def listener(self, wake: asyncio.Event) -> Callable[[], None]:
        def signal() -> None:  # engine thread
            with self._lock:
                self._ready.append(wake)
                if self._scheduled:
                    return
                self._scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop (server shutting down): nobody is waiting
                self.loop.call_soon_threadsafe(self._fire)

        return signal

    def _fire(self) -> None:  # event loop thread
        with self._lock:
            ready, self._ready, self._scheduled = self._ready, [], False
        for wake in ready:
            wake.set()


_NOTIFIERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _notifier(loop: asyncio.AbstractEventLoop) -> LoopNotifier:
    notifier = _NOTIFIERS.get(loop)
    if notifier is None:
        notifier = _NOTIFIERS[loop] = LoopNotifier(loop)
    return notifier
