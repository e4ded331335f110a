"""In-context learning vs parameter-efficient tuning on a shipped task, with the default model.

    .venv/bin/python -m bench.methods [--task topic] [--methods lora qlora prompt p_tuning prefix ia3 dora bitfit
                                      bottleneck longlora]
                                      [--k 4] [--orderings 4] [--threads 1] [--out bench/RESULTS.md]

One table: zero-shot (dense and NF4 base), few-shot in context with k examples (random selection per
row; nearest-neighbour selection by cosine of the base model's mean-pooled input embeddings; one fixed
random set under several orderings: min / mean / max), and each tuning method trained with its default
settings (exact-match on the held-out split, trainable parameters, adapter file size, training time).
For every tuned adapter it also serves the test prompts through our engine and counts how many greedy
completions equal PEFT's (for bitfit / bottleneck, which PEFT cannot load: the trained model's). Results are
cached per row in --cache (JSON) so a rerun skips finished rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from server.model.checkpoint import resolve_model_dir
from server.trainer.base import load_base, load_tokenizer
from server.trainer.config import TrainConfig
from server.trainer.data import Example
from server.trainer.evaluate import engine_greedy, evaluate, max_new_tokens_for
from server.trainer.loop import load_splits, train
from server.trainer.methods import method_names


def shot_ids(e: Example, eos_id: int, sep: list[int]) -> list[int]:
    """An in-context example: its prompt, its completion without EOS, then the separator."""
    completion = [t for t in e.completion_ids if t != eos_id]
    return [*e.prompt_ids, *completion, *sep]


def few_shot_prompts(test: list[Example], shots: list[list[Example]], eos_id: int, sep: list[int]) -> list[list[int]]:
    return [[t for s in row_shots for t in shot_ids(s, eos_id, sep)] + list(e.prompt_ids)
            for e, row_shots in zip(test, shots, strict=True)]


@torch.no_grad()
def mean_embeddings(model, examples: list[Example]) -> torch.Tensor:
    """[n, hidden] unit-norm mean of the base model's input embeddings over each prompt."""
    table = model.get_input_embeddings().weight
    vecs = torch.stack([table[list(e.prompt_ids)].float().mean(0) for e in examples])
    return torch.nn.functional.normalize(vecs, dim=-1)


def run_in_context(base, tokenizer, train_rows: list[Example], test: list[Example], k: int, orderings: int,
                   seed: int) -> dict[str, dict]:
    eos, sep = tokenizer.eos_token_id, tokenizer.encode("\n\n", add_special_tokens=False)
    rng = random.Random(seed)
    rows: dict[str, dict] = {}

    def score(name: str, shots: list[list[Example]]) -> float:
        t0 = time.perf_counter()
        prompts = few_shot_prompts(test, shots, eos, sep)
        em = evaluate(base, tokenizer, test, prompts=prompts, with_loss=False).exact_match
        print(f"  {name}: exact-match {em:.1%} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return em

    rows["random"] = {"exact_match": score(f"{k}-shot random", [rng.sample(train_rows, k) for _ in test])}
    sims = mean_embeddings(base, test) @ mean_embeddings(base, train_rows).T  # [test, train]
    nearest = [[train_rows[j] for j in reversed(sims[i].topk(k).indices.tolist())] for i in range(len(test))]
    rows["nearest"] = {"exact_match": score(f"{k}-shot nearest (most similar last)", nearest)}
    fixed = rng.sample(train_rows, k)
    scores = []
    for o in range(orderings):
        order = fixed[:]
        random.Random(seed + 1 + o).shuffle(order)
        scores.append(score(f"{k}-shot fixed set, ordering {o + 1}", [order] * len(test)))
    rows["orderings"] = {"min": min(scores), "mean": sum(scores) / len(scores), "max": max(scores), "all": scores}
    return rows


def run_method(method: str, args, work: Path) -> dict:
    cfg = TrainConfig(method=method, output_dir=work / method, task=args.task, n_train=args.n_train,
                      n_test=args.n_test, seed=args.seed, save_every=0, progress=not args.no_progress)
    result = train(cfg, overwrite=True)
    tokenizer = load_tokenizer(resolve_model_dir(None))
    _, test = load_splits(cfg, tokenizer)
    served = engine_greedy(cfg.output_dir, [e.prompt_ids for e in test], max_new_tokens_for(test), model_path=None,
                           quantize=method == "qlora")
    same = sum(a == b for a, b in zip(served, result.eval.token_ids, strict=True))
    print(f"  {result.summary_line()}\n  engine == PEFT greedy on {same}/{len(test)} test prompts", flush=True)
    return {"exact_match": result.eval.exact_match, "eval_loss": result.eval.loss,
            "trainable_params": result.trainable_params, "adapter_bytes": result.adapter_bytes,
            "train_seconds": result.train_seconds, "steps": result.steps, "lr": cfg.resolved("lr"),
            "embed_norm_lr": cfg.resolved("embed_norm_lr"),
            "batch_size": cfg.resolved("batch_size"), "engine_equal": same, "rows": len(test),
            "first_loss": result.losses[0], "final_loss": sum(result.losses[-5:]) / len(result.losses[-5:])}


def table(res: dict, args) -> str:
    k, n = args.k, args.n_test
    lines = ["| setup | exact-match | trainable params | adapter file | training time | engine == PEFT greedy |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("zero_shot", "zero-shot, fp32 base"), ("zero_shot_nf4", "zero-shot, NF4 base")):
        if key in res:
            lines.append(f"| {label} | {res[key]['exact_match']:.1%} | 0 | - | - | - |")
    icl = res.get("in_context", {})
    if "random" in icl:
        lines.append(f"| {k}-shot in context, random examples per row | {icl['random']['exact_match']:.1%} "
                     "| 0 | - | - | - |")
    if "nearest" in icl:
        lines.append(f"| {k}-shot in context, nearest-neighbour examples | {icl['nearest']['exact_match']:.1%} "
                     "| 0 | - | - | - |")
    if "orderings" in icl:
        o = icl["orderings"]
        lines.append(f"| {k}-shot in context, one fixed set, {len(o['all'])} orderings (min / mean / max) | "
                     f"{o['min']:.1%} / {o['mean']:.1%} / {o['max']:.1%} | 0 | - | - | - |")
    for method in method_names():
        r = res.get("methods", {}).get(method)
        if r:
            saved_lr = f", embeddings and norms lr {r['embed_norm_lr']:g}" if r.get("embed_norm_lr") else ""
            setup = f"{method} ({r['steps']} steps x {r['batch_size']}, lr {r['lr']:g}{saved_lr})"
            lines.append(f"| {setup} | {r['exact_match']:.1%} | {r['trainable_params']:,} "
                         f"| {r['adapter_bytes'] / 1e3:,.0f} kB | {r['train_seconds']:.0f} s "
                         f"| {r['engine_equal']}/{r['rows']} |")
    return "\n".join(lines) + f"\n\n({n} held-out rows of task `{args.task}`; training rows: {args.n_train})\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="topic")
    p.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-test", type=int, default=48)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--orderings", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-in-context", action="store_true")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/switchboard-bench-methods"))
    p.add_argument("--cache", type=Path, default=None, help="JSON of finished rows (default: work-dir/results.json)")
    p.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.work_dir / "results.json"
    res = json.loads(cache.read_text()) if cache.is_file() else {}

    def save() -> None:
        cache.write_text(json.dumps(res, indent=1))

    model_dir = resolve_model_dir(None)
    tokenizer = load_tokenizer(model_dir)
    probe = TrainConfig(method="lora", output_dir=args.work_dir, task=args.task, n_train=args.n_train,
                        n_test=args.n_test, seed=args.seed)
    train_data, test = load_splits(probe, tokenizer)
    started = time.perf_counter()
    for key, quantized in (("zero_shot", False), ("zero_shot_nf4", True)):
        if key not in res:
            base = load_base(model_dir, quantized=quantized)
            res[key] = {"exact_match": evaluate(base, tokenizer, test, with_loss=False).exact_match}
            print(f"{key}: {res[key]['exact_match']:.1%}", flush=True)
            save()
    if not args.skip_in_context and "in_context" not in res:
        base = load_base(model_dir, quantized=False)
        res["in_context"] = run_in_context(base, tokenizer, train_data.examples, test, args.k, args.orderings,
                                           args.seed)
        save()
    for method in args.methods:
        if method not in res.setdefault("methods", {}):
            print(f"training {method} ...", flush=True)
            res["methods"][method] = run_method(method, args, args.work_dir)
            save()
    out = table(res, args)
    print(out)
    print(f"(bench wall time this run: {time.perf_counter() - started:.0f}s)")
    if args.out:
        cmd = "python -m bench.methods " + " ".join(sys.argv[1:] if argv is None else argv)
        header = (f"\n## Adapter methods vs in-context learning (issue 6), {dt.date.today()}, "
                  f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), cores shared with other jobs\n\n"
                  f"`.venv/bin/python {cmd}`\n\n")
        with args.out.open("a") as f:
            f.write(header + out)


if __name__ == "__main__":
    main()
