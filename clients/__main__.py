"""`python -m clients {generate,stream,health,adapters,usage,reload-tenants} ...`: the command line.

Target and key: --target HOST:PORT (env SWITCHBOARD_TARGET, default 127.0.0.1:50051) and --api-key KEY
(env SWITCHBOARD_API_KEY). Exit status: 0 ok, 1 the server refused (its status and message on stderr),
2 bad usage; `health` exits 0 only when SERVING. `python -m clients load-test --help`: the load-test harness.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from clients.errors import SwitchboardError
from clients.sync import SwitchboardClient


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    parser.add_argument("--target", default=d(os.environ.get("SWITCHBOARD_TARGET", "127.0.0.1:50051")))
    parser.add_argument("--api-key", default=d(os.environ.get("SWITCHBOARD_API_KEY")))
    parser.add_argument("--timeout", type=float, default=d(None), help="deadline of each call, seconds")


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message (chat template applied) or, with --raw, the raw prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--system", default=None, help="a system message (chat mode)")
    p.add_argument("--adapter", default="")
    p.add_argument("--compose", action="append", default=None, metavar="NAME=WEIGHT",
                   help="a part of a composition of LoRA adapters (repeatable; WEIGHT defaults to 1)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--logit-bias", action="append", default=None, metavar="TOKEN=BIAS",
                   help="add BIAS to token id TOKEN's logit (repeatable)")
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--logprobs", action="store_true", help="return the tokens' logprobs (with --json)")
    p.add_argument("--top-logprobs", type=int, default=None)
    p.add_argument("--request-id", default="")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    g = p.add_mutually_exclusive_group()  # structured output: at most one
    g.add_argument("--json-schema", default=None, metavar="SCHEMA", help="output valid for this JSON schema "
                   "(JSON text, or @FILE)")
    g.add_argument("--json-object", action="store_true", help="output is a JSON object")
    g.add_argument("--regex", default=None, help="the whole output matches this regex")
    g.add_argument("--choice", action="append", default=None, help="output is one of these strings (repeatable)")
    g.add_argument("--grammar", default=None, metavar="GRAMMAR", help="a Lark or GBNF grammar (text, or @FILE)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("generate", "generate a completion"), ("stream", "stream a completion as it is made")):
        p = sub.add_parser(name, help=help_)
        _common(p, defaults=False)
        _generation_args(p)
    p = sub.add_parser("health", help="grpc.health.v1 status (exit 0 when SERVING)")
    _common(p, defaults=False)
    adapters = sub.add_parser("adapters", help="manage adapters").add_subparsers(dest="action", required=True)
    p = adapters.add_parser("list")
    _common(p, defaults=False)
    p.add_argument("--tenant", default="")
    for action in ("get", "delete"):
        p = adapters.add_parser(action)
        _common(p, defaults=False)
        p.add_argument("name")
        p.add_argument("--tenant", default="")
    p = adapters.add_parser("upload", help="upload a PEFT directory or a .tar (a new version if the name exists)")
    _common(p, defaults=False)
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--tenant", default="")
    p.add_argument("--shared", action="store_true")
    p = adapters.add_parser("merge", help="merge LoRA adapters into a new one")
    _common(p, defaults=False)
    p.add_argument("name")
    p.add_argument("--sources", nargs="+", required=True)
    p.add_argument("--method", default="linear", choices=["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"])
    p.add_argument("--weights", nargs="+", type=float, default=None)
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--target-rank", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--shared", action="store_true")
    p.add_argument("--tenant", default="")
    p = sub.add_parser("usage", help="tokens and requests per tenant, adapter and minute (admin: every tenant)")
    _common(p, defaults=False)
    p.add_argument("--tenant", default="")
    p.add_argument("--from", dest="start", type=float, default=0, help="unix seconds (default: the beginning)")
    p.add_argument("--to", dest="end", type=float, default=0, help="unix seconds, exclusive (default: now)")
    p.add_argument("--json", action="store_true", help="every row as JSON (default: a table and the totals)")
    p = sub.add_parser("reload-tenants", help="admin: the server re-reads its tenants file")
    _common(p, defaults=False)
    return parser.parse_args(argv)


def _part(text: str) -> tuple[str, float]:
    """--compose NAME=WEIGHT (or NAME: weight 1)."""
    name, _, weight = text.rpartition("=") if "=" in text else (text, "", "1")
    try:
        return name, float(weight)
    except ValueError:
        raise SystemExit(f"--compose {text!r}: the weight after '=' must be a number") from None


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                  request_id=args.request_id, min_p=args.min_p, presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                  logit_bias=_logit_bias(args.logit_bias), min_tokens=args.min_tokens, logprobs=args.logprobs,
                  top_logprobs=args.top_logprobs, json_schema=_text_or_file(args.json_schema),
                  json_object=args.json_object, regex=args.regex, choice=args.choice,
                  grammar=_text_or_file(args.grammar))
    if args.compose:
        kwargs["adapters"] = [_part(p) for p in args.compose]
    if args.raw:
        return dict(prompt=args.prompt, **kwargs)
    chat = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    return dict(messages=chat, **kwargs)


def _text_or_file(value: str | None) -> str | None:
    """The argument's text, or the contents of FILE for "@FILE"."""
    if value is None or not value.startswith("@"):
        return value
    with open(value[1:], encoding="utf-8") as f:
        return f.read()


def _logit_bias(items: list[str] | None) -> dict[int, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(token)] = float(bias)
        except ValueError:
            raise ValueError(f"--logit-bias takes TOKEN=BIAS (a token id and a number), got {item!r}") from None
    return out


def _print_json(obj) -> None:
    print(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, indent=2))


def _print_usage(report) -> None:
    import time

    print(f"{'minute (UTC)':17} {'tenant':16} {'adapter':28} {'prompt':>9} {'(cached)':>9} {'completion':>10} "
          f"{'requests':>8}")
    for r in report.rows:
        minute = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.minute))
        print(f"{minute:17} {r.tenant:16} {r.adapter or '(base)':28} {r.prompt_tokens:9d} {r.cached_prompt_tokens:9d} "
              f"{r.completion_tokens:10d} {r.requests:8d}")
    print(f"{'total':63} {report.prompt_tokens:9d} {report.cached_prompt_tokens:9d} {report.completion_tokens:10d} "
          f"{report.requests:8d}")


def run(args: argparse.Namespace, client: SwitchboardClient) -> int:
    if args.command == "health":
        status = client.health()
        print(status)
        return 0 if status == "SERVING" else 1
    if args.command == "generate":
        result = client.generate(**_generation_kwargs(args))
        if args.json:
            _print_json(result)
        else:
            print(result.text)
            print(f"[{result.finish_reason}; {result.prompt_tokens} prompt + {result.completion_tokens} generated "
                  f"tokens; ttft {result.ttft_ms:.0f} ms, total {result.total_ms:.0f} ms]", file=sys.stderr)
        return 0
    if args.command == "stream":
        for chunk in client.stream(**_generation_kwargs(args)):
            if args.json:
                print(json.dumps(dataclasses.asdict(chunk)))
            else:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finished:
                    sys.stdout.write("\n")
                    print(f"[{chunk.finish_reason}; {chunk.completion_tokens} tokens; ttft {chunk.ttft_ms:.0f} ms, "
                          f"total {chunk.total_ms:.0f} ms]", file=sys.stderr)
        return 0
    if args.command == "usage":
        report = client.get_usage(args.tenant, int(args.start), int(args.end))
        if args.json:
            _print_json(report)
        else:
            _print_usage(report)
        return 0
    if args.command == "reload-tenants":
        print("tenants in force: " + ", ".join(client.reload_tenants()))
        return 0
    action = args.action
    if action == "list":
        _print_json([dataclasses.asdict(a) for a in client.list_adapters(args.tenant)])
    elif action == "get":
        _print_json(client.get_adapter(args.name, args.tenant))
    elif action == "delete":
        client.delete_adapter(args.name, args.tenant)
        print(f"deleted {args.name}", file=sys.stderr)
    elif action == "upload":
        _print_json(client.upload_adapter(args.path, args.name, tenant=args.tenant, shared=args.shared))
    elif action == "merge":
        _print_json(client.merge_adapters(
            args.name, args.sources, method=args.method, weights=args.weights, density=args.density,
            target_rank=args.target_rank, seed=args.seed, shared=args.shared, tenant=args.tenant))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load-test"]:  # the load-test harness (bench/load_test.py; run from the checkout)
        from bench.load_test import main as load_test_main

        return load_test_main(argv[1:])
    args = parse_args(argv)
    try:
        with SwitchboardClient(args.target, api_key=args.api_key, timeout=args.timeout) as client:
            return run(args, client)
    except SwitchboardError as exc:
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
