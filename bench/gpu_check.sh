#!/usr/bin/env bash
# On a CUDA GPU machine (e.g. the device tool's lent H200), <= 8 minutes: install the tensorrt
# extra, print bench/gpu_check.py's table (label throughput of the full-size teachers at random
# weights over fp16/bf16 and batch sizes; student TensorRT FP16 and INT8 engines at 640: build
# time, latency, agreement with ONNX Runtime FP32; one fine-tuning step of each teacher), then
# run the GPU-only tests (TensorRT engine build from the QDQ ONNX, manifest, load).
#   bash bench/gpu_check.sh
# Without CUDA, gpu_check.py prints one line and the GPU tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export FIFTYONE_DO_NOT_TRACK=true RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; }
if .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  .venv/bin/pip install -q -e '.[tensorrt]'
  .venv/bin/python -c "import torch, tensorrt; print('GPU', torch.cuda.get_device_name(0), 'TensorRT', tensorrt.__version__)"
fi
status=0
.venv/bin/python bench/gpu_check.py "$@" || status=$?
.venv/bin/python -m pytest -q -p no:warnings -m gpu tests/export || status=$?
exit $status
