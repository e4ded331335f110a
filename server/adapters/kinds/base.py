"""The adapter-kind interface: what every kind of adapter (LoRA, IA3, prompt tuning, ...) tells the server.

A kind is data plus a small dispatch (no class tower: one base class with defaults). The server's
generic parts use it at five moments of an adapter's life:

  read      peft_format.read_adapter -> kind.read(cfg, tensors, args, limits)   validate, normalize
            (limits: server.config.AdapterLimits, the one object built from the pool config)
            (before that, kind.check_tensor_header bounds its tensors from the safetensors header alone)
  describe  the registry records kind.describe(payload) with each stored version
  slots     the pool: kind.new_tables(...) once per family; per load tables.stage / ensure / fill / clear
  admit     the engine: kind.layout(n) at submit (context entries it adds), kind.cached_prefix at admission
  step      the runner: kind.step(tables, chunks, T, device) -> a StepAdapter the model calls, once per family
  merge     the admin merge (server/adapters/merge.py): kind.merge(sources, spec, dir) writes the merged adapter

A family is kinds that share one slot table set and one StepAdapter per step (LoRA, DoRA and LongLoRA: one
LoRA table set with per-slot extras): the pool creates the tables with the family's first registered kind and
every member fills them; the runner asks that first kind for one step over the chunks of every member.

Engine, runner, pool and model iterate over the registered kinds (server/adapters/kinds/__init__.py)
and name none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from server.adapters.errors import AdapterRejected
from server.config import AdapterLimits
from server.model.args import ModelArgs
from server.model.batch import StepAdapter

if TYPE_CHECKING:
    from server.adapters.merge import MergeSpec
    from server.adapters.weights import AdapterWeights


class Staging(Protocol):
    def __call__(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """host tensor -> `dtype` (default: the tables' dtype), contiguous, pinned on CUDA."""
        ...


# (layer, module) -> the base projection's dense weight [out, in] fp32 (dequantized on an NF4 model) and its
# bias [out] fp32 or None: what kinds whose slot tables derive from the base (e.g. a weight norm) read at fill
BaseWeights = Callable[[int, str], tuple[torch.Tensor, torch.Tensor | None]]


class AdapterFormatError(ValueError):
    """The adapter directory is not something we can serve; the message says why."""


class BaseModelMismatch(AdapterFormatError):
    """The adapter is well formed but made for another base (hidden size, layer count, KV shape)."""


@dataclass(frozen=True, slots=True)
class ContextLayout:
    """Context entries an adapter puts before a sequence's prompt: [prefix K/V][virtual tokens][prompt]."""

    n_prefix: int = 0  # entries whose K/V the adapter supplies (written at admission, never computed)
    n_virtual: int = 0  # entries computed from adapter embeddings instead of token ids


@dataclass(frozen=True, slots=True)
class ChunkView:
    """One scheduled sequence's tokens in this step, as a kind sees them."""

    slot: int  # the adapter's device slot
    payload: object  # the kind's weights (host copy)
    start: int  # first context index computed this step
    count: int  # tokens computed this step
    offset: int  # flat index of its first token among the step's T tokens
    layout: ContextLayout
    # a composition (LoRA family only): every part's (slot, weight); `slot` is then -1 and `payload` None
    parts: tuple[tuple[int, float], ...] = ()


def token_slots(chunks: list[ChunkView], num_tokens: int, fill: int, dtype: torch.dtype = torch.int64
                ) -> torch.Tensor:
    """[num_tokens] (host) the adapter slot of each token of the chunks' sequences, `fill` for every other token
    (-1, or a table's all-neutral row)."""
    rows = torch.full((num_tokens,), fill, dtype=dtype)
    for c in chunks:
        rows[c.offset : c.offset + c.count] = c.slot
    return rows


class SlotTables:
    """A kind's preallocated device tables, indexed by adapter slot. Filling a slot is a copy, never a realloc."""

    def stage(self, payload: object, ready: Staging) -> object:
        """A host copy ready for a cheap fill (`ready` converts one tensor); raises ValueError if it cannot fit."""
        return payload

    def ensure(self, payload: object) -> None:
        """Create the tables `payload` needs, so that fill() adds none (called under the pool's lock)."""

    def fill(self, slot: int, payload: object) -> None:
        """Copy `payload` into `slot` (the slot is clear and no running sequence reads it)."""

    def clear(self, slot: int) -> None:
        """Reset `slot` to "no adapter"."""

    base: BaseWeights | None = None  # the served model's base weights, once bound

    def bind_base(self, base: BaseWeights) -> None:
        """Called once, before any fill, with the served model's base weights (tables that need none ignore them)."""
        self.base = base

    def bound_base(self, needs: str) -> BaseWeights:
        """The bound base weights; ValueError naming what `needs` them when the tables were never bound."""
        if self.base is None:
            raise ValueError(f"{needs} needs the base model's weights; these slot tables were never bound to a model")
        return self.base


class AdapterKind:
    name: str = ""  # stored with each version and shown to users, e.g. "LORA"
    peft_types: tuple[str, ...] = ()  # adapter_config.json peft_type values this kind reads
    family: str = ""  # kinds of one family share slot tables and a StepAdapter; "" = a family of its own
    # its delta may be weighted and summed with other adapters' in one request (server/engine/composition.py)
    composable: bool = False

    @property
    def family_name(self) -> str:
        return self.family or self.name

    def accepts(self, cfg: dict) -> bool:
        """Whether this kind reads an adapter_config.json (by default: its peft_type is one of ours)."""
        return cfg.get("peft_type") in self.peft_types

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits) -> object:
        """The normalized payload; raises AdapterFormatError / BaseModelMismatch with a reason."""
        raise NotImplementedError

    def check_config(self, cfg: dict) -> None:
        """Refuse a config this kind cannot serve (AdapterFormatError naming the option), before any tensor is read."""

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """Before any tensor is read (server/adapters/validation.py): True when `key` is one of this kind's own
        tensors and `shape` fits the base; raise AdapterFormatError / BaseModelMismatch when it is its key with
        a bad shape; False when it is not its key (keys parsed by server/adapters/kinds/peft_keys.py). A key no
        registered kind claims is refused."""
        return False

    def tensors(self, payload: object) -> list[torch.Tensor]:
        """Every tensor the payload holds (host-memory accounting)."""
        raise NotImplementedError

    def describe(self, payload: object) -> dict:
        """Recorded with a stored version: rank, target_modules, num_virtual_tokens."""
        return {"rank": 0, "target_modules": [], "num_virtual_tokens": 0}

    def layout(self, num_virtual_tokens: int) -> ContextLayout:
        """The context entries a sequence using this adapter starts with."""
        return ContextLayout()

    def new_tables(self, args: ModelArgs, num_slots: int, limits: AdapterLimits, dtype: torch.dtype,
                   device: str) -> SlotTables | None:
        """Device tables for all slots; None when the kind keeps nothing on the device."""
        return None

    def cached_prefix(self, payload: object) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V [layers, n_prefix, kv_heads, head_dim] to write at context 0..n_prefix-1 at admission."""
        return None

    def merge(self, sources: list[AdapterWeights], spec: MergeSpec, out_dir: Path) -> None:
        """Write the merge of `sources` (stored adapters, the first of this kind) to the new directory `out_dir`
        as an adapter this kind reads; AdapterRejected when the kind, a source or the spec cannot be merged."""
        raise AdapterRejected(f"source 0 is a {self.name} adapter; adapters of that kind cannot be merged")

    def step(self, tables: SlotTables | None, chunks: list[ChunkView], num_tokens: int,
             device: torch.device) -> StepAdapter | None:
        """This step's contribution for the sequences in `chunks`; None = nothing to apply."""
        return None
