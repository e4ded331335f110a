"""DoRA, BitFit, bottleneck and LongLoRA adapters through the API of a real server: uploaded, served by name
(greedy tokens equal to each kind's oracle), hot-swapped to a new version under the same name, and refused cleanly when
malformed (3+ bad files per kind, each with INVALID_ARGUMENT, or FAILED_PRECONDITION for a file made for another
base, and a message naming the problem)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.errors import FailedPrecondition, InvalidArgument, SwitchboardError
from server.config import AdapterPoolConfig
from tests.kinds_adapters import (
    PFEIFFER,
    bitfit_logits,
    bottleneck_logits,
    make_bitfit_adapter,
    make_dora_adapter,
    write_bottleneck_adapter,
)
from tests.longlora_adapters import longlora_logits, make_longlora_adapter
from tests.peft_adapters import ALL_PROJ, peft_logits
from tests.server_utils import running_server

IDS = [11, 402, 13, 9000, 15, 7]
NEW = 6


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path):
    with running_server(tiny_llama_dir, tenants=["acme"], pool_cfg=AdapterPoolConfig(device_slots=3,
                        max_lora_rank=16)) as srv:
        yield srv


def uploadable(src: Path, dst: Path) -> Path:
    """The upload's two files: AdapterHub's adapter.safetensors travels as adapter_model.safetensors."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "adapter_config.json", dst / "adapter_config.json")
    weights = src / "adapter_model.safetensors"
    shutil.copy2(weights if weights.exists() else src / "adapter.safetensors", dst / "adapter_model.safetensors")
    return dst


def oracle_greedy(model_dir: Path, kind: str, adapter: Path) -> list[int]:
    from tests.test_model_parity import hf_model

    base = hf_model(model_dir, False)
    ids = list(IDS)
    for _ in range(NEW):
        if kind == "dora":
            logits = peft_logits(model_dir, adapter, ids, base=base)
        elif kind == "bitfit":
            logits = bitfit_logits(base, adapter, ids)
        elif kind == "longlora":
            logits = longlora_logits(base, adapter, ids)
        else:
            logits = bottleneck_logits(base, adapter, ids)
        ids.append(int(logits[-1].argmax()))
    return ids[len(IDS):]


def make(kind: str, model_dir: Path, out: Path, seed: int) -> Path:
    if kind == "dora":
        return make_dora_adapter(model_dir, out, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=seed)
    if kind == "bitfit":
        return make_bitfit_adapter(model_dir, out, targets=ALL_PROJ, seed=seed)
    if kind == "longlora":
        return make_longlora_adapter(model_dir, out, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=seed,
                                     factor=2.0)
    return write_bottleneck_adapter(model_dir, out, PFEIFFER, seed=seed)


@pytest.mark.parametrize("kind", ["dora", "bitfit", "bottleneck", "longlora"])
def test_uploaded_served_by_name_and_hot_swapped(server, tiny_llama_dir: Path, tmp_path: Path, kind: str) -> None:
    v1 = make(kind, tiny_llama_dir, tmp_path / "v1", seed=61)
    v2 = make(kind, tiny_llama_dir, tmp_path / "v2", seed=62)
    want1, want2 = oracle_greedy(tiny_llama_dir, kind, v1), oracle_greedy(tiny_llama_dir, kind, v2)
    assert want1 != want2, "the two versions must differ for the swap to show"
    with server.client("acme") as acme:
        info = acme.upload_adapter(uploadable(v1, tmp_path / "up1"), f"{kind}-x")
        kinds = {"dora": "DORA", "bitfit": "BITFIT", "bottleneck": "BOTTLENECK", "longlora": "LONGLORA"}
        assert info.kind == kinds[kind]
        got = acme.generate(token_ids=IDS, adapter=f"{kind}-x", max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == want1 and got.adapter_version == 1
        base = acme.generate(token_ids=IDS, max_new_tokens=NEW, ignore_eos=True)
        assert base.token_ids != want1
        acme.upload_adapter(uploadable(v2, tmp_path / "up2"), f"{kind}-x")  # hot swap: a new version, same name
        got = acme.generate(token_ids=IDS, adapter=f"{kind}-x", max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == want2 and got.adapter_version == 2
        acme.delete_adapter(f"{kind}-x")


def _bad(src: Path, dst: Path, *, cfg=None, top=None, edit=None) -> Path:
    dst = uploadable(src, dst)
    full = json.loads((dst / "adapter_config.json").read_text())
    if cfg:
        full["config"].update(cfg)
    full.update(top or {})
    (dst / "adapter_config.json").write_text(json.dumps(full))
    if edit:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _drop(fragment: str):
    def edit(t: dict) -> None:
        for k in [k for k in t if fragment in k]:
            t.pop(k)
    return edit


def _set(key: str, value: torch.Tensor):
    return lambda t: t.__setitem__(key, value)


BAD = {
    "dora": [({"edit": _drop("lora_magnitude_vector")}, "lora_magnitude_vector tensors are missing"),
             ({"top": {"fan_in_fan_out": True}}, "fan_in_fan_out"),
             ({"edit": _set("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                            torch.ones(65))}, "features; the base has")],
    "bitfit": [({"edit": _set("model.layers.0.self_attn.q_proj.bias", torch.ones(63))}, "features; the base has"),
               ({"top": {"target_modules": ["q_proj"]}}, "do not match"),
               ({"edit": _set("model.layers.0.self_attn.rotary.bias", torch.ones(64))}, "unknown target module")],
    "bottleneck": [({"cfg": {"ln_after": True}}, "ln_after=True is not served"),
                   ({"cfg": {"non_linearity": "tanh"}}, "non_linearity 'tanh' is not served"),
                   ({"edit": _drop("adapter_up.bias")}, "lacks adapter_up.bias"),
                   ({"top": {"hidden_size": 128}}, "hidden size 128")],
    "longlora": [({"top": {"modules_to_save": ["embed_tokens", "lm_head"]}}, "lm_head"),
                 ({"top": {"rope_scaling": {"rope_type": "yarn", "factor": 2}}}, "only 'linear'"),
                 ({"top": {"rope_scaling": {"rope_type": "linear", "factor": 0.25}}}, "must be >= 1"),
                 ({"edit": _set("base_model.model.model.norm.weight", torch.ones(65))}, "the base's hidden size"),
                 ({"edit": _set("base_model.model.model.embed_tokens.weight", torch.ones(100, 64))},
                  "the base's table")],
}


# BaseModelMismatch: made for another base
MISMATCH = ("features; the base has", "hidden size 128", "the base's hidden size", "the base's table")


@pytest.mark.parametrize("kind", list(BAD))
def test_malformed_uploads_are_refused(server, tiny_llama_dir: Path, tmp_path: Path, kind: str) -> None:
    good = make(kind, tiny_llama_dir, tmp_path / "good", seed=63)
    with server.client("acme") as acme:
        before = [a.name for a in acme.list_adapters()]
        for i, (change, words) in enumerate(BAD[kind]):
            status = FailedPrecondition if words in MISMATCH else InvalidArgument
            bad = _bad(good, tmp_path / f"bad{i}", **change)
            with pytest.raises(SwitchboardError) as exc:
                acme.upload_adapter(bad, f"bad-{kind}-{i}")
            assert isinstance(exc.value, status), f"{kind} {i}: {exc.value!r}"
            assert words in str(exc.value), f"{kind} {i}: {exc.value}"
        assert [a.name for a in acme.list_adapters()] == before
        assert acme.generate(token_ids=IDS, max_new_tokens=2).token_ids  # still serving


def test_an_adapterhub_directory_uploads_under_its_own_weights_name(server, tiny_llama_dir: Path,
                                                                     tmp_path: Path) -> None:
    """AdapterHub saves adapter.safetensors: the client sends it as it is and the server accepts that name."""
    made = write_bottleneck_adapter(tiny_llama_dir, tmp_path / "hub", PFEIFFER, seed=64)
    assert (made / "adapter.safetensors").is_file() and not (made / "adapter_model.safetensors").exists()
    with server.client("acme") as acme:
        info = acme.upload_adapter(made, "hub-named")
        assert info.kind == "BOTTLENECK"
        got = acme.generate(token_ids=IDS, adapter="hub-named", max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == oracle_greedy(tiny_llama_dir, "bottleneck", made)
        acme.delete_adapter("hub-named")


def test_a_tar_with_both_weights_names_or_a_pickled_hub_file_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    from server.adapters.upload import UploadRefused, extract_adapter_tar

    def tar_with(names: list[str]) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tar:
            for name in names:
                data = b"{}" if name.endswith(".json") else b"x" * 8
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    for names, words in (
        (["adapter_config.json", "adapter_model.safetensors", "adapter.safetensors"], "one weights file"),
        (["adapter_config.json", "pytorch_adapter.bin"], "pickled pytorch_adapter.bin"),
        (["adapter_config.json"], "lacks adapter_model.safetensors or adapter.safetensors"),
    ):
        with pytest.raises(UploadRefused, match=words):
            extract_adapter_tar(tar_with(names), tmp_path / f"out-{len(names)}-{words[:4]}", max_bytes=1 << 20)
    out = extract_adapter_tar(tar_with(["adapter_config.json", "adapter.safetensors"]), tmp_path / "ok",
                              max_bytes=1 << 20)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
