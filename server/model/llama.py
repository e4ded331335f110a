"""One Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) reading a ForwardBatch.

A single forward serves a mix of prefill chunks and decode tokens of many sequences, each with
its own adapter: projections route tokens to adapters (layers.Projection), attention reads every
sequence's context from the paged KV cache in place (kernels/attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from server.model.args import ModelArgs
from server.model.batch import AttentionMeta, ForwardBatch, StepAdapter
from server.model.layers import Projection, RMSNorm, Rotary, project_group


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, q: Projection, k: Projection, v: Projection, o: Projection,
                 backend: kernels.KernelBackend | None = None) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.kernels = backend or q.base.kernels  # the base projections' device
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale = args.head_dim**-0.5

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMeta,
        adapters: list[StepAdapter],
        k_cache: torch.Tensor,  # [kv_slots, kv_heads, head_dim] this layer's cache
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        t = h.shape[0]
        q, k, v = project_group((self.q_proj, self.k_proj, self.v_proj), h, adapters)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        q = self.kernels.rope_and_cache(q, k, v, cos, sin, attn.kv_write_slots, k_cache, v_cache)  # K/V rotated in
        out = self.kernels.paged_attention(q, k_cache, v_cache, attn.paged, self.scale)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim), adapters)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: Projection, up: Projection, down: Projection) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor, adapters: list[StepAdapter]) -> torch.Tensor:
        gate, up = project_group((self.gate_proj, self.up_proj), x, adapters)
        return self.down_proj(F.silu(gate) * up, adapters)


class DecoderLayer(nn.Module):
    """h += attention(norm(h)); h += mlp(norm(h)), each sub-block's output passed through the adapters'
    block_output hook (server/model/batch.py) before it joins the residual stream."""

    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_norm, post_norm
        self.layer = attn.o_proj.layer  # this decoder layer's index

    def forward(self, h, cos_sin, attn, adapters, k_cache, v_cache) -> torch.Tensor:
        x = self.input_layernorm(h)
        for adapter in adapters:
            x = adapter.norm(h, x, self.layer, "input_layernorm", None)
        out = self.self_attn(x, cos_sin, attn, adapters, k_cache, v_cache)
        for adapter in adapters:
            out = adapter.block_output(h, out, self.layer, "attention")
        h = h + out
        x = self.post_attention_layernorm(h)
        for adapter in adapters:
            x = adapter.norm(h, x, self.layer, "post_attention_layernorm", None)
        out = self.mlp(x, adapters)
        for adapter in adapters:
            out = adapter.block_output(h, out, self.layer, "mlp")
        return h + out


class LlamaModel(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        embed: torch.Tensor,  # [vocab, hidden]
        layers: list[DecoderLayer],
        norm: RMSNorm,
        lm_head: torch.Tensor,  # [vocab, hidden] (the embedding itself when tied)
        backend: kernels.KernelBackend | None = None,  # default: kernels.backend(embed.device)
    ) -> None:
        super().__init__()
        self.args = args
        self.kernels = backend or kernels.backend(embed.device)
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        tied = args.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else nn.Parameter(lm_head, requires_grad=False)
        self.rotary = Rotary(args)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def base_weight(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projection `module` of `layer` as dense fp32: weight [out, in] (dequantized when NF4) and bias [out] or
        None. For adapter tables derived from the base; a copy, so callers may keep it off the model's device."""
        if module in ("input_layernorm", "post_attention_layernorm", "norm"):  # RMSNorm weights [hidden], no bias
            norm = self.norm if module == "norm" else getattr(self.layers[layer], module)
            return norm.weight.detach().float().clone(), None
        block = self.layers[layer]
        proj = getattr(block.self_attn, module, None) or getattr(block.mlp, module, None)
        if not isinstance(proj, Projection):
            raise KeyError(f"layer {layer} has no projection {module!r}")
        base = proj.base
        dense = base.dense_weight if hasattr(base, "dense_weight") else (lambda: base.weight)
        with torch.no_grad():
            weight = dense().detach().float().clone()
            bias = None if getattr(base, "bias", None) is None else base.bias.detach().float().clone()
        return weight, bias

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        h = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        for adapter in batch.adapters:
            h = adapter.embed_tokens(batch.input_ids, h)
        for adapter in batch.adapters:
            h = adapter.embed(h)
        return h

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        k_cache: torch.Tensor,  # [layers, kv_slots, kv_heads, head_dim]
        v_cache: torch.Tensor,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits (fp32) [S, vocab] at batch.logits_index, or [T, vocab] for every token if all_logits."""
        h = self.embed(batch)
        factor = None
        for adapter in batch.adapters:
            factor = adapter.rope_factor(factor)
        cos_sin = self.rotary.cos_sin(batch.positions, h.dtype, factor)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin, batch.attention, batch.adapters, k_cache[i], v_cache[i])
        rows = None if all_logits else batch.logits_index
        if rows is not None:
            h = h[rows]
        x = self.norm(h)
        for adapter in batch.adapters:
            x = adapter.norm(h, x, len(self.layers), "norm", rows)
        return self.kernels.linear(x, self.lm_head, None).float()  # [S, vocab]

    def memory_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in [*self.parameters(), *self.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        for m in self.modules():  # NF4 absmax / double-quant statistics live outside buffers
            state = getattr(m, "quant_state", None)
            if state is not None:
                total += m.nbytes() - m.packed.numel()
        return total
