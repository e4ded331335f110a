"""An adapter in one normalized, framework-free form: what the PEFT reader produces and the pool loads.

`payload` is the kind's own data (each kind's weights class, server/adapters/kinds/); everything
generic (host-memory accounting, context layout, slot tables) goes through the kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.adapters import kinds
from server.adapters.kinds.base import AdapterKind, ContextLayout


@dataclass(slots=True)
class AdapterWeights:
    kind: str  # the registered kind's name (its `name`)
    config: dict  # the adapter_config.json as read
    payload: object  # the kind's weights
    base_model: str | None = None  # base_model_name_or_path from the config
    meta: dict = field(default_factory=dict)

    @property
    def spec(self) -> AdapterKind:
        return kinds.by_name(self.kind)

    def describe(self) -> dict:
        """What is recorded with a stored version: kind, rank, target_modules, num_virtual_tokens."""
        return {"kind": self.kind, **self.spec.describe(self.payload)}

    @property
    def layout(self) -> ContextLayout:
        return self.spec.layout(self.describe()["num_virtual_tokens"])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.spec.tensors(self.payload))
