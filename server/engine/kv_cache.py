"""Paged KV cache: fixed blocks of `block_size` token slots shared by all layers.

A sequence owns a list of blocks (its block table); the slot of context index i is
`blocks[i // block_size] * block_size + i % block_size`. The budget is fixed in config; the
scheduler asks `can_allocate` before admitting or growing a sequence.
"""

from __future__ import annotations

import torch

from server.model.args import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: str):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (args.num_layers, num_blocks * block_size, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, kv_heads, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, have: int, context_len: int) -> int:
        """Extra blocks a sequence holding `have` blocks needs to hold `context_len` slots."""
        return max(0, -(-context_len // self.block_size) - have)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def kv_slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """KV-cache slots [end-start] int64 of context indices start..end-1."""
        idx = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.int64)
        return table[idx // self.block_size] * self.block_size + idx % self.block_size

    def write_prefix(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store prefix-tuning K/V [layers, n, kv_heads, head_dim] at context indices 0..n-1 (no RoPE)."""
        slots = self.kv_slots(blocks, 0, keys.shape[1]).to(self.k.device)
        self.k[:, slots] = keys.to(self.k.dtype)
        self.v[:, slots] = values.to(self.v.dtype)
