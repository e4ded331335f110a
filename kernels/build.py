"""Build the C++ CPU kernels (kernels/csrc/*.cpp) once into a cached shared library, and load it.

The library is a plain C ABI called through ctypes: no torch headers, so a build takes a second or
two instead of the ~minute a torch extension takes, and needs only a C++ compiler with OpenMP (`c++`,
or `$CXX`). It links libgomp, which resolves to the copy torch has already loaded (same soname), so
the kernels share torch's OpenMP runtime; every call passes torch's thread count.

Cache: `$SWITCHBOARD_CACHE/kernels` (default `~/.cache/switchboard/kernels`), one file per
(source, flags, compiler, CPU) hash, written under a temporary name and renamed into place, so
concurrent first calls (test workers, several servers) never see a half-written library.
A machine without a compiler gets `None` and a warning; callers then use the torch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels bind to it)

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
_loaded: dict[str, ctypes.CDLL | None] = {}
build_seconds: dict[str, float] = {}  # name -> seconds the build took in this process (0 = cache hit)


def cache_dir() -> Path:
    root = os.environ.get("SWITCHBOARD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "switchboard") / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return cxx if cxx and shutil.which(cxx) else None


def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernels/csrc/<name>.cpp (built on first use, cached on disk), or None without a compiler."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    try:
        lib = ctypes.CDLL(str(_build(name)))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        warnings.warn(f"switchboard CPU kernel {name!r} unavailable ({exc}); using the torch reference",
                      RuntimeWarning, stacklevel=2)
    _loaded[name] = lib
    return lib


def _build(name: str) -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    sources = [CSRC / f"{name}.cpp", *sorted(CSRC.glob("*.h"))]
    h = hashlib.sha256()
    for part in (*[p.read_bytes() for p in sources], " ".join(FLAGS).encode(), cxx.encode(), _cpu_signature().encode()):
        h.update(part)
    out = cache_dir() / f"{name}-{h.hexdigest()[:16]}.so"
    build_seconds[name] = 0.0
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, "-I", str(CSRC), str(sources[0]), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    build_seconds[name] = time.perf_counter() - start
    return out
