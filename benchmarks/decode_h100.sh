#!/usr/bin/env bash
# Issue 7 (fast decode) on one H100: the CUDA tests of the decode area, then the decode benchmark.
#
#   OUT=/some/dir bash benchmarks/decode_h100.sh [tests] [bench]      # repo root, GPU machine; default both
#
# Writes under $OUT:
#   decode_tests.log    pytest -m cuda of tests/test_decode.py, tests/test_decode_compile.py, tests/test_generation.py,
#                       tests/test_flash_model.py (graph == eager greedy/sampled tokens at batch 1 and 4 left-padded,
#                       graph + torch.compile == eager tokens in fp32/bf16 at batch 1 and 3, no host sync in a
#                       replayed or eager decode step, FLASHLM_ATTN_CHECKS refusal)
#   decode_h100.json    flashlm bench decode: llama-1b bf16 random weights, batch 1/8/32 x context 128/2k/8k,
#                       flashlm-graph / flashlm-graph-inductor / flashlm-eager / hf-dynamic (+ hf-static-compile
#                       at 1x128), 64 new tokens; the inductor row compiles at each grid point (~0.5-1 min)
#   decode_h100.log     its stdout (table + the summary JSON as the last line)
# BENCH_ARGS overrides the bench flags (e.g. BENCH_ARGS="--contexts 128,2048 --batch-sizes 1,8" to cut it;
# "--hf-compile-configs all" compiles transformers at every point: ~1 min per point).
# Budget: tests ~2-4 min, bench ~10-14 min (cut the grid with BENCH_ARGS to stay shorter).
set -uo pipefail
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
steps=${*:-tests bench}
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
rc=0
for step in $steps; do
  case $step in
    tests)
      timeout "${TESTS_TIMEOUT:-400}" "$PY" -m pytest -q --no-header -p no:cacheprovider -m cuda -rs \
        tests/test_decode.py tests/test_decode_compile.py tests/test_generation.py tests/test_flash_model.py \
        2>&1 | tail -n 80 \
        | tee "$OUT/decode_tests.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    bench)
      # shellcheck disable=SC2086
      timeout "${BENCH_TIMEOUT:-900}" "$PY" -m flashlm.bench.decode ${BENCH_ARGS:---preset llama-1b --dtype bf16 \
        --batch-sizes 1,8,32 --contexts 128,2048,8192 --new-tokens 64 --repeats 2 --hf-compile-configs 1x128} \
        --output "$OUT/decode_h100.json" 2>&1 | tee "$OUT/decode_h100.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    *) echo "unknown step $step (tests | bench)"; rc=2 ;;
  esac
done
exit $rc
