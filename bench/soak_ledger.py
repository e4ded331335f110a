"""The soak's usage oracle: what every client call received, as bounds on what the server may bill it, per tenant.

A client opens an entry before each generation call (`ledger.open(tenant, prompt_len, max_tokens)`), then
says how it ended: `exact(prompt, completion)` for a response (or a finished stream) whose usage it saw,
`cut(prompt, received)` for a stream it cancelled after `received` tokens (the engine may have computed more
before the abort landed, never more than max_tokens), nothing for a call that failed or expired (0 .. its
upper bound: a call aborted while waiting is not billed). `check(usage_rows)` compares the server's stored
usage (summed over adapters and minutes) with the sums, once traffic stopped and every bill settled.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

FIELDS = ("prompt", "completion", "requests")


@dataclass(slots=True)
class Entry:
    tenant: str
    low: tuple[int, int, int]  # (prompt, completion, requests) the server bills at least
    high: tuple[int, int, int]  # ... at most

    def exact(self, prompt: int, completion: int) -> None:
        self.low = self.high = (prompt, completion, 1)

    def cut(self, prompt: int, received: int) -> None:
        """A stream the client cancelled after `received` tokens (at least one: its prompt was scheduled)."""
        self.low = (prompt, received, 1) if received else (0, 0, 0)
        self.high = (prompt, self.high[1], 1)


@dataclass
class UsageCheck:
    ok: bool
    rows: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # tenant -> field -> [low, stored, high]
    exact_calls: int = 0
    bounded_calls: int = 0


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Entry] = []

    def open(self, tenant: str, prompt_len: int, max_tokens: int) -> Entry:
        entry = Entry(tenant, (0, 0, 0), (prompt_len, max_tokens, 1))
        with self._lock:
            self._entries.append(entry)
        return entry

    def check(self, usage_rows) -> UsageCheck:
        """`usage_rows`: server.usage.UsageRow (or alike) of every tenant the ledger has entries for."""
        stored = Counter()
        for r in usage_rows:
            stored[(r.tenant, "prompt")] += r.prompt_tokens
            stored[(r.tenant, "completion")] += r.completion_tokens
            stored[(r.tenant, "requests")] += r.requests
        low, high = Counter(), Counter()
        with self._lock:
            entries = list(self._entries)
        for e in entries:
            for i, f in enumerate(FIELDS):
                low[(e.tenant, f)] += e.low[i]
                high[(e.tenant, f)] += e.high[i]
        out = UsageCheck(ok=True, exact_calls=sum(e.low == e.high for e in entries))
        out.bounded_calls = len(entries) - out.exact_calls
        for tenant in sorted({e.tenant for e in entries}):
            out.rows[tenant] = {}
            for f in FIELDS:
                k = (tenant, f)
                out.rows[tenant][f] = [low[k], stored[k], high[k]]
                out.ok = out.ok and low[k] <= stored[k] <= high[k]
        return out
