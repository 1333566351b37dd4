#!/usr/bin/env bash
# Second GPU call of a session (FA4 not carried, Liger carried as .whl): the CUDA tests of the new
# fused ops / loss / optimizer and the flash model, the optimizer timing, the seed profile (speed and
# peak memory per model/mode/case) and the decode profile. OUT=... bash benchmarks/h200_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT}"
site=/tmp/site
mkdir -p $site
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl
export PYTHONPATH="$site:$PWD/src"
git log -1 --format='commit %h %s' 2>/dev/null || true
shopt -s nullglob
tests=(tests/ops tests/test_loss*.py tests/test_optim*.py tests/test_flash_model.py tests/test_flash_fused.py \
  tests/test_decode.py tests/test_decode_compile.py tests/test_generation.py tests/test_train.py)
timeout "${TESTS_TIMEOUT:-150}" python -m pytest -n 8 -q -m cuda -p no:cacheprovider --no-header -rfE "${tests[@]}" \
  > $OUT/gpu_tests_check.log 2>&1
echo "pytest rc=$?"; tail -n 25 $OUT/gpu_tests_check.log
timeout 40 python benchmarks/optim_bench.py 2>&1 | tee $OUT/optim_bench.txt
timeout 90 python benchmarks/profile_steps.py --preset small --batch 2 --seqlen 256 --out $OUT 2>&1 | grep -v Warn | tail -n 9
timeout 70 python benchmarks/profile_decode.py --preset llama-1b --points 1x128,32x128 --out $OUT 2>&1 | grep -v Warn | tail -n 30
# the eager decode step (no CUDA graph) of the seed config: flash vs default (issue 17: >= 1.3x)
timeout 90 python -m flashlm.bench --model small --batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 20 \
  --cases generate --cuda-graph off --compare default,flash --no-progress --output $OUT/seed_generate_eager.json 2>&1 | tail -n 12
