"""Read and validate PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

PEFT 0.21 semantics, reproduced by the engine:
- LORA: y += scale * (x @ A^T) @ B^T, scale = alpha / r (alpha / sqrt(r) with use_rslora). Keys
  `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
- PROMPT_TUNING / P_TUNING: `prompt_embeddings` [n_virtual, hidden] (for P-tuning PEFT saves the prompt
  encoder's output), prepended to the input embeddings; virtual tokens take positions 0..n-1.
- PREFIX_TUNING: `prompt_embeddings` [n_virtual, layers*2*kv_heads*head_dim] viewed as
  [n, layers*2, kv_heads, head_dim]; layer l's keys are entry 2l and values 2l+1; no RoPE on them.
- IA3: `ia3_l` per module: [out, 1] scales the output, or [1, in] scales the input of the modules in
  `feedforward_modules`.
Pickled weights (`adapter_model.bin`) are never read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from server.adapters import validation
from server.adapters.weights import (
    AdapterKind,
    AdapterWeights,
    IA3Weights,
    LoraWeights,
    PrefixWeights,
    PromptWeights,
)
from server.model.args import PROJECTIONS, ModelArgs

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MODULE_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B|ia3_l)(?:\.weight)?$"
)
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# options we do not serve, with the value that means "off"
_UNSUPPORTED_LORA = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                     "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None}


class AdapterFormatError(ValueError):
    """The adapter directory is not something we can serve; the message says why."""


class BaseModelMismatch(AdapterFormatError):
    """The adapter is well formed but made for another base (hidden size, layer count, KV shape)."""


def _fail(msg: str) -> AdapterFormatError:
    return AdapterFormatError(msg)


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise _fail(f"{CONFIG_FILE} is missing")
    return validation.check_config(cfg_path.read_bytes())  # size, depth, field types before/after parsing


def read_tensors(path: Path, limits: validation.HeaderLimits | None = None) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.bin").exists() and not (path / WEIGHTS_FILE).exists():
        raise _fail("pickled adapter_model.bin weights are refused; save with safetensors")
    if not (path / WEIGHTS_FILE).is_file():
        raise _fail(f"{WEIGHTS_FILE} is missing")
    if limits is not None:  # names, dtypes, shapes, sizes against the base, before any tensor is read
        validation.check_safetensors_header(path / WEIGHTS_FILE, limits)
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    return {k: validation.check_finite(k, t, torch.float32) for k, t in tensors.items()}  # finite once converted


def read_adapter(path: Path, args: ModelArgs, max_lora_rank: int, max_virtual_tokens: int) -> AdapterWeights:
    """Parse and validate a PEFT directory against the loaded base; raises AdapterFormatError."""
    path = Path(path)
    cfg = read_config(path)
    tensors = read_tensors(path, validation.HeaderLimits(args, max_lora_rank, max_virtual_tokens))
    kind_name = cfg["peft_type"]
    try:
        kind = AdapterKind(kind_name)
    except ValueError:
        served = ", ".join(k.value for k in AdapterKind)
        raise _fail(f"peft_type {kind_name!r} is not served; served: {served}") from None
    weights = AdapterWeights(kind=kind, config=cfg, base_model=cfg.get("base_model_name_or_path"))
    if kind is AdapterKind.LORA:
        weights.lora = _read_lora(cfg, tensors, args, max_lora_rank)
    elif kind is AdapterKind.IA3:
        weights.ia3 = _read_ia3(cfg, tensors, args)
    else:
        emb = _prompt_embeddings(cfg, tensors, max_virtual_tokens)
        if kind is AdapterKind.PREFIX_TUNING:
            weights.prefix = _prefix(emb, args)
        else:
            if emb.shape[1] != args.hidden_size:
                raise BaseModelMismatch(
                    f"prompt_embeddings width {emb.shape[1]} != base hidden size {args.hidden_size}")
            weights.prompt = PromptWeights(emb)
    return weights


def _module_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, suffixes: tuple[str, ...]):
    """(layer, module, suffix) -> tensor, refusing keys that address anything else."""
    out: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        m = _MODULE_KEY.match(key)
        if m is None:
            raise _fail(f"unexpected tensor {key!r} (only the seven projections of decoder layers are served)")
        layer, parent, module, suffix = int(m[1]), m[2], m[3], m[4]
        if module not in PROJECTIONS or _PARENT[module] != parent:
            raise _fail(f"unknown target module {module!r} in {key!r}; served: {', '.join(PROJECTIONS)}")
        if suffix not in suffixes:
            raise _fail(f"unexpected tensor {key!r} for this adapter type")
        if layer >= args.num_layers:
            raise BaseModelMismatch(f"tensor {key!r} addresses layer {layer}; the base has {args.num_layers} layers")
        out[(layer, module, suffix)] = t
    if not out:
        raise _fail(f"{WEIGHTS_FILE} holds no adapter tensors")
    return out


def _check_options(cfg: dict) -> None:
    for option, off in _UNSUPPORTED_LORA.items():
        if cfg.get(option) not in (off, None) and cfg.get(option) != off:
            raise _fail(f"{option}={cfg[option]!r} is not served")
    if cfg.get("bias", "none") != "none":
        raise _fail(f"bias={cfg['bias']!r} is not served (only 'none')")


def _read_lora(cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, max_rank: int) -> LoraWeights:
    _check_options(cfg)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1:
        raise _fail(f"LoRA rank r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise _fail(f"LoRA rank {r} exceeds the server's maximum rank {max_rank}")
    alpha = validation.check_scale("lora_alpha", alpha)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    validation.check_scale("the LoRA scale lora_alpha/r", scale)
    found = _module_tensors(tensors, args, ("lora_A", "lora_B"))
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, module, suffix), t in found.items():
        n_in, n_out = args.projection_shape(module)
        want = (r, n_in) if suffix == "lora_A" else (n_out, r)
        if tuple(t.shape) != want:
            rank_ok = t.dim() == 2 and t.shape[0 if suffix == "lora_A" else 1] == r
            error = BaseModelMismatch if rank_ok else AdapterFormatError
            raise error(f"{suffix} of layer {layer} {module} has shape {tuple(t.shape)}; the base needs {want}")
        (a if suffix == "lora_A" else b)[(layer, module)] = t
    if a.keys() != b.keys():
        raise _fail("every lora_A needs its lora_B (and vice versa)")
    return LoraWeights(rank=r, scale=float(scale), a=a, b=b)


def _read_ia3(cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs) -> IA3Weights:
    _check_options(cfg)
    ff = cfg.get("feedforward_modules") or []
    ff_set = frozenset([ff] if isinstance(ff, str) else ff)
    scales: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, module, _), t in _module_tensors(tensors, args, ("ia3_l",)).items():
        n_in, n_out = args.projection_shape(module)
        is_ff = any(module == f or module.endswith(f) for f in ff_set)
        want = (1, n_in) if is_ff else (n_out, 1)
        if tuple(t.shape) != want:
            error = BaseModelMismatch if t.numel() != max(want) else AdapterFormatError
            raise error(f"ia3_l of layer {layer} {module} has shape {tuple(t.shape)}; the base needs {want}")
        scales[(layer, module)] = t.reshape(-1)
    modules = {m for _, m in scales}
    return IA3Weights(scales=scales, feedforward_modules=frozenset(m for m in modules if m in ff_set))


def _prompt_embeddings(cfg: dict, tensors: dict[str, torch.Tensor], max_virtual: int) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        extra = sorted(set(tensors) - {"prompt_embeddings"})
        raise _fail(f"expected only 'prompt_embeddings', found {extra or 'nothing'}")
    emb = tensors["prompt_embeddings"]
    n = cfg.get("num_virtual_tokens")
    if emb.dim() != 2 or emb.shape[0] != n:
        raise _fail(f"prompt_embeddings shape {tuple(emb.shape)} does not match num_virtual_tokens={n}")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise _fail("num_transformer_submodules != 1 (encoder-decoder adapters) is not served")
    if n > max_virtual:
        raise _fail(f"{n} virtual tokens exceed the server's maximum of {max_virtual}")
    return emb


def _prefix(emb: torch.Tensor, args: ModelArgs) -> PrefixWeights:
    width = args.num_layers * 2 * args.num_kv_heads * args.head_dim
    if emb.shape[1] != width:
        raise BaseModelMismatch(
            f"prefix width {emb.shape[1]} != layers*2*kv_heads*head_dim = {width} of the base "
            f"({args.num_layers}*2*{args.num_kv_heads}*{args.head_dim})"
        )
    kv = emb.view(emb.shape[0], args.num_layers * 2, args.num_kv_heads, args.head_dim)
    keys = kv[:, 0::2].permute(1, 0, 2, 3).contiguous()  # [layers, n, kv_heads, head_dim]
    values = kv[:, 1::2].permute(1, 0, 2, 3).contiguous()
    return PrefixWeights(keys=keys, values=values)
