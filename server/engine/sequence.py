"""One request's state inside the engine, and its incremental detokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from server.adapters.residency import Lease
from server.engine.request import FinishReason, GenerationRequest, RequestHandle
from server.structured.state import GrammarState


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class IncrementalDetokenizer:
    """Text deltas that never split a multi-byte character.

    Decodes a short window of tokens before and after the read offset; a delta is released only
    when the window's text does not end in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: object, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])  # context for correct leading spaces
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


@dataclass(eq=False)
class Sequence:
    """Context layout: [prefix K/V (n_prefix)] [virtual tokens (n_virtual)] [prompt] [generated].

    Position (RoPE) and KV index of context entry i are both i.
    """

    request: GenerationRequest
    handle: RequestHandle
    detok: IncrementalDetokenizer
    n_prefix: int = 0  # prefix-tuning K/V entries (written, never computed)
    n_virtual: int = 0  # prompt-tuning / P-tuning virtual tokens (computed from embeddings)
    lease: Lease | None = None  # the adapter's pinned device slot and tensors, while running
    adapter_version: int | None = None  # the adapter version that served it (kept after the lease ends)
    # a composition's pinned parts: (lease, weight) each, while running; their versions kept after
    part_leases: list[tuple[Lease, float]] = field(default_factory=list)
    part_versions: tuple[int, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # context entries whose K/V are in the cache (includes n_prefix)
    blocks: list[int] = field(default_factory=list)
    # prefix cache (server.engine.prefix_cache): the chain's root (None = not cached), the adapter identity its
    # blocks are tagged with, the keys of the context's full blocks known so far, and how many of `blocks`
    # are keyed (hits or registered); prompt tokens served from the cache at the first admission
    cache_root: bytes | None = None
    cache_tag: str = "base"
    block_keys: list[bytes] = field(default_factory=list)
    n_committed: int = 0
    cached_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    generator: torch.Generator | None = None
    text: str = ""  # generated text so far (stop strings checked here)
    emitted_chars: int = 0  # characters of `text` already sent to the caller
    first_scheduled: float | None = None
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    grammar: GrammarState | None = None  # the output constraint's matcher (server.structured); None = free text

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def adapter_slot(self) -> int:
        """The pinned adapter slot, -1 without one."""
        return self.lease.adapter_slot if self.lease is not None else -1

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def context_len(self) -> int:
        return self.n_prefix + self.n_virtual + len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Context entries still to compute; the next token is sampled once this reaches 0."""
        return self.context_len - self.num_computed

    def token_at(self, i: int) -> int:
        """Token id at context index i (virtual entries -> 0; their embeddings come from the adapter)."""
        j = i - self.n_prefix - self.n_virtual
        if j < 0:
            return 0
        n_prompt = len(self.prompt_ids)
        return self.prompt_ids[j] if j < n_prompt else self.output_ids[j - n_prompt]

    def mark_scheduled(self) -> None:
        if self.first_scheduled is None:
            self.first_scheduled = time.monotonic()
