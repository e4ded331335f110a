"""ScaleSettings: everything the Ray Serve application needs, from CLI flags or the Serve config's `args`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from server.config import AdapterLimits, AdapterPoolConfig, ConfigError, EngineConfig, ModelConfig, ServerConfig


@dataclass(frozen=True, slots=True)
class ScaleSettings(AdapterLimits):
    """The AdapterLimits fields (max_lora_rank, ...: each replica's pool holds adapters to them) and the rest."""

    model: str | None = None  # HF directory or .gguf (None: the embedded default model)
    quantize: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    replicas: int = 2
    num_cpus_per_replica: float = 1.0
    torch_threads: int = 1  # per replica
    adapters_per_replica: int = 8  # the multiplexed LRU size; also the replica pool's device slots
    max_running: int = 64
    max_waiting: int = 256
    kv_blocks: int = 2048
    max_model_len: int | None = None
    data_dir: str = "data"  # shared by every replica (one machine) or a shared filesystem (cluster)
    host: str = "127.0.0.1"
    port: int = 50051  # the ingress's gRPC port
    http_port: int | None = None  # the ingress's OpenAI-compatible HTTP API (None: not served)
    model_id: str = "SmolLM2-135M-Instruct"  # the base model's id in the HTTP API
    metrics_port: int | None = 9090  # the ingress's /metrics (per-replica figures: Ray's metrics export)
    tenants: str | None = None  # tenants TOML file
    affinity: bool = True  # False: Ray's default routing (no multiplexed id), for comparisons
    retries: int = 4  # re-submissions of a request that had produced no token when its replica failed
    prefix_routing: bool = True  # prefer the replica holding the longest cached prefix (server.scale.prefix_router)
    routing_stats_period_s: float = 2.0  # how often each replica exports its prefix summary to the routers
    route_max_blocks: int = 64  # blocks of a prompt the routing keys cover (from its start)
    extra: dict = field(default_factory=dict)  # ServerConfig overrides (e.g. per_tenant_concurrency)

    def __post_init__(self) -> None:
        AdapterLimits.__post_init__(self)
        if self.replicas < 1:
            raise ConfigError("replicas must be >= 1")
        if self.adapters_per_replica < 1:
            raise ConfigError("adapters_per_replica must be >= 1")
        if self.routing_stats_period_s <= 0 or self.route_max_blocks < 1:
            raise ConfigError("routing_stats_period_s must be > 0 and route_max_blocks >= 1")
        if self.num_cpus_per_replica <= 0 or self.torch_threads < 1:
            raise ConfigError("num_cpus_per_replica must be > 0 and torch_threads >= 1")

    @classmethod
    def from_args(cls, args: dict | None) -> ScaleSettings:
        """From the Serve config's `args` mapping; unknown keys are refused with their names."""
        args = dict(args or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(f"unknown serve-ray settings: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**args)

    def model_config(self) -> ModelConfig:
        return ModelConfig(path=self.model, quantize=self.quantize, dtype=self.dtype, device=self.device)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_running=self.max_running, max_waiting=self.max_waiting, kv_blocks=self.kv_blocks,
                            max_model_len=self.max_model_len)

    def request_router_config(self):
        """Ray Serve's RequestRouterConfig for the engine deployment: prefix-aware, or None (Ray's default)."""
        if not self.prefix_routing:
            return None
        from ray.serve.config import RequestRouterConfig

        from server.scale.prefix_router import PrefixAwareRouter

        return RequestRouterConfig(
            request_router_class=PrefixAwareRouter, request_routing_stats_period_s=self.routing_stats_period_s,
            request_router_kwargs={"block_size": self.engine_config().kv_block_size,
                                   "max_blocks": self.route_max_blocks})

    def pool_config(self) -> AdapterPoolConfig:
        limits = {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterLimits)}
        return AdapterPoolConfig(device_slots=self.adapters_per_replica, **limits)

    def server_config(self) -> ServerConfig:
        return ServerConfig(host=self.host, port=self.port, metrics_port=self.metrics_port,
                            data_dir=Path(self.data_dir), tenants_file=Path(self.tenants) if self.tenants else None,
                            **self.extra)
