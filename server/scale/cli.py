"""`python -m server serve-ray --replicas N ...`: the Ray Serve application on a local Ray instance (or a running
cluster with --address), the same gRPC API as `python -m server serve` on --port.

Ctrl-C / SIGTERM shuts the application down. For `serve run` / `serve deploy`: server/scale/serve_config.yaml.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from server.config import ConfigError
from server.scale.settings import ScaleSettings
from server.serve_cli import add_limit_flags, limit_values

APP = "switchboard"


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = ScaleSettings()
    p = argparse.ArgumentParser(prog="python -m server serve-ray", description=__doc__)
    p.add_argument("--replicas", type=int, default=d.replicas, help="engine replicas (each owns one Engine)")
    p.add_argument("--num-cpus-per-replica", type=float, default=d.num_cpus_per_replica)
    p.add_argument("--torch-threads", type=int, default=d.torch_threads, help="torch threads per replica")
    p.add_argument("--adapters-per-replica", type=int, default=d.adapters_per_replica,
                   help="multiplexed LRU size (and device slots) per replica")
    p.add_argument("--address", default=None, help="a running Ray cluster (e.g. auto); default: start one here")
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="the ingress's gRPC port")
    p.add_argument("--http-port", type=int, default=None, help="the OpenAI-compatible HTTP API (default: off)")
    p.add_argument("--model-id", default=None, help="the base model's id in the HTTP API")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--data-dir", type=Path, default=Path(d.data_dir), help="the shared adapter store")
    p.add_argument("--tenants", type=Path, default=None)
    p.add_argument("--max-running", type=int, default=d.max_running)
    p.add_argument("--max-waiting", type=int, default=d.max_waiting)
    p.add_argument("--kv-blocks", type=int, default=d.kv_blocks)
    add_limit_flags(p)  # --max-lora-rank, --max-virtual-tokens, ...: each replica's adapter limits
    p.add_argument("--no-affinity", action="store_true", help="Ray's default routing (for comparisons)")
    p.add_argument("--ray-metrics-port", type=int, default=None,
                   help="Ray's Prometheus export on this node (the replicas' switchboard_replica_* counters)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> ScaleSettings:
    return ScaleSettings(
        model=args.model, quantize=not args.no_quantize, dtype=args.dtype, device=args.device,
        replicas=args.replicas, num_cpus_per_replica=args.num_cpus_per_replica, torch_threads=args.torch_threads,
        adapters_per_replica=args.adapters_per_replica, max_running=args.max_running, max_waiting=args.max_waiting,
        kv_blocks=args.kv_blocks, data_dir=str(args.data_dir.resolve()), host=args.host, port=args.port,
        http_port=args.http_port,
        model_id=args.model_id or (Path(args.model).stem if args.model else ScaleSettings().model_id),
        metrics_port=None if args.no_metrics else args.metrics_port,
        tenants=str(args.tenants.resolve()) if args.tenants else None, affinity=not args.no_affinity,
        **limit_values(args))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = settings_of(args)
        settings.server_config()  # refuse bad ports etc. before starting Ray
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: ray[serve] is not installed: pip install --group ray", file=sys.stderr)
        return 2
    from server.scale.app import build

    root = str(Path(__file__).resolve().parents[2])
    local = {} if args.address or args.ray_metrics_port is None else {"_metrics_export_port": args.ray_metrics_port}
    ray.init(address=args.address, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": str(settings.torch_threads)}}, **local)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build(settings), name=APP, route_prefix=None)
        target = f"{settings.host}:{settings.port}"
        print(f"Switchboard on Ray Serve: {settings.replicas} engine replicas, gRPC ingress on {target}\n"
              f"  .venv/bin/python -m clients --target {target} generate \"Name three colors.\"\n"
              f"  .venv/bin/python -m clients --target {target} health\n"
              "Per-replica state: `serve status`; Ctrl-C or SIGTERM stops.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("shutting down", flush=True)
        serve.shutdown()  # stops every replica (the ingress drains nothing: in-flight streams are cut)
        ray.shutdown()
    return 0
