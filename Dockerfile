# Switchboard server image. The install is the README's: `make install` (pins in pyproject.toml).
#
#   CPU (default):  docker build -t switchboard .
#   CUDA:           docker build -t switchboard:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg PYTHON=python3 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   Run:            docker run -p 50051:50051 -p 9090:9090 -v $PWD/tenants.toml:/config/tenants.toml:ro \
#                     -v switchboard-data:/data switchboard
#                   (`python -m server.tenants new admin acme` writes a tenants file and prints the keys)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# the interpreter `make install` builds the venv with (3.11+)
ARG PYTHON=python3
# where pip finds torch: the CPU wheels by default (PyPI's Linux torch wheels carry CUDA libraries)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    SWITCHBOARD_CACHE=/home/switchboard/.cache/switchboard \
    DEBIAN_FRONTEND=noninteractive

RUN apt-get update \
    && apt-get install -y --no-install-recommends make ca-certificates g++ \
    && if ! command -v "${PYTHON}" >/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-venv python3-pip; fi \
    && "${PYTHON}" -c "import sys, venv; assert sys.version_info >= (3, 11), sys.version" \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 switchboard \
    && mkdir -p /app /data /config \
    && chown switchboard:switchboard /app /data /config
WORKDIR /app
COPY --chown=switchboard:switchboard . .
USER switchboard

RUN make install PYTHON="${PYTHON}" \
    # convert the embedded default model (GGUF -> safetensors cache) now, so containers start in seconds
    && .venv/bin/python -c "from server.model.checkpoint import resolve_model_dir; print(resolve_model_dir(None))"

VOLUME ["/data"]
EXPOSE 50051 8000 9090

# grpc.health.v1 through the client CLI (needs no API key); exit 0 only when SERVING
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-m", "clients", "--target", "127.0.0.1:50051", "--timeout", "5", "health"]

# a non-loopback bind needs a tenants file (mount one at /config/tenants.toml); /metrics is published on 9090
# for the operator's scraper (do not expose it publicly: it names tenants); SIGTERM drains in-flight requests
# (8 s grace: inside `docker stop`'s default 10 s)
STOPSIGNAL SIGTERM
CMD ["/app/.venv/bin/python", "-m", "server", "serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", \
     "--metrics-port", "9090", "--metrics-host", "0.0.0.0", \
     "--data-dir", "/data", "--tenants", "/config/tenants.toml", "--grace-period", "8"]
