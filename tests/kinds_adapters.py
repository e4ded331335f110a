"""Oracle-side adapters for the DoRA / BitFit kinds: made by PEFT (DoRA) or written by hand in the documented
format (BitFit), with random non-zero weights, plus the independent models that compute their logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tests.peft_adapters import peft_logits


def make_dora_adapter(base_dir: Path, out: Path, *, rank: int, alpha: float, targets: list[str], seed: int,
                      rslora: bool = False) -> Path:
    """PEFT's DoRA adapter with random lora_A / lora_B and a magnitude off the base's weight norm (so the gain
    g = m / ||W + sBA|| is neither 1 nor the LoRA-only value)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=True, use_rslora=rslora,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def dora_logits(base_dir: Path, adapter_dir: Path, ids: list[int], quantize: bool = False,
                base: torch.nn.Module | None = None) -> torch.Tensor:
    """PEFT's PeftModel logits (DoRA adapters are PEFT LoRA directories)."""
    return peft_logits(base_dir, adapter_dir, ids, quantize, base=base)


def bitfit_biases(args_hidden: int, args_kv: int, intermediate: int, layers: int, targets: list[str], seed: int
                  ) -> dict[str, torch.Tensor]:
    """Random non-zero bias vectors keyed like the base model's parameters."""
    out_dim = {"q_proj": args_hidden, "k_proj": args_kv, "v_proj": args_kv, "o_proj": args_hidden,
               "gate_proj": intermediate, "up_proj": intermediate, "down_proj": args_hidden}
    parent = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in out_dim}
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.{parent[m]}.{m}.bias": 0.5 * torch.randn(out_dim[m], generator=g)
            for i in range(layers) for m in targets}


def write_bitfit_adapter(out: Path, biases: dict[str, torch.Tensor], targets: list[str],
                         base_model: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "BITFIT", "target_modules": targets, "base_model_name_or_path": base_model}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in biases.items()}, out / "adapter_model.safetensors")
    return out


def make_bitfit_adapter(base_dir: Path, out: Path, *, targets: list[str], seed: int) -> Path:
    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads) * cfg.get("head_dim", hidden // heads)
    biases = bitfit_biases(hidden, kv, cfg["intermediate_size"], cfg["num_hidden_layers"], targets, seed)
    return write_bitfit_adapter(out, biases, targets, str(base_dir))


def with_biases(base: torch.nn.Module, biases: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The oracle for a BitFit adapter: a copy of transformers' model whose projections carry the biases
    (added to an existing base bias, e.g. Qwen2's q/k/v), i.e. what `attention_bias=True, mlp_bias=True` builds."""
    model = copy.deepcopy(base)
    params = dict(model.named_modules())
    with torch.no_grad():
        for key, b in biases.items():
            linear = params[key.removesuffix(".bias")]
            if linear.bias is None:
                linear.bias = torch.nn.Parameter(b.clone().to(linear.weight.device))
            else:
                linear.bias += b.to(linear.bias)
    return model


def bitfit_logits(base: torch.nn.Module, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    from safetensors.torch import load_file

    model = with_biases(base, load_file(adapter_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


# ---- bottleneck adapters: AdapterHub's saved layout, and an independent oracle via forward hooks ----
HOULSBY = {"architecture": "bottleneck", "mh_adapter": True, "output_adapter": True, "reduction_factor": 16,
           "non_linearity": "swish", "original_ln_before": False, "original_ln_after": True,
           "residual_before_ln": True, "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False,
           "init_weights": "bert", "is_parallel": False, "scaling": 1.0, "use_gating": False, "phm_layer": False,
           "dropout": 0.0, "inv_adapter": None, "leave_out": [], "stochastic_depth": 0.0}  # DoubleSeqBnConfig
PFEIFFER = {**HOULSBY, "mh_adapter": False, "non_linearity": "relu", "original_ln_before": True}  # SeqBnConfig
LOCATIONS = {"attention": "attention_adapters", "mlp": "output_adapters"}


def write_bottleneck_adapter(base_dir: Path, out: Path, config: dict, *, seed: int, name: str = "bn") -> Path:
    """What AdapterHub's `model.save_adapter(out, name)` writes (adapter_config.json + adapter.safetensors),
    with random non-zero weights."""
    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    size = max(1, int(hidden // config["reduction_factor"]))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    blocks = (["attention"] if config.get("mh_adapter") else []) + (["mlp"] if config.get("output_adapter") else [])
    for i in range(layers):
        for block in blocks:
            p = f"model.layers.{i}.{LOCATIONS[block]}.adapters.{name}"
            tensors[f"{p}.adapter_down.0.weight"] = 0.3 * torch.randn(size, hidden, generator=g)
            tensors[f"{p}.adapter_down.0.bias"] = 0.1 * torch.randn(size, generator=g)
            tensors[f"{p}.adapter_up.weight"] = 0.3 * torch.randn(hidden, size, generator=g)
            tensors[f"{p}.adapter_up.bias"] = 0.1 * torch.randn(hidden, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    full = {"config": config, "hidden_size": hidden, "model_type": cfg.get("model_type", "llama"), "name": name,
            "model_class": "LlamaForCausalLM", "model_name": str(base_dir), "version": "adapters.1.2.0"}
    (out / "adapter_config.json").write_text(json.dumps(full))
    save_file(tensors, out / "adapter.safetensors")
    return out


def _adapterhub_block(a: torch.Tensor, r: torch.Tensor, cfg: dict, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The new hidden state after one placement, following AdapterHub's Adapter.pre_forward / forward /
    post_forward with layer_norm=None (how its Llama layer calls them)."""
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "swish": torch.nn.functional.silu,
           "silu": torch.nn.functional.silu}[cfg["non_linearity"]]
    if cfg["residual_before_ln"] is True:
        residual = a
    hidden = a + r if cfg["original_ln_before"] else a
    if not cfg["residual_before_ln"]:
        residual = hidden
    down = act(hidden @ w["adapter_down.0.weight"].T + w["adapter_down.0.bias"])
    up = (down @ w["adapter_up.weight"].T + w["adapter_up.bias"]) * cfg["scaling"]
    output = up + residual
    return output + r if cfg["original_ln_after"] else output


def bottleneck_logits(base: torch.nn.Module, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' model with the adapter applied by forward hooks on each decoder layer's self_attn / mlp."""
    from safetensors.torch import load_file

    full = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg, name = full["config"], full["name"]
    model = copy.deepcopy(base)
    dtype = next(model.parameters()).dtype  # float64 when the caller measures the fp32 oracle's own rounding
    weights = {k: v.to(dtype) for k, v in load_file(adapter_dir / "adapter.safetensors").items()}
    handles = []
    for i, layer in enumerate(model.model.layers):
        seen: dict[str, torch.Tensor] = {}

        def keep(key, seen=seen):
            def hook(module, args, kwargs):
                seen[key] = args[0] if args else kwargs["hidden_states"]
            return hook

        handles.append(layer.register_forward_pre_hook(keep("attention"), with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(keep("mlp"), with_kwargs=True))
        for block, module in (("attention", layer.self_attn), ("mlp", layer.mlp)):
            prefix = f"model.layers.{i}.{LOCATIONS[block]}.adapters.{name}."
            w = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            if not w:
                continue

            def apply(module, args, output, block=block, w=w, seen=seen):
                a = output[0] if isinstance(output, tuple) else output
                r = seen[block]
                new = _adapterhub_block(a, r, cfg, w) - r  # the layer adds r back
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(module.register_forward_hook(apply))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    for h in handles:
        h.remove()
    return logits
