"""Long contexts: our engine vs transformers batched `generate`, TTFT and decode speed per prompt length.

    .venv/bin/python -m bench.long_context [--lengths 64,512,2048,4096] [--batch 8] [--new-tokens 32]
        [--quantize] [--threads N] [--skip-mixed] [--out bench/RESULTS.md] [--plot bench/results/long_context.png]

Part 1: --batch sequences of L prompt tokens + --new-tokens new ones (greedy, EOS ignored), for each L, on
the default model (fp32 dense; --quantize: NF4 on our side only, transformers stays fp32 -- say so when
quoting). Ours: the Engine in-process, every sequence submitted at once. Transformers: one batched
`generate` of the same prompts (all of length L: no padding), with a streamer that timestamps each step.
Reported: TTFT (submit -> first token; ours: the median over sequences and the last sequence's, which is what
transformers' one batched prefill compares with), decode tokens/s (once every sequence has its first token:
the tokens after that moment / the time after it), total tokens/s (all tokens / submit -> all finished),
and ours/theirs of the total.
Part 2 (mixed batch): time per output token of 31 short sequences next to one 4096-token prompt, against a
batch of 32 short ones: one long prefill must not stall everyone else's decode.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.engine_throughput import make_prompts


@dataclass
class RunTimes:
    """Per-sequence token timestamps (seconds since submit), and submit -> every sequence finished."""

    stamps: list[list[float]] = field(default_factory=list)  # [sequence][token] arrival times
    seconds: float = 0.0

    @property
    def first(self) -> list[float]:
        return [s[0] for s in self.stamps]

    def ttft(self) -> float:
        """Median over sequences of submit -> first token."""
        return statistics.median(self.first)

    def ttft_all(self) -> float:
        """Submit -> every sequence has its first token (transformers' batched generate: its one TTFT)."""
        return max(self.first)

    def decode_tps(self) -> float:
        """Decode tokens/s once every sequence is decoding: tokens after the last first token / the time after it."""
        start = self.ttft_all()
        after = sum(1 for s in self.stamps for t in s if t > start)
        end = max(s[-1] for s in self.stamps)
        return after / max(1e-9, end - start)

    def total_tps(self) -> float:
        return sum(len(s) for s in self.stamps) / self.seconds

    def tpot(self, rows: list[int] | None = None) -> float:
        """Median over sequences of (last - first) / (tokens - 1): time per output token after the first."""
        rows = range(len(self.stamps)) if rows is None else rows
        return statistics.median((self.stamps[i][-1] - self.stamps[i][0]) / max(1, len(self.stamps[i]) - 1)
                                 for i in rows)


def ours(engine, prompts: list[list[int]], new_tokens: list[int]) -> RunTimes:
    """Submit every prompt at once; one waiting thread per request timestamps its events."""
    from server.engine.request import GenerationRequest, SamplingParams

    times = RunTimes([[] for _ in prompts])
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"lc-{start}-{i}", tuple(p),
                                               SamplingParams(max_new_tokens=n, ignore_eos=True)))
               for i, (p, n) in enumerate(zip(prompts, new_tokens, strict=True))]

    def wait(i: int) -> None:
        while True:
            event = handles[i].get(timeout=3600)
            now = time.perf_counter() - start
            if event.error:
                raise RuntimeError(f"request {i}: {event.error}")
            times.stamps[i].extend([now] * len(event.token_ids))
            if event.finished:
                return

    threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.seconds = time.perf_counter() - start
    return times


class _StepStreamer:
    """transformers streamer: put() gets the prompt first, then each step's new tokens (one per sequence)."""

    def __init__(self, start: float) -> None:
        self.start, self.calls, self.steps = start, 0, []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.steps.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def theirs(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> RunTimes:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    streamer = _StepStreamer(start)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, streamer=streamer)
    seconds = time.perf_counter() - start
    return RunTimes([list(streamer.steps) for _ in prompts], seconds)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,512,2048,4096")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quantize", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--mixed-long", type=int, default=4096)
    ap.add_argument("--mixed-short", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from server.config import EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.model.checkpoint import resolve_model_dir

    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max([*lengths, args.mixed_long if not args.skip_mixed else 0]) + args.new_tokens
    need = max(args.batch * longest, longest + 32 * (args.mixed_short + args.new_tokens))
    config = EngineConfig(kv_blocks=-(-need // 16) + 64, max_running=64)
    engine = Engine.create(ModelConfig(quantize=args.quantize), config)
    engine.start()
    tokenizer = engine.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=torch.float32).eval()
    ours(engine, make_prompts(tokenizer, 2, 16, seed=99), [2, 2])  # warm-up
    theirs(model, make_prompts(tokenizer, 2, 16, seed=99), 2, pad)
    mode = "NF4" if args.quantize else "fp32 dense"
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [f"### Long contexts ({dt.date.today()}, CPU, {torch.get_num_threads()} threads, ours {mode}, "
             f"transformers fp32; load average before: {load})", "",
             f"`python -m bench.long_context {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| prompt | ours TTFT p50 s | ours TTFT all s | theirs TTFT s | ours decode tok/s | "
             f"theirs decode tok/s | ours tok/s | theirs tok/s | ours/theirs | ({args.batch} sequences, "
             f"{args.new_tokens} new tokens each) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    curve: list[tuple[int, float, float]] = []
    for length in lengths:
        prompts = make_prompts(tokenizer, args.batch, length, seed=length)
        a = ours(engine, prompts, [args.new_tokens] * args.batch)
        b = theirs(model, prompts, args.new_tokens, pad)
        curve.append((length, a.total_tps(), b.total_tps()))
        row = (f"| {length} | {a.ttft():.2f} | {a.ttft_all():.2f} | {b.ttft():.2f} | {a.decode_tps():.1f} | "
               f"{b.decode_tps():.1f} | "
               f"{a.total_tps():.1f} | {b.total_tps():.1f} | {a.total_tps() / b.total_tps():.2f}x | |")
        lines.append(row)
        print(row, flush=True)
    if not args.skip_mixed:
        n_short = 31
        short = make_prompts(tokenizer, 32, args.mixed_short, seed=7)
        alone = ours(engine, short, [args.new_tokens] * 32)
        long_prompt = make_prompts(tokenizer, 1, args.mixed_long, seed=8)
        mixed = ours(engine, long_prompt + short[:n_short], [args.new_tokens] * (n_short + 1))
        t_alone, t_mixed = alone.tpot(), mixed.tpot(list(range(1, n_short + 1)))
        lines += ["", f"| mixed batch ({args.mixed_short}-token prompts, {args.new_tokens} new) | short sequences' "
                  "time per output token, ms |", "|---|---:|",
                  f"| 32 short | {t_alone * 1e3:.1f} |",
                  f"| 1 x {args.mixed_long}-token + 31 short | {t_mixed * 1e3:.1f} |",
                  f"| ratio | {t_mixed / t_alone:.2f}x |"]
        print("\n".join(lines[-6:]), flush=True)
    engine.shutdown()
    lines.append("")
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    if args.plot:
        plot(curve, args.plot, f"{args.batch} sequences x (L + {args.new_tokens}), {torch.get_num_threads()} threads")


def plot(curve: list[tuple[int, float, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [c[0] for c in curve]
    ax.plot(xs, [c[1] for c in curve], "o-", label="switchboard engine")
    ax.plot(xs, [c[2] for c in curve], "s--", label="transformers generate (batched)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
