"""The load test's workload and its two loops: a plan of requests (arrival times, prompt and output lengths,
adapters) and the clients that send it open-loop (at the planned times) or closed-loop (N clients back to back).
The command line, the report and the spawned server are in bench/load_test.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from bench.arrivals import LengthDist, arrival_times
from bench.stats import SLO, RequestRecord, summarize
from bench.workloads import sample_adapter_ids


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
