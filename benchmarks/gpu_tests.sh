#!/usr/bin/env bash
# Every CUDA test of the suite, then the attention kernel benchmark, on the GPU machine (repo root).
# Writes $OUT/gpu_tests.log (pytest summary) and $OUT/kernels_h100.json (+ kernels.log).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:?set OUT}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())"
timeout "${TESTS_TIMEOUT:-360}" python -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE tests/ 2>&1 \
  | tee "$OUT/gpu_tests_full.log" | tail -n 60 > "$OUT/gpu_tests.log"
cat "$OUT/gpu_tests.log"
if [ "${RUN_KERNELS:-1}" = 1 ]; then
  timeout "${KERNELS_TIMEOUT:-200}" python -m flashlm.bench.kernels --json "$OUT/kernels_h100.json" 2>&1 | tee "$OUT/kernels.log" | tail -n 60
fi
