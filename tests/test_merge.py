"""LoRA merges against PEFT's `add_weighted_adapter` (the oracle): per target module, the merged delta
weight (scale * B @ A) equals PEFT's for the same sources, weights, density and target rank.

DARE is compared with the *same seed*: PEFT draws its masks from torch's global generator, but
`add_weighted_adapter` first initialises the new adapter's weights from that generator too. The test
re-seeds the global generator with our seed right before PEFT's first mask draw (a wrapper around
peft's dare_linear/dare_ties), so both sides draw the same masks in the same order and match exactly.
"""

from __future__ import annotations

from pathlib import Path

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch

from server.adapters.errors import AdapterRejected
from server.adapters.kinds.lora_merge import merge_lora, write_peft_lora
from server.adapters.merge import MergeSpec
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.adapter_files import peft_adapter
from tests.peft_adapters import ALL_PROJ

SOURCES = {  # name -> (rank, seed, targets, alpha, rslora); "c" uses rsLoRA scaling, "d" a different rank
    "a": (4, 11, ("q_proj", "v_proj"), 8.0, False),
    "b": (4, 12, ("q_proj", "k_proj", "v_proj", "o_proj"), 4.0, False),
    "c": (4, 13, tuple(ALL_PROJ), 16.0, True),
    "d": (2, 14, ("v_proj", "down_proj"), 2.0, False),
}


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path) -> dict[str, Path]:
    return {n: peft_adapter(tiny_llama_dir, rank=r, seed=s, targets=t, alpha=a, rslora=rs)
            for n, (r, s, t, a, rs) in SOURCES.items()}


def peft_merged_deltas(base_dir: Path, sources: dict[str, Path], names: list[str], weights: list[float],
                       method: str, monkeypatch, **kwargs) -> dict[tuple[int, str], torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sources[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(sources[n], adapter_name=n)
    seed = kwargs.pop("seed", None)
    if seed is not None:  # see the module docstring
        for fn_name in ("dare_linear", "dare_ties"):
            original = getattr(peft_lora_model, fn_name)
            state = {"first": True}

            def reseeding(*args, _orig=original, _state=state, **kw):
                if _state["first"]:
                    torch.manual_seed(seed)
                    _state["first"] = False
                return _orig(*args, **kw)

            monkeypatch.setattr(peft_lora_model, fn_name, reseeding)
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kwargs)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = module.get_delta_weight("merged").detach()
    return out


def our_deltas(base_dir: Path, sources: dict[str, Path], names: list[str], spec: MergeSpec, tmp: Path):
    args = ModelArgs.from_dir(base_dir)
    merged = merge_lora([read_adapter(sources[n], args, AdapterLimits(64, 16)) for n in names], spec)
    # through the PEFT format
    written = read_adapter(write_peft_lora(merged, tmp / "merged"), args, AdapterLimits(64, 16)).payload
    assert written.rank == merged.rank and written.scale == 1.0
    return {k: written.scale * (written.b[k] @ written.a[k]) for k in written.a}, merged


CASES = [
    ("linear", ["a", "b", "c"], [0.7, -0.4, 1.3], {}),
    ("cat", ["a", "d", "c"], [0.5, 1.5, -0.8], {}),
    ("svd", ["a", "d", "c"], [1.0, 0.6, 0.9], {"svd_rank": 3}),
    ("svd", ["b", "d"], [1.0, 2.0], {}),  # default rank: the largest source rank
    ("ties", ["a", "b", "c"], [0.9, 0.5, 1.1], {"density": 0.4}),
    ("dare_linear", ["a", "b", "c"], [0.8, 0.6, 1.0], {"density": 0.5, "seed": 1234}),
    ("dare_ties", ["a", "b", "c"], [1.2, 0.3, 0.7], {"density": 0.3, "seed": 99}),
]


@pytest.mark.parametrize(("method", "names", "weights", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                                            enumerate(CASES)])
def test_merge_matches_peft(tiny_llama_dir: Path, sources, tmp_path: Path, monkeypatch, method, names, weights,
                            kwargs) -> None:
    spec = MergeSpec(method=method, weights=tuple(weights), density=kwargs.get("density"),
                     target_rank=kwargs.get("svd_rank"), seed=kwargs.get("seed"))
    ours, merged = our_deltas(tiny_llama_dir, sources, names, spec, tmp_path)
    theirs = peft_merged_deltas(tiny_llama_dir, sources, names, weights, method, monkeypatch, **dict(kwargs))
    assert ours.keys() == theirs.keys()  # the union of the sources' targets
    for key in theirs:
        assert theirs[key].abs().max() > 0, key
        torch.testing.assert_close(ours[key], theirs[key], atol=2e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")
    expected_rank = {"cat": sum(SOURCES[n][0] for n in names), "svd": kwargs.get("svd_rank") or
                     max(SOURCES[n][0] for n in names)}.get(method, 4)
    assert merged.rank == expected_rank


def test_dare_depends_on_the_seed(tiny_llama_dir: Path, sources, tmp_path: Path) -> None:
    """Guards the exact-seed comparison above: a different seed gives different masks."""
    spec = MergeSpec(method="dare_linear", density=0.5, seed=1)
    one, _ = our_deltas(tiny_llama_dir, sources, ["a", "b"], spec, tmp_path / "1")
    two, _ = our_deltas(tiny_llama_dir, sources, ["a", "b"], MergeSpec("dare_linear", density=0.5, seed=2),
                        tmp_path / "2")
    same, _ = our_deltas(tiny_llama_dir, sources, ["a", "b"], spec, tmp_path / "3")
    key = next(iter(one))
    assert not torch.equal(one[key], two[key]) and torch.equal(one[key], same[key])


@pytest.mark.parametrize(("names", "spec", "words"), [
    (["a", "d"], MergeSpec("linear"), "equal rank"),
    (["a", "b"], MergeSpec("ties"), "density"),
    (["a", "b"], MergeSpec("dare_ties", density=1.5), "density"),
    (["a", "b"], MergeSpec("average"), "unknown"),
    (["a", "b"], MergeSpec("linear", weights=(1.0,)), "one weight per source"),
    (["a", "b"], MergeSpec("svd", target_rank=0), "target_rank"),
    ([], MergeSpec("linear"), "at least one"),
])
def test_bad_merges_are_refused(tiny_llama_dir: Path, sources, names, spec, words) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    with pytest.raises(AdapterRejected, match=words):
        merge_lora([read_adapter(sources[n], args, AdapterLimits(64, 16)) for n in names], spec)
