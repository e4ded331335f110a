"""LongLoRA (Chen et al. 2023): LoRA + trained embeddings and RMSNorm weights + RoPE linear position interpolation.

A LongLoRA sequence computes, on its own rows of the step only:
  embeddings   the adapter's embedding table row of each token (PEFT `modules_to_save: ["embed_tokens"]`; the
               LM head stays the base's, as PEFT leaves a tied head on the original table)
  norms        RMSNorm with the adapter's weight: input / post-attention norm of each layer and the final norm
  RoPE         position * inv_freq / factor (transformers' rope_type "linear"), so it runs at factor x the base's
               context in the same batch as base sequences
  projections  LoRA's delta (server/adapters/kinds/lora.py)
Inference uses full attention; S2-Attn is a training-only device (server/trainer/longlora.py).

Files: PEFT's LoRA directory (`peft_type: "LORA"`) with
  modules_to_save  any of embed_tokens, input_layernorm, post_attention_layernorm, norm
  rope_scaling     {"rope_type": "linear", "factor": F}, 1 <= F <= MAX_ROPE_FACTOR (our key; PEFT ignores it)
and, next to lora_A / lora_B, the saved modules under PEFT's names:
  base_model.model.model.embed_tokens.weight                       [vocab, hidden]
  base_model.model.model.layers.<i>.input_layernorm.weight          [hidden]
  base_model.model.model.layers.<i>.post_attention_layernorm.weight [hidden]
  base_model.model.model.norm.weight                                [hidden]

Tables, besides LoRA's (created on the first LongLoRA adapter, so a server without one pays nothing):
  norm    [slots + 1, 2 * layers + 1, hidden]  row `slots` and norms an adapter leaves alone: the base's weights
          (index 2 i: input norm of layer i, 2 i + 1: its post-attention norm, 2 layers: the final norm)
  embed   [slots, vocab, hidden]               the slot's whole embedding table (only for adapters that train it)
  factor  host list [slots]                    RoPE interpolation factor (1.0 = none)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kernels import build_lora_meta
from kernels.pointwise import rms_normalize
from server.adapters import validation
from server.adapters.kinds.base import (
    AdapterFormatError,
    BaseModelMismatch,
    ChunkView,
    ReadLimits,
    Staging,
    token_slots,
)
from server.adapters.kinds.lora import LoraKind, LoraStep, LoraTables, LoraWeights
from server.clip import clip
from server.model.args import ModelArgs

MAX_ROPE_FACTOR = 64.0
SAVED_MODULES = ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm")
EMBED_KEY = "base_model.model.model.embed_tokens.weight"
FINAL_NORM_KEY = "base_model.model.model.norm.weight"
_LAYER_NORM_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)"
                             r"\.weight$")
_LORA_KEY = re.compile(r"\.(lora_A|lora_B)(?:\.weight)?$")


def is_longlora(cfg: dict) -> bool:
    """A PEFT LoRA config with trained non-LoRA modules or a RoPE interpolation factor."""
    return (cfg.get("peft_type") == "LORA" and not cfg.get("use_dora")
            and bool(cfg.get("modules_to_save") or cfg.get("rope_scaling")))


def norm_index(args: ModelArgs, layer: int, name: str) -> int:
    """Row of a norm in the `norm` table (see the module docstring)."""
    if name == "norm":
        return 2 * args.num_layers
    return 2 * layer + (0 if name == "input_layernorm" else 1)


def rope_factor(cfg: dict) -> float:
    """The linear interpolation factor recorded in the config (1.0 when there is none)."""
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return 1.0
    if not isinstance(scaling, dict):
        raise AdapterFormatError(f"rope_scaling must be an object like {{\"rope_type\": \"linear\", \"factor\": 2}}, "
                                 f"got {clip(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "linear":
        raise AdapterFormatError(f"rope_scaling rope_type {clip(kind)} is not served (only 'linear')")
    factor = validation.check_scale("rope_scaling factor", scaling.get("factor"), MAX_ROPE_FACTOR)
    if factor < 1.0:
        raise AdapterFormatError(f"rope_scaling factor {factor:g} must be >= 1 (it extends the context)")
    return factor


@dataclass(slots=True)
class LongLoraWeights:
    lora: LoraWeights
    norms: dict[tuple[int, str], torch.Tensor]  # (layer, name) -> [hidden]; the final norm is (num_layers, "norm")
    embed: torch.Tensor | None  # [vocab, hidden] the trained embedding table, None = the base's
    factor: float  # RoPE linear interpolation factor, 1.0 = none


class LongLoraTables(LoraTables):
    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, dtype: torch.dtype, device: str) -> None:
        super().__init__(args, num_slots, max_rank, dtype, device)
        self.norm: torch.Tensor | None = None
        self.embed: torch.Tensor | None = None
        self.has_embed: list[bool] = [False] * num_slots
        self.factor: list[float] = [1.0] * num_slots

    @property
    def base_row(self) -> int:
        return self.num_slots

    def _base_norms(self) -> torch.Tensor:
        """[2 * layers + 1, hidden] the base's norm weights, in table order."""
        base = self.bound_base("LongLoRA (its norm weights)")
        rows = [base(i, n)[0] for i in range(self.args.num_layers)
                for n in ("input_layernorm", "post_attention_layernorm")]
        return torch.stack([*rows, base(self.args.num_layers, "norm")[0]])

    def stage(self, payload: LongLoraWeights, ready: Staging) -> LongLoraWeights:
        lora = super().stage(payload.lora, ready)
        embed = None if payload.embed is None else ready(payload.embed)
        return LongLoraWeights(lora, {k: ready(t) for k, t in payload.norms.items()}, embed, payload.factor)

    def ensure(self, payload: LongLoraWeights) -> None:
        super().ensure(payload.lora)
        if self.norm is None:
            base = self._base_norms().to(self.dtype)
            self.norm = base.to(self.device)[None].repeat(self.num_slots + 1, 1, 1).contiguous()
        if payload.embed is not None and self.embed is None:
            self.embed = torch.zeros(self.num_slots, *payload.embed.shape, dtype=self.dtype, device=self.device)

    def fill(self, slot: int, payload: LongLoraWeights) -> None:
        self.bound_base("LongLoRA (its norm weights)")
        self.ensure(payload)
        super().fill(slot, payload.lora)
        for (layer, name), w in payload.norms.items():
            self.norm[slot, norm_index(self.args, layer, name)] = w.to(self.dtype)
        if payload.embed is not None:
            self.embed[slot] = payload.embed.to(self.dtype)
            self.has_embed[slot] = True
        self.factor[slot] = payload.factor

    def clear(self, slot: int) -> None:
        super().clear(slot)
        if self.norm is not None:
            self.norm[slot] = self.norm[self.base_row]
        if self.embed is not None and self.has_embed[slot]:
            self.embed[slot].zero_()
        self.has_embed[slot] = False
        self.factor[slot] = 1.0


class LongLoraStep(LoraStep):
    """LoRA's deltas plus three per-token lookups: embedding rows, norm weights, RoPE factor."""

    def __init__(self, tables: LongLoraTables, chunks: list[ChunkView], num_tokens: int, device: torch.device
                 ) -> None:
        slots = token_slots(chunks, num_tokens, -1, torch.int32)
        super().__init__(tables, build_lora_meta(slots.to(device), tables.ranks))
        self.eps = tables.args.rms_norm_eps
        self.norm_rows = token_slots(chunks, num_tokens, tables.base_row).to(device)  # [T] norm table row
        self.mine = self.norm_rows != tables.base_row  # [T] bool: this kind's tokens
        self.all_mine = sum(c.count for c in chunks) == num_tokens
        embedded = [c for c in chunks if tables.has_embed[c.slot]]
        self.embed_tokens_at = None  # [n] flat tokens whose embedding row is the adapter's, and their slots
        if embedded:
            at = torch.cat([torch.arange(c.offset, c.offset + c.count) for c in embedded])
            of = torch.cat([torch.full((c.count,), c.slot, dtype=torch.int64) for c in embedded])
            self.embed_tokens_at = (at.to(device), of.to(device))
        self.factor = None  # [T] fp32, only when some sequence interpolates
        if any(tables.factor[c.slot] != 1.0 for c in chunks):
            factor = torch.ones(num_tokens, dtype=torch.float32)
            for c in chunks:
                factor[c.offset : c.offset + c.count] = tables.factor[c.slot]
            self.factor = factor.to(device)

    def embed_tokens(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens_at is None:
            return h
        at, of = self.embed_tokens_at
        return h.index_copy(0, at, self.tables.embed[of, input_ids[at]].to(h.dtype))

    def rope_factor(self, factor: torch.Tensor | None) -> torch.Tensor | None:
        if self.factor is None:
            return factor
        return self.factor if factor is None else factor * self.factor

    def norm(self, x: torch.Tensor, y: torch.Tensor, layer: int, name: str, rows: torch.Tensor | None
             ) -> torch.Tensor:
        """The LongLoRA rows renormed with their slot's weight (RMSNorm's arithmetic); other rows as they came."""
        slot_rows = self.norm_rows if rows is None else self.norm_rows[rows]
        mine = self.mine if rows is None else self.mine[rows]
        # [n, hidden]; index_select copies rows (advanced indexing over the 3-d table took ~3x longer)
        weight = self.tables.norm[:, norm_index(self.tables.args, layer, name)].index_select(0, slot_rows)
        h = rms_normalize(x, self.eps)
        if rows is None and self.all_mine:  # every token is this kind's: no base row to keep
            return weight * h
        return torch.where(mine[:, None], weight * h, y)


class LongLoraKind(LoraKind):
    name = "LONGLORA"
    peft_types = ()  # read by config (is_longlora), never by peft_type alone

    def accepts(self, cfg: dict) -> bool:
        return is_longlora(cfg)

    def check_config(self, cfg: dict) -> None:
        saved = cfg.get("modules_to_save") or []
        if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
            raise AdapterFormatError(f"modules_to_save must be a list of module names, got {clip(saved)}")
        unknown = sorted(set(saved) - set(SAVED_MODULES))
        if unknown:
            raise AdapterFormatError(f"modules_to_save {unknown} are not served for LongLoRA; served: "
                                     f"{', '.join(SAVED_MODULES)}")
        rope_factor(cfg)
        super().check_config(_lora_config(cfg))

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs,
             limits: ReadLimits) -> LongLoraWeights:
        self.check_config(cfg)
        lora_tensors = {k: t for k, t in tensors.items() if _LORA_KEY.search(k)}
        norms: dict[tuple[int, str], torch.Tensor] = {}
        embed = None
        for key, t in tensors.items():
            if key in lora_tensors:
                continue
            if not self.check_tensor_header(key, tuple(t.shape), args, limits):
                raise AdapterFormatError(f"unexpected tensor {clip(key)} in a LongLoRA adapter")
            if key == EMBED_KEY:
                embed = t
            elif key == FINAL_NORM_KEY:
                norms[(args.num_layers, "norm")] = t
            else:
                m = _LAYER_NORM_KEY.match(key)
                norms[(int(m[1]), m[2])] = t
        saved = set(cfg.get("modules_to_save") or [])
        if embed is not None and "embed_tokens" not in saved:
            raise AdapterFormatError("the adapter holds an embedding table but modules_to_save lacks embed_tokens")
        if "embed_tokens" in saved and embed is None:
            raise AdapterFormatError(f"modules_to_save names embed_tokens but {EMBED_KEY} is missing")
        for name in ("input_layernorm", "post_attention_layernorm", "norm"):
            if name in saved and not any(n == name for _, n in norms):
                raise AdapterFormatError(f"modules_to_save names {name} but none of its weights are saved")
        lora = super().read(_lora_config(cfg), lora_tensors, args, limits)
        return LongLoraWeights(lora, norms, embed, rope_factor(cfg))

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: ReadLimits) -> bool:
        if key == EMBED_KEY:
            if len(shape) != 2:
                raise AdapterFormatError(f"{key} has shape {shape}; it must be [vocab, hidden]")
            if shape != (args.vocab_size, args.hidden_size):
                raise BaseModelMismatch(f"{key} has shape {shape}; the base's table is "
                                        f"({args.vocab_size}, {args.hidden_size})")
            return True
        m = _LAYER_NORM_KEY.match(key)
        if key != FINAL_NORM_KEY and m is None:
            return False
        if m is not None and int(m[1]) >= args.num_layers:
            raise BaseModelMismatch(f"tensor {key} addresses layer {m[1]}; the base has {args.num_layers} layers")
        if len(shape) != 1:
            raise AdapterFormatError(f"{key} has shape {shape}; a norm weight is a vector")
        if shape[0] != args.hidden_size:
            raise BaseModelMismatch(f"{key} has {shape[0]} features; the base's hidden size is {args.hidden_size}")
        return True

    def tensors(self, payload: LongLoraWeights) -> list[torch.Tensor]:
        extra = [] if payload.embed is None else [payload.embed]
        return [*super().tensors(payload.lora), *payload.norms.values(), *extra]

    def describe(self, payload: LongLoraWeights) -> dict:
        return {**super().describe(payload.lora), "rope_factor": payload.factor}

    def new_tables(self, args: ModelArgs, num_slots: int, limits: ReadLimits, dtype: torch.dtype,
                   device: str) -> LongLoraTables:
        return LongLoraTables(args, num_slots, limits.max_lora_rank, dtype, device)

    def step(self, tables: LongLoraTables, chunks: list[ChunkView], num_tokens: int,
             device: torch.device) -> LongLoraStep:
        return LongLoraStep(tables, chunks, num_tokens, device)


def _lora_config(cfg: dict) -> dict:
    """The config without the LongLoRA options, as the LoRA reader checks it."""
    return {k: v for k, v in cfg.items() if k not in ("modules_to_save", "rope_scaling")}
