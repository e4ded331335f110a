"""The training loop: PEFT adapter on transformers' model, loss on completion tokens, AdamW, eval, checkpoints.

train(cfg) = load data -> build base + PEFT adapter -> (resume) -> steps -> final eval -> save the PEFT dir.
The batch at step s is a pure function of (seed, s) and every piece of state (adapter tensors, optimizer,
RNG) is in the checkpoint, so an interrupted run resumed from a checkpoint ends where the uninterrupted
run would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from server.model.checkpoint import resolve_model_dir
from server.trainer.base import load_base, load_tokenizer
from server.trainer.checkpoint import (
    TrainState,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from server.trainer.config import TrainConfig
from server.trainer.data import Example, LoadResult, collate, encode_rows, load_jsonl
from server.trainer.evaluate import EvalResult, completion_loss, evaluate
from server.trainer.methods import by_name
from server.trainer.optim import make_optimizer, set_warmup_lr
from server.trainer.tasks import task_splits

log = logging.getLogger(__name__)
# weights land before config; adapter.safetensors: AdapterHub's name (bottleneck adapters)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter.safetensors", "adapter_config.json", "README.md")


class TrainingInterrupted(RuntimeError):
    """Raised by `stop_after` (tests stand in for a killed run with it)."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    output_dir: Path
    method: str
    steps: int
    resumed_from: int  # 0 = a fresh run
    losses: list[float]  # training loss per step run in this process
    eval: EvalResult | None
    trainable_params: int
    adapter_bytes: int
    train_seconds: float  # this process's optimisation steps (evaluation excluded)
    tokens_per_second: float
    data_errors: list[str]

    def summary_line(self) -> str:
        first = f"{self.losses[0]:.3f}" if self.losses else "-"
        last = f"{sum(self.losses[-5:]) / len(self.losses[-5:]):.3f}" if self.losses else "-"
        ev = (f" eval_loss={self.eval.loss:.3f} exact_match={self.eval.exact_match:.1%} ({self.eval.rows} rows)"
              if self.eval else "")
        resumed = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        return (f"trained {self.method}: {self.steps} steps{resumed}, loss {first} -> {last},{ev} "
                f"trainable={self.trainable_params:,} adapter={self.adapter_bytes / 1e6:.2f} MB "
                f"time={self.train_seconds:.0f}s {self.tokens_per_second:.0f} tokens/s -> {self.output_dir}")


def load_splits(cfg: TrainConfig, tokenizer) -> tuple[LoadResult, list[Example]]:
    """(train rows with their errors, held-out rows)."""
    if cfg.task is not None:
        train_rows, test_rows = task_splits(cfg.task, cfg.n_train, cfg.n_test, seed=cfg.seed)
        train = encode_rows([(f"task:{cfg.task}:train:{i}", r) for i, r in enumerate(train_rows)], tokenizer,
                            cfg.max_length)
        test = encode_rows([(f"task:{cfg.task}:test:{i}", r) for i, r in enumerate(test_rows)], tokenizer,
                           cfg.max_length)
        return train, test.examples
    train = load_jsonl(cfg.data, tokenizer, cfg.max_length)
    if cfg.eval_data is not None:
        test = load_jsonl(cfg.eval_data, tokenizer, cfg.max_length)
        return LoadResult(train.examples, train.errors + test.errors), test.examples
    rows = list(train.examples)
    random.Random(cfg.seed).shuffle(rows)
    n_test = max(1, int(len(rows) * cfg.eval_fraction)) if len(rows) > 1 else 0
    return LoadResult(rows[n_test:], train.errors), rows[:n_test]


def data_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_ids, e.completion_ids]).encode())
    return h.hexdigest()[:16]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of the batch at `step`: consecutive slices of per-epoch seeded permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return out


def build_model(cfg: TrainConfig, model_dir: Path):
    """The frozen base with the method's trainable adapter (each method builds its own: server/trainer/methods.py)."""
    method = by_name(cfg.method)
    base = load_base(model_dir, quantized=method.defaults.quantized_base, device=cfg.device)
    return method.build(cfg, base, model_dir)


def save_adapter(model, output_dir: Path) -> int:
    """Write the PEFT dir (safetensors) into output_dir, file by file via rename; returns the weights' bytes."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        weights = next(tmp / f for f in ADAPTER_FILES[:2] if (tmp / f).exists())
        for name in ADAPTER_FILES[:2]:  # a weights file of another format left by an earlier run would be read first
            if name != weights.name:
                (output_dir / name).unlink(missing_ok=True)
        for name in ADAPTER_FILES:
            if (tmp / name).exists():
                os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (output_dir / weights.name).stat().st_size


def train(cfg: TrainConfig, *, overwrite: bool = False, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a training run; `stop_after` ends early after that step as an interruption would."""
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    train_data, test = load_splits(cfg, tokenizer)
    for err in train_data.errors:
        log.warning("skipped %s", err)
    examples = train_data.examples
    fingerprint = f"{cfg.fingerprint()}-{data_digest(examples)}"
    model = build_model(cfg, model_dir)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(trainable.values())
    optimizer = make_optimizer(cfg, list(trainable.items()))
    history: list[dict] = []
    start = 0
    if overwrite:
        clear_checkpoints(cfg.output_dir)
    ckpt = latest_checkpoint(cfg.output_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, fingerprint)
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state.trainable[name])
        optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.rng)
        start, history = state.step, state.history
        log.info("resuming from %s (step %d)", ckpt, start)
    def snapshot(step: int) -> TrainState:
        return TrainState(step, fingerprint, {n: p.detach().clone() for n, p in trainable.items()},
                          optimizer.state_dict(), torch.get_rng_state(), history)

    steps, batch_size = cfg.resolved("steps"), cfg.resolved("batch_size")
    pad_id = tokenizer.pad_token_id
    losses: list[float] = []
    train_seconds, tokens = 0.0, 0
    model.train()
    bar = tqdm(total=steps, initial=start, disable=not cfg.progress, desc=cfg.method, dynamic_ncols=True)
    for step in range(start, steps):
        t0 = time.perf_counter()
        set_warmup_lr(optimizer, step, cfg.warmup_steps)
        batch = collate([examples[i] for i in batch_indices(len(examples), batch_size, step, cfg.seed)], pad_id)
        loss_sum, n_tokens = completion_loss(model, batch)
        loss = loss_sum / n_tokens
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        tokens += batch.tokens
        loss_value = float(loss.detach())
        losses.append(loss_value)
        history.append({"step": step + 1, "loss": loss_value})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / train_seconds:.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < steps and test:
            ev = evaluate(model, tokenizer, test, batch_size=cfg.eval_batch_size)
            history.append({"step": done, "eval_loss": ev.loss, "exact_match": ev.exact_match})
            bar.write(f"step {done}: eval_loss={ev.loss:.3f} exact_match={ev.exact_match:.1%}")
            model.train()  # evaluate() left it in eval mode (S2-Attn trains only in training mode)
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            save_checkpoint(cfg.output_dir, snapshot(done))
        if stop_after is not None and done >= stop_after and done < steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {done} (stop_after)")
    bar.close()
    ev = evaluate(model, tokenizer, test, batch_size=cfg.eval_batch_size) if test else None
    if ev is not None:
        history.append({"step": steps, "eval_loss": ev.loss, "exact_match": ev.exact_match})
    adapter_bytes = save_adapter(model, cfg.output_dir)
    result = TrainResult(cfg.output_dir, cfg.method, steps, start, losses, ev, sum(p.numel() for p in params),
                         adapter_bytes, train_seconds, tokens / train_seconds if train_seconds else 0.0,
                         train_data.errors)
    summary = {"config": cfg.to_json(), "fingerprint": fingerprint, "history": history,
               "summary": result.summary_line(), "trainable_params": result.trainable_params,
               "adapter_bytes": adapter_bytes, "train_seconds": train_seconds}
    (cfg.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    save_checkpoint(cfg.output_dir, snapshot(steps))
    return result
