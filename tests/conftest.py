"""Shared fixtures: tiny random checkpoints (session-scoped, built once) and the default model dir."""

from __future__ import annotations

import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when its own language helpers are decorated, i.e. at the first
# `import triton` anywhere (peft and bitsandbytes import it): set it before anything else is imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server.model.checkpoint import resolve_model_dir

    return resolve_model_dir(None)


SEED_ENV = "SWITCHBOARD_TEST_SEED"


@pytest.fixture(autouse=True)
def _random_seed(request: pytest.FixtureRequest):
    """Every test starts from a fresh seed of torch's and Python's global generators (the seed of any input a
    test draws without its own generator); a failing test prints it, and SWITCHBOARD_TEST_SEED=N replays it."""
    import random

    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**31))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.stash[_SEED_KEY] = seed
    yield


_SEED_KEY = pytest.StashKey[int]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"{SEED_ENV}={seed} reproduces this test's random inputs"))
    return report
