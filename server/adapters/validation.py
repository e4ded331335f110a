"""Checks on untrusted adapter files that run before (or instead of) reading them whole.

- `check_config(raw)`: adapter_config.json bounded in size and nesting depth before `json.loads` (a
  config nested 100k deep is a RecursionError, not a message), then the types of the fields we read.
- `read_safetensors_header(f)` / `check_safetensors_header(path, args, limits)`: only the 8-byte length and
  the JSON header are read; every entry is checked against the loaded base (names, dtypes, shapes,
  byte sizes and offsets) BEFORE any tensor is read, so a 0.5 MB upload declaring a 500 MB tensor is
  refused from its first kilobyte. The upload path runs the same check while the tar streams in.
- `check_finite(name, tensor, serving_dtype)`: after conversion to the dtype it is served in (a float64
  1e300 is finite in f64 and inf in f32), and bounded in magnitude so every served dtype stays finite.
- `check_scale(name, value)`: lora_alpha, the effective LoRA scale and merge weights: finite and bounded.
Errors are peft_format.AdapterFormatError (INVALID_ARGUMENT) or BaseModelMismatch (FAILED_PRECONDITION), with the
field named and caller-chosen text clipped.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from server.adapters import kinds, numbers
from server.adapters.kinds.base import AdapterFormatError, AdapterLimits
from server.clip import clip
from server.model.args import ModelArgs

MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 4 << 20  # a real header: ~150 bytes per tensor, 2 tensors per projection and layer
MAX_SCALE = 1e4  # |lora_alpha|, |alpha / r|, |merge weight|
MAX_ABS_WEIGHT = 65504.0  # the largest float16: weights within it are finite in every served dtype
SERVED_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# config fields we read, with the JSON types they may have (None is always allowed: "not set")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,), "r": (int,), "lora_alpha": (int, float), "use_rslora": (bool,),
    "target_modules": (list, str), "feedforward_modules": (list, str), "num_virtual_tokens": (int,),
    "num_transformer_submodules": (int,), "bias": (str,), "base_model_name_or_path": (str,),
}


def _fail(msg: str) -> Exception:
    return AdapterFormatError(msg)


def json_depth_ok(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the nesting of [ and { in `text` (outside strings) stays within `max_depth`."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _bounded_json(raw: bytes, what: str, limit: int) -> object:
    if len(raw) > limit:
        raise _fail(f"{what} has {len(raw)} bytes; the limit is {limit}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"{what} is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not json_depth_ok(text):
        raise _fail(f"{what} is not valid JSON for an adapter: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(f"{what} is not valid JSON: {clip(str(exc))}") from None


def check_config(raw: bytes) -> dict:
    """adapter_config.json bytes -> the config dict; size, depth and the types of the fields we read checked."""
    cfg = _bounded_json(raw, "adapter_config.json", MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict) or ("peft_type" not in cfg and not isinstance(cfg.get("config"), dict)):
        raise _fail("adapter_config.json has no peft_type (nor an AdapterHub \"config\")")
    for field, types in _FIELD_TYPES.items():
        value = cfg.get(field)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
            raise _fail(f"adapter_config.json field {field} must be {' or '.join(t.__name__ for t in types)}, "
                        f"got {clip(value)}")
        if not isinstance(value, types):
            raise _fail(f"adapter_config.json field {field} must be {' or '.join(t.__name__ for t in types)}, "
                        f"got {type(value).__name__} {clip(value)}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise _fail(f"adapter_config.json field {field} must list strings")
    return cfg


def check_scale(name: str, value: object, bound: float = MAX_SCALE) -> float:
    """`value` as a float if it is a finite number with |value| <= bound; else AdapterFormatError naming `name`."""
    return numbers.magnitude(name, value, bound)


def check_finite(name: str, tensor: torch.Tensor, serving_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`tensor` converted to `serving_dtype`, refused if that has NaN/Inf or values beyond MAX_ABS_WEIGHT."""
    if not tensor.is_floating_point():
        raise _fail(f"tensor {clip(name)} has non-float dtype {tensor.dtype}")
    served = tensor.to(serving_dtype)
    if served.numel() == 0:
        return served
    if not torch.isfinite(served).all():
        raise _fail(f"tensor {clip(name)} contains NaN or Inf values (as {str(serving_dtype).removeprefix('torch.')})")
    peak = float(served.abs().max())
    if peak > MAX_ABS_WEIGHT:
        raise _fail(f"tensor {clip(name)} holds values up to {peak:.3g}; adapter weights must stay within "
                    f"+-{MAX_ABS_WEIGHT:g}")
    return served


def read_safetensors_header(f: BinaryIO, size: int) -> tuple[dict, int]:
    """(header dict, data bytes after it) of a safetensors stream of `size` bytes, reading only the header."""
    head = f.read(8)
    if len(head) < 8:
        raise _fail("adapter_model.safetensors is not a valid safetensors file: shorter than its 8-byte header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise _fail(f"adapter_model.safetensors is not a valid safetensors file: a header of {n} bytes "
                    f"(file {size} bytes, limit {MAX_HEADER_BYTES})")
    header = _bounded_json(f.read(n), "the adapter_model.safetensors header", MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise _fail("adapter_model.safetensors is not a valid safetensors file: its header is not a JSON object")
    return header, size - 8 - n


def check_header_entries(header: dict, data_bytes: int, args: ModelArgs, limits: AdapterLimits) -> int:
    """Every tensor entry against the base `args` within `limits`; the bytes of tensor data the header describes."""
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _fail("adapter_model.safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(f"adapter_model.safetensors entry {clip(key)} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SERVED_DTYPES:
            raise _fail(f"tensor {clip(key)} has dtype {clip(dtype)}; served: {', '.join(SERVED_DTYPES)} "
                        "(non-float and float8 tensors are refused)")
        if (not isinstance(shape, list) or len(shape) > 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _fail(f"tensor {clip(key)} has shape {clip(shape)}; adapter tensors are 1-2 dimensional")
        _check_entry_shape(key, tuple(shape), args, limits)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _fail(f"tensor {clip(key)} has malformed data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * SERVED_DTYPES[dtype]:
            raise _fail(f"tensor {clip(key)}: data_offsets {offsets} do not fit its shape/dtype and the "
                        f"{data_bytes} data bytes")
        spans.append((begin, end))
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise _fail("adapter_model.safetensors has overlapping tensors")
    return sum(e - b for b, e in spans)


def _check_entry_shape(key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> None:
    """Each kind claims and checks its own keys (each kind's check_tensor_header, through kinds/peft_keys.py); a key
    no kind claims is refused."""
    if not any(kind.check_tensor_header(key, shape, args, limits) for kind in kinds.registered()):
        raise _fail(f"unexpected tensor {clip(key)} (only the seven projections of decoder layers are served)")


def check_safetensors_header(path: Path, args: ModelArgs, limits: AdapterLimits) -> int:
    """Check the header of the safetensors file at `path` (only the header is read); the data bytes it describes."""
    with open(path, "rb") as f:
        return check_safetensors_stream(f, path.stat().st_size, args, limits)


def check_safetensors_stream(f: BinaryIO, size: int, args: ModelArgs, limits: AdapterLimits) -> int:
    """The same check on a stream positioned at the start of a safetensors file of `size` bytes."""
    header, data_bytes = read_safetensors_header(f, size)
    described = check_header_entries(header, data_bytes, args, limits)
    if described != data_bytes:
        raise _fail(f"adapter_model.safetensors is not a valid safetensors file: {data_bytes} data bytes, "
                    f"its header describes {described}")
    return described
