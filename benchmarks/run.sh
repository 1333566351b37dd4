#!/usr/bin/env bash
# The model benchmarks (`flashlm bench`) of one GPU machine in one go, from the repo root:
#
#   OUT=/some/dir bash benchmarks/run.sh MACHINE [CONFIG ...]      # MACHINE: h100 | h200 (names the files)
#
# CONFIGs (default: h100 -> seed seed_graph long 1b padded packed; h200 -> seed 1b seed_compile 1b_compile):
#   seed          small    bs2 x 256   train, forward, generate  default,flash,hf-sdpa(+hf-liger,+hf-flashlm)
#   seed_graph    small    bs2 x 256   generate, --compile       default,flash,hf-sdpa
#   seed_compile  small    bs2 x 256   --compile (flash fullgraph; flash decode from a CUDA graph) default,flash,hf-sdpa
#   long          small    bs8 x 2048  train, forward, generate  default,flash,hf-sdpa(+extras)
#   1b            llama-1b bs8 x 2048  train only                default,flash,hf-sdpa(+extras)
#   1b_compile    llama-1b bs8 x 2048  train, --compile          flash,hf-sdpa
#   padded        small    bs8 x 2048  padding ratio 0.5         default,flash,hf-sdpa
#   packed        small    bs8 x 2048  packed documents          default,flash,hf-sdpa (train, forward)
#   decode        llama-1b decode sweep batch 1/8/32 x context 128/2k/8k  default,flash,hf-sdpa,hf-static
# Extras join when importable: hf-liger (carry .whl), hf-flashlm (flashlm.hf.register). FA4 is used when
# flash_attn.cute imports. Results: $OUT/$MACHINE/<config>.json + .png, packed into
# $OUT/bench_$MACHINE.tar.gz (unpack into benchmarks/results/$MACHINE/) next to $OUT/tables.md (PACK=0 leaves
# the folder). Replaces run_h100.sh / run_h200.sh (results/COMMANDS.md names their last commit).
set -uo pipefail  # no -e: a config that fails is reported and the others still run
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:?set OUT to the output folder}"
MACHINE="${1:?name the machine: h100 or h200}"; shift
case "$MACHINE" in
  h100) defaults="seed seed_graph long 1b padded packed" ;;
  h200) defaults="seed 1b seed_compile 1b_compile" ;;
  *) echo "unknown machine $MACHINE (h100 | h200)"; exit 2 ;;
esac
configs="${*:-${CONFIGS:-$defaults}}"
PY="${PYTHON:-python}"
DIR="$OUT/$MACHINE"
mkdir -p "$DIR"
extra=""
"$PY" -c "import liger_kernel.transformers" 2>/dev/null && extra="$extra,hf-liger"
"$PY" -c "import flashlm.hf as h; h.register" 2>/dev/null && extra="$extra,hf-flashlm"
"$PY" -c "import flash_attn.cute" 2>/dev/null && echo "FA4 importable" || echo "FA4 not importable"
echo "extra HF rows: ${extra:-none}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

failed=()
bench() {  # bench NAME FLAGS...
  local name="$1"; shift
  echo; echo "=== $name: flashlm bench $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$PY" -m flashlm.bench "$@" --no-progress --output "$DIR/$name.json" --plot "$DIR/$name.png" || failed+=("$name")
  echo "=== $name took $((SECONDS - t0)) s"
}
seed="--model small --batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 20"
long="--model small --batch-size 8 --seq-length 2048 --warmup-steps 3 --benchmark-steps 10"
oneb="--model llama-1b --batch-size 8 --seq-length 2048 --warmup-steps 3 --benchmark-steps 10 --cases train"
for c in $configs; do
  case "$c" in
    seed) bench seed_small_bs2x256 $seed --compare "default,flash,hf-sdpa$extra" ;;
    seed_graph) bench seed_small_bs2x256_graph $seed --cases generate --compile --compare default,flash,hf-sdpa ;;
    seed_compile) bench seed_small_bs2x256_compile $seed --compile --compare default,flash,hf-sdpa ;;
    long) bench long_small_bs8x2048 $long --compare "default,flash,hf-sdpa$extra" ;;
    1b) bench train_llama1b_bs8x2048 $oneb --compare "default,flash,hf-sdpa$extra" ;;
    1b_compile) bench train_llama1b_bs8x2048_compile $oneb --compile --compare flash,hf-sdpa ;;
    padded) bench padded50_small_bs8x2048 $long --padding-ratio 0.5 --compare default,flash,hf-sdpa ;;
    packed) bench packed_small_bs8x2048 $long --packed --cases train,forward --compare default,flash,hf-sdpa ;;
    decode) bench decode_llama1b --model llama-1b --cases decode --decode-batch-sizes 1,8,32 \
              --decode-contexts 128,2048,8192 --new-tokens 32 --warmup-steps 2 --benchmark-steps 5 \
              --compare default,flash,hf-sdpa,hf-static ;;
    *) echo "unknown config $c"; failed+=("$c") ;;
  esac
done
echo; echo "=== all tables"
"$PY" -m flashlm.bench.report "$DIR"/*.json | tee "$OUT/tables.md"
if [ "${PACK:-1}" = 1 ]; then
  tar czf "$OUT/bench_$MACHINE.tar.gz" -C "$DIR" . && rm -rf "$DIR" && echo "packed into $OUT/bench_$MACHINE.tar.gz"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED configs: ${failed[*]}"; exit 1; fi
