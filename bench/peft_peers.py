"""What users run instead of us: HF transformers + PEFT, four ways, on the same requests.

  peft_one_at_a_time  set_adapter + generate, one request at a time
  peft_mixed_batches  generate(adapter_names=[...]) over batches of mixed adapters
  merge_per_adapter   merge the adapter into the base, generate its requests as one batch, unmerge
  base_batched        transformers' batched generate with no adapters at all (the ceiling)

Every request generates exactly `new_tokens` tokens (EOS suppressed with min_new_tokens), greedy.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    adapter: str  # "" = base model
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class PeerResult:
    name: str
    requests: int
    tokens: int
    seconds: float
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> generated ids
    note: str = ""
    load_avg: float | None = None  # the machine's 1-minute load average when the row finished (contention)
    runs_s: list[float] = field(default_factory=list)  # every repeat's seconds when the row was repeated

    def repeated(self, more: PeerResult) -> PeerResult:
        """This row with one more repeat of the same work: `seconds` becomes the median over the repeats."""
        if more.tokens != self.tokens:
            raise RuntimeError(f"{self.name}: a repeat generated {more.tokens} tokens, the first {self.tokens}")
        if more.outputs != self.outputs and "repeats differ" not in self.note:
            self.note = "; ".join(filter(None, [self.note, "repeats differ in greedy tokens"]))
        self.runs_s = (self.runs_s or [self.seconds]) + [more.seconds]
        self.seconds = statistics.median(self.runs_s)
        return self

    @property
    def spread(self) -> str:
        """tokens/s of the slowest and the fastest repeat, or "" for a single run."""
        if len(self.runs_s) < 2:
            return ""
        return f"{self.tokens / max(self.runs_s):.1f}-{self.tokens / min(self.runs_s):.1f}"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "requests": self.requests, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "note": self.note, "load_avg": self.load_avg,
                "runs_s": self.runs_s}


def make_lora_adapters(base_dir: Path, out_dir: Path, n: int, rank: int = 16, alpha: float = 32.0,
                       scale: float = 0.02, seed: int = 0, targets: list[str] | None = None) -> list[Path]:
    """`n` PEFT LoRA adapters (default: all seven projections), random non-zero A and B (std `scale`)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.peft_adapters import ALL_PROJ, AdapterSpec, peft_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           peft_config(AdapterSpec("a", "lora", rank=rank, alpha=alpha, targets=targets or ALL_PROJ)))
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(scale * torch.randn(p.shape, generator=g))
        paths.append(out_dir / f"lora-{i:03d}")
        model.save_pretrained(paths[-1])
    return paths


def load_peft_model(base_dir: Path, adapters: dict[str, Path], quantize: bool):
    """A PeftModel holding every adapter (fp32 dense or NF4 base, as our server loads it)."""
    from peft import PeftModel

    from tests.test_model_parity import hf_model

    names = list(adapters)
    model = PeftModel.from_pretrained(hf_model(base_dir, quantize), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def greedy_batch(model, prompts: list[tuple[int, ...]], new_tokens: int, pad_id: int, **kw) -> list[list[int]]:
    """transformers' generate on a left-padded batch; exactly `new_tokens` new ids per prompt."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, **kw)
    return out[:, width:].tolist()


def _run(name: str, batches, model, new_tokens: int, pad_id: int, note: str = "") -> PeerResult:
    """Generate each (requests, prepare, generate kwargs, cleanup) batch in turn, timing all of it."""
    res = PeerResult(name, 0, 0, 0.0, note=note)
    start = time.perf_counter()
    for reqs, prepare, kw, cleanup in batches:
        prepare()
        outs = greedy_batch(model, [r.token_ids for r in reqs], new_tokens, pad_id, **kw)
        cleanup()
        for r, o in zip(reqs, outs, strict=True):
            res.outputs[r.index] = o
        res.requests += len(reqs)
        res.tokens += sum(map(len, outs))
    res.seconds = time.perf_counter() - start
    return res


def _noop() -> None:
    pass


def peft_one_at_a_time(model, requests: list[BenchRequest], new_tokens: int, pad_id: int) -> PeerResult:
    batches = [([r], lambda r=r: model.set_adapter(r.adapter), {}, _noop) for r in requests]
    return _run("PEFT, one request at a time (set_adapter + generate)", batches, model, new_tokens, pad_id)


def peft_mixed_batches(model, requests: list[BenchRequest], new_tokens: int, pad_id: int,
                       batch: int) -> PeerResult:
    chunks = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    batches = [(c, _noop, {"adapter_names": [r.adapter or "__base__" for r in c]}, _noop) for c in chunks]
    return _run(f"PEFT mixed-adapter batches of {batch} (adapter_names=)", batches, model, new_tokens, pad_id)


def merge_per_adapter(model, requests: list[BenchRequest], new_tokens: int, pad_id: int) -> PeerResult:
    """For each adapter: merge it into the base weights, generate its requests as one batch, unmerge."""
    by_adapter: dict[str, list[BenchRequest]] = defaultdict(list)
    for r in requests:
        by_adapter[r.adapter].append(r)

    def prepare(name: str) -> None:
        model.set_adapter(name)
        model.base_model.merge_adapter([name])

    batches = [(reqs, lambda n=name: prepare(n), {}, model.base_model.unmerge_adapter)
               for name, reqs in by_adapter.items()]
    return _run("merge per adapter (merge, batch its requests, unmerge)", batches, model, new_tokens, pad_id)


def base_batched(base_model, requests: list[BenchRequest], new_tokens: int, pad_id: int, batch: int) -> PeerResult:
    chunks = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    batches = [(c, _noop, {}, _noop) for c in chunks]
    return _run(f"transformers generate, batch {batch}, NO adapters (ceiling)", batches, base_model, new_tokens,
                pad_id)

