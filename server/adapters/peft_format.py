"""Read and validate PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

The files are read here; what they mean is each kind's business (server/adapters/kinds/: lora, ia3,
virtual for prompt tuning and P-tuning, prefix, ...), chosen by `kinds.by_config` (the config's `peft_type`,
or an AdapterHub `adapter_config.json`, whose architecture sits under "config" and whose weights are
`adapter.safetensors`). Pickled weights (`adapter_model.bin`, `pytorch_adapter.bin`) are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from server.adapters import kinds
from server.adapters.kinds import AdapterFormatError, BaseModelMismatch, ReadLimits
from server.adapters.kinds.modules import WEIGHTS_FILE
from server.adapters.weights import AdapterWeights
from server.model.args import ModelArgs

CONFIG_FILE = "adapter_config.json"
ADAPTERHUB_WEIGHTS_FILE = "adapter.safetensors"  # the AdapterHub `adapters` library's safetensors name

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "AdapterFormatError", "BaseModelMismatch", "read_adapter", "read_config",
           "read_tensors"]


def _fail(msg: str) -> AdapterFormatError:
    return AdapterFormatError(msg)


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise _fail(f"{CONFIG_FILE} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or ("peft_type" not in cfg and not isinstance(cfg.get("config"), dict)):
        raise _fail(f"{CONFIG_FILE} has no peft_type (nor an AdapterHub \"config\")")
    return cfg


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.exists() and (path / ADAPTERHUB_WEIGHTS_FILE).exists():
        weights = path / ADAPTERHUB_WEIGHTS_FILE
    for pickled in ("adapter_model.bin", "pytorch_adapter.bin"):
        if (path / pickled).exists() and not weights.exists():
            raise _fail(f"pickled {pickled} weights are refused; save with safetensors")
    if not weights.is_file():
        raise _fail(f"{WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(f"{weights.name} is not a valid safetensors file: {exc}") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise _fail(f"tensor {key} has non-float dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise _fail(f"tensor {key} contains NaN or Inf values")
    return {k: t.float() for k, t in tensors.items()}


def read_adapter(path: Path, args: ModelArgs, max_lora_rank: int, max_virtual_tokens: int) -> AdapterWeights:
    """Parse and validate a PEFT directory against the loaded base; raises AdapterFormatError."""
    path = Path(path)
    cfg = read_config(path)
    tensors = read_tensors(path)
    kind = kinds.by_config(cfg)
    payload = kind.read(cfg, tensors, args, ReadLimits(max_lora_rank, max_virtual_tokens))
    return AdapterWeights(kind=kind.name, config=cfg, payload=payload, base_model=cfg.get("base_model_name_or_path"))
