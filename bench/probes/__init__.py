"""One-off A/B probes behind design choices recorded in bench/history/ (attention routes, the NF4 kernel vs
bitsandbytes, pointwise passes, long prompts on CPU, gRPC overhead). Run as `python -m bench.probes.<name>`."""
