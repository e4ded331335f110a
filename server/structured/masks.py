"""The vocabulary bitmask of a step's constrained rows, applied to their logits as tensor ops.

Semantics, for the constrained rows c_0..c_{C-1} of logits [S, V] with grammar states g_0..g_{C-1}:
    bits[j]          = llguidance's next-token bitmask of g_j, int32 [W] (W = ceil(V' / 32), V' >= V the
                       tokenizer's vocabulary as llguidance sees it; bit t % 32 of word t // 32 = token t allowed)
    allowed[j, t]    = (bits[j, t // 32] >> (t % 32)) & 1, for t < V
    logits[c_j, t]   = -inf where not allowed[j, t]; other rows untouched
The masks of all rows are computed by one llguidance call on its own thread pool (GIL released);
unpacking and masking are two tensor ops over [C, V]; no Python loop over tokens. Rows without a grammar
state cost nothing, and a step without any costs one list scan.
"""

from __future__ import annotations

import threading

import llguidance
import llguidance.torch
import torch

from server.structured.state import GrammarState

_BITS = (1 << torch.arange(32, dtype=torch.int64)).to(torch.int32)  # [32] bit b set (1 << 31 wraps to int32 min)
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def _llg_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor(num_threads=2)
        return _executor


def fill_bitmasks(states: list[GrammarState]) -> torch.Tensor:
    """bits [C, W] int32: each state's next-token bitmask (a state already in error gets all zeros)."""
    words = (states[0].matcher_vocab + 31) // 32
    bits = torch.zeros(len(states), words, dtype=torch.int32)
    live = [(s.matcher, j) for j, s in enumerate(states) if s.error is None]
    if live:
        llguidance.torch.fill_next_token_bitmask_par(_llg_executor(), live, bits)
    return bits


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """allowed [C, vocab] bool from bits [C, W] int32 (bit t % 32 of word t // 32)."""
    C, W = bits.shape
    flat = torch.bitwise_and(bits.unsqueeze(-1), _BITS).ne(0).reshape(C, W * 32)  # [C, W * 32] (a shift: ~15x slower)
    if vocab > W * 32:
        flat = torch.cat([flat, flat.new_zeros(C, vocab - W * 32)], dim=1)
    return flat[:, :vocab]


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> torch.Tensor:
    """logits [R, V] (modified in place and returned) with -inf at every token states[j] forbids in row rows[j]."""
    allowed = unpack(fill_bitmasks(states), logits.shape[1]).to(logits.device)  # [C, V]
    if len(rows) == logits.shape[0]:  # every row constrained (rows are distinct): no gather
        order = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        return logits.masked_fill_(~allowed.index_select(0, torch.argsort(order)), float("-inf"))
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy_(0, index, masked)
