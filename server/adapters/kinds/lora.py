"""LoRA: y += scale * (x @ A^T) @ B^T on each targeted projection (PEFT's LoraModel; rsLoRA scaling).

LoRA, DoRA (dora.py) and LongLoRA (longlora.py) are one family: three adapter kinds users see (by their
adapter_config.json) that read their own files, and fill one slot table set (lora_tables.py) served by one
StepAdapter per step (lora_step.py), DoRA's gains and LongLoRA's norms / embeddings / RoPE factor being optional
per-slot extras (lora_extras.py). A step mixing the three takes one kernel call per projection group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from server.adapters import validation
from server.adapters.kinds.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    BaseModelMismatch,
    ChunkView,
)
from server.adapters.kinds.lora_merge import merge_lora, write_peft_lora
from server.adapters.kinds.lora_step import LoraStep
from server.adapters.kinds.lora_tables import LoraTables
from server.adapters.kinds.lora_weights import LoraWeights
from server.adapters.kinds.peft_keys import LORA_MATRICES, module_key, module_shape, module_tensors
from server.adapters.kinds.peft_options import check_served_options
from server.model.args import ModelArgs

if TYPE_CHECKING:
    from server.adapters.merge import MergeSpec
    from server.adapters.weights import AdapterWeights

__all__ = ["LoraKind", "LoraStep", "LoraTables", "LoraWeights"]


class LoraKind(AdapterKind):
    name = "LORA"
    peft_types = ("LORA",)
    family = "LORA"  # DoRA and LongLoRA inherit it: one table set, one StepAdapter per step
    composable = True  # a weighted sum of LoRA deltas is what PEFT computes with several adapters active

    def accepts(self, cfg: dict) -> bool:
        return cfg.get("peft_type") == "LORA" and not cfg.get("use_dora")  # use_dora: server/adapters/kinds/dora.py

    def check_config(self, cfg: dict) -> None:
        check_served_options(cfg)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits) -> LoraWeights:
        check_served_options(cfg)
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r < 1:
            raise AdapterFormatError(f"LoRA rank r must be a positive integer, got {r!r}")
        if r > limits.max_lora_rank:
            raise AdapterFormatError(f"LoRA rank {r} exceeds the server's maximum rank {limits.max_lora_rank}")
        alpha = validation.check_scale("lora_alpha", alpha)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        validation.check_scale("the LoRA scale lora_alpha/r", scale)
        a: dict[tuple[int, str], torch.Tensor] = {}
        b: dict[tuple[int, str], torch.Tensor] = {}
        for (layer, module, suffix), t in module_tensors(tensors, args, LORA_MATRICES).items():
            n_in, n_out = args.projection_shape(module)
            want = (r, n_in) if suffix == "lora_A" else (n_out, r)
            if tuple(t.shape) != want:
                rank_ok = t.dim() == 2 and t.shape[0 if suffix == "lora_A" else 1] == r
                error = BaseModelMismatch if rank_ok else AdapterFormatError
                raise error(f"{suffix} of layer {layer} {module} has shape {tuple(t.shape)}; the base needs {want}")
            (a if suffix == "lora_A" else b)[(layer, module)] = t
        if a.keys() != b.keys():
            raise AdapterFormatError("every lora_A needs its lora_B (and vice versa)")
        return LoraWeights(rank=r, scale=float(scale), a=a, b=b)

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """lora_A [r, in] / lora_B [out, r] from the safetensors header alone: 2-d, 1 <= r <= the server's maximum
        rank, the base projection's width."""
        parsed = module_key(key)
        if parsed is None or parsed.suffix not in LORA_MATRICES:
            return False
        n_in, n_out = module_shape(key, parsed, args)
        where = f"{parsed.suffix} of layer {parsed.layer} {parsed.module}"
        if len(shape) != 2:
            raise AdapterFormatError(f"{where} has shape {shape}; LoRA tensors are 2-dimensional")
        rank, width, need = (shape[0], shape[1], n_in) if parsed.suffix == "lora_A" else (shape[1], shape[0], n_out)
        if not 1 <= rank <= limits.max_lora_rank:
            raise AdapterFormatError(f"{where} has rank {rank}: LoRA rank {rank} exceeds the server's maximum rank "
                                     f"{limits.max_lora_rank} (or is 0)")
        if width != need:
            raise BaseModelMismatch(f"{where} has shape {shape}; the base needs {need} in that dimension")
        return True

    def tensors(self, payload: LoraWeights) -> list[torch.Tensor]:
        return [*payload.a.values(), *payload.b.values()]

    def describe(self, payload: LoraWeights) -> dict:
        return {"rank": payload.rank, "target_modules": list(payload.target_modules), "num_virtual_tokens": 0}

    def new_tables(self, args: ModelArgs, num_slots: int, limits: AdapterLimits, dtype: torch.dtype,
                   device: str) -> LoraTables:
        return LoraTables(args, num_slots, limits.max_lora_rank, limits.lora_torch_dtype or dtype, device, dtype)

    def merge(self, sources: list[AdapterWeights], spec: MergeSpec, out_dir: Path) -> None:
        """PEFT's add_weighted_adapter over LoRA sources (lora_merge.py; DoRA and LongLoRA sources are refused)."""
        write_peft_lora(merge_lora(sources, spec), out_dir, base_model=sources[0].base_model)

    def step(self, tables: LoraTables, chunks: list[ChunkView], num_tokens: int, device: torch.device) -> LoraStep:
        """One StepAdapter for the sequences of every kind of the family (the runner passes all their chunks)."""
        return LoraStep(tables, chunks, num_tokens, device)
