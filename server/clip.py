"""`clip(text)`: a caller-supplied name made safe to echo in an error message.

Error details travel in gRPC trailing metadata (a few KB at most): a 100 KB tar member name or a 10 KB
adapter name echoed whole turns a clear INVALID_ARGUMENT into a transport error. Every place that
echoes a caller's name or path goes through `clip`, which keeps at most `limit` characters and says
how many were cut.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200


def clip(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """`repr(text)` when it is short; else its first `limit` characters, quoted, plus how many were cut."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}... ({len(s) - limit} more characters)"
