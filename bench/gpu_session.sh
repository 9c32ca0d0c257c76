#!/usr/bin/env bash
# One call on a lent GPU machine (no network there: nothing is installed, the image's
# torch/triton/pybind11/pytest/cupy are used): build the extensions in place (CUDA sources
# included), run the GPU tests and the kernel benchmarks, and leave logs + JSON under $OUT.
#   bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/brorl-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
$PY -m engine.info --json > "$OUT/info.json" 2>&1
# the real Triton compiler, not the interpreter that tests/conftest.py picks by default
TRITON_INTERPRET=0 $PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
  tests/kernels tests/csrc tests/engine tests/trainer/test_weight_sync.py \
  > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu-tests.log"
$PY bench/kernels.py > "$OUT/kernels.log" 2>&1
$PY bench/kernels_sampling.py > "$OUT/kernels-sampling.log" 2>&1
cp bench/results/kernels-*.json "$OUT/" 2>/dev/null
# the N=512 over N=16 claim where the paper makes it: Qwen2-0.5B shapes, bf16, on the GPU
timeout 300 $PY bench/throughput.py --device cuda --model qwen2-0.5b --dtype bfloat16 \
  --ns 16 128 512 --repeats 2 --out "$OUT/throughput-gpu.json" > "$OUT/throughput.log" 2>&1
echo "throughput rc=$?" >> "$OUT/throughput.log"
# the embedded trainer on CUDA: the shipped demo, two RL steps
timeout 300 $PY -m trainer.cli train steps=2 eval.every=0 output_dir="$OUT/demo-gpu" \
  > "$OUT/demo-gpu.log" 2>&1
echo "demo rc=$?" >> "$OUT/demo-gpu.log"
# N=512 over N=16 on the demo's trained policy (cached by the demo above), merging on/off
timeout 180 $PY bench/large_n_trained.py --device cuda --repeats 2 \
  --out "$OUT/large-n-trained-gpu.json" > "$OUT/large-n-trained.log" 2>&1
echo "large-n-trained rc=$?" >> "$OUT/large-n-trained.log"
tail -n 3 "$OUT"/*.log
