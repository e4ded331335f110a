"""Build the C++ CPU kernels (kernels/csrc/<name>.cpp) once into a cached Python extension, and import it.

Each is a small CPython extension (module `sb_<name>`) whose entry points take plain ints (data
pointers, strides, sizes) through METH_FASTCALL and release the GIL while they run: no torch headers,
so a build takes a second or two instead of the ~minute a torch extension takes, and needs only a C++
compiler with OpenMP (`c++`, or `$CXX`) and Python's headers. It links libgomp, which resolves to the
copy torch has already loaded (same soname), so the kernels share torch's OpenMP runtime; every call
passes torch's thread count.

Cache: `$SWITCHBOARD_CACHE/kernels` (default `~/.cache/switchboard/kernels`), one file per
(source, flags, compiler, CPU) hash, written under a temporary name and renamed into place, so
concurrent first calls (test workers, several servers) never see a half-written library.
A machine without a compiler (or Python headers) gets `None` and a warning; callers then use the torch
reference.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels bind to it)

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
_loaded: dict[str, ModuleType | None] = {}
build_seconds: dict[str, float] = {}  # name -> seconds the build took in this process (0 = cache hit)


def march() -> str:
    """`-march=` target: the build machine's CPU unless SWITCHBOARD_CPU_MARCH says otherwise (e.g. x86-64-v3 to
    build and test the AVX2 paths on an AVX-512 machine)."""
    return os.environ.get("SWITCHBOARD_CPU_MARCH", "native")


def cache_dir() -> Path:
    root = os.environ.get("SWITCHBOARD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "switchboard") / "kernels"


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keys = ("model name", "flags", "Features")
    return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in keys) + os.uname().machine


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return cxx if cxx and shutil.which(cxx) else None


def extension(name: str) -> ModuleType | None:
    """The compiled kernels/csrc/<name>.cpp as module `sb_<name>` (built on first use, cached on disk), or None
    (with a warning) where it cannot be built."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    try:
        path = _build(name)
        loader = importlib.machinery.ExtensionFileLoader(f"sb_{name}", str(path))
        spec = importlib.util.spec_from_file_location(f"sb_{name}", path, loader=loader)
        lib = importlib.util.module_from_spec(spec)
        loader.exec_module(lib)
    except (OSError, ImportError, subprocess.SubprocessError, RuntimeError) as exc:
        warnings.warn(f"switchboard CPU kernel {name!r} unavailable ({exc}); using the torch reference",
                      RuntimeWarning, stacklevel=2)
    _loaded[name] = lib
    return lib


def _build(name: str) -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        raise RuntimeError(f"no Python.h under {include} (install the Python development headers)")
    sources = [CSRC / f"{name}.cpp", *sorted(CSRC.glob("*.h"))]
    flags = [*FLAGS, f"-march={march()}"]
    h = hashlib.sha256()
    for part in (*[p.read_bytes() for p in sources], " ".join(flags).encode(), cxx.encode(), _cpu_signature().encode(),
                 include.encode(), str(sysconfig.get_config_var("EXT_SUFFIX")).encode()):
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
        proc = subprocess.run([cxx, *flags, "-I", str(CSRC), "-I", include, str(sources[0]), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    build_seconds[name] = time.perf_counter() - start
    return out
