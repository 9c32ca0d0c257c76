#!/usr/bin/env bash
# One call on a lent GPU machine: build the extensions (CUDA sources included), run the GPU
# tests and the kernel benchmarks, and leave logs + JSON under $OUT (default /tmp/brorl-gpu).
#   bash bench/gpu_session.sh
# The GPU machines bring their own CUDA torch; nothing here installs torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/brorl-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
# no build isolation: setup.py must see the CUDA torch to compile csrc/cuda
$PY -m pip install -q --no-build-isolation -e ".[test]" > "$OUT/install.log" 2>&1
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
$PY -m engine.info --json > "$OUT/info.json" 2>&1
TRITON_INTERPRET=0 $PY -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu-tests.log"
$PY bench/kernels.py > "$OUT/kernels.log" 2>&1
$PY bench/kernels_sampling.py > "$OUT/kernels-sampling.log" 2>&1
cp bench/results/kernels-*.json "$OUT/" 2>/dev/null
tail -n 3 "$OUT"/*.log
