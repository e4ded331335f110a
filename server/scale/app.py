"""The Ray Serve application: Ingress -> EngineReplica x N.

`serve run server/scale/serve_config.yaml` (or `serve deploy` to a running cluster) imports
`server.scale.app:build_app` and passes the YAML's `args` (ScaleSettings fields); `python -m server serve-ray`
builds the same application from its flags.
"""

from __future__ import annotations

from ray.serve import Application

from server.scale.ingress import Ingress
from server.scale.replica import engine_deployment
from server.scale.settings import ScaleSettings


def build(settings: ScaleSettings) -> Application:
    replica = engine_deployment(settings)
    return Ingress.bind(replica.bind(settings), settings)


def build_app(args: dict) -> Application:
    """The application builder `serve run` / `serve deploy` call with the config's `args`."""
    return build(ScaleSettings.from_args(args))
