"""The trainer's optimiser groups: LongLoRA's embeddings and norms (PEFT modules_to_save) at --embed-norm-lr, its LoRA
at --lr, both warmed up in proportion; methods without saved modules keep one group."""

from __future__ import annotations

from pathlib import Path

import torch

from server.trainer.cli import config_from_args, parse_args
from server.trainer.config import TrainConfig
from server.trainer.loop import build_model
from server.trainer.methods import method_defaults
from server.trainer.optim import make_optimizer, set_warmup_lr


def _groups(cfg: TrainConfig, model_dir: Path) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    model = build_model(cfg, model_dir)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return make_optimizer(cfg, named), {id(p): n for n, p in named}


def test_longlora_embeddings_and_norms_get_their_own_learning_rate(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(method="longlora", output_dir=tmp_path, model=str(tiny_llama_dir), task="topic", lr=2e-3,
                      embed_norm_lr=3e-5, warmup_steps=4)
    opt, names = _groups(cfg, tiny_llama_dir)
    lora, saved = opt.param_groups
    assert (lora["lr"], saved["lr"]) == (2e-3, 3e-5)
    assert all("lora_" in names[id(p)] for p in lora["params"])
    saved_names = [names[id(p)] for p in saved["params"]]
    assert all("modules_to_save" in n for n in saved_names)
    for module in ("embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm"):
        assert any(module in n for n in saved_names), module
    set_warmup_lr(opt, 0, cfg.warmup_steps)
    assert (lora["lr"], saved["lr"]) == (2e-3 / 4, 3e-5 / 4)
    set_warmup_lr(opt, 10, cfg.warmup_steps)
    assert (lora["lr"], saved["lr"]) == (2e-3, 3e-5)


def test_embed_norm_lr_defaults_and_cli(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(method="longlora", output_dir=tmp_path, model=str(tiny_llama_dir), task="topic")
    opt, _ = _groups(cfg, tiny_llama_dir)
    defaults = method_defaults("longlora")
    assert [g["lr"] for g in opt.param_groups] == [defaults.lr, defaults.embed_norm_lr or defaults.lr]
    lora = TrainConfig(method="lora", output_dir=tmp_path / "l", model=str(tiny_llama_dir), task="topic")
    assert len(_groups(lora, tiny_llama_dir)[0].param_groups) == 1  # no saved modules: one group at --lr
    args = parse_args(["--method", "longlora", "--task", "topic", "--output-dir", str(tmp_path), "--embed-norm-lr",
                       "1e-6"])
    assert config_from_args(args).resolved("embed_norm_lr") == 1e-6
    assert cfg.fingerprint() != TrainConfig(method="longlora", output_dir=tmp_path, model=str(tiny_llama_dir),
                                            task="topic", embed_norm_lr=1e-6).fingerprint()
