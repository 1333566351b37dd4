#!/usr/bin/env bash
# Issue 17 session 3 (FA4 not carried; Liger carried as .whl): the CUDA tests of the decode path, the
# decode profile, the llama-1b decode grid. From the repo root on the GPU machine:
#   OUT=... bash benchmarks/h200_decode.sh
source benchmarks/gpu_env.sh
git log -1 --format='commit %h %s' 2>/dev/null || true
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TESTS_TIMEOUT:-200}" python -m pytest -n 8 -q -m cuda -p no:cacheprovider --no-header -rfE \
    tests/test_decode.py tests/test_generation.py tests/test_sampling.py tests/ops tests/test_decode_compile.py \
    tests/test_flash_model.py tests/test_flash_fused.py tests/test_triton.py > $OUT/gpu_tests_decode.log 2>&1
  echo "pytest rc=$?"; tail -n 25 $OUT/gpu_tests_decode.log
fi
timeout 90 python benchmarks/profile_decode.py --preset llama-1b --points "${PROFILE_POINTS:-1x128,32x128}" \
  --out $OUT 2>&1 | grep -v Warn | tail -n 30
timeout "${DECODE_TIMEOUT:-300}" python -m flashlm.bench.decode --preset llama-1b --dtype bf16 \
  --batch-sizes "${DECODE_BATCHES:-1,8,32}" --contexts "${DECODE_CONTEXTS:-128,2048,8192}" \
  --models "${DECODE_MODELS:-flashlm-graph,flashlm-graph-inductor,hf-static-compile}" --hf-compile-configs 1x128 \
  --new-tokens 32 --repeats 3 --output $OUT/decode_grid_h200.json 2>&1 | tail -n 40
