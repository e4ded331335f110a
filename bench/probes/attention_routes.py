"""Prefill-chunk attention: the compiled paged kernel vs the flash-kernel chunk path, per (rows, past).

    .venv/bin/python -m bench.attention_routes [--threads 2] [--heads 9 --kv-heads 3 --dim 64]

One sequence's chunk of `rows` query rows over `past` earlier context entries (one layer, fp32, block size 16),
best of 5 after a warm-up, for both routes of kernels/attention.py; the ratio kernel / flash > 1 means the flash
path is faster. `takes_flash` (FLASH_MIN_Q, FLASH_ALWAYS_Q) is set from this table; the last column says which
route it picks today.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kernels import attention as att


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rows", default="16,64,128,256,512,1024,2048")
    ap.add_argument("--pasts", default="0,512,2048")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not att.available():
        sys.exit("no compiled attention kernel on this machine (no C++ compiler)")
    bs, scale = 16, args.dim**-0.5
    print(f"{torch.get_num_threads()} threads, {args.heads}/{args.kv_heads} heads of {args.dim}, fp32\n")
    print("| rows | past | kernel ms | flash ms | kernel/flash | route today |")
    print("|---:|---:|---:|---:|---:|---|")
    for rows in (int(x) for x in args.rows.split(",")):
        for past in (int(x) for x in args.pasts.split(",")):
            ctx = rows + past
            n_blocks = -(-ctx // bs)
            k_cache = torch.randn(n_blocks * bs, args.kv_heads, args.dim)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(rows, args.heads, args.dim)
            meta = att.build_paged_attention_meta([rows], [ctx], [list(range(n_blocks))], bs)
            out = torch.empty_like(q)
            flash = best_ms(lambda: att._chunk_attention(q, k_cache, v_cache, meta, scale, 0, out))  # noqa: B023
            saved = att.FLASH_MIN_Q
            att.FLASH_MIN_Q = 0  # metadata built now routes every row to the compiled kernel
            kernel_meta = att.build_paged_attention_meta([rows], [ctx], [list(range(n_blocks))], bs)
            att.FLASH_MIN_Q = saved
            kernel = best_ms(lambda: att.paged_attention_kernel(q, k_cache, v_cache, kernel_meta, scale))  # noqa: B023
            route = "flash" if att.takes_flash(rows, past) else "kernel"
            print(f"| {rows} | {past} | {kernel:.2f} | {flash:.2f} | {kernel / flash:.2f} | {route} |", flush=True)


if __name__ == "__main__":
    main()
