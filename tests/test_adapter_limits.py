"""AdapterLimits: one object built from the pool config, every limit with its serve flag, and the same object
reaching the pool's tables and the readers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.adapters.pool import AdapterPool
from server.config import AdapterLimits, AdapterPoolConfig, ConfigError
from server.model.args import ModelArgs
from server.serve_cli import configs, parse_args

# a value other than the default for each field (a new field needs one here: the test says so)
NON_DEFAULT = {"max_lora_rank": 12, "max_virtual_tokens": 7, "max_bottleneck_size": 24, "lora_dtype": "bfloat16"}


def test_every_limit_has_a_serve_flag_that_reaches_the_pool_limits() -> None:
    names = [f.name for f in dataclasses.fields(AdapterLimits)]
    assert sorted(names) == sorted(NON_DEFAULT), "give the new AdapterLimits field a value in NON_DEFAULT"
    argv = [a for name, value in NON_DEFAULT.items() for a in ("--" + name.replace("_", "-"), str(value))]
    _, _, pool, _ = configs(parse_args(argv))
    assert pool.limits == AdapterLimits(**NON_DEFAULT)
    assert configs(parse_args([]))[2].limits == AdapterLimits()


def test_pool_config_is_the_limits_plus_residency() -> None:
    cfg = AdapterPoolConfig(device_slots=3, host_cache_bytes=1 << 20, **NON_DEFAULT)
    assert type(cfg.limits) is AdapterLimits and cfg.limits == AdapterLimits(**NON_DEFAULT)
    assert dataclasses.replace(cfg, device_slots=1).limits == cfg.limits
    for bad, message in (({"max_lora_rank": 0}, "max_lora_rank must be in"),
                         ({"max_virtual_tokens": 0}, "max_virtual_tokens must be > 0"),
                         ({"max_bottleneck_size": 9000}, "max_bottleneck_size must be in"),
                         ({"lora_dtype": "fp8"}, "lora_dtype must be one of")):
        with pytest.raises(ConfigError, match=message):
            AdapterLimits(**bad)
        with pytest.raises(ConfigError, match=message):
            AdapterPoolConfig(**bad)
    with pytest.raises(ConfigError, match="device_slots must be > 0"):
        AdapterPoolConfig(device_slots=0)


def test_the_pool_sizes_every_kind_s_tables_by_its_one_limits_object(tiny_llama_dir) -> None:
    cfg = AdapterPoolConfig(device_slots=2, max_lora_rank=4, max_bottleneck_size=8, lora_dtype="bfloat16")
    pool = AdapterPool(cfg, ModelArgs.from_dir(tiny_llama_dir), torch.float32, "cpu")
    assert pool.limits == cfg.limits
    lora, bottleneck = pool.tables.by_kind["LORA"], pool.tables.by_kind["BOTTLENECK"]
    assert (lora.max_rank, lora.dtype) == (4, torch.bfloat16)
    assert bottleneck.max_size == 8


def test_serve_ray_takes_the_same_limit_flags_to_each_replica_pool() -> None:
    from server.scale.cli import parse_args as ray_args
    from server.scale.cli import settings_of
    from server.scale.settings import ScaleSettings

    argv = [a for name, value in NON_DEFAULT.items() for a in ("--" + name.replace("_", "-"), str(value))]
    settings = settings_of(ray_args(argv))
    assert settings.pool_config().limits == AdapterLimits(**NON_DEFAULT)
    assert settings.pool_config().device_slots == settings.adapters_per_replica
    assert ScaleSettings.from_args({"max_bottleneck_size": 32}).pool_config().max_bottleneck_size == 32
    with pytest.raises(ConfigError, match="max_virtual_tokens must be > 0"):
        ScaleSettings.from_args({"max_virtual_tokens": 0})
