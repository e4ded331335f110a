"""Load test: drive a running Switchboard server over gRPC and report latency, throughput and goodput.

    python -m bench.load_test --target 127.0.0.1:50051 --rate 2 --num-requests 64 \\
        --adapters 32 --popularity zipf:1.5 --prompt-len fixed:32 --output-len fixed:32 \\
        --slo-ttft-ms 500 --slo-tpot-ms 100 --json out.json
    python -m bench.load_test --rates 1,2,4 --arrival gamma:2 --plot sweep.png ...   # open-loop sweep
    python -m bench.load_test --concurrency 1,8,32 ...                                 # closed-loop sweep

Open loop (--rate/--rates): requests are sent at the times of a Poisson or gamma(cv) process whatever
the server's state. Closed loop (--concurrency): that many clients each send their next request when
the previous one ends. Every request streams (GenerateStream, or with --protocol openai a streaming
/v1/completions through bench/openai_stream.py): TTFT is the first token-carrying chunk, inter-token
latencies the gaps between chunks. Prompts are random token ids (exact prompt lengths, no
tokenizer needed); everything random comes from --seed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from bench.arrivals import ARRIVAL_KINDS
from bench.load_run import Workload, run_load, warm_up
from bench.stats import SLO, format_summary
from bench.workloads import POPULARITY_KINDS


def parse_list(text: str, cast) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be > 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None,
                    help="HOST:PORT of the gRPC server (default 127.0.0.1:50051) or, with --protocol openai, of its "
                         "HTTP API (default 127.0.0.1:8000)")
    ap.add_argument("--protocol", choices=("grpc", "openai"), default="grpc",
                    help="grpc: Inference.GenerateStream; openai: streaming /v1/completions (token-id prompts)")
    ap.add_argument("--api-key", default=None)
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop at this many requests/s")
    load.add_argument("--rates", type=lambda s: parse_list(s, float), help="open-loop sweep, e.g. 1,2,4")
    load.add_argument("--concurrency", type=lambda s: parse_list(s, int),
                      help="closed loop at this many clients (a list sweeps); the default is 8")
    ap.add_argument("--arrival", default="poisson", help=f"open-loop process: {', '.join(ARRIVAL_KINDS)}")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=0, help="N adapter names <prefix>0..N-1 (0 = base model)")
    ap.add_argument("--adapter-prefix", default="adapter-")
    ap.add_argument("--adapter-names", default=None, help="comma-separated adapter names (instead of --adapters)")
    ap.add_argument("--popularity", default="uniform", help=f"adapter popularity: {', '.join(POPULARITY_KINDS)}")
    ap.add_argument("--prompt-len", default="fixed:32", help="fixed:N | uniform:LO-HI | normal:M,S | lognormal:M,S")
    ap.add_argument("--output-len", default="fixed:32")
    ap.add_argument("--no-ignore-eos", action="store_true", help="stop at EOS (default: always generate the length)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the run")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per-request deadline")
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--slo-e2e-ms", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of latency/throughput against the sweep")
    ap.add_argument("--save-requests", action="store_true", help="include every request's timings in the JSON")
    ap.add_argument("--no-progress", action="store_true")
    spawn = ap.add_argument_group("self-contained run (instead of --target)")
    spawn.add_argument("--spawn-server", action="store_true",
                       help="start `python -m server serve` on a free loopback port for this run (default model) "
                            "and upload --adapters freshly made random PEFT LoRA adapters to it")
    spawn.add_argument("--quantize", action="store_true", help="with --spawn-server: NF4 base (default fp32 dense)")
    spawn.add_argument("--adapter-rank", type=int, default=16, help="with --spawn-server: LoRA rank (7 projections)")
    spawn.add_argument("--device-slots", type=int, default=16, help="with --spawn-server")
    return ap


async def run_from_args(args: argparse.Namespace, client=None) -> dict:
    """Run every point of the sweep the arguments describe; returns the JSON report."""
    adapters = tuple(a for a in (args.adapter_names or "").split(",") if a) or tuple(
        f"{args.adapter_prefix}{i}" for i in range(args.adapters))
    w = Workload(num_requests=args.num_requests, adapters=adapters, popularity=args.popularity,
                 prompt_len=args.prompt_len, output_len=args.output_len, ignore_eos=not args.no_ignore_eos,
                 temperature=args.temperature, seed=args.seed)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    if args.rate is not None or args.rates:
        points = [("rate", r) for r in (args.rates or [args.rate])]
    else:
        points = [("concurrency", c) for c in (args.concurrency or [8])]
    own_client = client is None
    if args.target is None:
        args.target = "127.0.0.1:8000" if args.protocol == "openai" else "127.0.0.1:50051"
    if own_client and args.protocol == "openai":
        from bench.openai_stream import OpenAIStreamClient

        client = OpenAIStreamClient(f"http://{args.target}", api_key=args.api_key)
    elif own_client:
        from clients import AsyncSwitchboardClient

        client = AsyncSwitchboardClient(args.target, api_key=args.api_key)
    runs = []
    try:
        await warm_up(client, w, args.warmup)
        for kind, value in points:
            summary, records = await run_load(
                client, w, rate=value if kind == "rate" else None, concurrency=value if kind == "concurrency" else None,
                arrival=args.arrival, slo=slo, timeout_s=args.timeout_s, show_progress=not args.no_progress)
            print(f"\n== {kind} {value} ==\n{format_summary(summary)}", flush=True)
            if args.save_requests:
                summary["requests_detail"] = [asdict(r) for r in records]
            runs.append(summary)
    finally:
        if own_client:
            closing = client.close()
            if asyncio.iscoroutine(closing):
                await closing
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "target": args.target,
        "protocol": args.protocol,
        "workload": asdict(w) | {"adapters": len(w.adapters)},
        "sweep": points[0][0],
        "runs": runs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.plot:
        from bench.plots import plot_rate_sweep

        xlabel = "offered rate (req/s)" if points[0][0] == "rate" else "concurrent clients"
        plot_rate_sweep([v for _, v in points], runs, args.plot, xlabel=xlabel,
                        title=f"{len(adapters)} adapters ({w.popularity}), {w.prompt_len} -> {w.output_len}")
    return report


@contextmanager
def spawned_server(args: argparse.Namespace):
    """--spawn-server: a server subprocess with --adapters random LoRA adapters uploaded; sets args.target."""
    import socket
    import tempfile

    from bench.peft_peers import make_lora_adapters
    from bench.serving import server_subprocess, upload_adapters
    from server.model.checkpoint import resolve_model_dir

    concurrency = max(args.concurrency or [64])
    with socket.socket() as probe:  # a free port for the HTTP API (its banner line is not parsed here)
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    with server_subprocess(quantize=args.quantize, device_slots=args.device_slots, max_lora_rank=args.adapter_rank,
                           max_running=concurrency, extra=("--http-port", str(http_port))) as srv:
        if args.adapters:
            paths = make_lora_adapters(resolve_model_dir(None), Path(tempfile.mkdtemp(prefix="load-test-")),
                                       args.adapters, rank=args.adapter_rank, seed=args.seed)
            seconds = upload_adapters(srv.target, None, {f"{args.adapter_prefix}{i}": p for i, p in enumerate(paths)})
            print(f"uploaded {len(paths)} adapters in {seconds:.1f} s to {srv.target}", flush=True)
        args.grpc_target, args.http_target = srv.target, f"127.0.0.1:{http_port}"
        args.target = srv.target if args.protocol == "grpc" else args.http_target
        yield srv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.spawn_server:
            with spawned_server(args):
                report = asyncio.run(run_from_args(args))
        else:
            report = asyncio.run(run_from_args(args))
    except (ValueError, ImportError) as exc:
        print(f"load_test: {exc}", file=sys.stderr)
        return 2
    return 1 if any(r["errors"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
