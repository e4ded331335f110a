"""Paged KV cache: fixed blocks of `block_size` token slots shared by all layers.

A sequence holds a list of blocks (its block table); the slot of context index i is
`blocks[i // block_size] * block_size + i % block_size`. Blocks are reference-counted (server.engine.
block_allocator): sibling sequences (several choices of one prompt) and the prefix cache's hits share full
blocks (`share`), and a block's last holder releases it to the free list, or, when the prefix cache keyed it,
to the cache of unreferenced blocks that allocation evicts last. A shared block is never written: only the
partially filled tail block is written again, and a fork copies it (`copy_block`). The budget is fixed in
config; the scheduler asks `can_allocate` before admitting or growing a sequence.
"""

from __future__ import annotations

import torch

from server.engine.block_allocator import BlockAllocator
from server.model.args import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: str):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (args.num_layers, num_blocks * block_size, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, kv_heads, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = BlockAllocator(num_blocks)

    @property
    def used_blocks(self) -> int:
        """Blocks held by sequences (cached-but-unreferenced blocks count as free)."""
        return self.blocks.held

    def blocks_needed(self, have: int, context_len: int) -> int:
        """Extra blocks a sequence holding `have` blocks needs to hold `context_len` slots."""
        return max(0, -(-context_len // self.block_size) - have)

    def can_allocate(self, n: int) -> bool:
        return n <= self.blocks.available

    def allocate(self, n: int) -> list[int]:
        return self.blocks.allocate(n)

    def free(self, blocks: list[int]) -> None:
        """Let go of `blocks` (the list is emptied)."""
        self.blocks.free(blocks)

    def share(self, blocks: list[int]) -> list[int]:
        """Another holder of `blocks` (full blocks that are never written again)."""
        return self.blocks.share(blocks)

    def copy_block(self, src: int) -> int:
        """A new block holding a copy of `src`'s K/V in every layer."""
        (dst,) = self.allocate(1)
        bs = self.block_size
        self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
        self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]
        return dst

    def kv_slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """KV-cache slots [end-start] int64 of context indices start..end-1."""
        idx = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.int64)
        return table[idx // self.block_size] * self.block_size + idx % self.block_size

    def write_prefix(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Store prefix-tuning K/V [layers, n, kv_heads, head_dim] at context indices start..start+n-1 (no RoPE)."""
        slots = self.kv_slots(blocks, start, start + keys.shape[1]).to(self.k.device)
        self.k[:, slots] = keys.to(self.k.dtype)
        self.v[:, slots] = values.to(self.v.dtype)
