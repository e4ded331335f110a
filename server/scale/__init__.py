"""Scale-out on Ray Serve: replicas of the engine with adapter-affinity routing (`python -m server serve-ray`).

- settings.py: ScaleSettings, one dataclass for the whole application (CLI flags and the YAML's `args`).
- shared_store.py: read-only view of the adapter store that every replica shares (the data directory).
- replica.py: the engine deployment; adapters are multiplexed ids (pool keys `tenant/name@version`).
- replica_keys.py: which keys a replica keeps registered (Ray's LRU, requests in flight, loads in progress).
- remote_engine.py: the Engine interface the gRPC face uses, over the engine deployment (retries, cuts).
- ingress.py: the ingress deployment: the unchanged gRPC services (auth + adapter resolution once).
- app.py: the application builder (`serve run server/scale/serve_config.yaml`).
- affinity_sim.py: a simulation of multiplexed routing against random routing at scale.

Ray is imported only here (the `ray` dependency group); the single-process server never imports this package.
"""
