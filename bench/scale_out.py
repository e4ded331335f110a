"""Scale-out on Ray Serve: 1 vs 2 engine replicas measured, and affinity routing at scale simulated.

    .venv/bin/python -m bench.scale_out            # both parts (default model, NF4, CPU)
    .venv/bin/python -m bench.scale_out --sim-only # only the simulation (seconds)

Part 1 (measured): for 1 and 2 replicas (--replicas-list), the Ray Serve application (server/scale) on a local
Ray instance, one torch thread and one CPU per replica; --adapters LoRA adapters (PEFT-made, rank 8) uploaded
through the ingress; --concurrency closed-loop gRPC clients stream --requests requests whose adapters follow
zipf(1.1). Reports output tokens/s, p50/p99 TTFT and the replicas' adapter loads. Caveat: on a 2-core machine
the second replica competes with the first (and with the ingress and Ray itself) for the same cores, so the
gain is bounded well below 2x; the figure shows the overhead and the routing, not a cluster's scaling.

Part 2 (simulated, server/scale/affinity_sim.py): adapter loads per 100 requests under Ray's multiplexed routing
vs routing that ignores adapters, for 10..3,000 adapters on 8 replicas with 8 slots each (zipf 1.1), and for
1..16 replicas at 1,000 adapters. Writes bench/results/scale_out.json and scale_out_sim.png.

Part 3 (simulated, server/scale/prefix_sim.py): prefix-aware routing (server/scale/prefix_router.py's rule) vs
adapter affinity alone on multi-turn chats (--chat-conversations x 3 turns, 768-token system prompt per tenant,
48-token turns, 2 tenants, 4 adapters + base, 4 replicas x 2 adapter slots x --chat-kv-blocks blocks, 8 in
flight): the share of prompt tokens served from the replicas' prefix caches, adapter loads and the busiest
replica's share, over --chat-seeds seeds.

Part 4 (measured, --chats; --chats-only for it alone): the same kind of chats through the Ray Serve application,
prefix-aware routing vs adapter affinity alone (bench/scale_chats.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.stats import percentiles
from server.scale.affinity_sim import simulate
from server.scale.prefix_sim import ChatLoad, simulate_chats

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["Name three colors.", "Write a haiku about a switchboard.", "What is the capital of France?",
           "Explain LoRA in one sentence."]


def measure(replicas: int, args, model_dir: Path, adapter_dirs: list[Path]) -> dict:
    from bench.ray_app import ray_switchboard
    from tests.scale_utils import replica_stats

    with ray_switchboard(model_dir, replicas, args.slots, not args.no_quantize, adapter_dirs) as client:
        rng = np.random.default_rng(args.seed)
        p = 1.0 / np.arange(1, len(adapter_dirs) + 1) ** 1.1
        picks = rng.choice(len(adapter_dirs), size=args.requests, p=p / p.sum())

        def one(k: int) -> tuple[float, int]:
            sent, first, tokens = time.perf_counter(), None, 0
            for chunk in client.stream(PROMPTS[k % len(PROMPTS)], adapter=f"a{picks[k]}",
                                       max_new_tokens=args.max_new_tokens, ignore_eos=True):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - sent
                tokens += len(chunk.token_ids)
            return first or 0.0, tokens

        client.generate(PROMPTS[0], max_new_tokens=2)  # warm-up
        before = sum(sum(s["loads"].values()) for s in replica_stats(replicas).values())
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            done = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
        loads = sum(sum(s["loads"].values()) for s in replica_stats(replicas).values()) - before
    ttft = percentiles([t for t, _ in done])
    tokens = sum(n for _, n in done)
    return {"replicas": replicas, "requests": args.requests, "concurrency": args.concurrency,
            "output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * ttft["p50"], "ttft_p99_ms": 1000 * ttft["p99"],
            "adapter_loads": loads, "loads_per_100": 100.0 * loads / args.requests}


def simulation(args) -> dict:
    by_adapters = [[simulate(pol, a, 8, 8, args.sim_requests, seed=args.seed).loads_per_100 for a in args.sim_adapters]
                   for pol in ("random", "multiplexed")]
    by_replicas = [[simulate(pol, 1000, r, 8, args.sim_requests, seed=args.seed).loads_per_100
                    for r in args.sim_replicas] for pol in ("random", "multiplexed")]
    return {"adapters": args.sim_adapters, "replicas": args.sim_replicas, "slots": 8, "zipf": 1.1,
            "requests": args.sim_requests, "loads_per_100_vs_adapters": dict(zip(("random", "multiplexed"),
                                                                                  by_adapters, strict=True)),
            "loads_per_100_vs_replicas_1000_adapters": dict(zip(("random", "multiplexed"), by_replicas,
                                                                 strict=True))}


def chats_measured(args, report: dict) -> None:
    from bench.scale_chats import measure_chats
    from server.model.checkpoint import resolve_model_dir
    from tests.peft_adapters import AdapterSpec, make_peft_adapter

    model_dir = resolve_model_dir(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="scale-chats-adapters-"))
    adapter_dirs = [make_peft_adapter(model_dir, AdapterSpec(f"a{i}", "lora", rank=8, seed=i), tmp / f"a{i}")
                    for i in range(args.adapters)]
    report["chats_measured"] = []
    for prefix_routing in (False, True):
        r = measure_chats(prefix_routing, args, model_dir, adapter_dirs)
        report["chats_measured"].append(r)
        ttft = ", ".join(f"turn {t + 1}: {a:.0f} / {b:.0f}" for t, (a, b) in
                         enumerate(zip(r["ttft_p50_ms"], r["ttft_p99_ms"], strict=True)))
        print(f"chats on {r['replicas']} replicas, {'prefix-aware' if prefix_routing else 'affinity alone'}: "
              f"{r['tok_per_s']:.1f} output tok/s, {r['cached_share']:.0%} of prompt tokens from the cache, "
              f"TTFT p50 / p99 ms {ttft}", flush=True)


def prefix_simulation(args) -> dict:
    load = ChatLoad(conversations=args.chat_conversations)
    out: dict = {"conversations": args.chat_conversations, "turns": load.turns, "kv_blocks": args.chat_kv_blocks,
                 "seeds": args.chat_seeds}
    for pol in ("affinity", "prefix"):
        runs = [simulate_chats(pol, load, kv_blocks=args.chat_kv_blocks, seed=args.seed + s)
                for s in range(args.chat_seeds)]
        out[pol] = {"cached_share": sum(r.cached_tokens for r in runs) / sum(r.prompt_tokens for r in runs),
                    "adapter_loads": sum(r.adapter_loads for r in runs) / len(runs),
                    "max_share": max(r.max_share for r in runs)}
    return out


def plot(sim: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for pol, style in (("random", "o--"), ("multiplexed", "s-")):
        a.plot(sim["adapters"], sim["loads_per_100_vs_adapters"][pol], style, label=pol)
        b.plot(sim["replicas"], sim["loads_per_100_vs_replicas_1000_adapters"][pol], style, label=pol)
    a.set(xscale="log", xlabel="adapters (8 replicas x 8 slots)", ylabel="adapter loads / 100 requests",
          title="zipf 1.1")
    b.set(xscale="log", xlabel="replicas (1,000 adapters, 8 slots each)", ylabel="adapter loads / 100 requests")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--replicas-list", type=int, nargs="+", default=[1, 2])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--slots", type=int, default=4, help="adapters per replica (the multiplexed LRU)")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-only", action="store_true")
    p.add_argument("--sim-requests", type=int, default=50_000)
    p.add_argument("--sim-adapters", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 3000])
    p.add_argument("--sim-replicas", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--chat-conversations", type=int, default=48)
    p.add_argument("--chat-kv-blocks", type=int, default=512, help="prefix-cache blocks per simulated replica")
    p.add_argument("--chat-seeds", type=int, default=5)
    p.add_argument("--chats", action="store_true", help="part 4: chats measured on Ray, prefix routing on vs off")
    p.add_argument("--chats-only", action="store_true")
    p.add_argument("--chat-replicas", type=int, default=2)
    p.add_argument("--chat-system", type=int, default=768, help="system prompt tokens (measured chats)")
    p.add_argument("--chat-turn", type=int, default=48)
    p.add_argument("--chat-turns", type=int, default=3)
    p.add_argument("--chat-new", type=int, default=32)
    p.add_argument("--out", default="scale_out")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report: dict = {}
    if args.chats or args.chats_only:
        chats_measured(args, report)
        if args.chats_only:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.out}_chats.json").write_text(json.dumps(report, indent=1))
            print(f"wrote {RESULTS / (args.out + '_chats.json')}")
            return
    if not args.sim_only:
        from server.model.checkpoint import resolve_model_dir
        from tests.peft_adapters import AdapterSpec, make_peft_adapter

        model_dir = resolve_model_dir(args.model)
        tmp = Path(tempfile.mkdtemp(prefix="scale-out-adapters-"))
        adapter_dirs = [make_peft_adapter(model_dir, AdapterSpec(f"a{i}", "lora", rank=8, seed=i), tmp / f"a{i}")
                        for i in range(args.adapters)]
        report["measured"] = []
        for n in args.replicas_list:
            r = measure(n, args, model_dir, adapter_dirs)
            report["measured"].append(r)
            print(f"{n} replica(s): {r['tok_per_s']:.1f} output tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms / "
                  f"p99 {r['ttft_p99_ms']:.0f} ms, {r['adapter_loads']} adapter loads "
                  f"({r['loads_per_100']:.1f} / 100 requests)", flush=True)
        report["measured_note"] = ("one machine: the replicas share its cores with each other, the ingress and "
                                   "Ray, so 2 replicas cannot reach 2x")
    sim = simulation(args)
    report["simulated"] = sim
    for pol in ("random", "multiplexed"):
        row = ", ".join(f"{a}: {v:.1f}" for a, v in zip(sim["adapters"], sim["loads_per_100_vs_adapters"][pol],
                                                        strict=True))
        print(f"simulated loads / 100 requests, 8 replicas x 8 slots, {pol:11}: {row}")
    for pol in ("random", "multiplexed"):
        row = ", ".join(f"{r}: {v:.1f}" for r, v in zip(
            sim["replicas"], sim["loads_per_100_vs_replicas_1000_adapters"][pol], strict=True))
        print(f"simulated loads / 100 requests, 1,000 adapters, by replicas, {pol:11}: {row}")
    chats = report["prefix_routing_simulated"] = prefix_simulation(args)
    for pol in ("affinity", "prefix"):
        r = chats[pol]
        print(f"simulated chats ({chats['conversations']} x {chats['turns']} turns, 4 replicas), {pol:8}: "
              f"{r['cached_share']:.1%} of prompt tokens from the cache, {r['adapter_loads']:.1f} adapter loads, "
              f"busiest replica {r['max_share']:.0%} of requests")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / (args.out + '.json')} and {plot(sim, RESULTS / (args.out + '_sim.png'))}")


if __name__ == "__main__":
    main()
