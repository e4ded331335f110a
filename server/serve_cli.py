"""`python -m server serve`: the gRPC server (Inference + Admin + health + reflection), the OpenAI-compatible
HTTP API (--http-port, same engine, tenants and metrics) and /metrics, in one process.

SIGTERM / SIGINT: report NOT_SERVING, answer 503 to new HTTP requests, let in-flight requests finish for
--grace-period seconds (then cancel them), stop the engine, exit 0. SIGHUP: re-read the tenants file
(keys, weights, quotas; a broken file is refused with the reason on stderr and the old one stays).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from server.config import AdapterLimits, AdapterPoolConfig, ConfigError, EngineConfig, ModelConfig, ServerConfig
from server.http.connections import HttpLimits
from server.tenants import TenantsFileError

DEFAULT_HTTP_PORT = 8000
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = ServerConfig()
    e = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m server serve", description=__doc__)
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--host", default=d.host, help="address to bind; non-loopback needs --tenants")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                   help="OpenAI-compatible HTTP API port, on --host (0 = any free port)")
    p.add_argument("--no-http", action="store_true", help="do not serve the HTTP API")
    h = HttpLimits()
    p.add_argument("--http-max-connections", type=int, default=h.max_connections,
                   help="open HTTP connections at most; over it keyless ones make room and are refused")
    p.add_argument("--http-max-per-address", type=int, default=h.max_per_address,
                   help="open HTTP connections from one client address at most")
    p.add_argument("--http-header-timeout", type=float, default=h.header_timeout_s,
                   help="seconds a client has to send a request's headers")
    p.add_argument("--http-body-timeout", type=float, default=h.body_timeout_s,
                   help="seconds a client has to send a request's body once its headers are complete (408 after)")
    p.add_argument("--model-id", default=None,
                   help="the base model's id in the HTTP API (default: the model's directory/file name)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port (0 = any)")
    p.add_argument("--metrics-host", default=d.metrics_host,
                   help="address /metrics binds (default loopback: it names tenants and their adapters)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="the adapter store lives here")
    p.add_argument("--tenants", type=Path, default=None, help="tenants TOML file (API key hashes)")
    p.add_argument("--no-quantize", action="store_true", help="dense weights instead of NF4")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--max-running", type=int, default=e.max_running)
    p.add_argument("--max-waiting", type=int, default=e.max_waiting, help="bounded waiting queue")
    p.add_argument("--max-batch-tokens", type=int, default=e.max_batch_tokens)
    p.add_argument("--kv-blocks", type=int, default=e.kv_blocks)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--device-slots", type=int, default=AdapterPoolConfig().device_slots)
    add_limit_flags(p)
    p.add_argument("--per-tenant-concurrency", type=int, default=d.per_tenant_concurrency)
    p.add_argument("--grace-period", type=float, default=d.grace_period_s, help="seconds to drain on SIGTERM")
    p.add_argument("--scheduling", choices=["vtc", "fcfs"], default=None,
                   help="waiting-queue policy (default: vtc when the tenants file has more than one tenant)")
    p.add_argument("--w-in", type=float, default=e.w_in, help="VTC cost of a prompt token")
    p.add_argument("--w-out", type=float, default=e.w_out, help="VTC cost of a generated token")
    p.add_argument("--no-fair-preemption", action="store_true",
                   help="VTC without fair-share preemption: a tenant under its share waits for a free batch slot")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt in full (no reuse of cached KV blocks across requests)")
    p.add_argument("--prefix-cache-share-base", action="store_true",
                   help="share the base model's cached KV blocks across tenants (a cache hit's TTFT then tells a "
                        "tenant that another sent the same prompt); adapters' blocks stay per tenant")
    p.add_argument("--prefix-cache-share-adapters", action="store_true",
                   help="the same for adapters their owner shared with other tenants")
    p.add_argument("--max-adapters-per-request", type=int, default=e.max_adapters_per_request,
                   help="LoRA adapters one request may compose with weights (its `adapters` list)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """One flag per AdapterLimits field (--max-lora-rank, --max-virtual-tokens, --max-bottleneck-size, --lora-dtype),
    its default, help and choices taken from the field: a kind's new limit needs no edit here."""
    for f in dataclasses.fields(AdapterLimits):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, **f.metadata)


def limit_values(args: argparse.Namespace) -> dict[str, object]:
    """The AdapterLimits fields parsed by add_limit_flags, by field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AdapterLimits)}


def configs(args: argparse.Namespace) -> tuple[ModelConfig, EngineConfig, AdapterPoolConfig, ServerConfig]:
    model = ModelConfig(path=args.model, quantize=not args.no_quantize, dtype=args.dtype, device=args.device)
    engine = EngineConfig(max_running=args.max_running, max_waiting=args.max_waiting,
                          max_batch_tokens=args.max_batch_tokens, kv_blocks=args.kv_blocks,
                          max_model_len=args.max_model_len, scheduling=args.scheduling or "fcfs",
                          w_in=args.w_in, w_out=args.w_out, fair_preemption=not args.no_fair_preemption,
                          prefix_cache=not args.no_prefix_cache,
                          prefix_cache_share_base=args.prefix_cache_share_base,
                          prefix_cache_share_adapters=args.prefix_cache_share_adapters,
                          max_adapters_per_request=args.max_adapters_per_request)
    pool = AdapterPoolConfig(device_slots=args.device_slots, **limit_values(args))
    server = ServerConfig(host=args.host, port=args.port, metrics_port=None if args.no_metrics else args.metrics_port,
                          metrics_host=args.metrics_host, data_dir=args.data_dir, tenants_file=args.tenants,
                          per_tenant_concurrency=args.per_tenant_concurrency, grace_period_s=args.grace_period)
    return model, engine, pool, server


def default_scheduling(tenant_names: list[str]) -> str:
    """VTC as soon as there is more than one tenant to be fair between, else FCFS (the same order for one)."""
    return "vtc" if len(tenant_names) > 1 else "fcfs"


def model_id(args: argparse.Namespace) -> str:
    if args.model_id:
        return args.model_id
    return Path(args.model).stem if args.model else DEFAULT_MODEL_ID


def how_to_call(target: str, metrics_port: int | None, host: str, keyed: bool, http_url: str | None = None,
                model: str = DEFAULT_MODEL_ID) -> str:
    key = " --api-key $SWITCHBOARD_API_KEY" if keyed else ""
    api_key = "$SWITCHBOARD_API_KEY" if keyed else "none"
    lines = [
        f"Switchboard is serving on {target}" + (f"; OpenAI API at {http_url}/v1" if http_url else "")
        + (f"; metrics at http://{host}:{metrics_port}/metrics" if metrics_port is not None else ""),
        "Try:",
    ]
    if http_url:
        lines += [
            f"  # the openai client (pip install openai); `model` = {model!r}, 'base', or an adapter name",
            f"  .venv/bin/python -c \"from openai import OpenAI; c = OpenAI(base_url='{http_url}/v1', "
            f"api_key='{api_key}'); print(c.chat.completions.create(model='{model}', "
            "messages=[{'role': 'user', 'content': 'Name three colors.'}], max_tokens=32)"
            ".choices[0].message.content)\"",
            f"  curl -s {http_url}/v1/chat/completions -H 'Content-Type: application/json'"
            + (" -H \"Authorization: Bearer $SWITCHBOARD_API_KEY\"" if keyed else "")
            + f" -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
            "\"content\": \"Name three colors.\"}], \"max_tokens\": 32}'",
        ]
    lines += [
        f'  .venv/bin/python -m clients --target {target}{key} generate "Name three colors." --max-new-tokens 32',
        f'  .venv/bin/python -m clients --target {target}{key} stream "Write a haiku about a switchboard."',
        f"  .venv/bin/python -m clients --target {target} health",
        "Stop with Ctrl-C or SIGTERM (in-flight requests drain first).",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("server.model.loader").setLevel(logging.INFO)  # start-up prints the model's memory
    from kernels import KernelError
    from server.grpc_server import SwitchboardServer, load_tenants

    try:
        model_cfg, engine_cfg, pool_cfg, server_cfg = configs(args)
        tenants = load_tenants(server_cfg)  # before loading the model: a refused bind fails fast
        if args.scheduling is None:
            engine_cfg = dataclasses.replace(engine_cfg, scheduling=default_scheduling(tenants.tenants))
    except (ConfigError, TenantsFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    from server.model.checkpoint import ModelNotFound

    try:
        server = SwitchboardServer.create(model_cfg, engine_cfg, pool_cfg, server_cfg, tenants=tenants)
    except (ModelNotFound, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KernelError as exc:  # SWITCHBOARD_KERNELS=cpu without a C++ compiler, a kernel that does not compile
        print(f"error: {exc}", file=sys.stderr)
        return 1
    http = None
    try:
        server.start()
        if not args.no_http:
            from server.http.app import HttpServer

            http = HttpServer(server.engine, server.registry, server.tenants, server.limiter, server.metrics,
                              model_id(args), args.host, args.http_port, quotas=server.quotas, usage=server.usage,
                              limits=HttpLimits(max_connections=args.http_max_connections,
                                                max_per_address=args.http_max_per_address,
                                                header_timeout_s=args.http_header_timeout,
                                                body_timeout_s=args.http_body_timeout))
            http.start()
    except (OSError, ValueError) as exc:  # a port taken, an HttpLimits value out of range
        print(f"error: {exc}", file=sys.stderr)
        server.stop(0)
        return 1
    print(how_to_call(server.target, server.metrics_port, args.metrics_host, keyed=not tenants.open,
                      http_url=http.url if http else None, model=model_id(args)), flush=True)
    while not stop.wait(0.5):  # a timed wait so signal handlers run promptly
        if hup.is_set():
            hup.clear()
            try:
                names = server.reload_tenants()
                print(f"tenants file reloaded: {', '.join(names)}", flush=True)
            except TenantsFileError as exc:
                print(f"error: tenants file not reloaded, the old one stays in force: {exc}", file=sys.stderr,
                      flush=True)
    grace = server_cfg.grace_period_s
    print(f"shutting down: draining in-flight requests (up to {grace:g} s)", flush=True)
    started = time.monotonic()
    if http is not None:  # HTTP answers 503 from now on; its in-flight requests finish on the running engine
        http.begin_drain()
        http.wait_idle(grace)
    server.stop(max(0.0, grace - (time.monotonic() - started)))
    if http is not None:
        http.stop(0)
    print("stopped", flush=True)
    return 0
