"""How a compiled kernel fails: a machine without a toolchain has no kernels (their tests skip, the server runs the
torch backend, or refuses to start when `SWITCHBOARD_KERNELS=cpu` asks for them); a source that does not compile
raises KernelBuildError (its tests fail, the server does not start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import build
from tests.compiler import needs_compiler

BROKEN = "#include <Python.h>\nstatic int broken( { return 0; }  // a syntax error\n"


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCHBOARD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "csrc"
    src.mkdir()
    return src


@needs_compiler
def test_a_compile_error_raises_with_the_compilers_message(fresh_cache: Path) -> None:
    (fresh_cache / "broken.cpp").write_text(BROKEN)
    with pytest.raises(build.KernelBuildError, match=r"kernel 'broken': .* failed: .*broken\.cpp"):
        build.extension("broken", csrc=fresh_cache)
    (fresh_cache / "broken.cpp").write_text("")  # the failure is remembered: no second build, the same error
    with pytest.raises(build.KernelBuildError, match="failed"):
        build.extension("broken", csrc=fresh_cache)
    assert not list((fresh_cache.parent / "cache" / "kernels").glob("*.so")), "nothing half-written in the cache"


@needs_compiler
def test_a_library_that_does_not_load_raises(fresh_cache: Path) -> None:
    """Compiles, but is not the extension module it claims to be (no PyInit_sb_empty): a load error, not a skip."""
    (fresh_cache / "empty.cpp").write_text("int sb_nothing_here() { return 0; }\n")
    with pytest.raises(build.KernelBuildError, match="kernel 'empty'"):
        build.extension("empty", csrc=fresh_cache)


def test_no_compiler_means_unavailable_not_an_error(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    missing = build.toolchain_missing()
    assert missing is not None and "/nonexistent/c++" in missing
    (fresh_cache / "broken.cpp").write_text(BROKEN)  # never compiled: there is nothing to compile it with
    assert build.extension("broken", csrc=fresh_cache) is None
    with pytest.raises(build.KernelsUnavailable, match="no C"):
        build._build("broken", fresh_cache)


def test_no_python_headers_means_unavailable(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sysconfig

    paths = {**sysconfig.get_paths(), "include": str(fresh_cache)}  # a directory without Python.h
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: paths)
    if build._compiler() is not None:
        assert "Python.h" in build.toolchain_missing()
    assert build.extension("absent", csrc=fresh_cache) is None


def test_cpu_kernels_asked_for_without_a_compiler_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(kernels, "MODE", "cpu")
    monkeypatch.setattr(kernels, "_backends", {})  # resolved afresh on this "machine"
    with pytest.raises(build.KernelsUnavailable, match=r"SWITCHBOARD_KERNELS=cpu.*no C\+\+ compiler"):
        kernels.warm_up(torch.device("cpu"))
    monkeypatch.setattr(kernels, "MODE", "auto")
    kernels.warm_up(torch.device("cpu"))  # auto: the torch references, with a warning in the log
    assert kernels.backend("cpu").name == "torch"
    with pytest.raises(build.KernelsUnavailable):
        kernels.backend("cpu", "cpu")


def test_serve_reports_the_kernel_error_and_exits(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    import kernels
    from server.serve_cli import main

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(kernels, "MODE", "cpu")
    monkeypatch.setattr(kernels, "_backends", {})
    rc = main(["--model", str(tiny_llama_dir), "--port", "0", "--no-http", "--no-metrics", "--no-quantize",
               "--data-dir", str(tmp_path)])
    assert rc == 1
    assert "error: SWITCHBOARD_KERNELS=cpu, but the CPU kernels cannot be built" in capsys.readouterr().err
