#!/usr/bin/env bash
# Every committed H100 result of issue 6 (flashlm bench), in one go: ~6-8 minutes on one H100.
#
#   OUT=/some/dir bash benchmarks/run_h100.sh          # from the repository root, on the GPU machine
#
# Five configs, each a JSON (results, environment, command line) and a PNG bar chart:
#   seed     small    bs2 x 256   train, forward, generate  default,flash,hf-sdpa,hf-eager(+liger,+flashlm)
#   long     small    bs8 x 2048  train, forward, generate  default,flash,hf-sdpa(+liger,+flashlm)
#   1b       llama-1b bs8 x 2048  train only                default,flash,hf-sdpa(+liger,+flashlm)
#   padded   small    bs8 x 2048  padding ratio 0.5         default,flash,hf-sdpa
#   packed   small    bs8 x 2048  packed documents          default,flash,hf-sdpa (train, forward)
# hf-liger joins when liger_kernel is importable, hf-flashlm when flashlm.hf.register exists.
# RUN_DECODE=1 adds the fast-decode sweep (llama-1b, batch 1/8/32 x context 128/2k/8k; several more minutes).
#
# The device tool returns at most 8 files from $OUT, so by default (PACK=1) the results are packed into
# $OUT/bench_h100.tar.gz (unpack into benchmarks/results/) next to $OUT/tables.md (all tables, printed
# at the end too). PACK=0 leaves the JSON/PNG files in $OUT/h100/ instead.
set -uo pipefail  # no -e: a config that fails is reported and the others still run
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:?set OUT to the output folder}"
PY="${PYTHON:-python}"
DIR="$OUT/h100"
mkdir -p "$DIR"

extra=""
"$PY" -c "import liger_kernel.transformers" 2>/dev/null && extra="$extra,hf-liger"
"$PY" -c "import flashlm.hf as h; h.register" 2>/dev/null && extra="$extra,hf-flashlm"
echo "extra HF rows: ${extra:-none}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

failed=()
bench() {  # bench NAME FLAGS...
  local name="$1"; shift
  echo; echo "=== $name: flashlm bench $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$PY" -m flashlm.bench "$@" --output "$DIR/$name.json" --plot "$DIR/$name.png" || failed+=("$name")
  echo "=== $name took $((SECONDS - t0)) s"
}

bench seed_small_bs2x256 --model small --batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 20 \
  --compare "default,flash,hf-sdpa,hf-eager$extra"
bench seed_small_bs2x256_graph --model small --batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 20 \
  --cases generate --compile --compare "default,flash,hf-sdpa"
bench long_small_bs8x2048 --model small --batch-size 8 --seq-length 2048 --warmup-steps 3 --benchmark-steps 10 \
  --compare "default,flash,hf-sdpa$extra"
bench train_llama1b_bs8x2048 --model llama-1b --batch-size 8 --seq-length 2048 --warmup-steps 3 --benchmark-steps 10 \
  --cases train --compare "default,flash,hf-sdpa$extra"
bench padded50_small_bs8x2048 --model small --batch-size 8 --seq-length 2048 --padding-ratio 0.5 \
  --warmup-steps 3 --benchmark-steps 10 --compare default,flash,hf-sdpa
bench packed_small_bs8x2048 --model small --batch-size 8 --seq-length 2048 --packed --cases train,forward \
  --warmup-steps 3 --benchmark-steps 10 --compare default,flash,hf-sdpa
if [ "${RUN_DECODE:-0}" = 1 ]; then
  bench decode_llama1b --model llama-1b --cases decode --decode-batch-sizes 1,8,32 --decode-contexts 128,2048,8192 \
    --new-tokens 32 --warmup-steps 2 --benchmark-steps 5 --compare default,flash,hf-sdpa,hf-static
fi

echo; echo "=== all tables"
"$PY" -m flashlm.bench.report "$DIR"/*.json | tee "$OUT/tables.md"
if [ "${PACK:-1}" = 1 ]; then
  tar czf "$OUT/bench_h100.tar.gz" -C "$DIR" . && rm -rf "$DIR"
  echo "packed into $OUT/bench_h100.tar.gz"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED configs: ${failed[*]}"; exit 1; fi
