"""The Switchboard application on a local Ray Serve for the scale-out benchmarks (bench/scale_out.py,
bench/scale_chats.py): Ray started with one CPU per replica (plus one), the app built on a temporary data
directory, the adapters uploaded as a0, a1, ...; yields a client; Serve and Ray are shut down however it ends."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def ray_switchboard(model_dir: Path, replicas: int, slots: int, quantize: bool, adapter_dirs: list[Path],
                    **settings) -> Iterator[object]:
    """A SwitchboardClient of a running app of `replicas` engine replicas; `settings`: more ScaleSettings fields."""
    import ray
    from ray import serve

    from clients import SwitchboardClient
    from server.scale.app import build
    from server.scale.settings import ScaleSettings
    from tests.scale_utils import APP, free_port

    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=replicas + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="scale-") as data:
        config = ScaleSettings(model=str(model_dir), quantize=quantize, replicas=replicas,
                               adapters_per_replica=slots, data_dir=data, port=port, metrics_port=None, **settings)
        try:
            serve.start(proxy_location="Disabled")
            serve.run(build(config), name=APP, route_prefix=None)
            client = SwitchboardClient(f"127.0.0.1:{port}", timeout=600)
            for i, path in enumerate(adapter_dirs):
                client.upload_adapter(path, f"a{i}")
            try:
                yield client
            finally:
                client.close()
        finally:
            serve.shutdown()
            ray.shutdown()
