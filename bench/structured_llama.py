"""llama.cpp's server as the reference of bench/structured.py: the same 32 prompts decoded at once with no
constraint, then with every other one held to the same JSON schema through its GBNF (`json_schema` on /completion),
on the embedded model's GGUF (Q4_1 weights, no adapters: llama.cpp batches one LoRA set per batch). What it shows is
llama.cpp's own cost of its JSON-schema grammar, side by side with ours (our step ratio), not a speed race between
different precisions."""

from __future__ import annotations

import threading
import time

from bench.llama_peer import LlamaServer


def run_batch(server: LlamaServer, prompts: list[list[int]], new_tokens: int, schema: dict | None) -> tuple[float, int]:
    """(wall seconds, tokens generated) for all prompts at once; rows 0, 2, 4, ... constrained when `schema`."""
    generated = [0] * len(prompts)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        extra = {"temperature": 1.0, "seed": i}
        if schema is not None and i % 2 == 0:  # a completed grammar may end with EOS (ignored EOS would leave no token)
            extra |= {"json_schema": schema, "ignore_eos": False}
        try:
            generated[i] = len(server.complete(prompts[i], new_tokens, extra)[1])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"llama-server failed: {errors[0]!r}") from errors[0]
    return time.perf_counter() - start, sum(generated)


def llama_rows(binary: str, gguf: str, prompt: tuple[int, ...], schema: dict, threads: int, new_tokens: int = 64,
               sequences: int = 32, rounds: int = 3) -> list[str]:
    """Markdown rows: llama.cpp's tokens/s with no constraint and with half the rows JSON-constrained."""
    server = LlamaServer(binary, gguf, parallel=sequences, ctx_size=sequences * (len(prompt) + new_tokens + 32),
                         threads=threads)
    try:
        prompts = [list(prompt)] * sequences
        run_batch(server, prompts, 8, None)  # warm-up
        rates: dict[str, list[float]] = {"none": [], "half-json": []}
        for _ in range(rounds):
            for name, s in (("none", None), ("half-json", schema)):
                wall, tokens = run_batch(server, prompts, new_tokens, s)
                rates[name].append(tokens / wall)
    finally:
        server.close()
    best = {name: max(r) for name, r in rates.items()}
    out = [f"| llama.cpp server, {sequences} sequences x {new_tokens} tokens, Q4_1 GGUF, {threads} threads "
           "(best of rounds) | tokens/s | vs none |", "|---|---:|---:|"]
    for name, rate in best.items():
        out.append(f"| {name} | {rate:.1f} | {best['none'] / rate:.2f}x time |")
    return out
