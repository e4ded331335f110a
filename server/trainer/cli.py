"""`python -m server.trainer` / `python -m server train`: train a PEFT adapter the server can serve.

Examples:
  python -m server.trainer --method lora --task topic --output-dir adapters/topic-lora
  python -m server train --method prompt --data rows.jsonl --eval-data held_out.jsonl --output-dir out/p
  python -m server.trainer --write-task dates --output-dir data/   # the shipped task as JSONL files
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from server.config import ConfigError
from server.trainer.methods import method_names
from server.trainer.tasks import TASKS


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=method_names(), help="what to train")
    p.add_argument("--output-dir", type=Path, required=True, help="the PEFT adapter dir (+ checkpoints/)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", choices=list(TASKS), help="a shipped task (its train and test splits)")
    src.add_argument("--data", type=Path, help='JSONL rows: {"prompt","completion"} or {"messages":[...]}')
    src.add_argument("--write-task", choices=list(TASKS), help="write the task's splits as JSONL and exit")
    p.add_argument("--eval-data", type=Path, help="held-out JSONL (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, help="optimisation steps (default per method)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate (default per method)")
    p.add_argument("--embed-norm-lr", type=float,
                   help="longlora: learning rate of the trained embeddings and norms (default per method)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=128, help="rows longer than this (tokens) are rejected")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--targets", nargs="+", help="LoRA / IA3 target modules")
    p.add_argument("--virtual-tokens", type=int, help="prompt / P-tuning / prefix virtual tokens")
    p.add_argument("--encoder-hidden", type=int, help="P-tuning prompt encoder width")
    p.add_argument("--bottleneck", choices=["houlsby", "pfeiffer"], default="pfeiffer",
                   help="bottleneck variant: houlsby (after attention and feed-forward) or pfeiffer (feed-forward)")
    p.add_argument("--reduction-factor", type=float, default=16.0, help="bottleneck size = hidden / this")
    p.add_argument("--non-linearity", choices=["relu", "gelu", "silu"], help="bottleneck activation")
    p.add_argument("--rope-factor", type=float, default=2.0, help="longlora: RoPE linear interpolation factor")
    p.add_argument("--no-s2-attn", action="store_true",
                   help="longlora: full attention while training (default: S2-Attn, groups of --max-length / 4)")
    p.add_argument("--n-train", type=int, default=256, help="shipped task: training rows")
    p.add_argument("--n-test", type=int, default=48, help="shipped task: held-out rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (0: never)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints in --output-dir and start over")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--upload", metavar="TARGET", help="upload the adapter to a running server (host:port)")
    p.add_argument("--api-key", default=None, help="API key for --upload")
    p.add_argument("--name", default=None, help="adapter name for --upload (default: the output dir's name)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    from server.trainer.config import TrainConfig

    return TrainConfig(
        method=args.method, output_dir=args.output_dir, model=args.model, task=args.task, data=args.data,
        eval_data=args.eval_data, eval_fraction=args.eval_fraction, n_train=args.n_train, n_test=args.n_test,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, embed_norm_lr=args.embed_norm_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_length=args.max_length, rank=args.rank, alpha=args.alpha,
        targets=tuple(args.targets) if args.targets else None, virtual_tokens=args.virtual_tokens,
        encoder_hidden=args.encoder_hidden, bottleneck=args.bottleneck, reduction_factor=args.reduction_factor,
        non_linearity=args.non_linearity, rope_factor=args.rope_factor, s2_attn=not args.no_s2_attn, seed=args.seed,
        eval_every=args.eval_every, save_every=args.save_every,
        device=args.device, progress=not args.no_progress)


def upload(output_dir: Path, target: str, api_key: str | None, name: str):
    """Send the adapter's two PEFT files (not the checkpoints) to a running server."""
    from clients import SwitchboardClient  # the client library; only needed for --upload
    from server.trainer.loop import ADAPTER_FILES

    with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
        for f in ADAPTER_FILES[:3]:  # AdapterHub's adapter.safetensors travels under the upload's weights name
            if (output_dir / f).exists():
                shutil.copy2(output_dir / f, Path(tmp) / (ADAPTER_FILES[0] if f == ADAPTER_FILES[1] else f))
        with SwitchboardClient(target, api_key) as client:
            return client.upload_adapter(tmp, name=name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "bitsandbytes", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.write_task:
        from server.trainer.tasks import write_task

        for path in write_task(args.write_task, args.output_dir, n_train=args.n_train, n_test=args.n_test,
                               seed=args.seed):
            print(path)
        return 0
    if args.method is None:
        print("error: --method is required", file=sys.stderr)
        return 2
    from server.trainer.checkpoint import CheckpointMismatch
    from server.trainer.data import DataError
    from server.trainer.loop import train

    try:
        result = train(config_from_args(args), overwrite=args.overwrite)
    except (ConfigError, DataError, CheckpointMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for err in result.data_errors[:50]:
        print(f"skipped {err}", file=sys.stderr)
    print(result.summary_line())
    if args.upload:
        name = args.name or args.output_dir.name
        try:
            info = upload(args.output_dir, args.upload, args.api_key, name)
        except Exception as exc:  # noqa: BLE001 - any client failure: the adapter stays on disk; say why
            print(f"error: upload of {args.output_dir} to {args.upload} failed: {exc}", file=sys.stderr)
            return 1
        print(f"uploaded {info.name} version {info.version} to {args.upload} ({info.size_bytes:,} bytes)")
    return 0
