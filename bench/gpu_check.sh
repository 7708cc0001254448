#!/usr/bin/env bash
# On a CUDA GPU machine (e.g. the device tool's lent H200): install the tensorrt extra and
# run the GPU-only tests (TensorRT engine build from the QDQ ONNX, manifest, load).
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export FIFTYONE_DO_NOT_TRACK=true RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; }
.venv/bin/pip install -q -e '.[tensorrt]'
.venv/bin/python -c "import torch, tensorrt; print('GPU', torch.cuda.get_device_name(0), 'TensorRT', tensorrt.__version__)"
.venv/bin/python -m pytest -q -p no:warnings -m gpu tests/export
