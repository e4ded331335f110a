"""The Triton kernels (kernels/sgmv.py) compiled ahead of time for NVIDIA GPUs, on a machine with no GPU and no driver.

`triton.compile` lowers each kernel for a `GPUTarget` (sm_80 = A100, sm_90 = H100) through Triton's IR, LLVM and the
`ptxas` bundled in the triton wheel into a cubin; `ptxas -v` over the same PTX reports its registers per thread and
spills, and Triton's metadata the shared memory it asks for at launch. Each launch mirrors one the engine makes
(sgmv_shrink / sgmv_expand): the dtypes of the activations and of the adapter tables, the tables' padded rank (which
sets BLOCK_R), and Triton's own argument specialization (an int equal to 1 becomes a constant, an int or pointer
divisible by 16 is marked so) for the pool's layouts: x, t and y rows contiguous, A's `in` axis contiguous, B seen
rank-major (its `out` axis contiguous).

`python -m kernels.aot [--ranks 16 64 256] [--json PATH]` prints the table. Must run without TRITON_INTERPRET=1 (the
interpreter replaces the kernels with Python functions). Compiles are cached in Triton's cache (TRITON_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

ARCHS = (80, 90)  # sm_80 (A100), sm_90 (H100)
ENGINE_RANKS = (16, 64)  # padded ranks checked by the suite: a small one and the pool's default (max_lora_rank 64)
# (activations: x and y, adapter tables: A and B): the model's dtype, or lora_dtype=float32 under a bf16 model
DTYPES = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"))
# the most shared memory one block may ask for (opt-in), per compute capability: A100 163 KiB, H100 227 KiB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
HIDDEN = 4096  # `in` / `out` features of a projection (any multiple of 16 specializes the same way)
LAYERS = 32  # the tables' layer axis (a slot's stride: LAYERS * rank * features)


@dataclass(frozen=True, slots=True)
class Launch:
    kernel: str  # "shrink" (sgmv_shrink) or "expand" (sgmv_expand)
    act: str  # x (shrink) / y (expand) dtype, Triton's name
    table: str  # A / B dtype
    max_rank: int  # the tables' padded rank: BLOCK_R = sgmv._block_r(max_rank)


@dataclass(frozen=True, slots=True)
class Compiled:
    launch: Launch
    arch: str  # "sm_80", "sm_90a"
    block_r: int
    registers: int  # per thread
    shared_bytes: int  # dynamic shared memory per block
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    num_warps: int
    fits: bool  # shared_bytes within the arch's per-block limit (SHARED_LIMIT): otherwise the launch fails


def engine_launches(ranks: tuple[int, ...] = ENGINE_RANKS) -> list[Launch]:
    return [Launch(k, act, table, r) for k in ("shrink", "expand") for act, table in DTYPES for r in ranks]


def _arguments(launch: Launch) -> dict[str, object]:
    """The launch's arguments in the kernel's order: a pointer as its element type ("*fp32"), an int as a sample
    value of the engine's (specialized by the rules of Triton's launcher), a constexpr as its value."""
    from kernels import sgmv

    r, n = launch.max_rank, HIDDEN
    segs = {"tokens_ptr": "*i64", "seg_begin_ptr": "*i64", "seg_end_ptr": "*i64", "seg_slots_ptr": "*i32"}
    if launch.kernel == "shrink":  # x [T, in], A [slots, R, in] a layer's view of [slots, layers, R, in], t [T, R]
        return {"x_ptr": f"*{launch.act}", "a_ptr": f"*{launch.table}", "out_ptr": "*fp32", **segs, "K": n, "R": r,
                "sxm": n, "sxk": 1, "sas": LAYERS * r * n, "sar": n, "sak": 1, "som": r, "sor": 1,
                "BLOCK_M": sgmv.BLOCK_M, "BLOCK_K": sgmv.BLOCK_K, "BLOCK_R": sgmv._block_r(r)}
    # t [T, R] fp32, B [slots, out, R] the transposed view of the rank-major [slots, layers, R, out], y [T, out]
    return {"t_ptr": "*fp32", "b_ptr": f"*{launch.table}", "scale_ptr": "*fp32", "y_ptr": f"*{launch.act}", **segs,
            "N": n, "R": r, "stm": r, "str_": 1, "sbs": LAYERS * r * n, "sbn": 1, "sbr": n, "sym": n, "syn": 1,
            "BLOCK_M": sgmv.BLOCK_M, "BLOCK_N": sgmv.BLOCK_N, "BLOCK_R": sgmv._block_r(r)}


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile one launch for sm_<arch> (raises whatever Triton or ptxas raises when it does not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    from kernels import sgmv

    fn = sgmv._shrink_kernel if launch.kernel == "shrink" else sgmv._expand_kernel
    args = _arguments(launch)
    assert list(args) == fn.arg_names, (list(args), fn.arg_names)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for i, (name, value) in enumerate(args.items()):
        if name in constexpr_names or value == 1:  # Triton's launcher turns an int argument equal to 1 into a constant
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, str):  # a pointer: torch's allocations (and the engine's views) are 16-byte aligned
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32))
    gpu = sm_arch_from_capability(arch)
    regs, stores, loads = _ptxas_usage(kernel.asm["ptx"], gpu, get_ptxas(arch).path)
    shared = kernel.metadata.shared
    return Compiled(launch, gpu, constants["BLOCK_R"], regs, shared, stores, loads, kernel.metadata.num_warps,
                    shared <= SHARED_LIMIT[arch])


def _ptxas_usage(ptx: str, gpu: str, ptxas: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) that `ptxas -v` reports for the PTX, with Triton's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}: {proc.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {proc.stderr[-2000:]}")
    return int(regs[1]), int(spills[1]), int(spills[2])


def table(rows: list[Compiled]) -> str:
    head = f"{'kernel':7} {'x/y':5} {'table':5} {'rank':>4} {'BLOCK_R':>7} {'arch':7} {'regs':>4} {'smem B':>7} " \
           f"{'spill st':>8} {'spill ld':>8} fits"
    lines = [head, "-" * len(head)]
    for c in rows:
        lc = c.launch
        lines.append(f"{lc.kernel:7} {lc.act:5} {lc.table:5} {lc.max_rank:>4} {c.block_r:>7} {c.arch:7} "
                     f"{c.registers:>4} {c.shared_bytes:>7} {c.spill_stores:>8} {c.spill_loads:>8} "
                     f"{'yes' if c.fits else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=list(ENGINE_RANKS), help="tables' padded ranks")
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80, 90)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions")
    rows = [compile_launch(launch, arch) for launch in engine_launches(tuple(args.ranks)) for arch in args.archs]
    print(table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(c), "launch": asdict(c.launch)} for c in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
