"""The HTTP face's side of a call's life: `EventStream`, an SSE response that closes its call however it ends.

The call itself (slot, quota, engine sequences, abort, the bill for what was computed) is server.lifecycle's
`Call`, the same object the gRPC face uses.
"""

from __future__ import annotations

from starlette.responses import StreamingResponse

from server.lifecycle import Call


class EventStream(StreamingResponse):
    """An SSE response that closes its Call however the stream ends, even if the body never started
    (a client that disconnects before the first chunk)."""

    def __init__(self, body, call: Call) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.call = call

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.close()
