#!/usr/bin/env bash
# Issue 16 seed-config check on the GPU: flash vs default, eager and --compile, train + forward.
# Usage (repo root): bash benchmarks/flash_vs_default.sh [OUTDIR]   (extra env: PRESET, BS, SEQ)
set -euo pipefail
out=${1:-benchmarks/results/h200}
mkdir -p "$out"
common=(--model "${PRESET:-small}" --batch-size "${BS:-2}" --seq-length "${SEQ:-256}" --compare default,flash
        --cases train,forward --no-progress)
PYTHONPATH=$PWD/src python -m flashlm bench "${common[@]}" --output "$out/flash_vs_default_eager.json"
PYTHONPATH=$PWD/src python -m flashlm bench "${common[@]}" --compile --output "$out/flash_vs_default_compile.json"
PYTHONPATH=$PWD/src python benchmarks/op_counts.py --preset "${PRESET:-small}" --batch "${BS:-2}" --seqlen "${SEQ:-256}"
PYTHONPATH=$PWD/src python benchmarks/flash_vs_default.py "$out/flash_vs_default_eager.json" \
    "$out/flash_vs_default_compile.json"
