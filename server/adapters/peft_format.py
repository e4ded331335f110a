"""Read and validate PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

The files are read here; what they mean is each kind's business (server/adapters/kinds/: lora, ia3,
virtual for prompt tuning and P-tuning, prefix, ...), chosen by `kinds.by_config` (the config's `peft_type`,
or an AdapterHub `adapter_config.json`, whose architecture sits under "config" and whose weights are
`adapter.safetensors`). Pickled weights (`adapter_model.bin`, `pytorch_adapter.bin`) are never read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from server.adapters import kinds, validation
from server.adapters.kinds import AdapterFormatError, AdapterLimits, BaseModelMismatch
from server.adapters.kinds.peft_keys import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.weights import AdapterWeights
from server.model.args import ModelArgs

ADAPTERHUB_WEIGHTS_FILE = "adapter.safetensors"  # the AdapterHub `adapters` library's safetensors name

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "AdapterFormatError", "BaseModelMismatch", "read_adapter", "read_config",
           "read_tensors"]


def _fail(msg: str) -> AdapterFormatError:
    return AdapterFormatError(msg)


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise _fail(f"{CONFIG_FILE} is missing")
    return validation.check_config(cfg_path.read_bytes())  # size, depth, field types before/after parsing


def weights_file(path: Path) -> Path:
    """The adapter's safetensors file: PEFT's name, else AdapterHub's; pickled weights are refused."""
    weights = path / WEIGHTS_FILE
    if not weights.exists() and (path / ADAPTERHUB_WEIGHTS_FILE).exists():
        weights = path / ADAPTERHUB_WEIGHTS_FILE
    for pickled in ("adapter_model.bin", "pytorch_adapter.bin"):
        if (path / pickled).exists() and not weights.exists():
            raise _fail(f"pickled {pickled} weights are refused; save with safetensors")
    if not weights.is_file():
        raise _fail(f"{WEIGHTS_FILE} is missing")
    return weights


def read_tensors(path: Path, args: ModelArgs, limits: AdapterLimits) -> dict[str, torch.Tensor]:
    """The adapter's tensors, finite once converted; the header is checked against the base first."""
    weights = weights_file(path)
    validation.check_safetensors_header(weights, args, limits)  # names, dtypes, shapes, sizes before any read
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(f"{weights.name} is not a valid safetensors file: {exc}") from None
    return {k: validation.check_finite(k, t, torch.float32) for k, t in tensors.items()}  # finite once converted


def read_adapter(path: Path, args: ModelArgs, limits: AdapterLimits | None = None) -> AdapterWeights:
    """Parse and validate a PEFT (or AdapterHub) directory against the loaded base within `limits` (default: the
    default pool's, AdapterLimits()); raises AdapterFormatError."""
    limits = limits or AdapterLimits()
    path = Path(path)
    cfg = read_config(path)
    kind = kinds.by_config(cfg)
    kind.check_config(cfg)  # options it cannot serve are refused before any tensor is read
    tensors = read_tensors(path, args, limits)
    payload = kind.read(cfg, tensors, args, limits)
    return AdapterWeights(kind=kind.name, config=cfg, payload=payload, base_model=cfg.get("base_model_name_or_path"))
