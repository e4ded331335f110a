"""gRPC vs the OpenAI HTTP API on one workload and one server, side by side: rounds of A (gRPC) then B (HTTP).

    python -m bench.http_vs_grpc [--rounds 2] [--json bench/results/http_vs_grpc.json] [load_test workload flags]

Spawns `python -m server serve` once (default model, fp32 dense unless --quantize, --adapters random LoRAs), then
runs bench.load_test's closed loop against its gRPC port and its HTTP port alternately, so both protocols see
the same server, adapters and (as far as possible) the same machine load. The default workload is the peer
comparison's: 32 distinct rank-16 LoRA adapters, 64 requests of 32 prompt -> 32 new tokens, 32 concurrent.
Prints each run and the HTTP/gRPC ratio of output tokens/s, with the load average before each run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

from bench import load_test

DEFAULT_WORKLOAD = ["--adapters", "32", "--adapter-rank", "16", "--num-requests", "64", "--prompt-len", "fixed:32",
                    "--output-len", "fixed:32", "--concurrency", "32", "--popularity", "distinct", "--warmup", "4",
                    "--no-progress"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.http_vs_grpc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    own, rest = ap.parse_known_args(argv)
    workload = DEFAULT_WORKLOAD + rest  # later flags win
    spawn_args = load_test.build_parser().parse_args([*workload, "--spawn-server"])
    runs = []
    with load_test.spawned_server(spawn_args):
        for rnd in range(own.rounds):
            for protocol in ("grpc", "openai"):
                args = load_test.build_parser().parse_args(workload)
                args.protocol = protocol
                args.target = spawn_args.grpc_target if protocol == "grpc" else spawn_args.http_target
                load = os.getloadavg()
                report = asyncio.run(load_test.run_from_args(args))
                run = report["runs"][0]
                runs.append({"round": rnd, "protocol": protocol, "loadavg_before": load,
                             "output_tokens_per_s": run["output_token_throughput"], "errors": run["errors"],
                             "ttft_ms": run["ttft_ms"], "tpot_ms": run["tpot_ms"], "duration_s": run["duration_s"]})
                print(f"round {rnd} {protocol:6s} {run['output_token_throughput']:7.2f} output tok/s "
                      f"(load average before: {load[0]:.2f})", flush=True)
    mean = {p: sum(r["output_tokens_per_s"] for r in runs if r["protocol"] == p) / own.rounds
            for p in ("grpc", "openai")}
    ratio = mean["openai"] / mean["grpc"]
    print(f"mean output tok/s: gRPC {mean['grpc']:.2f}, HTTP {mean['openai']:.2f}; HTTP/gRPC = {ratio:.3f}")
    if own.json:
        own.json.parent.mkdir(parents=True, exist_ok=True)
        own.json.write_text(json.dumps({"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                        "workload": workload, "runs": runs, "mean_output_tokens_per_s": mean,
                                        "http_over_grpc": ratio}, indent=1))
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
