"""A transformers model with trainable pieces hooked into it: calls go straight to the base model."""

from __future__ import annotations

from torch import nn


class HookedModel(nn.Module):
    """Subclasses set `self.base` (the transformers CausalLM) and add their trainable modules and hooks."""

    base: nn.Module

    @property
    def generation_config(self):
        return self.base.generation_config

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)
