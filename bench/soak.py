"""Soak test: a server under mixed hostile and friendly traffic for a long time; resources must stay flat.

    python -m bench.soak --duration-s 1800 --plot soak.png --json soak.json     # the 30-minute run
    python -m bench.soak --duration-s 150 --model tests-tiny ...                # a short run

An in-process server (the one `python -m server serve` builds, gRPC and the OpenAI HTTP port) with several
tenants, each with its own LoRA adapters and one shared; gRPC client threads generate (streams, unary, adapters
and base), cancel streams after their first chunk, send 1 ms deadlines; HTTP client threads (the openai client,
bench/soak_http.py) do the same over HTTP, cancels mid-stream included; every `--swap-every-s` each adapter gets
a new version uploaded (hot swap) and a scratch adapter is deleted and re-made; every `--bad-every-s` a bad
request or upload from a fixed table is sent (bench/soak_bad.py). Every call's status must be one its action
allows (`unexpected` counts the others). Sampled every `--sample-s`: RSS, open file descriptors, threads,
staging bytes, KV blocks in use, running/waiting sequences (the adapter host cache is capped at
`--host-cache-mb`, so it fills during warm-up). "Flat": the last quarter's mean minus the first quarter's (after
warm-up) within `--rss-slack-mb` / 8 fds / 8 threads, and at the end (traffic stopped, drained) no KV block
held, no staging file left. Usage (bench/soak_ledger.py): at the end each tenant's stored prompt / completion
tokens and requests lie within what its clients received: exactly a finished call's usage, and for a cancelled
stream its prompt plus between the tokens received and max_tokens (what the engine computed before the abort
landed is not visible to the client); refused calls bill nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK, CANCELLED, DEADLINE = "OK", "CANCELLED", "DEADLINE_EXCEEDED"
@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    threads: int
    staging_bytes: int
    kv_blocks_used: int
    running: int
    waiting: int
    calls: int


@dataclass
class Report:
    duration_s: float
    calls: dict[str, int] = field(default_factory=dict)  # "action status" -> count
    unexpected: list[str] = field(default_factory=list)  # the first few, with their messages
    unexpected_count: int = 0
    samples: list[Sample] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    flat: bool = False
    load: str = ""
    usage: dict = field(default_factory=dict)  # bench.soak_ledger.UsageCheck as a dict


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.report: Report | None = None
        self.total = 0

    def record(self, action: str, status: str, allowed: set[str], message: str = "") -> None:
        with self.lock:
            key = f"{action} {status}"
            self.report.calls[key] = self.report.calls.get(key, 0) + 1
            self.total += 1
            if status not in allowed:
                self.report.unexpected_count += 1
                if len(self.report.unexpected) < 20:
                    self.report.unexpected.append(f"{key}: {message[:200]}")


def call_status(call) -> tuple[str, str]:
    try:
        call()
        return OK, ""
    except Exception as exc:  # SwitchboardError (clients) or grpc.RpcError (raw stubs)
        code = getattr(exc, "code", None)
        code = code() if callable(code) else code
        return (code.name if code is not None else type(exc).__name__), str(exc)


def _stream_then_cancel(client, entry, **kw) -> None:
    stream = client.stream(**kw)
    first = next(stream)
    stream.close()
    if first.finished:
        entry.exact(first.prompt_tokens, first.completion_tokens)
    else:
        entry.cut(len(kw["token_ids"]), len(first.token_ids))


def _generate(c, entry, **kw) -> None:
    r = c.generate(**kw)
    entry.exact(r.prompt_tokens, r.completion_tokens)


def _stream_all(c, entry, **kw) -> None:
    last = list(c.stream(**kw))[-1]
    entry.exact(last.prompt_tokens, last.completion_tokens)


def worker(srv, tenant: str, adapters: list[str], tally: Tally, ledger, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with srv.client(tenant, timeout=60) as c:
        while not stop.is_set():
            kw = {"token_ids": [rng.randrange(5, 1000) for _ in range(rng.randint(2, 24))],
                  "adapter": rng.choice(["", *adapters])}
            roll = rng.random()
            if roll < 0.45:
                action, allowed, fn, kw["max_new_tokens"] = "generate", {OK}, _generate, rng.randint(1, 12)
            elif roll < 0.7:
                action, allowed, fn = "stream", {OK}, _stream_all
                kw.update(max_new_tokens=8, temperature=0.8, seed=rng.randrange(1 << 30))
            elif roll < 0.85:
                action, allowed, fn = "cancel", {OK}, _stream_then_cancel
                kw.update(max_new_tokens=64, ignore_eos=True)
            else:
                action, allowed, fn = "deadline", {DEADLINE, OK}, _generate
                kw.update(max_new_tokens=32, ignore_eos=True, timeout=0.001)
            entry = ledger.open(tenant, len(kw["token_ids"]), kw["max_new_tokens"])
            status, message = call_status(lambda f=fn, k=kw, e=entry: f(c, e, **k))
            tally.record(action, status, allowed, message)


def swapper(srv, tenants: list[str], paths: list[Path], every_s: float, tally: Tally, stop: threading.Event) -> None:
    """Hot swaps: a new version of every adapter; the scratch adapter deleted and re-made."""
    i = 0
    while not stop.wait(every_s):
        for tenant in tenants:
            with srv.client(tenant, timeout=120) as c:
                for name in ("own", "tool") if tenant == tenants[0] else ("own",):
                    i += 1
                    status, msg = call_status(lambda n=name: c.upload_adapter(paths[i % len(paths)], n,  # noqa: B023
                                                                          shared=n == "tool"))
                    tally.record("upload", status, {OK}, msg)
                status, msg = call_status(lambda: c.delete_adapter("scratch"))
                tally.record("delete", status, {OK, "NOT_FOUND"}, msg)
                path = paths[i % len(paths)]
                status, msg = call_status(lambda p=path: c.upload_adapter(p, "scratch"))
                tally.record("upload", status, {OK}, msg)


def sample(srv, started: float, tally: Tally) -> Sample:
    import psutil

    proc = psutil.Process()
    size = tree_bytes(srv.registry.store.root / ".staging")
    s = srv.engine.stats()
    return Sample(round(time.monotonic() - started, 1), proc.memory_info().rss / 2**20, proc.num_fds(),
                  proc.num_threads(), size, s.kv_blocks_used, s.running, s.waiting, tally.total)


def tree_bytes(root: Path) -> int:
    """Bytes of the files under root, walked while uploads create and remove their staging directories: a
    directory or file gone before it is read counts 0 (rglob raised FileNotFoundError on one)."""
    total = 0
    for dirpath, _, files in os.walk(root):  # os.walk skips a directory that vanished (and a missing root)
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def judge(report: Report, rss_slack_mb: float) -> None:
    samples = report.samples[1:-1] or report.samples  # under traffic: not the warm-up one, not the final one
    q = max(1, len(samples) // 4)
    first, last = samples[:q], samples[-q:]
    mean = lambda xs, f: sum(getattr(x, f) for x in xs) / len(xs)  # noqa: E731
    report.drift = {f: round(mean(last, f) - mean(first, f), 2) for f in ("rss_mb", "fds", "threads")}
    report.flat = (report.drift["rss_mb"] <= rss_slack_mb and report.drift["fds"] <= 8 and report.drift["threads"] <= 8
                   and report.end.get("kv_blocks_used", 1) == 0 and report.end.get("staging_bytes", 1) == 0)


def run(model_dir: Path, *, duration_s: float, tenants: int = 3, workers_per_tenant: int = 2, swap_every_s: float = 60,
        bad_every_s: float = 3, sample_s: float = 5, rss_slack_mb: float = 64, seed: int = 0,
        quantize: bool = False, adapter_paths: list[Path] | None = None, host_cache_mb: int = 64,
        http_workers_per_tenant: int = 1) -> Report:
    from bench.peft_peers import make_lora_adapters
    from bench.soak_bad import bad_sender
    from bench.soak_http import http_worker
    from bench.soak_ledger import Ledger
    from server.config import AdapterPoolConfig
    from tests.http_utils import MODEL_ID, running_http_server

    names = [f"t{i}" for i in range(tenants)]
    paths = adapter_paths or make_lora_adapters(model_dir, Path(tempfile.mkdtemp(prefix="soak-")), 4, rank=4, seed=seed)
    tally = Tally()
    tally.report = report = Report(duration_s=duration_s)
    ledger = Ledger()
    # every hot swap adds versions that stay in the host LRU up to its byte cap: a small cap reaches its
    # plateau within the warm-up, so growth past it is a leak, not the cache filling
    pool_cfg = AdapterPoolConfig(host_cache_bytes=host_cache_mb << 20)
    with running_http_server(model_dir, tenants=names, quantize=quantize, pool_cfg=pool_cfg) as web:
        srv = web.grpc
        for i, t in enumerate(names):
            with srv.client(t, timeout=120) as c:
                c.upload_adapter(paths[i % len(paths)], "own")
                if i == 0:
                    c.upload_adapter(paths[-1], "tool", shared=True)
        stop = threading.Event()
        threads = [threading.Thread(target=worker, daemon=True,
                                    args=(srv, t, ["own", "tool"], tally, ledger, stop, seed * 1000 + i * 10 + j))
                   for i, t in enumerate(names) for j in range(workers_per_tenant)]
        threads += [threading.Thread(target=http_worker, daemon=True, args=(
            web.base_url, MODEL_ID, srv.keys[t], t, ["own", "tool"], tally, ledger, stop, seed * 1000 + i * 10 + 5 + j))
            for i, t in enumerate(names) for j in range(http_workers_per_tenant)]
        threads += [threading.Thread(target=swapper, args=(srv, names, paths, swap_every_s, tally, stop), daemon=True),
                    threading.Thread(target=bad_sender, args=(srv, names[-1], bad_every_s, tally, stop), daemon=True)]
        started = time.monotonic()
        for th in threads:
            th.start()
        while time.monotonic() - started < duration_s:
            report.samples.append(sample(srv, started, tally))
            time.sleep(min(sample_s, max(0.0, duration_s - (time.monotonic() - started))))
        stop.set()
        for th in threads:
            th.join(timeout=120)
        time.sleep(1.0)  # the engine frees the last cancelled sequences at its next steps (and settles their bills)
        deadline = time.monotonic() + 30
        while (srv.engine.stats().running or srv.engine.stats().waiting) and time.monotonic() < deadline:
            time.sleep(0.1)
        report.usage = asdict(ledger.check(srv.server.usage.query(None)))
        end = sample(srv, started, tally)
        report.samples.append(end)
        report.end = {"kv_blocks_used": end.kv_blocks_used, "staging_bytes": end.staging_bytes,
                      "running": end.running, "waiting": end.waiting}
    report.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    judge(report, rss_slack_mb)
    return report


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in report.samples]
    fields = [("rss_mb", "RSS (MB)"), ("fds", "open fds"), ("threads", "threads"),
              ("staging_bytes", "staging (bytes)"), ("kv_blocks_used", "KV blocks used"), ("calls", "calls done")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    for ax, (f, label) in zip(axes.flat, fields, strict=True):
        ax.plot(t, [getattr(s, f) for s in report.samples], marker=".")
        ax.set_title(label)
        ax.set_xlabel("minutes")
    fig.suptitle(f"soak {report.duration_s / 60:.1f} min: {sum(report.calls.values())} calls, "
                 f"{report.unexpected_count} unexpected, flat={report.flat} (load {report.load})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=1800)
    p.add_argument("--model", default=None, help="HF dir (default: the embedded default model)")
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--workers-per-tenant", type=int, default=2)
    p.add_argument("--http-workers-per-tenant", type=int, default=1)
    p.add_argument("--swap-every-s", type=float, default=60)
    p.add_argument("--bad-every-s", type=float, default=3)
    p.add_argument("--sample-s", type=float, default=10)
    p.add_argument("--rss-slack-mb", type=float, default=64)
    p.add_argument("--quantize", action="store_true")
    p.add_argument("--host-cache-mb", type=int, default=64, help="the adapter pool's host LRU cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from server.model.checkpoint import resolve_model_dir

    report = run(Path(a.model) if a.model else resolve_model_dir(None), duration_s=a.duration_s, tenants=a.tenants,
                 workers_per_tenant=a.workers_per_tenant, swap_every_s=a.swap_every_s, bad_every_s=a.bad_every_s,
                 sample_s=a.sample_s, rss_slack_mb=a.rss_slack_mb, seed=a.seed, quantize=a.quantize,
                 host_cache_mb=a.host_cache_mb, http_workers_per_tenant=a.http_workers_per_tenant)
    first, last = report.samples[1] if len(report.samples) > 1 else report.samples[0], report.samples[-1]
    print(f"soak: {report.duration_s:.0f} s, {sum(report.calls.values())} calls, {report.unexpected_count} unexpected; "
          f"RSS {first.rss_mb:.0f} -> {last.rss_mb:.0f} MB, fds {first.fds} -> {last.fds}, threads {first.threads} -> "
          f"{last.threads}; drift {report.drift}; end {report.end}; flat={report.flat}; load {report.load}")
    for line in report.unexpected:
        print("  unexpected:", line)
    print(json.dumps(report.calls, indent=1, sort_keys=True))
    if a.json:
        a.json.write_text(json.dumps(asdict(report), indent=1))
    if a.plot:
        plot(report, a.plot)
    print("usage [low, stored, high] per tenant:", json.dumps(report.usage["rows"]), "ok" if report.usage["ok"]
          else "NOT WITHIN WHAT THE CLIENTS RECEIVED", f"({report.usage['exact_calls']} calls exact, "
          f"{report.usage['bounded_calls']} bounded)")
    return 0 if report.flat and report.unexpected_count == 0 and report.usage["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
