"""LongLoRA training: S2-Attn vs full attention at the same extended length (memory, time per step, held-out loss).

    .venv/bin/python -m bench.longlora [--model DIR] [--length 2048] [--rope-factor 2] [--steps 20] [--modes s2 full]
                                       [--lr 1e-3] [--embed-norm-lr X] [--threads N] [--device cpu|cuda] [--out FILE]

Each attention mode trains in its own process (so its peak memory is its own) the same LongLoRA adapter
(server/trainer/longlora.py: LoRA rank 8 on q/k/v/o + embeddings and norms, RoPE linear factor `--rope-factor`)
from the same seed on the same batches: sequences of `--length` tokens made by concatenating rows of the shipped
topic task (prompt + completion), next-token loss on every token. Reported per mode: median wall and CPU seconds
per optimisation step, peak memory (CUDA: max allocated; CPU: the process's peak RSS), first / last training
loss, and the held-out loss after the same steps, measured with full attention (as the adapter is served).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from server.model.checkpoint import resolve_model_dir
from server.trainer.base import load_base, load_tokenizer
from server.trainer.longlora import attach_longlora
from server.trainer.methods import method_defaults
from server.trainer.optim import SAVED_MODULE_MARK
from server.trainer.tasks import task_splits


def streams(tokenizer, length: int, n_train: int, n_test: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(train, held-out) sequences [length] of concatenated topic rows (disjoint rows)."""
    train_rows, test_rows = task_splits("topic", 200, 40, seed=0)

    def pack(rows: list[dict], count: int) -> list[torch.Tensor]:
        ids: list[int] = []
        i = 0
        while len(ids) < length * count:
            r = rows[i % len(rows)]
            ids += tokenizer(r["prompt"] + r["completion"] + "\n")["input_ids"]
            i += 1
        return [torch.tensor(ids[k * length : (k + 1) * length]) for k in range(count)]

    return pack(train_rows, n_train), pack(test_rows, n_test)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_mode(args) -> dict:
    """One attention mode, in this process."""
    torch.manual_seed(0)
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    train, test = streams(tokenizer, args.length, args.steps, args.eval_sequences)
    base = load_base(model_dir, quantized=False, device=args.device)
    model = attach_longlora(base, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                            factor=args.rope_factor, context=args.length, s2_attn=args.mode == "s2")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if SAVED_MODULE_MARK not in n], "lr": args.lr},
                             {"params": [p for n, p in named if SAVED_MODULE_MARK in n], "lr": args.embed_norm_lr}])
    model.train()
    walls, cpus, losses = [], [], []
    for seq in train:
        ids = seq[None].to(args.device)
        w0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        held = [float(model(input_ids=s[None].to(args.device), labels=s[None].to(args.device)).loss) for s in test]
    return {"mode": args.mode, "step_wall_s": statistics.median(walls[1:] or walls),
            "step_cpu_s": statistics.median(cpus[1:] or cpus), "peak_mib": peak_bytes(args.device) / 2**20,
            "first_loss": losses[0], "last_loss": statistics.mean(losses[-3:]),
            "held_out_loss": statistics.mean(held), "load_1min": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--length", type=int, default=2048, help="training sequence length (tokens)")
    ap.add_argument("--rope-factor", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=20, help="optimisation steps (one sequence each)")
    defaults = method_defaults("longlora")
    ap.add_argument("--lr", type=float, default=defaults.lr, help="LoRA learning rate (the trainer's default)")
    ap.add_argument("--embed-norm-lr", type=float, default=defaults.embed_norm_lr or defaults.lr,
                    help="embeddings and norms (the trainer's default)")
    ap.add_argument("--eval-sequences", type=int, default=4, help="held-out sequences of --length tokens")
    ap.add_argument("--modes", nargs="+", choices=["s2", "full"], default=["s2", "full"],
                    help="attention modes to run, one process each, in this order")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", choices=["s2", "full"], help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run_mode(args)), flush=True)
        return
    child = [a for a in (sys.argv[1:] if argv is None else argv) if a]
    results = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, "-m", "bench.longlora", *child, "--mode", mode], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {mode}: {results[-1]}", flush=True)
    lines = [f"### LongLoRA training, S2-Attn vs full attention ({dt.date.today()})", "",
             f"`python -m bench.longlora {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"| {args.length} tokens, RoPE x{args.rope_factor:g}, {args.steps} steps, {args.device}, "
             f"{torch.get_num_threads()} threads | step wall s | step CPU s | peak MiB | loss first -> last "
             f"| held-out loss (full attention) | load (1 min) at end |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in results:
        name = "S2-Attn (4 groups, half the heads offset by half a group)" if r["mode"] == "s2" else "full attention"
        lines.append(f"| {name} | {r['step_wall_s']:.2f} | {r['step_cpu_s']:.2f} | {r['peak_mib']:.0f} "
                     f"| {r['first_loss']:.3f} -> {r['last_loss']:.3f} | {r['held_out_loss']:.3f} "
                     f"| {r['load_1min']:.1f} |")
    print("\n".join(lines), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
