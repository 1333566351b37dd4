#!/usr/bin/env bash
# Last GPU call of the 2026-12-01 afternoon session (~3 min of device time left; FA4 not carried): the
# seed config's eager decode step (no CUDA graph) flash vs default, and `flashlm train` llama-1b for 20
# steps with the median step throughput. OUT=... bash benchmarks/h200_last.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
OUT="${OUT:?set OUT}"
timeout 60 python -m flashlm.bench --model small --batch-size 2 --seq-length 256 --warmup-steps 5 --benchmark-steps 10 \
  --cases generate --cuda-graph off --compare default,flash --no-progress --output $OUT/seed_generate_eager.json 2>&1 \
  | grep -E "^\|" | head -n 12
python -c "import random,json;r=random.Random(0);W=[''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2,9))) for _ in range(20000)];f=open('/tmp/c.jsonl','w');[f.write(json.dumps({'text':' '.join(r.choice(W) for _ in range(r.randint(50,400)))})+'\n') for _ in range(6000)]"
timeout 125 python -m flashlm.train --model llama-1b --data /tmp/c.jsonl --seq-length 2048 --batch-size 8 --max-steps 20 \
  --warmup-steps 5 --eval-every 0 --save-every 0 --no-progress --output /tmp/r1 --cache-dir /tmp/cache 2>&1 | tail -n 2 \
  | tee $OUT/train_llama1b_h200_nofa4.log
cp /tmp/r1/metrics.jsonl $OUT/train_llama1b_h200_nofa4_metrics.jsonl 2>/dev/null || true
