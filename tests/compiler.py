"""The one skip condition of the compiled-kernel tests: a machine with no C++ compiler (or no Python headers) at all.
A kernel that does not compile is not a reason to skip: its tests call it and fail with KernelBuildError."""

from __future__ import annotations

import pytest

from kernels.build import toolchain_missing

MISSING = toolchain_missing()
needs_compiler = pytest.mark.skipif(MISSING is not None, reason=f"the CPU kernels cannot be built here: {MISSING}")
