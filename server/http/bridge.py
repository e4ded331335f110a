"""Engine RequestHandles (filled by the step-loop thread) consumed from asyncio without a thread per request."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator

from server.engine.request import RequestHandle, TokenEvent, merge_events


async def events(handles: list[RequestHandle], idle_s: float = 0.5
                 ) -> AsyncIterator[tuple[int, TokenEvent] | None]:
    """(index into handles, event) as events arrive, several queued events of one handle merged into one
    (as the gRPC path coalesces them). Yields None after `idle_s` without any event, so the caller can
    check that its client is still there and the engine alive. Ends when every handle has finished."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def signal() -> None:  # engine thread
        loop.call_soon_threadsafe(wake.set)

    for h in handles:
        h.set_listener(signal)
    open_ = set(range(len(handles)))
    try:
        while open_:
            wake.clear()  # cleared before draining: a put after this point sets it again
            got = False
            for i in sorted(open_):
                batch = _drain(handles[i])
                if batch:
                    got = True
                    event = merge_events(batch)
                    if event.finished:
                        open_.discard(i)
                    yield i, event
            if got or not open_:
                continue
            try:
                await asyncio.wait_for(wake.wait(), timeout=idle_s)
            except TimeoutError:
                yield None
    finally:
        for h in handles:
            h.set_listener(None)


def _drain(handle: RequestHandle) -> list[TokenEvent]:
    out: list[TokenEvent] = []
    while not handle.done and (not out or not out[-1].finished):
        try:
            out.append(handle.get(timeout=0))
        except queue.Empty:
            break
    return out
