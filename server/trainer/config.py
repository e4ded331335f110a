"""TrainConfig: one frozen, checked description of a training run (CLI flags -> this -> the loop)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from server.config import require
from server.trainer.methods import method_defaults

# settings that may change between a run and the rerun that resumes it (train longer, evaluate more often)
_RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "save_every", "progress", "eval_batch_size"})


@dataclass(frozen=True, slots=True)
class TrainConfig:
    method: str
    output_dir: Path
    model: str | None = None  # HF dir or .gguf; None = the embedded default model
    task: str | None = None  # a shipped task (server/trainer/tasks.py) instead of --data
    data: Path | None = None  # JSONL training rows
    eval_data: Path | None = None  # JSONL held-out rows; default: a split of --data (or the task's test split)
    eval_fraction: float = 0.1
    n_train: int = 256  # shipped task sizes
    n_test: int = 48
    steps: int | None = None  # None = the method's default
    batch_size: int | None = None
    lr: float | None = None
    embed_norm_lr: float | None = None  # PEFT modules_to_save (LongLoRA's embeddings and norms); None = the method's
    warmup_steps: int = 5  # linear warm-up, then constant (so a longer rerun resumes the same schedule)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 128
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    virtual_tokens: int | None = None
    encoder_hidden: int | None = None
    bottleneck: str = "pfeiffer"  # --method bottleneck: houlsby (after attention and feed-forward) | pfeiffer
    reduction_factor: float = 16.0  # bottleneck size = hidden // reduction_factor
    non_linearity: str | None = None  # relu | gelu | silu; None = the variant's (houlsby: swish, pfeiffer: relu)
    rope_factor: float = 2.0  # --method longlora: RoPE linear interpolation factor (context x this)
    s2_attn: bool = True  # --method longlora: shifted sparse attention while training
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 20  # checkpoint period in steps; 0 = only the final adapter
    eval_batch_size: int = 16
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        method_defaults(self.method)  # raises on unknown methods
        require((self.task is None) != (self.data is None), "give exactly one of --task or --data")
        require(0.0 < self.eval_fraction < 1.0, "eval_fraction must be in (0, 1)")
        for name in ("steps", "batch_size", "rank", "virtual_tokens", "encoder_hidden"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{name} must be > 0")
        require(self.lr is None or self.lr > 0, "lr must be > 0")
        require(self.embed_norm_lr is None or self.embed_norm_lr > 0, "embed_norm_lr must be > 0")
        require(self.max_length > 1, "max_length must be > 1")
        require(self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        require(self.bottleneck in ("houlsby", "pfeiffer"), "bottleneck must be houlsby or pfeiffer")
        require(self.reduction_factor > 0, "reduction_factor must be > 0")
        require(1.0 <= self.rope_factor <= 64.0, "rope_factor must be in [1, 64]")
        require(self.non_linearity in (None, "relu", "gelu", "silu"), "non_linearity must be relu, gelu or silu")

    def resolved(self, name: str):
        """The value in force: the flag when given, else the method's default."""
        value = getattr(self, name)
        return getattr(method_defaults(self.method), name) if value is None else value

    def fingerprint(self) -> str:
        """Identifies what a checkpoint was trained with; a rerun resumes only when this matches."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RESUMABLE_CHANGES}
        settings.update({n: self.resolved(n) for n in ("batch_size", "lr", "embed_norm_lr", "rank", "alpha",
                                                       "targets", "virtual_tokens", "encoder_hidden")})
        if settings["embed_norm_lr"] is None:  # methods without modules_to_save: checkpoints from before it resume
            del settings["embed_norm_lr"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))
