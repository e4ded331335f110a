"""`python -m server generate --prompt TEXT`: a quick look at the engine without gRPC."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, InvalidRequest, SamplingParams


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server generate", description=__doc__)
    p.add_argument("--prompt", required=True, help="user message (sent through the chat template if the model has one)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory to apply")
    p.add_argument("--no-quantize", action="store_true", help="dense weights instead of NF4")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("server.model.loader").setLevel(logging.INFO)  # start-up prints the model's memory
    model_cfg = ModelConfig(path=args.model, quantize=not args.no_quantize, dtype=args.dtype)
    engine = Engine.create(model_cfg, EngineConfig())
    tok = engine.tokenizer
    if tok.chat_template and not args.raw:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tok.encode(args.prompt)
    adapter = None
    if args.adapter:
        from pathlib import Path

        adapter = "cli-adapter"
        engine.pool.register(adapter, Path(args.adapter))
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    engine.start()
    try:
        handle = engine.submit(GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling, adapter=adapter))
    except InvalidRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        engine.shutdown()
        return 2
    for event in handle:
        sys.stdout.write(event.text)
        sys.stdout.flush()
        if event.error:
            print(f"\nerror: {event.error}", file=sys.stderr)
    sys.stdout.write("\n")
    engine.shutdown()
    return 0
