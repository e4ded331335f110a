"""Our server against what users would run instead, on one multi-LoRA workload, in one process run.

    .venv/bin/python -m bench.compare_peers [--quantize] [--engine-inprocess] [--out bench/RESULTS.md]

Workload (defaults): 32 PEFT-made LoRA adapters (rank 16, all seven projections, random non-zero A and
B), 64 requests spread over them (`distinct`: request i uses adapter i mod 32), every prompt 32 tokens,
every request exactly 32 new tokens (EOS ignored), greedy, on the default model (SmolLM2-135M),
fp32 dense (`--quantize`: NF4 on both sides).

Rows: (a) our gRPC server on loopback (a subprocess, adapters uploaded through the Admin API, driven by
the async client at --concurrency streams), [--engine-inprocess: our Engine called directly, no gRPC, by a closed
loop of --concurrency caller threads like the gRPC client,
with the adapters and again with none: what the LoRA path costs us],
(b) PEFT one request at a time, (c) PEFT mixed-adapter batches, (d) merge per adapter, (e) transformers
batched generate with no adapters. (b) and (d) time a subset (--single-requests, --merge-adapters) of the
same requests: they are linear in the request count. Every peer's greedy tokens are checked against
ours (fp32: they should agree; the check shows all rows did the same work).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from bench.peft_peers import (
    BenchRequest,
    PeerResult,
    base_batched,
    load_peft_model,
    make_lora_adapters,
    merge_per_adapter,
    peft_mixed_batches,
    peft_one_at_a_time,
)
from bench.workloads import sample_adapter_ids


def make_requests(tokenizer, n: int, adapters: list[str], prompt_len: int, popularity: str,
                  seed: int) -> list[BenchRequest]:
    from bench.engine_throughput import make_prompts

    prompts = make_prompts(tokenizer, n, prompt_len, seed=seed)
    ids = sample_adapter_ids(popularity, n, len(adapters), np.random.default_rng(seed))
    return [BenchRequest(i, adapters[a], tuple(p)) for i, (a, p) in enumerate(zip(ids.tolist(), prompts, strict=True))]


@contextmanager
def ours_engine(quantize: bool, adapters: dict[str, Path], requests: list[BenchRequest], new_tokens: int,
                concurrency: int, rank: int, model: str | None = None) -> Iterator[Callable[[bool], PeerResult]]:
    """Our Engine in this process (no gRPC), warmed up; yields run(with_adapters): the requests driven as the gRPC
    row's client drives the server, a closed loop of `concurrency` callers each submitting its next request when its
    previous one ends, so that the two rows differ by the gRPC path only (with_adapters False: the same requests on
    the base, the LoRA cost)."""
    import threading

    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams
    from tests.engine_utils import collect

    engine = Engine.create(ModelConfig(path=model, quantize=quantize), EngineConfig(max_running=concurrency),
                           AdapterPoolConfig(device_slots=len(adapters), max_lora_rank=rank))
    for name, path in adapters.items():
        engine.pool.register(name, path)
    engine.start()
    runs = iter(range(1 << 30))

    def run(with_adapters: bool) -> PeerResult:
        label = (f"switchboard Engine in-process (no gRPC), {concurrency} callers" if with_adapters
                 else f"switchboard Engine in-process, {concurrency} callers, NO adapters")
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        res = PeerResult(label, len(requests), 0, 0.0)
        tag = next(runs)
        pending, lock, errors = iter(requests), threading.Lock(), []

        def caller() -> None:
            while True:
                with lock:
                    r = next(pending, None)
                if r is None:
                    return
                adapter = (r.adapter or None) if with_adapters else None
                try:
                    out = collect(engine.submit(GenerationRequest(f"run{tag}-{r.index}", r.token_ids, params,
                                                                  adapter=adapter)), timeout=3600)
                except Exception as exc:  # a submit refused or a stream that stalled: fail the run, not the thread
                    errors.append(f"request {r.index} failed: {exc!r}")
                    return
                if out.error:
                    errors.append(f"request {r.index} failed: {out.error}")
                res.outputs[r.index] = out.token_ids

        callers = [threading.Thread(target=caller, daemon=True) for _ in range(min(concurrency, len(requests)))]
        start = time.perf_counter()
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        res.seconds = time.perf_counter() - start
        if errors:
            raise RuntimeError(errors[0])
        res.tokens = sum(map(len, res.outputs.values()))
        return res

    try:
        warm = SamplingParams(max_new_tokens=1, ignore_eos=True)  # loads every adapter into its slot
        for h in [engine.submit(GenerationRequest(f"warm-{n}", (1, 2, 3, 4), warm, adapter=n)) for n in adapters]:
            collect(h)
        yield run
    finally:
        engine.shutdown()


@contextmanager
def ours_server(quantize: bool, adapters: dict[str, Path], requests: list[BenchRequest], new_tokens: int,
                concurrency: int, rank: int, model: str | None = None) -> Iterator[Callable[[], PeerResult]]:
    """Our gRPC server in a subprocess on loopback, adapters uploaded via Admin; yields run(): the requests
    driven by the async client at `concurrency` streams (each run warms every adapter first)."""
    from bench.serving import drive_requests, server_subprocess, upload_adapters

    with server_subprocess(quantize=quantize, device_slots=len(adapters), max_lora_rank=rank, model=model,
                           max_running=concurrency) as srv:
        upload_adapters(srv.target, srv.api_key, adapters)

        def run() -> PeerResult:
            res = drive_requests(srv.target, srv.api_key, requests, new_tokens, concurrency)
            res.name = f"switchboard server over gRPC, {concurrency} concurrent streams"
            return res

        yield run


def repeated(repeats: int, run: Callable[..., PeerResult], *args) -> PeerResult:
    """`run(*args)` `repeats` times: its first result with seconds = the median over every run."""
    result = run(*args)
    for _ in range(repeats - 1):
        result.repeated(run(*args))
    return result


def ours_interleaved(args, adapters: dict[str, Path], requests: list[BenchRequest]) -> list[PeerResult]:
    """Our rows, run round-robin `--repeats` times (server, engine with adapters, engine without) so that a
    drift in the machine's speed lands on every row alike; each row's figure is its median."""
    rows: list[tuple[Callable[[], PeerResult], list[PeerResult]]] = []
    with ExitStack() as stack:
        if not args.no_server:
            rows.append((stack.enter_context(ours_server(args.quantize, adapters, requests, args.new_tokens,
                                                         args.concurrency, args.rank, args.model)), []))
        if args.engine_inprocess:
            engine_run = stack.enter_context(ours_engine(args.quantize, adapters, requests, args.new_tokens,
                                                         args.concurrency, args.rank, args.model))
            rows += [(lambda: engine_run(True), []), (lambda: engine_run(False), [])]
        for _ in range(args.repeats):
            for run, results in rows:
                results.append(run())
                results[-1].load_avg = os.getloadavg()[0]
    merged = []
    for _, results in rows:
        first = results[0]
        for more in results[1:]:
            first.repeated(more)
        first.load_avg = max(r.load_avg for r in results)
        merged.append(first)
    return merged


def agreement(ours: PeerResult, peer: PeerResult) -> str:
    """How many of the peer's requests produced exactly our tokens (and the same first token)."""
    common = [i for i in peer.outputs if i in ours.outputs]
    if not common:
        return "-"
    same = sum(ours.outputs[i] == peer.outputs[i] for i in common)
    first = sum(ours.outputs[i][:1] == peer.outputs[i][:1] for i in common)
    return f"{same}/{len(common)} identical, first token {first}/{len(common)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare_peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32, help="our concurrent requests and the peers' batch size")
    ap.add_argument("--popularity", default="distinct")
    ap.add_argument("--quantize", action="store_true", help="NF4 base on both sides (default fp32 dense)")
    ap.add_argument("--model", default=None, help="an HF model dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--engine-inprocess", action="store_true",
                    help="also time our Engine directly (no gRPC), with the adapters and with none")
    ap.add_argument("--no-server", action="store_true", help="skip the gRPC server row")
    ap.add_argument("--single-requests", type=int, default=8, help="requests timed for PEFT one-at-a-time")
    ap.add_argument("--merge-adapters", type=int, default=8, help="adapters timed for merge-per-adapter")
    ap.add_argument("--skip", default="", help="comma list of peers to skip: single,mixed,merge,base")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of every row; ours round-robin; each row's figure is its median (min-max shown)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("bench/results/compare_peers.json"))
    ap.add_argument("--plot", type=Path, default=None, help="PNG bar chart of tokens/s")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if args.no_server and not args.engine_inprocess:
        ap.error("--no-server needs --engine-inprocess (otherwise nothing of ours is measured)")

    from transformers import AutoTokenizer

    from server.model.checkpoint import resolve_model_dir

    base_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tmp = Path(tempfile.mkdtemp(prefix="compare-peers-"))
    t0 = time.perf_counter()
    paths = make_lora_adapters(base_dir, tmp, args.adapters, rank=args.rank, seed=args.seed)
    adapters = {p.name: p for p in paths}
    print(f"made {len(paths)} PEFT adapters (rank {args.rank}, 7 projections) in {time.perf_counter() - t0:.1f} s")
    requests = make_requests(tokenizer, args.requests, list(adapters), args.prompt_len, args.popularity, args.seed)
    mode = "NF4" if args.quantize else "fp32 dense"

    peers: list[PeerResult] = []

    def done(result: PeerResult, into: list[PeerResult] = peers) -> None:
        result.load_avg = max(result.load_avg or 0.0, os.getloadavg()[0])
        into.append(result)
        print(f"{result.name}: {result.tokens_per_s:.1f} tok/s ({result.requests} requests)", flush=True)

    ours = ours_interleaved(args, adapters, requests)
    for result in ours:
        print(f"{result.name}: {result.tokens_per_s:.1f} tok/s ({result.requests} requests, runs {result.spread})",
              flush=True)
    gc.collect()

    if not {"single", "mixed", "merge"} <= skip:
        model = load_peft_model(base_dir, adapters, args.quantize)
        greedy_batch_warmup(model, requests, pad_id)
        if "single" not in skip:
            singles = requests[: args.single_requests]
            done(repeated(args.repeats, peft_one_at_a_time, model, singles, args.new_tokens, pad_id))
        if "mixed" not in skip:
            done(repeated(args.repeats, peft_mixed_batches, model, requests, args.new_tokens, pad_id, args.concurrency))
        if "merge" not in skip:
            keep = set(list(adapters)[: args.merge_adapters])
            subset = [r for r in requests if r.adapter in keep]
            done(repeated(args.repeats, merge_per_adapter, model, subset, args.new_tokens, pad_id))
            if args.quantize:
                peers[-1].note = "NF4: merge/unmerge requantizes the base each time"
        del model
        gc.collect()
    if "base" not in skip:
        from tests.test_model_parity import hf_model

        base = hf_model(base_dir, args.quantize)
        greedy_batch_warmup(base, requests, pad_id)
        done(repeated(args.repeats, base_batched, base, requests, args.new_tokens, pad_id, args.concurrency))
        del base
        gc.collect()

    ref = ours[0]
    rows = []
    for r in ours + peers:
        ratio = ref.tokens_per_s / r.tokens_per_s if r.tokens_per_s else float("nan")
        check = "" if r is ref else agreement(ref, r)
        if "NO adapters" in r.name:
            check = "(base model: different output expected)"
        rows.append((r, ratio, check))
    date = dt.date.today().isoformat()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, {device}"
    cmd = " ".join([".venv/bin/python -m bench.compare_peers", *(argv if argv is not None else sys.argv[1:])])
    table = [
        f"### Peer comparison, {mode} ({date}, {machine})",
        "",
        f"`{cmd}`",
        "",
        f"{args.model or 'SmolLM2-135M-Instruct'} {mode}; {args.adapters} LoRA adapters rank {args.rank} "
        "on all 7 projections; "
        f"{args.requests} requests ({args.popularity}), prompt {args.prompt_len} -> {args.new_tokens} new tokens, "
        f"greedy, EOS ignored; batch/concurrency {args.concurrency}.",
        "",
        f"| setup | requests timed | tokens/s (median) | runs min-max | {ref.name.split(',')[0]} / this "
        "| greedy tokens vs ours | load avg (max) |",
        "|---|---:|---:|---:|---:|---|---:|",
        *[f"| {r.name}{' (' + r.note + ')' if r.note else ''} | {r.requests} | {r.tokens_per_s:.1f} | {r.spread} "
          f"| {ratio:.2f}x | {check} | {r.load_avg:.1f} |" for r, ratio, check in rows],
        "",
    ]
    print("\n".join(table))
    report = {"date": date, "machine": machine, "mode": mode, "args": {k: str(v) for k, v in vars(args).items()},
              "results": [r.as_dict() | {"ours_over_this": ratio, "agreement": check} for r, ratio, check in rows]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        from bench.plots import plot_bars

        plot_bars([r.name[:60] for r, _, _ in rows], [r.tokens_per_s for r, _, _ in rows], args.plot, "tokens/s",
                  f"{args.adapters} LoRA adapters, {mode}")
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(table) + "\n")
    return 0


def greedy_batch_warmup(model, requests: list[BenchRequest], pad_id: int) -> None:
    """One tiny generate so lazy initialisation (kernels, caches) is not timed."""
    from bench.peft_peers import greedy_batch

    kw = {"adapter_names": [requests[0].adapter]} if hasattr(model, "peft_config") else {}
    greedy_batch(model, [requests[0].token_ids[:4]], 2, pad_id, **kw)


if __name__ == "__main__":
    sys.exit(main())
