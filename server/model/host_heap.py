"""The process heap keeps the memory it frees, for CPU serving.

glibc's malloc hands blocks from 128 KiB up (its dynamic mmap threshold) to the kernel on free (munmap, heap trim,
MADV_DONTNEED on thread arenas), and the next allocation of the same size faults every 4 KiB page back in, zeroed.
An engine step allocates and frees the same activations every step (logits, MLP intermediates, prefill chunks), so
the default costs ~370,000 page faults per 2,048 generated tokens on the default model at batch 32 (measured:
bench/RESULTS.md "Session 5"), ~0.65 s of kernel time per run of the peer workload. With the thresholds below the
freed blocks stay in the heap and are reused: 0-2,000 faults per run. The price is that the process's resident
size stays at its high-water mark, as with vLLM's or PyTorch's CUDA caching allocators; vLLM's CPU backend gets
the same effect by preloading tcmalloc.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h: top-of-heap free bytes kept before trimming
M_TOP_PAD = -2  # extra bytes requested with each heap growth
M_MMAP_THRESHOLD = -3  # requests of at least this size get their own mmap (glibc caps it at 32 MiB on 64-bit)

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def retain_freed_heap() -> bool:
    """Set glibc's malloc thresholds so that freed blocks under 32 MiB are kept for reuse (idempotent); True when
    glibc took all three, False on other platforms or C libraries (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all([mallopt(param, value) == 1 for param, value in settings])
