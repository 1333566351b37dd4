#!/usr/bin/env bash
# A/B of two versions of flashlm on one warm GPU machine, side by side (issue 26: the commit before the
# restructuring against the working tree). Made here, before the calls:
#   git archive --format=tar.gz -o .ab/before.tar.gz <before-commit> src    # .ab/ is git-ignored
#   git archive --format=tar.gz -o .ab/after.tar.gz <after-commit> src      # optional: else ./src
#   pip download liger-kernel==0.8.5 into .whl/ (the device README's command)
# Then, from the repo root on the GPU machine, carry .ab .whl:
#   STAGE=ab     A/B: seed eager (default + flash), llama-1b train, decode b1/b32 x 128, seed compiled (flash)
#   STAGE=host   benchmarks/ab_host.py (no bench harness) on both trees, alternating, + cProfile tables
#   STAGE=tests  every CUDA test of the working tree
# FlashAttention-4 (two more calls to carry, ../shared/tools/pack-fa4-for-device.sh) is optional: unpack both
# parts into /tmp/site first and both sides pick it up.
# Each A/B row runs the same `flashlm bench` command on both trees, one after the other (order alternates
# per row against drift); JSON under $OUT, the ratio table (after / before) last: $OUT/ab_table.md.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT}"
site=/tmp/site
deps="$site:$site/nvidia_cutlass_dsl/dsl_packages"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

side() {  # side before|after NAME ARGS...: one flashlm command on that tree, JSON to $OUT/NAME_<side>.json
  local which="$1" name="$2"; shift 2
  local src="$after_src"; [ "$which" = before ] && src=/tmp/before/src
  echo "=== $name $which: flashlm $* ($(date -u +%H:%M:%S))"
  PYTHONPATH="$deps:$src" timeout "${ROW_TIMEOUT:-240}" python -m flashlm.cli "$@" --output "$OUT/${name}_$which.json" \
    2>&1 | grep -v -i "warn" | tail -n 4
}
ab() { side before "$@"; side after "$@"; }
ba() { side after "$@"; side before "$@"; }

table() {  # the ratio table of every NAME_before.json / NAME_after.json pair in $OUT
  python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
KEYS = ("median_ms", "peak_memory_gb", "first_token_ms", "per_token_ms", "tokens_per_s")
def rows(d):  # (label, value) of every timed figure: model bench cases, or decode points
    for model, m in d.get("models", {}).items():
        for case, c in m.get("cases", {}).items():
            for k in KEYS:
                if isinstance(c.get(k), (int, float)):
                    yield f"{model} {case} {k}", c[k]
    for p in d.get("points", []):
        for k in ("first_token_ms", "per_token_ms", "tokens_per_s", "peak_memory_gb"):
            if isinstance(p.get(k), (int, float)):
                yield f"{p['impl']} b{p['batch']} x {p['context']} {k}", p[k]
print("| row | figure | before | after | after / before |\n|---|---|---|---|---|")
for b in sorted(out.glob("*_before.json")):
    name = b.name[: -len("_before.json")]
    a = out / f"{name}_after.json"
    if not a.exists():
        print(f"| {name} | (after missing) | | | |"); continue
    before, after = dict(rows(json.loads(b.read_text()))), dict(rows(json.loads(a.read_text())))
    for k in before:
        if k in after and before[k]:
            print(f"| {name} | {k} | {before[k]:.4g} | {after[k]:.4g} | {after[k] / before[k]:.3f} |")
EOF
}

seed="bench --model small --batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 20 --no-progress"
mkdir -p $site /tmp/before && tar -C /tmp/before -xzf .ab/before.tar.gz
# "after": .ab/after.tar.gz where present (`git archive HEAD src`: a commit, not a tree being edited), else ./src
after_src="$PWD/src"
if [ -f .ab/after.tar.gz ]; then mkdir -p /tmp/after && tar -C /tmp/after -xzf .ab/after.tar.gz && after_src=/tmp/after/src; fi
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "${STAGE:?}" in
  ab)
    ab seed_eager $seed --compare default,flash
    ba train_llama1b bench --model llama-1b --batch-size 8 --seq-length 2048 --warmup-steps 3 --benchmark-steps 10 \
      --cases train --compare flash --no-progress
    ab decode_llama1b bench decode --preset llama-1b --dtype bf16 --batch-sizes 1,32 --contexts 128 \
      --models flashlm-graph --new-tokens 64 --repeats 3
    ba seed_compiled $seed --compare flash --cases train,forward --compile
    table | tee "$OUT/ab_table.md"
    (cd "$OUT" && tar -czf ab_json.tar.gz ./*.json && rm -f ./*.json)  # at most 8 files come back from a call
    ;;
  host)  # ab_host.py on both trees, alternating, ROUNDS times (default 3); cProfile tables of the first round
    for r in $(seq 1 "${ROUNDS:-3}"); do
      for which in before after; do
        src="$after_src"; [ "$which" = before ] && src=/tmp/before/src
        for attn in flash default; do
          prof=(); [ "$r" = 1 ] && prof=(--profile "$OUT/host_profile_${attn}_$which.txt")
          PYTHONPATH="$deps:$src" python benchmarks/ab_host.py $attn "${prof[@]}" 2>&1 | grep -v -i warn | sed "s/^/round $r $which: /"
        done
      done
    done | tee "$OUT/host_ab.log"
    ;;
  tests)
    PYTHONPATH="$deps:$PWD/src" timeout "${TESTS_TIMEOUT:-300}" python -m pytest -q -m cuda -n 12 -p no:cacheprovider \
      --no-header -rfE tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30
    ;;
esac
