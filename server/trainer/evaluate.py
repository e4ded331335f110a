"""Held-out evaluation: loss on completion tokens, and exact-match of greedy completions.

Exact-match compares the greedy completion (up to EOS, first line, surrounding whitespace stripped) with
the reference completion (stripped). Greedy decoding runs prompts of equal token length together, so no
row is ever padded: each completion is the one the model gives that prompt alone. `engine_greedy` runs the
same prompts through our serving engine with the adapter registered in its pool (the parity check).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from server.trainer.data import IGNORE, Batch, Example, collate


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float  # mean cross-entropy per completion token
    exact_match: float  # fraction of rows whose greedy completion equals the reference
    rows: int
    completions: list[str]  # the greedy completions (decoded, first line, stripped)
    token_ids: list[list[int]]  # the greedy completions' tokens (ending with EOS when one was produced)


def completion_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over completion tokens, number of those tokens); logits only where needed."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=batch.keep)
    logits = out.logits[:, -batch.keep :].float()  # [B, keep, vocab]
    targets = batch.targets[:, -batch.keep :]  # [B, keep]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def eval_loss(model, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = completion_loss(model, collate(list(examples[i : i + batch_size]), pad_id))
        total += float(loss)
        count += n
    return total / max(count, 1)


def _truncate_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def greedy_completions(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, batch_size: int = 16
) -> list[list[int]]:
    """Greedy continuation of each prompt (transformers/PEFT generate), ending with EOS if one is produced."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    results: list[list[int]] = [[] for _ in prompts]
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([list(prompts[r]) for r in chunk])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
            for r, row in zip(chunk, out[:, length:].tolist(), strict=True):
                results[r] = _truncate_at_eos(row, eos_ids)
    return results


def completion_text(tokenizer, ids: Sequence[int]) -> str:
    """The decoded completion as exact-match sees it: special tokens dropped, first line, stripped."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].strip()


def eos_ids_of(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def max_new_tokens_for(examples: Sequence[Example]) -> int:
    """Room for the longest reference completion (which includes its EOS) plus two tokens."""
    return max(len(e.completion_ids) for e in examples) + 2


@torch.no_grad()
def evaluate(model, tokenizer, examples: Sequence[Example], *, prompts: Sequence[Sequence[int]] | None = None,
             with_loss: bool = True, batch_size: int = 16) -> EvalResult:
    """Loss (teacher-forced) and greedy exact-match on `examples`; `prompts` overrides the prompt ids
    (few-shot contexts) while the references stay the examples' completions."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    loss = eval_loss(model, examples, pad_id, batch_size) if with_loss else float("nan")
    prompts = prompts if prompts is not None else [e.prompt_ids for e in examples]
    ids = greedy_completions(model, prompts, max_new_tokens_for(examples), eos_ids_of(model, tokenizer), pad_id,
                             batch_size)
    texts = [completion_text(tokenizer, g) for g in ids]
    hits = sum(t == e.completion.strip() for t, e in zip(texts, examples, strict=True))
    model.train(was_training)
    return EvalResult(loss, hits / max(len(examples), 1), len(examples), texts, ids)


def engine_greedy(adapter_dir: Path | None, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  model_path: str | None, quantize: bool) -> list[list[int]]:
    """Greedy completions from our serving engine (all prompts in one batch), with the adapter registered."""
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams

    engine = Engine.create(ModelConfig(path=model_path, quantize=quantize), EngineConfig(),
                           AdapterPoolConfig(device_slots=2))
    adapter = None
    if adapter_dir is not None:
        adapter = "trained"
        engine.pool.register(adapter, Path(adapter_dir))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(f"eval-{uuid.uuid4().hex}", tuple(p), params, adapter=adapter))
                   for p in prompts]
        results = []
        for handle in handles:
            tokens: list[int] = []
            for event in handle:
                if event.error:
                    raise RuntimeError(f"engine error: {event.error}")
                tokens += event.token_ids
            results.append(tokens)
    finally:
        engine.shutdown()
    return results
