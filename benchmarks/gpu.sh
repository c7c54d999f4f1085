#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one script: the extraction engine on CUDA (cli.py bench: nvJPEG
# decoding end to end -- the default on CUDA -- against the Pillow decode processes in the same run, the engine
# from predecoded images, first-batch and shutdown seconds, NaN/Inf rows) and torch-logreg on CUDA against
# scikit-learn on the same machine's CPU cores (cli.py bench-heads), and one fine-tuning run (cli.py finetune: the
# last block of lite0 on the digits, bf16 autocast) for its seconds on a GPU.
#
#   OUT=gpu-results bash benchmarks/gpu.sh
#
# Needs this repo's dependencies importable by $PYTHON (default python3) and a CUDA GPU.
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, sklearn, timm, numpy; print('torch', torch.__version__, 'sklearn', sklearn.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-420}" $PY cli.py bench --num-images "${NUM_IMAGES:-20000}" --decode "${DECODE:-auto}" --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log"
timeout "${HEADS_TIMEOUT:-240}" $PY cli.py bench-heads --no-compare --json "$OUT/bench-heads-gpu.json" 2>&1 | tee "$OUT/bench-heads-gpu.log"
timeout "${FINETUNE_TIMEOUT:-180}" $PY cli.py finetune builtin:digits --weights "${FT_WEIGHTS:-packaged}" --train-blocks 1 \
  --epochs 3 --augment none --device cuda --out "$OUT/finetune-1" -q 2>&1 | tee "$OUT/finetune-gpu.log"
