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
Failures come in two kinds. A machine with no C++ compiler (or no Python headers) at all cannot build any kernel:
`toolchain_missing()` says why, `extension()` returns None, and the dispatcher (kernels/backend.py) resolves the
torch backend (or, asked for `SWITCHBOARD_KERNELS=cpu`, refuses to start: `KernelsUnavailable`). A compiler that
rejects a source, or a library that does not load, is a bug, not a missing feature: `extension()` raises
`KernelBuildError` with the compiler's message (every call, from one cached failure), which fails the kernels' tests
and the server's start-up instead of quietly running the references.
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
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels bind to it)

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
_loaded: dict[str, ModuleType | None] = {}
_failed: dict[str, KernelBuildError] = {}
build_seconds: dict[str, float] = {}  # name -> seconds the build took in this process (0 = cache hit)


class KernelError(RuntimeError):
    """A compiled CPU kernel the server needs and cannot have (a start-up error, with the reason)."""


class KernelBuildError(KernelError):
    """A kernel source that does not compile, or a built library that does not load: a bug to fix, never a fallback."""


class KernelsUnavailable(KernelError):
    """The compiled CPU kernels were asked for (`SWITCHBOARD_KERNELS=cpu`) on a machine that cannot build them."""


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


def toolchain_missing() -> str | None:
    """Why no kernel can be built on this machine (no C++ compiler, no Python headers), or None when one can."""
    if _compiler() is None:
        cxx = os.environ.get("CXX")
        return f"no C++ compiler (CXX={cxx!r} is not on PATH)" if cxx else "no C++ compiler (set CXX or install g++)"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"no Python.h under {include} (install the Python development headers)"
    return None


def extension(name: str, csrc: Path = CSRC) -> ModuleType | None:
    """The compiled <csrc>/<name>.cpp as module `sb_<name>` (built on first use, cached on disk); None where this
    machine has no toolchain (toolchain_missing()). Raises KernelBuildError when the source does not compile or the
    library does not load (the same error again on every later call, without rebuilding)."""
    key = name if csrc is CSRC else f"{csrc}/{name}"
    if key in _loaded:
        return _loaded[key]
    if key in _failed:
        raise _failed[key]
    if toolchain_missing() is not None:
        _loaded[key] = None
        return None
    try:
        path = _build(name, csrc)
        loader = importlib.machinery.ExtensionFileLoader(f"sb_{name}", str(path))
        spec = importlib.util.spec_from_file_location(f"sb_{name}", path, loader=loader)
        lib = importlib.util.module_from_spec(spec)
        loader.exec_module(lib)
    except (OSError, ImportError, subprocess.SubprocessError, RuntimeError) as exc:
        if isinstance(exc, KernelBuildError):
            _failed[key] = exc
            raise
        _failed[key] = KernelBuildError(f"kernel {name!r}: {exc}")
        raise _failed[key] from exc
    _loaded[key] = lib
    return lib


def _build(name: str, csrc: Path = CSRC) -> Path:
    missing = toolchain_missing()
    if missing is not None:
        raise KernelsUnavailable(missing)
    cxx = _compiler()
    include = sysconfig.get_paths()["include"]
    sources = [csrc / f"{name}.cpp", *sorted(csrc.glob("*.h"))]
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
        proc = subprocess.run([cxx, *flags, "-I", str(csrc), "-I", include, str(sources[0]), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise KernelBuildError(f"kernel {name!r}: {cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    build_seconds[name] = time.perf_counter() - start
    return out
