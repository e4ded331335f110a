"""Workload generators shared by kernel tests and benchmarks (Punica / S-LoRA popularity).

One generator for tests and benchmarks alike, so what is tested is what is measured.
"""

from __future__ import annotations

import numpy as np

POPULARITY_KINDS = ("distinct", "uniform", "zipf:<s>", "identical", "skewed:<p>", "powerlaw:<alpha>")


def sample_adapter_ids(kind: str, n: int, num_adapters: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter index (0..num_adapters-1) for each of `n` requests or sequences.

    distinct:  request i uses adapter i mod num_adapters (every one different when n <= num_adapters)
    uniform:   each drawn uniformly at random
    zipf:<s>:  P(k) proportional to 1/(k+1)^s (Punica's skewed popularity; "zipf" = s 1.5)
    identical: all use adapter 0
    skewed:<p>: one adapter (0) takes a share p of the requests ("skewed" = 0.7), the rest spread uniformly
               over the long tail 1..num_adapters-1 (Punica's "skewed")
    powerlaw:<alpha>: S-LoRA's power law, P(k) proportional to (k+1)^-alpha ("powerlaw" = alpha 1)
    """
    if n < 0 or num_adapters <= 0:
        raise ValueError("n must be >= 0 and num_adapters > 0")
    name, _, arg = kind.partition(":")
    if name == "distinct":
        return np.arange(n) % num_adapters
    if name == "uniform":
        return rng.integers(0, num_adapters, size=n)
    if name == "identical":
        return np.zeros(n, dtype=np.int64)
    if name == "skewed":
        share = float(arg) if arg else 0.7
        if not 0.0 <= share <= 1.0:
            raise ValueError("skewed share must be in [0, 1]")
        if num_adapters == 1:
            return np.zeros(n, dtype=np.int64)
        tail = rng.integers(1, num_adapters, size=n)
        return np.where(rng.random(n) < share, 0, tail)
    if name in ("zipf", "powerlaw"):
        exponent = float(arg) if arg else (1.5 if name == "zipf" else 1.0)
        if exponent <= 0:
            raise ValueError(f"{name} exponent must be > 0")
        weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** exponent
        return rng.choice(num_adapters, size=n, p=weights / weights.sum())
    raise ValueError(f"unknown popularity {kind!r}; one of {', '.join(POPULARITY_KINDS)}")


def random_lora(args, rank: int, seed: int, std: float = 0.02):
    """A rank-`rank` LoRA on all seven projections of every layer of a model with `args` (server ModelArgs),
    random non-zero A and B (std `std`), in the pool's in-memory form: what the benchmarks register."""
    import torch

    from server.adapters.kinds.lora import LoraWeights
    from server.adapters.weights import AdapterWeights
    from server.model.args import PROJECTIONS

    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for layer in range(args.num_layers):
        for module in PROJECTIONS:
            n_in, n_out = args.projection_shape(module)
            a[(layer, module)] = std * torch.randn(rank, n_in, generator=g)
            b[(layer, module)] = std * torch.randn(n_out, rank, generator=g)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS)}
    return AdapterWeights(kind="LORA", config=cfg, payload=LoraWeights(rank, 2.0, a, b))
