"""The Serve config file and the settings it feeds (no Ray cluster: schema and field checks only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError
from server.scale.settings import ScaleSettings

CONFIG = Path(__file__).resolve().parents[1] / "server" / "scale" / "serve_config.yaml"


def test_serve_config_passes_rays_schema_and_our_settings():
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed (the `ray` group)")
    import yaml

    raw = yaml.safe_load(CONFIG.read_text())
    schema.ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    assert app["import_path"] == "server.scale.app:build_app"
    settings = ScaleSettings.from_args(app["args"])
    assert settings.replicas == 2 and settings.adapters_per_replica == 8
    assert settings.server_config().tenants_file is not None  # a public bind needs keys


def test_unknown_and_bad_settings_are_refused_with_their_names():
    with pytest.raises(ConfigError, match="replica_count"):
        ScaleSettings.from_args({"replica_count": 2})
    with pytest.raises(ConfigError, match="replicas must be >= 1"):
        ScaleSettings(replicas=0)
    with pytest.raises(ConfigError, match="adapters_per_replica"):
        ScaleSettings(adapters_per_replica=0)


def test_prefix_routing_settings():
    pytest.importorskip("ray.serve.config", reason="ray[serve] is not installed (the `ray` group)")
    with pytest.raises(ConfigError, match="routing_stats_period_s"):
        ScaleSettings(routing_stats_period_s=0)
    with pytest.raises(ConfigError, match="route_max_blocks"):
        ScaleSettings.from_args({"route_max_blocks": 0})
    assert ScaleSettings(prefix_routing=False).request_router_config() is None
    cfg = ScaleSettings(routing_stats_period_s=0.5, route_max_blocks=8).request_router_config()
    assert cfg.request_router_class == "server.scale.prefix_router.PrefixAwareRouter"
    assert cfg.request_routing_stats_period_s == 0.5
    assert cfg.request_router_kwargs == {"block_size": 16, "max_blocks": 8}
