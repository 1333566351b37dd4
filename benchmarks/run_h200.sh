#!/usr/bin/env bash
# The model benchmarks of issues 16/17 on one H200, in one go (~6-9 minutes):
#
#   OUT=/some/dir bash benchmarks/run_h200.sh        # from the repository root, on the GPU machine
#
# CONFIGS (space-separated, default all): seed seed_compile 1b 1b_compile
#   seed          small    bs2 x 256   train, forward, generate  default,flash,hf-sdpa(+hf-liger,+hf-flashlm)
#   seed_compile  the same with --compile (flash and default compiled; flash decode from a CUDA graph)
#   1b            llama-1b bs8 x 2048  train only                default,flash,hf-sdpa(+hf-liger)
#   1b_compile    the same with --compile (flash compiled; hf-sdpa compiled)
# hf-liger joins when liger_kernel is importable (carry .whl), FA4 is used when flash_attn.cute imports.
# Results: $OUT/h200/<config>.json + .png, packed into $OUT/bench_h200.tar.gz with $OUT/tables.md.
set -uo pipefail  # no -e: a config that fails is reported and the others still run
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:?set OUT to the output folder}"
PY="${PYTHON:-python}"
DIR="$OUT/h200"
mkdir -p "$DIR"
liger=""
"$PY" -c "import liger_kernel.transformers" 2>/dev/null && liger=",hf-liger"
"$PY" -c "import flash_attn.cute" 2>/dev/null && echo "FA4 importable" || echo "FA4 not importable"
echo "extra HF rows: ${liger:-none}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

failed=()
bench() {  # bench NAME FLAGS...
  local name="$1"; shift
  echo; echo "=== $name: flashlm bench $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$PY" -m flashlm.bench "$@" --no-progress --output "$DIR/$name.json" --plot "$DIR/$name.png" || failed+=("$name")
  echo "=== $name took $((SECONDS - t0)) s"
}
for c in ${CONFIGS:-seed 1b seed_compile 1b_compile}; do
  case "$c" in
    seed) bench seed_small_bs2x256 --model small --batch-size 2 --seq-length 256 --warmup-steps 10 \
            --benchmark-steps 20 --compare "default,flash,hf-sdpa$liger" ;;
    seed_compile) bench seed_small_bs2x256_compile --model small --batch-size 2 --seq-length 256 --warmup-steps 10 \
            --benchmark-steps 20 --compile --compare "default,flash,hf-sdpa" ;;
    1b) bench train_llama1b_bs8x2048 --model llama-1b --batch-size 8 --seq-length 2048 --warmup-steps 3 \
            --benchmark-steps 10 --cases train --compare "flash,hf-sdpa$liger,hf-flashlm" ;;
    1b_compile) bench train_llama1b_bs8x2048_compile --model llama-1b --batch-size 8 --seq-length 2048 \
            --warmup-steps 3 --benchmark-steps 10 --cases train --compile --compare "flash,hf-sdpa" ;;
    *) echo "unknown config $c"; failed+=("$c") ;;
  esac
done
echo; echo "=== all tables"
"$PY" -m flashlm.bench.report "$DIR"/*.json | tee "$OUT/tables.md"
tar czf "$OUT/bench_h200.tar.gz" -C "$DIR" . && rm -rf "$DIR" && echo "packed into $OUT/bench_h200.tar.gz"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED configs: ${failed[*]}"; exit 1; fi
