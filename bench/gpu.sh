#!/usr/bin/env bash
# The GPU checks, as one short run (well under 10 minutes on one GPU): (a) the trainer on
# CIFAR-shaped random data (resnet32x4 teacher, batch 64, bf16 autocast, channels_last) against a
# plain PyTorch loop of the same model; (b) a lockstep audit of 8 resnet8x4 students; (c) `cmim serve`
# on its embedded default running a small job whose epoch events name the device; (d) an owner's ONNX
# model served through onnxruntime (which provider, rows/s against PyTorch).
# Each part prints its numbers and one JSON line; results go to docs/performance.md.
# With --small every part runs at tiny sizes, which is how the script itself is checked on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$PY" bench/gpu.py trainer "$@"
"$PY" bench/gpu.py lockstep "$@"
"$PY" bench/gpu.py onnx
"$PY" bench/gpu.py serve
