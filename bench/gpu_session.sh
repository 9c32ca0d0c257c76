#!/usr/bin/env bash
# The one call on a lent GPU machine. Prepare it here first with `bash bench/gpu_prep.sh`,
# then: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560).
# That machine has no network: nothing is fetched, the image's torch/triton/transformers/
# pybind11/pytest/cupy are used, and .gpu/ brings the rest (the demo's packages and its
# warm-started policy). Steps run in order of value, each under its own cap and all under
# one deadline (BUDGET_S, default 500 s, inside the call's limit), so a slow step costs the
# steps after it, never the results before it. Logs and JSON land under $OUT; the last
# lines printed are a table of the steps and the key figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/brorl-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-500}
# brorl.engine / brorl.kernels / brorl.trainer straight from this tree, without installing
# it (the image's setuptools may not do an editable install without the network): a
# `brorl` folder of links to the three top-level folders (bench/ imports from $PWD)
mkdir -p /tmp/brorl-src/brorl
for top in engine kernels trainer; do ln -sfn "$PWD/$top" "/tmp/brorl-src/brorl/$top"; done
export PYTHONPATH=/tmp/brorl-src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STEPS="$OUT/steps.txt"
: > "$STEPS"

# step NAME CAP_S CMD...: runs CMD with its output in $OUT/NAME.log, under the smaller of
# CAP_S and the time left; records rc and seconds (rc 124: stopped at its cap)
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((BUDGET_S - SECONDS))
  if ((left < 20)); then
    printf '%-16s skipped (budget: %d s left)\n' "$name" "$left" | tee -a "$STEPS"
    return
  fi
  ((cap > left)) && cap=$left
  local t0=$SECONDS
  # through bash, so that CMD may be a function of this script (exported with export -f)
  timeout --kill-after=10 "$cap" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-3d %4d s (cap %d s)\n' "$name" "$rc" $((SECONDS - t0)) "$cap" |
    tee -a "$STEPS"
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv || return 1
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" || return 1
  if [ -d .gpu/whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .gpu/whl/*.whl || return 1
    # pycosat (a C extension, imported by reasoning-gym) has no wheel for Python 3.12:
    # built here; if it cannot be, a module that refuses every call lets reasoning-gym
    # import (only its SAT-based puzzles use pycosat; the demo's chain_sum does not)
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target /tmp/site .gpu/sdist/pycosat-*.tar.gz ||
      printf '%s\n' 'def solve(*a, **k):' \
        '    raise RuntimeError("pycosat could not be built on this machine")' \
        'itersolve = solve' > /tmp/site/pycosat.py
  fi
  if [ -d .gpu/demo ]; then
    mkdir -p ~/.cache/brorl/demo && cp -r .gpu/demo/. ~/.cache/brorl/demo/
  fi
  $PY -c "import reasoning_gym, math_verify; print('demo packages import')"
}

export -f setup
export PY PYTHONPATH=/tmp/site:$PYTHONPATH
step setup 60 setup
step build 150 $PY setup.py build_ext --inplace -j 8
$PY -m brorl.engine.info --json > "$OUT/info.json" 2> "$OUT/info.log"
TIMEOUT_FLAG=()
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG=(--timeout=90)
# the real Triton compiler, not the interpreter that tests/conftest.py picks by default
TRITON_INTERPRET=0 step gpu-tests 180 $PY -m pytest -q -m gpu -p no:cacheprovider -rfEs \
  --continue-on-collection-errors --durations=15 "${TIMEOUT_FLAG[@]}" \
  tests/kernels tests/csrc tests/engine tests/trainer/test_weight_sync.py
step kernels 100 $PY bench/kernels_triton.py
step kernels-sampling 50 $PY bench/kernels_sampling.py
cp bench/results/kernels-*.json "$OUT/" 2>/dev/null
# the N=512 over N=16 claim where the paper makes it: Qwen2-0.5B shapes, bf16, on the GPU
step throughput 120 $PY bench/throughput.py --device cuda --model qwen2-0.5b \
  --dtype bfloat16 --ns 16 128 512 --hf-ns 16 512 --repeats 2 \
  --out "$OUT/throughput-gpu.json"
# the embedded trainer on CUDA: the shipped demo (warm start carried in .gpu/demo), 2 steps
step demo 90 $PY -m brorl.trainer.cli train steps=2 eval.every=0 progress=false \
  output_dir="$OUT/demo-gpu"
# N=512 over N=16 on the demo's trained policy, merging on and off
step large-n 60 $PY bench/large_n_trained.py --device cuda --repeats 1 --total 4096 \
  --out "$OUT/large-n-trained-gpu.json"
# the engine's behaviour logprobs (Triton, bf16 and float32) against the trainer's
step mismatch 40 $PY bench/logprob_mismatch.py --device cuda \
  --out "$OUT/logprob-mismatch-gpu.json"

echo "== tails"
for f in gpu-tests kernels kernels-sampling throughput demo large-n mismatch; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f"; tail -n 8 "$OUT/$f.log" | cut -c1-240; }
done
echo "== steps ($SECONDS s in all)"
cat "$STEPS"
