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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arrivals import ARRIVAL_KINDS, LengthDist, arrival_times  # noqa: E402
from bench.stats import SLO, RequestRecord, format_summary, summarize  # noqa: E402
from bench.workloads import POPULARITY_KINDS, sample_adapter_ids  # noqa: E402


@dataclass(frozen=True, slots=True)
class Workload:
    """What to send (independent of how fast): adapters by popularity, lengths, sampling."""

    num_requests: int = 64
    adapters: tuple[str, ...] = ()  # empty = the base model
    popularity: str = "uniform"
    prompt_len: str = "fixed:32"
    output_len: str = "fixed:32"
    ignore_eos: bool = True
    temperature: float = 0.0
    token_id_range: tuple[int, int] = (1000, 20000)  # prompt token ids are drawn from [lo, hi)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        LengthDist(self.prompt_len), LengthDist(self.output_len)
        if self.adapters:
            sample_adapter_ids(self.popularity, 1, len(self.adapters), np.random.default_rng(0))
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"bad token id range {self.token_id_range}")


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    index: int
    adapter: str  # "" = base model
    token_ids: tuple[int, ...]
    max_new_tokens: int
    send_at_s: float | None = None  # open loop: offset from the start; closed loop: None


def make_plan(w: Workload, rate: float | None = None, arrival: str = "poisson") -> list[PlannedRequest]:
    """The requests of one run, deterministic in `w.seed` (the same prompts and adapters at every rate)."""
    rng = np.random.default_rng(w.seed)
    n = w.num_requests
    prompt_lens = LengthDist(w.prompt_len).sample(n, rng)
    output_lens = LengthDist(w.output_len).sample(n, rng)
    ids = sample_adapter_ids(w.popularity, n, len(w.adapters), rng) if w.adapters else np.full(n, -1)
    lo, hi = w.token_id_range
    prompts = [tuple(rng.integers(lo, hi, size=int(k)).tolist()) for k in prompt_lens]
    times = arrival_times(arrival, rate, n, np.random.default_rng([w.seed, 1])) if rate is not None else [None] * n
    return [
        PlannedRequest(i, w.adapters[a] if a >= 0 else "", prompts[i], int(output_lens[i]),
                       None if t is None else float(t))
        for i, (a, t) in enumerate(zip(ids.tolist(), times, strict=True))
    ]


def _status_name(exc: BaseException) -> str:
    """A gRPC status name for a client error (SwitchboardError.code or grpc's code()), else the class name."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            code = code()
        except TypeError:
            code = None
    return getattr(code, "name", None) or type(exc).__name__


async def send_one(client, req: PlannedRequest, w: Workload, run_tag: str, timeout_s: float) -> RequestRecord:
    """Stream one request, timing every token-carrying chunk. Never raises: failures land in the record."""
    rec = RequestRecord(adapter=req.adapter, prompt_tokens=len(req.token_ids), max_new_tokens=req.max_new_tokens)
    start = rec.send_time = time.perf_counter()
    try:
        async for chunk in client.stream(token_ids=list(req.token_ids), adapter=req.adapter,
                                         max_new_tokens=req.max_new_tokens, temperature=w.temperature,
                                         ignore_eos=w.ignore_eos, seed=w.seed + req.index,
                                         request_id=f"{run_tag}-{req.index}", timeout=timeout_s):
            now = time.perf_counter() - start
            if chunk.token_ids:
                if rec.ttft_s is None:
                    rec.ttft_s = now
                rec.token_times_s.append(now)
                rec.output_tokens += len(chunk.token_ids)
                rec.output_token_ids.extend(t for t in chunk.token_ids if t >= 0)
            counted = getattr(chunk, "completion_tokens", 0) if chunk.finished else 0
            if counted:  # the server's own count (the openai path's only exact one)
                rec.output_tokens = max(rec.output_tokens, counted)
        rec.e2e_s = time.perf_counter() - start
        if rec.output_tokens == 0:
            rec.error, rec.error_message = "NO_TOKENS", "the stream ended without a token"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 -- every failure is a counted outcome of the load test
        rec.error, rec.error_message = _status_name(exc), str(exc)[:300]
    return rec


async def run_open_loop(client, plan: list[PlannedRequest], w: Workload, timeout_s: float = 600.0,
                        progress=None) -> tuple[list[RequestRecord], float]:
    """Send each request at its planned time (not waiting for earlier ones); returns records and duration."""
    tag = f"lt{time.time_ns()}"
    start = time.perf_counter()
    tasks = []
    for req in plan:
        delay = start + (req.send_at_s or 0.0) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(send_one(client, req, w, tag, timeout_s))
        if progress is not None:
            task.add_done_callback(lambda _t: progress.update(1))
        tasks.append(task)
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - start


async def run_closed_loop(client, plan: list[PlannedRequest], w: Workload, concurrency: int,
                          timeout_s: float = 600.0, progress=None) -> tuple[list[RequestRecord], float]:
    """`concurrency` workers, each sending the next unsent request when its previous one ends."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    tag = f"lt{time.time_ns()}"
    records: list[RequestRecord | None] = [None] * len(plan)
    pending = iter(plan)

    async def worker() -> None:
        for req in pending:  # the shared iterator hands each request to exactly one worker
            records[req.index] = await send_one(client, req, w, tag, timeout_s)
            if progress is not None:
                progress.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(plan)))))
    return [r for r in records if r is not None], time.perf_counter() - start


async def run_load(client, w: Workload, *, rate: float | None = None, concurrency: int | None = None,
                   arrival: str = "poisson", slo: SLO | None = None, timeout_s: float = 600.0,
                   show_progress: bool = True) -> tuple[dict, list[RequestRecord]]:
    """One run, open loop at `rate` or closed loop at `concurrency`; returns (summary, records)."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
    plan = make_plan(w, rate, arrival)
    from tqdm import tqdm

    label = f"rate {rate}/s ({arrival})" if rate is not None else f"concurrency {concurrency}"
    with tqdm(total=len(plan), desc=label, unit="req", disable=not show_progress, leave=False) as bar:
        if rate is not None:
            records, duration = await run_open_loop(client, plan, w, timeout_s, bar)
        else:
            records, duration = await run_closed_loop(client, plan, w, concurrency, timeout_s, bar)
    summary = summarize(records, duration, slo)
    summary["mode"] = {"rate": rate, "arrival": arrival if rate is not None else None, "concurrency": concurrency}
    return summary, records


async def warm_up(client, w: Workload, n: int) -> None:
    """A few short requests (not measured) so first-step costs do not land in the figures."""
    if n <= 0:
        return
    plan = make_plan(Workload(num_requests=n, adapters=w.adapters, popularity="distinct", prompt_len="fixed:8",
                              output_len="fixed:2", seed=w.seed + 7919))
    await run_closed_loop(client, plan, w, concurrency=n)


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
