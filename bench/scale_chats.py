"""Multi-turn chats through the Ray Serve application, prefix-aware routing vs adapter affinity alone (measured).

Part of `python -m bench scale --chats` (bench/scale_out.py). For each routing (ScaleSettings.prefix_routing
False, then True): a local Ray instance with --chat-replicas engine replicas (one CPU and one torch thread
each), --adapters LoRA adapters uploaded through the ingress; --chat-conversations conversations run closed
loop and all at once, conversation i on adapter a{i mod adapters} (every --adapters+1-th on the base model),
each turn streamed over gRPC as token ids: a --chat-system token system prompt (one per run), then user turns
of --chat-turn tokens, each later turn the whole history (with the answers, --chat-new tokens, EOS ignored).
Reports TTFT p50 / p99 per turn, output tokens / s and the share of prompt tokens the replicas served from
their prefix caches (the responses' cached_prompt_tokens).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from bench.stats import percentiles


def measure_chats(prefix_routing: bool, args, model_dir: Path, adapter_dirs: list[Path]) -> dict:
    from bench.ray_app import ray_switchboard
    from server.model.args import ModelArgs

    vocab = ModelArgs.from_dir(model_dir).vocab_size
    rng = np.random.default_rng(args.seed)
    system = rng.integers(0, vocab, args.chat_system).tolist()
    turns = [[rng.integers(0, vocab, args.chat_turn).tolist() for _ in range(args.chat_turns)]
             for _ in range(args.chat_conversations)]
    n_adapters = len(adapter_dirs)
    ttft = [[0.0] * len(turns) for _ in range(args.chat_turns)]
    totals = [0, 0, 0]  # output tokens, prompt tokens, cached prompt tokens
    lock = threading.Lock()
    errors: list[BaseException] = []
    with ray_switchboard(model_dir, args.chat_replicas, args.slots, not args.no_quantize, adapter_dirs,
                         prefix_routing=prefix_routing) as client:
        client.generate(token_ids=[1, 2, 3], max_new_tokens=2)  # warm-up

        def conversation(i: int) -> None:
            try:
                chat(i)
            except BaseException as exc:  # noqa: BLE001 - raised below
                errors.append(exc)

        def chat(i: int) -> None:
            adapter = "" if i % (n_adapters + 1) == n_adapters else f"a{i % (n_adapters + 1)}"
            history = list(system)
            for t, user in enumerate(turns[i]):
                history += user
                sent, answer, cached = time.perf_counter(), [], 0
                for chunk in client.stream(token_ids=history, adapter=adapter, max_new_tokens=args.chat_new,
                                           ignore_eos=True):
                    if chunk.token_ids and not answer:
                        ttft[t][i] = 1e3 * (time.perf_counter() - sent)
                    answer += chunk.token_ids
                    cached = chunk.cached_prompt_tokens or cached
                with lock:
                    totals[0] += len(answer)
                    totals[1] += len(history)
                    totals[2] += cached
                history += answer

        start = time.perf_counter()
        threads = [threading.Thread(target=conversation, args=(i,)) for i in range(len(turns))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a conversation failed: {errors[0]!r}") from errors[0]
    per_turn = [percentiles(row) for row in ttft]
    return {"prefix_routing": prefix_routing, "replicas": args.chat_replicas,
            "conversations": args.chat_conversations, "turns": args.chat_turns,
            "ttft_p50_ms": [p["p50"] for p in per_turn], "ttft_p99_ms": [p["p99"] for p in per_turn],
            "tok_per_s": totals[0] / wall, "cached_share": totals[2] / max(1, totals[1])}
