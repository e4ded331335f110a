"""Bottleneck adapters (Houlsby; Pfeiffer) as the AdapterHub `adapters` library defines and saves them.

Files (what `model.save_adapter(dir, name)` writes; safetensors only):
  adapter_config.json   {"config": {"architecture": "bottleneck", "mh_adapter": ..., "output_adapter": ...,
                         "reduction_factor": ..., "non_linearity": ..., "original_ln_before": ...,
                         "original_ln_after": ..., "residual_before_ln": ..., "scaling": ..., ...},
                         "name": ..., "model_type": "llama", "hidden_size": ..., "version": ...}
  adapter.safetensors   model.layers.<i>.attention_adapters.adapters.<name>.adapter_down.0.{weight,bias}
                        model.layers.<i>.attention_adapters.adapters.<name>.adapter_up.{weight,bias}
                        (output_adapters.* likewise, after the feed-forward)
Houlsby = "double_seq_bn" (mh_adapter and output_adapter), Pfeiffer = "seq_bn" (output_adapter only).

The library's Llama layer calls the adapter on a sub-block's output `a` with the residual `r` and no layer norm
(LlamaDecoderLayerWithAdapters), so for one placement (Adapter.pre_forward / forward / post_forward):
  x   = a + r if original_ln_before else a
  res = a if residual_before_ln else x
  out = scaling * up(act(down(x))) + res;   h = out + r if original_ln_after else out
Served through the model's block_output hook (the value added to r, i.e. h - r), batched for every bottleneck
adapter in the step: down through the LoRA shrink kernel, bias and activation on the small intermediate, up
through the expand kernel, one launch each per placement per layer; per-slot coefficients carry the flags.

Tables (per placement "attention" / "mlp", created on first use; sizes padded to max_bottleneck_size):
  down[p] [slots, layers, max_r, hidden]   down_b[p] [slots, layers, max_r]
  up[p]   [slots, layers, hidden, max_r]   up_b[p]   [slots, layers, hidden]
  scale [slots] fp32; ln_before / res_x / no_ln_after [slots + 1] coefficients (row `slots`: no adapter)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from kernels import SlotViews, build_lora_meta
from server.adapters.kinds.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    BaseModelMismatch,
    ChunkView,
    SlotTables,
    Staging,
    token_slots,
)
from server.adapters.kinds.bottleneck_format import (
    ACTIVATIONS,
    TENSOR_KEY,
    BottleneckWeights,
    parse_config,
    read_blocks,
)
from server.model.args import ModelArgs
from server.model.batch import StepAdapter

_ACT_FNS = (F.relu, F.gelu, F.silu)  # indexed by ACTIVATIONS' codes


class BottleneckTables(SlotTables):
    def __init__(self, args: ModelArgs, num_slots: int, max_size: int, dtype: torch.dtype, device: str) -> None:
        self.args, self.num_slots, self.max_size, self.dtype, self.device = args, num_slots, max_size, dtype, device
        self.down: dict[str, torch.Tensor] = {}
        self.down_b: dict[str, torch.Tensor] = {}
        self.up: dict[str, torch.Tensor] = {}
        self.up_b: dict[str, torch.Tensor] = {}
        self.scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        coef = {"dtype": dtype, "device": device}
        self.ln_before = torch.zeros(num_slots + 1, **coef)  # x = a + ln_before * r
        self.res_x = torch.zeros(num_slots + 1, **coef)  # res = a + res_x * (x - a)
        self.no_ln_after = torch.zeros(num_slots + 1, **coef)  # added = out - no_ln_after * r
        self.sizes: list[int] = [0] * num_slots
        self.activation: list[int] = [0] * num_slots
        self._views: dict[tuple[int, str], tuple[SlotViews, SlotViews]] = {}
        self.kernels = kernels.backend(device)  # the tables' device's kernels

    @property
    def none_row(self) -> int:
        return self.num_slots

    def _placement(self, block: str) -> None:
        if block in self.down:
            return
        s, n, h, r = self.num_slots, self.args.num_layers, self.args.hidden_size, self.max_size
        z = {"dtype": self.dtype, "device": self.device}
        self.up_b[block] = torch.zeros(s, n, h, **z)  # `down` last: a step that finds it finds the others
        self.up[block] = torch.zeros(s, n, h, r, **z)
        self.down_b[block] = torch.zeros(s, n, r, **z)
        self.down[block] = torch.zeros(s, n, r, h, **z)

    def views(self, layer: int, block: str) -> tuple[SlotViews, SlotViews]:
        views = self._views.get((layer, block))
        if views is None:
            views = (SlotViews(self.down[block][:, layer], 1), SlotViews(self.up[block][:, layer], 2))
            self._views[(layer, block)] = views
        return views

    def stage(self, payload: BottleneckWeights, ready: Staging) -> BottleneckWeights:
        if payload.size > self.max_size:
            raise ValueError(f"bottleneck size {payload.size} exceeds the configured maximum {self.max_size}")
        blocks = {k: tuple(ready(t) for t in ts) for k, ts in payload.blocks.items()}
        return BottleneckWeights(payload.size, payload.activation, payload.scaling, payload.original_ln_before,
                                 payload.original_ln_after, payload.residual_before_ln, blocks)

    def ensure(self, payload: BottleneckWeights) -> None:
        for block in payload.placements:
            self._placement(block)

    def fill(self, slot: int, payload: BottleneckWeights) -> None:
        if payload.size > self.max_size:
            raise ValueError(f"bottleneck size {payload.size} exceeds the configured maximum {self.max_size}")
        r = payload.size
        for (layer, block), (down, down_b, up, up_b) in payload.blocks.items():
            self._placement(block)
            self.down[block][slot, layer, :r] = down.to(self.dtype)
            self.down_b[block][slot, layer, :r] = down_b.to(self.dtype)
            self.up[block][slot, layer, :, :r] = up.to(self.dtype)
            self.up_b[block][slot, layer] = up_b.to(self.dtype)
        self.scale[slot] = payload.scaling
        self.ln_before[slot] = float(payload.original_ln_before)
        self.res_x[slot] = float(not payload.residual_before_ln)
        self.no_ln_after[slot] = float(not payload.original_ln_after)
        self.sizes[slot] = r
        self.activation[slot] = ACTIVATIONS[payload.activation]

    def clear(self, slot: int) -> None:
        for table in (*self.down.values(), *self.down_b.values(), *self.up.values(), *self.up_b.values()):
            table[slot].zero_()
        self.scale[slot] = 0.0
        for coef in (self.ln_before, self.res_x, self.no_ln_after):
            coef[slot] = 0.0
        self.sizes[slot] = 0
        self.activation[slot] = 0


class BottleneckStep(StepAdapter):
    def __init__(self, tables: BottleneckTables, meta, rows: torch.Tensor, slots: torch.Tensor,
                 act_masks: list[tuple[int, torch.Tensor]]) -> None:
        self.tables, self.meta = tables, meta
        self.rows = rows  # [T] int64 coefficient row (none_row for tokens without a bottleneck adapter)
        self.slots = slots  # [T] int64 slot, clamped to 0 for tokens without one (their rows are masked below)
        self.has = (rows != tables.none_row)[:, None]  # [T, 1] bool
        self.act_masks = act_masks  # (activation code, [T, 1] bool) for the codes present

    def block_output(self, residual: torch.Tensor, out: torch.Tensor, layer: int, block: str) -> torch.Tensor:
        t = self.tables
        if block not in t.down:
            return out
        ln_before = t.ln_before[self.rows][:, None]
        x = out + ln_before * residual
        down_v, up_v = t.views(layer, block)
        z = t.kernels.lora_shrink(x, down_v.stack, self.meta, down_v)  # [T, max_r] fp32, 0 without an adapter
        z = z + t.down_b[block][self.slots, layer].float() * self.has
        if len(self.act_masks) == 1:
            z = _ACT_FNS[self.act_masks[0][0]](z)
        else:
            z = sum(torch.where(mask, _ACT_FNS[code](z), 0.0) for code, mask in self.act_masks)
        up_b = t.up_b[block][self.slots, layer] * t.scale[self.slots][:, None].to(out.dtype) * self.has
        added = t.kernels.lora_expand(z, up_v.stack, t.scale, self.meta, up_b.to(out.dtype).clone(), up_v)
        res = out + t.res_x[self.rows][:, None] * (x - out)
        new = added + res - t.no_ln_after[self.rows][:, None] * residual
        return torch.where(self.has, new, out)


class BottleneckKind(AdapterKind):
    name = "BOTTLENECK"
    peft_types = ()  # not a PEFT type: AdapterHub's adapter_config.json

    def accepts(self, cfg: dict) -> bool:
        inner = cfg.get("config")
        return "peft_type" not in cfg and isinstance(inner, dict) and inner.get("architecture") == "bottleneck"

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs,
             limits: AdapterLimits) -> BottleneckWeights:
        inner = cfg.get("config")
        if not isinstance(inner, dict):
            raise AdapterFormatError("an AdapterHub adapter_config.json needs its architecture under \"config\"")
        hidden = cfg.get("hidden_size")
        if hidden is not None and hidden != args.hidden_size:
            raise BaseModelMismatch(f"the adapter was made for hidden size {hidden}; the base has {args.hidden_size}")
        c = parse_config(inner, args.hidden_size, limits)
        placements = {"attention"} if inner.get("mh_adapter") else set()
        if inner.get("output_adapter", True):
            placements.add("mlp")
        blocks = read_blocks(tensors, args, c["size"], placements)
        return BottleneckWeights(c["size"], c["activation"], c["scaling"], c["original_ln_before"],
                                 c["original_ln_after"], c["residual_before_ln"], blocks)

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """Bounds from the safetensors header alone (read() checks the exact size against the config)."""
        m = TENSOR_KEY.match(key)
        if m is None:
            return False
        layer, part, what = int(m[1]), m[4], m[5]
        if layer >= args.num_layers:
            raise BaseModelMismatch(f"tensor {key!r} addresses layer {layer}; the base has {args.num_layers} layers")
        h = args.hidden_size
        down = part.startswith("adapter_down")
        if what == "bias":
            ok = len(shape) == 1 and (shape[0] <= limits.max_bottleneck_size if down else shape[0] == h)
        else:
            size = shape[0] if down else shape[-1]
            ok = len(shape) == 2 and (shape[1] if down else shape[0]) == h and 1 <= size <= limits.max_bottleneck_size
        if not ok:
            raise AdapterFormatError(f"{part}.{what} of layer {layer} has shape {shape}; hidden size {h} and a "
                                     f"bottleneck of at most {limits.max_bottleneck_size} (--max-bottleneck-size) "
                                     f"are served")
        return True

    def tensors(self, payload: BottleneckWeights) -> list[torch.Tensor]:
        return [t for ts in payload.blocks.values() for t in ts]

    def describe(self, payload: BottleneckWeights) -> dict:
        return {"rank": payload.size, "target_modules": list(payload.placements), "num_virtual_tokens": 0}

    def new_tables(self, args: ModelArgs, num_slots: int, limits: AdapterLimits, dtype: torch.dtype,
                   device: str) -> BottleneckTables:
        return BottleneckTables(args, num_slots, limits.max_bottleneck_size, dtype, device)

    def step(self, tables: BottleneckTables, chunks: list[ChunkView], num_tokens: int,
             device: torch.device) -> BottleneckStep:
        slots = token_slots(chunks, num_tokens, -1, torch.int32)
        rows = torch.where(slots < 0, tables.none_row, slots).to(torch.int64)
        codes = torch.tensor([*tables.activation, -1])[rows]  # [T] activation code, -1 without an adapter
        masks = [(int(code), (codes == code)[:, None].to(device)) for code in sorted(set(codes.tolist()) - {-1})]
        meta = build_lora_meta(slots.to(device), tables.sizes)
        return BottleneckStep(tables, meta, rows.to(device), slots.clamp(min=0).to(torch.int64).to(device), masks)
