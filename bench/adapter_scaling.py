"""Adapter-count scaling: throughput and TTFT with 1, 10, 100, 1000 registered adapters, fixed device slots.

    .venv/bin/python -m bench.adapter_scaling [--counts 1,10,100,1000] [--device-slots 16] [--out bench/RESULTS.md]

One in-process server (SwitchboardServer on a loopback port, the real gRPC path); adapters are
registered straight through the registry's create() (validated, stored on disk, registered in the
pool: what an upload does, minus the bytes on the wire), N growing from point to point. At each point
--requests requests at --concurrency streams pick their adapter uniformly among the N registered, so
with N > device slots most requests find their adapter out of the device slots (and, past the host
cache, on disk). The adapters are PEFT LoRA (default rank 8 on q_proj and v_proj), cycled from 4
random sources.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.load_run import Workload, run_load, warm_up
from bench.peft_peers import make_lora_adapters
from bench.stats import format_summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.adapter_scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,10,100,1000")
    ap.add_argument("--device-slots", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", default="fixed:32")
    ap.add_argument("--output-len", default="fixed:32")
    ap.add_argument("--quantize", action="store_true", help="NF4 base (default fp32 dense)")
    ap.add_argument("--model", default=None, help="HF dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("bench/results/adapter_scaling.json"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    counts = sorted({int(c) for c in args.counts.split(",")})
    if not counts or counts[0] < 1:
        ap.error("--counts must be positive integers")

    from clients import AsyncSwitchboardClient
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig, ServerConfig
    from server.grpc_server import SwitchboardServer
    from server.model.checkpoint import resolve_model_dir

    work = Path(tempfile.mkdtemp(prefix="adapter-scaling-"))
    base_dir = resolve_model_dir(args.model)
    sources = make_lora_adapters(base_dir, work / "src", 4, rank=args.rank, seed=args.seed,
                                 targets=args.targets.split(","))
    server = SwitchboardServer.create(
        ModelConfig(path=args.model, quantize=args.quantize), EngineConfig(max_running=args.concurrency),
        AdapterPoolConfig(device_slots=args.device_slots, max_lora_rank=args.rank),
        ServerConfig(port=0, metrics_port=None, data_dir=work / "data"))
    server.start()
    rows, points = [], []
    try:
        registered = 0
        for n in counts:
            t0 = time.perf_counter()
            while registered < n:
                server.registry.create("local", f"scale-{registered:04d}", sources[registered % len(sources)])
                registered += 1
            register_s = time.perf_counter() - t0
            w = Workload(num_requests=args.requests, adapters=tuple(f"scale-{i:04d}" for i in range(n)),
                         popularity="uniform", prompt_len=args.prompt_len, output_len=args.output_len,
                         seed=args.seed + n)
            loads_before = server.engine.pool.stats()

            async def run(w=w):
                client = AsyncSwitchboardClient(server.target)
                try:
                    await warm_up(client, w, 2)
                    return await run_load(client, w, concurrency=args.concurrency,
                                          show_progress=not args.no_progress)
                finally:
                    closing = client.close()
                    if asyncio.iscoroutine(closing):
                        await closing

            summary, _ = asyncio.run(run())
            pool = server.engine.pool.stats()
            summary["adapters"] = n
            summary["register_s"] = register_s
            summary["pool"] = asdict(pool)
            summary["slot_loads"] = pool.loads - loads_before.loads
            summary["disk_loads"] = pool.disk_loads - loads_before.disk_loads
            summary["load_avg"] = os.getloadavg()[0]  # other jobs on the machine (1-minute average)
            points.append(summary)
            print(f"\n== {n} adapters (registered in {register_s:.1f} s) ==\n{format_summary(summary)}\n"
                  f"slot loads {summary['slot_loads']}, disk reads {summary['disk_loads']}", flush=True)
            rows.append(f"| {n} | {summary['completed']}/{summary['requests']} | {summary['request_throughput']:.2f} | "
                        f"{summary['output_token_throughput']:.1f} | {summary['ttft_ms']['p50']:.0f} | "
                        f"{summary['ttft_ms']['p99']:.0f} | {summary['tpot_ms']['p50']:.0f} | "
                        f"{summary['slot_loads']} | {summary['disk_loads']} | {summary['load_avg']:.1f} |")
    finally:
        server.stop(0)
    mode = "NF4" if args.quantize else "fp32 dense"
    cmd = " ".join([".venv/bin/python -m bench.adapter_scaling", *(argv if argv is not None else sys.argv[1:])])
    table = [
        f"### Adapter-count scaling, {mode} ({dt.date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU)",
        "",
        f"`{cmd}`",
        "",
        f"{args.device_slots} device slots; LoRA rank {args.rank} on {args.targets}; {args.requests} requests per "
        f"point at {args.concurrency} concurrent streams, uniform popularity, {args.prompt_len} -> {args.output_len}.",
        "",
        "| adapters | ok | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | slot loads | disk reads "
        "| load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    print("\n".join(table))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "plot": str(args.plot),
                                                           "out": str(args.out)}, "points": points}, indent=1))
    if args.plot:
        from bench.plots import plot_scaling

        plot_scaling(counts, [p["output_token_throughput"] for p in points], [p["ttft_ms"]["p99"] for p in points],
                     args.plot, f"{args.device_slots} device slots, uniform popularity")
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(table) + "\n")
    return 0 if all(not p["errors"] for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
