"""Prompt tuning and P-tuning: virtual-token embeddings [n_virtual, hidden] placed before the prompt.

PEFT key `prompt_embeddings` (for P-tuning PEFT saves the prompt encoder's output, so both kinds serve
the same way). The virtual tokens take context entries n_prefix..n_prefix+n_virtual-1 (positions as
PEFT gives them) and are computed like tokens whose embeddings come from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.kinds.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    BaseModelMismatch,
    ChunkView,
    ContextLayout,
)
from server.adapters.kinds.peft_keys import PROMPT_EMBEDDINGS
from server.model.args import ModelArgs
from server.model.batch import StepAdapter


@dataclass(slots=True)
class PromptWeights:
    """Virtual-token embeddings prepended to the input embeddings (prompt tuning and P-tuning)."""

    embeddings: torch.Tensor  # [n_virtual, hidden]


def prompt_embeddings(cfg: dict, tensors: dict[str, torch.Tensor], max_virtual: int) -> torch.Tensor:
    """The single `prompt_embeddings` tensor [n, width] of a prompt-learning adapter, checked against its config."""
    if set(tensors) != {PROMPT_EMBEDDINGS}:
        extra = sorted(set(tensors) - {PROMPT_EMBEDDINGS})
        raise AdapterFormatError(f"expected only 'prompt_embeddings', found {extra or 'nothing'}")
    emb = tensors[PROMPT_EMBEDDINGS]
    n = cfg.get("num_virtual_tokens")
    if emb.dim() != 2 or emb.shape[0] != n:
        raise AdapterFormatError(f"prompt_embeddings shape {tuple(emb.shape)} does not match num_virtual_tokens={n}")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError("num_transformer_submodules != 1 (encoder-decoder adapters) is not served")
    if n > max_virtual:
        raise AdapterFormatError(f"{n} virtual tokens exceed the server's maximum of {max_virtual}")
    return emb


def check_prompt_embeddings_header(key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
    """prompt_embeddings [n, width] from the safetensors header alone, for prompt tuning, P-tuning and prefix tuning
    (the header says not which: width is the hidden size or the prefix width; read() checks the kind's own)."""
    if key != PROMPT_EMBEDDINGS:
        return False
    prefix = args.num_layers * 2 * args.num_kv_heads * args.head_dim
    if len(shape) != 2:
        raise AdapterFormatError(f"prompt_embeddings has shape {shape}; it must be [num_virtual_tokens, width]")
    if shape[0] > limits.max_virtual_tokens:
        raise AdapterFormatError(f"{shape[0]} virtual tokens exceed the server's maximum of "
                                 f"{limits.max_virtual_tokens}")
    if shape[1] not in (args.hidden_size, prefix):
        raise BaseModelMismatch(f"prompt_embeddings width {shape[1]} is neither the base hidden size "
                                f"{args.hidden_size} nor its prefix width {prefix} (layers*2*kv_heads*head_dim)")
    return True


class VirtualTokenStep(StepAdapter):
    def __init__(self, index: torch.Tensor, embeds: torch.Tensor) -> None:
        self.index = index  # [T] int64 row of `embeds` for a virtual token, -1 for a real token
        self.embeds = embeds  # [Nv, hidden] the virtual embeddings of the step's prompt-tuned sequences

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        virtual = self.index >= 0
        h[virtual] = self.embeds[self.index[virtual]].to(h.dtype)
        return h


class VirtualTokenKind(AdapterKind):
    """One class for both PEFT types; registered once per name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.peft_types = (name,)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits
             ) -> PromptWeights:
        emb = prompt_embeddings(cfg, tensors, limits.max_virtual_tokens)
        if emb.shape[1] != args.hidden_size:
            raise BaseModelMismatch(f"prompt_embeddings width {emb.shape[1]} != base hidden size {args.hidden_size}")
        return PromptWeights(emb)

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        return check_prompt_embeddings_header(key, shape, args, limits)

    def tensors(self, payload: PromptWeights) -> list[torch.Tensor]:
        return [payload.embeddings]

    def describe(self, payload: PromptWeights) -> dict:
        return {"rank": 0, "target_modules": [], "num_virtual_tokens": int(payload.embeddings.shape[0])}

    def layout(self, num_virtual_tokens: int) -> ContextLayout:
        return ContextLayout(n_virtual=num_virtual_tokens)

    def step(self, tables: None, chunks: list[ChunkView], num_tokens: int, device: torch.device
             ) -> VirtualTokenStep | None:
        """Row arithmetic, worked example: a sequence with n_prefix=2, n_virtual=3 whose chunk covers context
        entries start=1..5 (count=5) at flat offset 10. Its virtual entries are context 2, 3, 4; the step's
        embedding table gets its 3 rows appended at `base` (say 4, after an earlier sequence's 4), so context
        entry i maps to row base + (i - n_prefix): flat tokens 11, 12, 13 read rows 4, 5, 6; flat tokens 10 and
        14 (context 1 and 5: a prefix entry, then the first prompt token) stay -1."""
        index = torch.full((num_tokens,), -1, dtype=torch.int64)
        rows: list[torch.Tensor] = []
        base = 0
        for c in chunks:
            lo = max(c.start, c.layout.n_prefix)
            hi = min(c.start + c.count, c.layout.n_prefix + c.layout.n_virtual)
            if lo >= hi:
                continue  # this chunk holds none of its virtual entries
            first = c.offset + (lo - c.start)
            index[first : first + hi - lo] = torch.arange(base + lo - c.layout.n_prefix, base + hi - c.layout.n_prefix)
            rows.append(c.payload.embeddings)
            base += c.payload.embeddings.shape[0]
        if not rows:
            return None
        return VirtualTokenStep(index.to(device), torch.cat(rows).to(device))
