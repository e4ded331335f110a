"""LoRA merges (LoraKind.merge): several LoRA adapters of one base combined into one LoRA, written as a PEFT
directory. The request (method, weights, density, target rank, seed) is server/adapters/merge.py's MergeSpec.

Semantics follow PEFT 0.21's `LoraModel.add_weighted_adapter` (the test oracle), per target module
(a module takes part only in the sources that have it; the merged targets are the union):

- linear / ties / dare_linear / dare_ties (equal ranks r): with s_i = w_i * scale_i,
  A = merge_i(sign(s_i) * sqrt|s_i| * A_i) and B = merge_i(sqrt|s_i| * B_i), merged separately, where
  merge is a plain sum (linear); magnitude pruning to `density`, majority sign per entry (sum of the
  pruned tensors), and the mean of the agreeing weighted entries (ties); random pruning with rescale
  1/density, then a sum (dare_linear) or the ties election (dare_ties).
  Note: like PEFT, this merges A and B separately, so linear is not sum_i s_i * B_i @ A_i.
- cat: A = concat_rows(s_i * A_i), B = concat_cols(B_i); rank = sum of ranks; exact.
- svd: delta = sum_i w_i * scale_i * B_i @ A_i, truncated SVD to `target_rank` (default: the largest
  source rank): B = U_r diag(S_r), A = Vh_r.
The merged adapter has lora_alpha = r (scale 1): the weights carry every scale.
DARE's random masks are drawn from a torch.Generator seeded with `seed`, module by module in model
order (layer, then q k v o gate up down), A tensors then B tensors, source by source: the order PEFT
draws them from the global generator.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from server.adapters.errors import AdapterRejected
from server.adapters.kinds.base import AdapterFormatError
from server.adapters.kinds.lora_weights import LoraWeights
from server.adapters.kinds.peft_keys import CONFIG_FILE, WEIGHTS_FILE, adapter_key
from server.adapters.validation import check_finite
from server.model.args import PROJECTIONS

if TYPE_CHECKING:
    from server.adapters.merge import MergeSpec
    from server.adapters.weights import AdapterWeights

_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")


def merge_lora(sources: list[AdapterWeights], spec: MergeSpec) -> LoraWeights:
    """The merged LoRA (scale 1.0); sources must all be LoRA adapters of the same base."""
    spec.check(len(sources))
    loras: list[LoraWeights] = []
    for i, w in enumerate(sources):
        if not isinstance(w.payload, LoraWeights):
            raise AdapterRejected(f"source {i} is a {w.kind} adapter; only LoRA adapters can be merged")
        loras.append(w.payload)
    method = "linear" if len(loras) == 1 else spec.method  # as PEFT: one source is a linear merge
    weights = list(spec.weights or [1.0] * len(loras))
    ranks = [lo.rank for lo in loras]
    if method in _SAME_RANK and len(set(ranks)) != 1:
        raise AdapterRejected(f"method {method} needs sources of equal rank, got ranks {ranks}; use cat or svd")
    rank = {"cat": sum(ranks), "svd": spec.target_rank or max(ranks)}.get(method, ranks[0])
    if method == "svd" and rank > sum(ranks):
        raise AdapterRejected(f"target_rank {rank} exceeds the sources' combined rank {sum(ranks)}: "
                              "the merged update has no more directions than that")
    seed = spec.seed if spec.seed is not None else int(torch.randint(0, 2**62, ()))
    gen = torch.Generator().manual_seed(seed)
    modules = sorted({k for lo in loras for k in lo.a}, key=lambda k: (k[0], PROJECTIONS.index(k[1])))
    a_out: dict[tuple[int, str], torch.Tensor] = {}
    b_out: dict[tuple[int, str], torch.Tensor] = {}
    for key in modules:
        present = [(lo, w) for lo, w in zip(loras, weights, strict=True) if key in lo.a]
        if method == "cat":
            a = torch.cat([lo.a[key].float() * (w * lo.scale) for lo, w in present], dim=0)
            b = torch.cat([lo.b[key].float() for lo, _ in present], dim=1)
            a_out[key] = torch.zeros(rank, a.shape[1]).index_copy_(0, torch.arange(a.shape[0]), a)
            b_out[key] = torch.zeros(b.shape[0], rank).index_copy_(1, torch.arange(b.shape[1]), b)
        elif method == "svd":
            delta = sum(w * lo.scale * (lo.b[key].float() @ lo.a[key].float()) for lo, w in present)
            if rank > min(delta.shape):
                raise AdapterRejected(f"target_rank {rank} exceeds the size {min(delta.shape)} of layer {key[0]} "
                                      f"{key[1]}")
            try:
                u, s, vh = torch.linalg.svd(delta, full_matrices=True)
            except torch.linalg.LinAlgError as exc:
                raise AdapterRejected(f"the SVD of layer {key[0]} {key[1]} did not converge ({exc}); "
                                      "try another method or smaller weights") from None
            b_out[key] = (u[:, :rank] @ torch.diag(s[:rank])).contiguous()
            a_out[key] = vh[:rank].contiguous()
        else:
            scaled = [w * lo.scale for lo, w in present]
            wa = torch.tensor([math.copysign(math.sqrt(abs(s)), s) if s != 0 else 0.0 for s in scaled])
            wb = torch.tensor([math.sqrt(abs(s)) for s in scaled])
            a_out[key] = _combine(method, [lo.a[key].float() for lo, _ in present], wa, spec.density, gen)
            b_out[key] = _combine(method, [lo.b[key].float() for lo, _ in present], wb, spec.density, gen)
    if rank < 1 or not a_out:
        raise AdapterRejected("the merge produced no LoRA weights")
    try:  # weights within bounds can still multiply out of range: the result is checked like an upload
        for (layer, module), t in [*a_out.items(), *b_out.items()]:
            check_finite(f"merged layer {layer} {module}", t)
    except AdapterFormatError as exc:
        raise AdapterRejected(f"the merge result is out of range: {exc}") from None
    return LoraWeights(rank=rank, scale=1.0, a=a_out, b=b_out)


def _combine(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
             gen: torch.Generator) -> torch.Tensor:
    """One merged tensor from same-shaped task tensors; `weights` [n] multiply after pruning."""
    if method in ("ties", "dare_linear", "dare_ties") and density is not None and density < 1:
        if method == "ties":
            tensors = [_keep_largest(t, density) for t in tensors]
        else:
            tensors = [t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density for t in tensors]
    stacked = torch.stack(tensors)  # [n, *shape]
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("linear", "dare_linear"):
        return weighted.sum(0)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # elect the sign by total (unweighted) mass
    agree = stacked.sign() == majority
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1.0
    return t * mask.view_as(t)


def write_peft_lora(lora: LoraWeights, out_dir: Path, *, base_model: str | None = None, extra: dict | None = None
                    ) -> Path:
    """Save a LoRA (any scale) as a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    out_dir.mkdir(parents=True, exist_ok=False)
    tensors = {}
    for (layer, module), a in lora.a.items():
        tensors[adapter_key(layer, module, "lora_A")] = a.float().contiguous()
        tensors[adapter_key(layer, module, "lora_B")] = lora.b[(layer, module)].float().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.scale * lora.rank,
        "use_rslora": False, "target_modules": list(lora.target_modules), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True, **(extra or {}),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir
