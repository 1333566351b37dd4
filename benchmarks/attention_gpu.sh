#!/bin/bash
# Attention on the GPU: probe PyTorch's cuDNN/FA2 ops, run the GPU tests, run the kernel benchmark.
# Usage (device machine, repo root):  bash benchmarks/attention_gpu.sh [probe] [tests] [bench]
# (no argument: all three). Writes under $OUT (default /tmp/attn_gpu):
#   probe.json          what cudnn / torch_flash do vs the reference (benchmarks/attention_probe.py)
#   gpu_tests.log       pytest tests/test_attention_gpu.py (PYTEST_K="cudnn or torch_flash" selects; summary at the end)
#   kernels_h100.json   flashlm bench kernels (table in kernels.log)
set -u
OUT=${OUT:-/tmp/attn_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-probe tests bench}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
for step in $steps; do
  case $step in
    probe) timeout 90 python benchmarks/attention_probe.py "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log" ;;
    tests) timeout ${TESTS_TIMEOUT:-280} python -m pytest -q --no-header -p no:cacheprovider tests/test_attention_gpu.py -rs ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 \
             | tail -n 80 | tee "$OUT/gpu_tests.log" ;;
    bench) timeout 200 python -m flashlm.bench.kernels --json "$OUT/kernels_h100.json" 2>&1 | tee "$OUT/kernels.log" ;;
  esac
done
