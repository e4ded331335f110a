"""One entry point for the benchmarks: `python -m bench <suite> [--threads N] [suite flags...]`.

`python -m bench` lists the suites; `python -m bench <suite> --help` shows a suite's own flags. The runner sets the
thread count before torch is imported (torch threads and OMP_NUM_THREADS alike), prints the machine line every
figure in bench/RESULTS.md carries (CPU model, ISA flags that matter, threads, load before), runs the suite's
`main(argv)`, and prints the load after. Each suite module also runs on its own: `python -m bench.<module>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import os
import platform
import sys

# suite -> (module, what it measures). The first group backs bench/RESULTS.md's claims; the rest are tools.
SUITES: dict[str, tuple[str, str]] = {
    "step": ("bench.kernels", "decode step: base vs 32 distinct LoRAs, one call vs two (and the kernel ops)"),
    "compose": ("bench.compose", "decode step: 32 sequences composing 2 of 32 LoRAs vs 32 single LoRAs vs base"),
    "kinds": ("bench.kinds", "decode step per adapter kind vs base (LoRA, DoRA, LongLoRA, IA3, ...)"),
    "peers": ("bench.compare_peers", "our server and engine vs PEFT and transformers on the default workload"),
    "long": ("bench.long_context", "long prompts vs transformers, and short sequences beside a long one"),
    "load": ("bench.load_test", "open- or closed-loop load through the server, gRPC or OpenAI HTTP"),
    "fairness": ("bench.fairness", "FCFS vs VTC across tenants (step counts deterministic)"),
    "methods": ("bench.methods", "adapter methods vs in-context learning on the shipped tasks"),
    "structured": ("bench.structured", "decode step with JSON-constrained rows vs none; grammar compile times"),
    "parts": ("bench.step_parts", "where a decode step's time goes, part by part"),
    "soak": ("bench.soak", "long mixed run: hot swaps, cancels, deadlines, bad input; resources over time"),
    "scale": ("bench.scale_out", "Ray Serve replicas and adapter-affinity routing"),
    "prefix": ("bench.prefix_cache", "the prefix cache on multi-turn chats: TTFT per turn, cache on/off, llama.cpp"),
    "churn": ("bench.adapter_churn", "1,000 stored adapters through a few device slots"),
    "http": ("bench.http_vs_grpc", "the OpenAI HTTP API vs gRPC on the peer workload"),
    "gpu": ("bench.gpu_llama7b", "a 7B-shaped model on a GPU (see bench/gpu_check.sh)"),
}


def machine_line(threads: int | None) -> str:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{dt.datetime.now().isoformat(timespec='seconds')} | {model} | {isa or 'no AVX2'} | "
            f"{os.cpu_count()} CPUs | threads {threads or 'default'} | load {load}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.strip(), "\n\nsuites:")
        for name, (module, what) in SUITES.items():
            print(f"  {name:<9} {what}  ({module})")
        return 0
    suite, rest = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}", file=sys.stderr)
        return 2
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None)
    known, rest = common.parse_known_args(rest)
    if known.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(known.threads)
        rest = ["--threads", str(known.threads), *rest] if _takes_threads(SUITES[suite][0]) else rest
    print(f"# python -m bench {' '.join(argv)}\n# {machine_line(known.threads)}", flush=True)
    module = importlib.import_module(SUITES[suite][0])
    if known.threads is not None:
        import torch

        torch.set_num_threads(known.threads)
    status = module.main(rest)
    print(f"# load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    return int(status or 0)


def _takes_threads(module: str) -> bool:
    """Whether the suite's own parser has --threads (so the runner forwards it rather than swallowing it)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None and '"--threads"' in open(spec.origin).read()


if __name__ == "__main__":
    sys.exit(main())
