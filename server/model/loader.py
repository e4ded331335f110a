"""Build a LlamaModel from an HF safetensors directory (NF4 or dense), plus its tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import kernels
from server.config import ModelConfig
from server.model.args import ModelArgs
from server.model.checkpoint import resolve_model_dir
from server.model.host_heap import retain_freed_heap
from server.model.layers import Projection, RMSNorm
from server.model.llama import MLP, Attention, DecoderLayer, LlamaModel
from server.model.quant import make_linear

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    model: LlamaModel
    args: ModelArgs
    tokenizer: object  # transformers PreTrainedTokenizerFast


class _Checkpoint:
    """Tensor lookup across the directory's *.safetensors files (memory-mapped)."""

    def __init__(self, model_dir: Path) -> None:
        self._where: dict[str, Path] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._where[key] = f
        self._open: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        f = self._where[key]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_tensor(key)


def build_model(
    model_dir: Path, args: ModelArgs, dtype: torch.dtype, quantize: bool, device: str
) -> LlamaModel:
    ckpt = _Checkpoint(model_dir)
    backend = kernels.backend(device)  # the device's kernels, resolved once, kept by every layer

    def proj(layer: int, prefix: str, name: str) -> Projection:
        key = f"model.layers.{layer}.{prefix}.{name}"
        weight = ckpt.get(f"{key}.weight").to(device)
        bias = ckpt.get(f"{key}.bias").to(device) if f"{key}.bias" in ckpt else None
        return Projection(make_linear(weight, bias, quantize=quantize, dtype=dtype, backend=backend), layer, name)

    def norm(key: str) -> RMSNorm:
        return RMSNorm(ckpt.get(key).to(device=device, dtype=dtype), args.rms_norm_eps, backend)

    layers = []
    for i in range(args.num_layers):
        attn = Attention(args, *(proj(i, "self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")), backend)
        mlp = MLP(*(proj(i, "mlp", n) for n in ("gate_proj", "up_proj", "down_proj")))
        p = f"model.layers.{i}"
        layers.append(DecoderLayer(attn, mlp, norm(f"{p}.input_layernorm.weight"),
                                   norm(f"{p}.post_attention_layernorm.weight")))
    embed = ckpt.get("model.embed_tokens.weight").to(device=device, dtype=dtype)
    lm_head = embed if args.tie_word_embeddings or "lm_head.weight" not in ckpt else (
        ckpt.get("lm_head.weight").to(device=device, dtype=dtype)
    )
    model = LlamaModel(args, embed, layers, norm("model.norm.weight"), lm_head, backend).eval()
    if torch.device(device).type == "cpu":
        settle_weights(model)
        retain_freed_heap()  # each step's activations reuse freed heap instead of faulting pages back in
    return model


def settle_weights(model: torch.nn.Module) -> None:
    """Move every CPU parameter and buffer (a shared tensor once) out of the checkpoint's memory map into one
    64-byte-aligned huge-page arena, in module order (kernels.cpu.arena_copies says why: 23% on dense matmuls)."""
    from kernels.cpu import arena_copies

    sightings: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []  # (module, name, is_parameter, tensor)
    unique: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is not None and t.device.type == "cpu":
                    sightings.append((module, name, is_param, t))
                    unique.setdefault(id(t), t)
    copies = dict(zip(unique, arena_copies([t.data for t in unique.values()]), strict=True))
    for module, name, is_param, t in sightings:
        if is_param:
            t.data = copies[id(t)]
        else:
            module._buffers[name] = copies[id(t)]


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Resolve, read and (optionally) NF4-quantize the base model. Never touches the network."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    model_dir = resolve_model_dir(cfg.path, cfg.cache_dir)
    args = ModelArgs.from_dir(model_dir)
    model = build_model(model_dir, args, cfg.torch_dtype, cfg.quantize, cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seconds = time.perf_counter() - start
    log.info(
        "loaded %s (%s, %s%s) in %.1f s: %.1f MiB", model_dir.name, args.architecture, cfg.dtype,
        ", NF4" if cfg.quantize else "", seconds, model.memory_bytes() / 2**20,
    )
    return LoadedModel(model, args, tokenizer)
