"""PEFT-made adapters built once per test session and copied where a test needs them (cheap, no downloads)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from functools import cache
from pathlib import Path

from server.adapters.store import MANIFEST, AdapterStore
from tests.peft_adapters import AdapterSpec, make_peft_adapter

_ROOT = Path(tempfile.mkdtemp(prefix="switchboard-adapters-"))


@cache
def peft_adapter(base_dir: Path, kind: str = "lora", rank: int = 4, seed: int = 0,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), alpha: float = 8.0, rslora: bool = False) -> Path:
    """A PEFT-made adapter for `base_dir` (made on first use, then reused; treat it as read-only)."""
    tag = f"{kind}-r{rank}-s{seed}-{'-'.join(targets)}-a{alpha}{'-rs' if rslora else ''}"
    out = _ROOT / f"{abs(hash(base_dir)) % 10**8}-{tag}"
    spec = AdapterSpec(out.name, kind, rank=rank, alpha=alpha, targets=list(targets), seed=seed, rslora=rslora)
    return make_peft_adapter(base_dir, spec, out)


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tar_bytes(src_dir: Path, arc_prefix: str = "") -> bytes:
    """The adapter directory as an uncompressed tar (its two files), in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(src_dir / name, arcname=f"{arc_prefix}{name}")
    return buf.getvalue()


def clone_store(store: AdapterStore, tenant: str, n: int, contents: int) -> None:
    """Grow tenant's a0000..a{contents-1} (committed) to n adapters a0000..a{n-1} whose files repeat them.

    Copies the committed version directories and rewrites their manifests' names: the layout put() writes,
    without n rounds of fsyncs (the store's own tests cover those). Reopen the store to see the copies."""
    masters = [store.latest(tenant, f"a{i:04d}") for i in range(contents)]
    for i in range(contents, n):
        master = masters[i % contents]
        dst = store.root / tenant / f"a{i:04d}" / master.path.name
        shutil.copytree(master.path, dst)
        manifest = json.loads((dst / MANIFEST).read_text())
        (dst / MANIFEST).write_text(json.dumps({**manifest, "name": f"a{i:04d}"}))
