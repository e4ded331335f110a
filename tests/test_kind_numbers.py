"""Every number in every adapter kind's config and tensors is checked when the adapter is read (upload, store
load): NaN, infinities, 1e300 and out-of-range values are refused with a message naming the field, never
stored to fail each request later (server/adapters/numbers.py, validation.check_finite). Over gRPC such an
upload is INVALID_ARGUMENT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.kinds.base import AdapterFormatError
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.kinds_adapters import PFEIFFER, make_bitfit_adapter, make_dora_adapter, write_bottleneck_adapter
from tests.longlora_adapters import make_longlora_adapter
from tests.peft_adapters import AdapterSpec, make_peft_adapter

LIMITS = AdapterLimits(16, 32, max_bottleneck_size=16)

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def kind_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kind-numbers")
    base = tiny_llama_dir
    return {
        "lora": make_peft_adapter(base, AdapterSpec("lora", "lora", rank=4, seed=1), root / "lora"),
        "dora": make_dora_adapter(base, root / "dora", rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=2),
        "longlora": make_longlora_adapter(base, root / "longlora", rank=4, alpha=8, targets=["q_proj", "v_proj"],
                                          seed=3, factor=2.0, saved=[]),
        "ia3": make_peft_adapter(base, AdapterSpec("ia3", "ia3", seed=4), root / "ia3"),
        "prefix": make_peft_adapter(base, AdapterSpec("prefix", "prefix", n_virtual=4, seed=5), root / "prefix"),
        "prompt": make_peft_adapter(base, AdapterSpec("prompt", "prompt", n_virtual=4, seed=6), root / "prompt"),
        "bitfit": make_bitfit_adapter(base, root / "bitfit", targets=["q_proj", "down_proj"], seed=7),
        "bottleneck": write_bottleneck_adapter(base, root / "bottleneck", PFEIFFER, seed=8),
    }


def _variant(src: Path, dst: Path, cfg: dict | None, tensor: tuple[str, float] | None) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / "adapter_config.json"
    config = json.loads(config_path.read_text())
    inner = config.get("config", config)  # AdapterHub nests its BnConfig
    for key, value in (cfg or {}).items():
        if key == "rope_factor":
            inner["rope_scaling"] = {"rope_type": "linear", "factor": value}
        else:
            inner[key] = value
    config_path.write_text(json.dumps(config))
    if tensor is not None:
        (weights,) = [p for p in dst.iterdir() if p.suffix == ".safetensors"]
        tensors = load_file(weights)
        part, value = tensor
        key = next(k for k in sorted(tensors) if part in k)
        t = tensors[key].to(torch.float64)
        t.view(-1)[0] = value
        tensors[key] = t
        save_file(tensors, weights)
    return dst


CASES = [  # (kind, case id, config changes, (tensor key part, value written into it), the message names)
    ("bottleneck", "scaling-nan", {"scaling": NAN}, None, "scaling must be a finite number"),
    ("bottleneck", "scaling-1e300", {"scaling": 1e300}, None, "scaling = 1e+300 is out of range"),
    ("bottleneck", "scaling-minus-inf", {"scaling": -INF}, None, "scaling must be a finite number"),
    ("bottleneck", "reduction-nan", {"reduction_factor": NAN}, None, "reduction_factor must be a finite number"),
    ("bottleneck", "reduction-zero", {"reduction_factor": 0}, None, "reduction_factor"),
    ("bottleneck", "reduction-negative", {"reduction_factor": -4}, None, "reduction_factor"),
    ("bottleneck", "reduction-1e300", {"reduction_factor": 1e300}, None, "reduction_factor = 1e+300 is out of range"),
    ("bottleneck", "reduction-true", {"reduction_factor": True}, None, "reduction_factor"),
    ("bottleneck", "up-weight-nan", None, ("adapter_up.weight", NAN), "contains NaN or Inf"),
    ("bottleneck", "down-bias-1e300", None, ("adapter_down.0.bias", 1e300), "contains NaN or Inf"),
    ("longlora", "rope-zero", {"rope_factor": 0}, None, "rope_scaling factor"),
    ("longlora", "rope-negative", {"rope_factor": -2}, None, "rope_scaling factor"),
    ("longlora", "rope-huge", {"rope_factor": 1e9}, None, "rope_scaling factor"),
    ("longlora", "rope-nan", {"rope_factor": NAN}, None, "rope_scaling factor must be a finite number"),
    ("longlora", "rope-string", {"rope_factor": "2"}, None, "rope_scaling factor must be a number"),
    ("lora", "alpha-nan", {"lora_alpha": NAN}, None, "lora_alpha must be a finite number"),
    ("lora", "alpha-1e300", {"lora_alpha": 1e300}, None, "lora_alpha"),
    ("lora", "rank-zero", {"r": 0}, None, "r"),
    ("lora", "rank-negative", {"r": -4}, None, "r"),
    ("lora", "weight-inf", None, ("lora_B", INF), "contains NaN or Inf"),
    ("dora", "alpha-inf", {"lora_alpha": INF}, None, "lora_alpha must be a finite number"),
    ("dora", "magnitude-nan", None, ("lora_magnitude_vector", NAN), "contains NaN or Inf"),
    ("dora", "magnitude-1e300", None, ("lora_magnitude_vector", 1e300), "contains NaN or Inf"),
    ("dora", "magnitude-huge", None, ("lora_magnitude_vector", 1e6), "must stay within"),
    ("ia3", "vector-nan", None, ("ia3_l", NAN), "contains NaN or Inf"),
    ("ia3", "vector-huge", None, ("ia3_l", 1e6), "must stay within"),
    ("bitfit", "bias-1e300", None, ("bias", 1e300), "contains NaN or Inf"),
    ("bitfit", "bias-nan", None, ("bias", NAN), "contains NaN or Inf"),
    ("prefix", "virtual-zero", {"num_virtual_tokens": 0}, None, "num_virtual_tokens"),
    ("prefix", "virtual-negative", {"num_virtual_tokens": -3}, None, "num_virtual_tokens"),
    ("prefix", "virtual-huge", {"num_virtual_tokens": 10**9}, None, "num_virtual_tokens"),
    ("prefix", "virtual-float", {"num_virtual_tokens": 4.5}, None, "num_virtual_tokens"),
    ("prefix", "embedding-nan", None, ("prompt_embeddings", NAN), "contains NaN or Inf"),
    ("prompt", "virtual-nan", {"num_virtual_tokens": NAN}, None, "num_virtual_tokens"),
    ("prompt", "embedding-inf", None, ("prompt_embeddings", -INF), "contains NaN or Inf"),
]


@pytest.mark.parametrize("kind, case, cfg, tensor, message", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_number_of_every_kind_is_checked(tiny_llama_dir: Path, kind_dirs: dict[str, Path], tmp_path: Path,
                                               kind: str, case: str, cfg, tensor, message: str) -> None:
    dst = _variant(kind_dirs[kind], tmp_path / case, cfg, tensor)
    with pytest.raises(AdapterFormatError, match=message.replace("(", r"\(").replace("+", r"\+")):
        read_adapter(dst, ModelArgs.from_dir(tiny_llama_dir), LIMITS)


@pytest.mark.parametrize("kind", ["lora", "dora", "longlora", "ia3", "prefix", "prompt", "bitfit", "bottleneck"])
def test_the_unchanged_adapters_are_read(tiny_llama_dir: Path, kind_dirs: dict[str, Path], kind: str) -> None:
    assert read_adapter(kind_dirs[kind], ModelArgs.from_dir(tiny_llama_dir), LIMITS)


@pytest.mark.parametrize("other", ["dora", "longlora", "ia3", "prefix", "bitfit", "bottleneck"])
def test_merges_across_kinds_are_refused_by_name(tiny_llama_dir: Path, kind_dirs: dict[str, Path],
                                                  other: str) -> None:
    """A merge is of LoRA adapters only: DoRA's magnitudes, BitFit's biases, a bottleneck's blocks... would be
    silently dropped by a LoRA merge, so a source of another kind is refused, in either position."""
    from server.adapters.errors import AdapterRejected
    from server.adapters.kinds.lora_merge import merge_lora
    from server.adapters.merge import MergeSpec

    args = ModelArgs.from_dir(tiny_llama_dir)
    lora, foreign = (read_adapter(kind_dirs[k], args, LIMITS) for k in ("lora", other))
    for sources, index in (([lora, foreign], 1), ([foreign, lora], 0)):
        with pytest.raises(AdapterRejected, match=f"source {index} is a {foreign.kind} adapter; only LoRA"):
            merge_lora(sources, MergeSpec("linear"))


def test_an_upload_with_a_nan_reduction_factor_is_invalid_argument(tiny_llama_dir: Path, kind_dirs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """Was UNKNOWN "cannot convert float NaN to integer" (and a NaN scaling was stored, then failed each request)."""
    from clients import InvalidArgument
    from tests.server_utils import running_server

    with running_server(tiny_llama_dir, tenants=["acme"]) as s, s.client("acme") as c:
        for case, change in (("rf", {"reduction_factor": NAN}), ("sc", {"scaling": NAN})):
            dst = _variant(kind_dirs["bottleneck"], tmp_path / case, change, None)
            with pytest.raises(InvalidArgument, match=next(iter(change))):
                c.upload_adapter(dst, f"bn-{case}")
        assert c.list_adapters() == []
