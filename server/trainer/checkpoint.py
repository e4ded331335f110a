"""Training checkpoints under `<output_dir>/checkpoints/step-NNNNNN/state.pt`, written atomically.

A checkpoint holds every trainable tensor (P-tuning's prompt encoder included, which the final PEFT file
does not keep), the optimizer state, the torch RNG state, the step and the loss history. A rerun with the
same settings resumes from the newest one; only the newest is kept.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.fsutil import atomic_dir

STATE_FILE = "state.pt"


class CheckpointMismatch(RuntimeError):
    """The checkpoint was made with other settings or data; resuming from it would mix two runs."""


@dataclass
class TrainState:
    step: int
    fingerprint: str
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    rng: torch.Tensor
    history: list[dict] = field(default_factory=list)  # {"step", "loss"} and eval records


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: Path, state: TrainState) -> Path:
    root = checkpoint_root(output_dir)
    target = root / f"step-{state.step:06d}"
    with atomic_dir(target) as tmp:
        torch.save({"step": state.step, "fingerprint": state.fingerprint, "trainable": state.trainable,
                    "optimizer": state.optimizer, "rng": state.rng, "history": state.history}, tmp / STATE_FILE)
    for older in root.glob("step-*"):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(p for p in checkpoint_root(output_dir).glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, fingerprint: str) -> TrainState:
    raw = torch.load(Path(path) / STATE_FILE, weights_only=True, map_location="cpu")
    if raw["fingerprint"] != fingerprint:
        raise CheckpointMismatch(
            f"{path} was trained with other settings or data (fingerprint {raw['fingerprint']} != {fingerprint}); "
            "use another --output-dir, or --overwrite to start over")
    return TrainState(raw["step"], raw["fingerprint"], raw["trainable"], raw["optimizer"], raw["rng"], raw["history"])


def clear_checkpoints(output_dir: Path) -> None:
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)
