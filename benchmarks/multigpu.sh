#!/bin/bash
# Issue 11: FSDP2 scaling of `flashlm train` (llama-1b, seq 2048, 8 rows per GPU, 50 steps).
#   run 1gpu  : torchrun --nproc-per-node 1, --grad-accum N  (the same global rows per step as N GPUs,
#               so its loss curve is the reference; its tokens/s is the per-GPU baseline)
#   run Ngpu  : torchrun --nproc-per-node N (FSDP2), checkpoints at steps 25 and 50
#   run resume: the N-GPU checkpoint of step 25 resumed in one process (--grad-accum N) to step 50
# Then benchmarks/multigpu_summary.py writes $OUT/multigpu_h100.json and the loss plot.
# Usage (repo root, on a machine with N >= 2 GPUs): OUT=... bash benchmarks/multigpu.sh
# A CPU smoke run (gloo): NGPU=2 MODEL=tiny EXTRA='--vocab-size 512' SEQ=128 BATCH=2 DOCS=300 STEPS=6 bash benchmarks/multigpu.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
# NVLink multicast stays off (shared machines: see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/multigpu_out}; mkdir -p "$OUT"
N=${NGPU:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
RUNS=${RUNS:-/tmp/mg}; rm -rf "$RUNS"; mkdir -p "$RUNS"
STEPS=${STEPS:-50}; HALF=$((STEPS / 2))
MODEL=${MODEL:-llama-1b}; SEQ=${SEQ:-2048}; BATCH=${BATCH:-8}; DOCS=${DOCS:-8000}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpus.txt"

# 8000 documents of random words (the generator of train_llama1b_h100.log, more documents)
python3 -c "import random,json;r=random.Random(0);W=[''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2,9))) for _ in range(20000)];f=open('$RUNS/c.jsonl','w');[f.write(json.dumps({'text':' '.join(r.choice(W) for _ in range(r.randint(50,400)))})+'\n') for _ in range($DOCS)]"
COMMON="-m flashlm.train --model $MODEL --data $RUNS/c.jsonl --seq-length $SEQ --batch-size $BATCH --max-steps $STEPS
        --warmup-steps 5 --eval-every 0 --no-progress --cache-dir $RUNS/cache ${EXTRA:-}"
TR="torchrun --standalone"

# one tokenizer for all runs (the first run trains and saves it)
$TR --nproc-per-node 1 $COMMON --grad-accum "$N" --save-every 0 --output "$RUNS/1gpu" 2>&1 | tee "$OUT/train_1gpu.log" || exit 1
TOK=$RUNS/1gpu/tokenizer.json
$TR --nproc-per-node "$N" $COMMON --tokenizer "$TOK" --save-every "$HALF" --output "$RUNS/${N}gpu" 2>&1 \
  | tee "$OUT/train_${N}gpu.log" || exit 1
$TR --nproc-per-node 1 $COMMON --tokenizer "$TOK" --grad-accum "$N" --save-every 0 --output "$RUNS/resume1" \
  --resume "$RUNS/${N}gpu/checkpoints/step_$(printf %07d $HALF)" 2>&1 | tee "$OUT/train_resume1.log" || exit 1
ls -la "$RUNS/${N}gpu/checkpoints" "$RUNS/${N}gpu/checkpoints/step_$(printf %07d $HALF)" | tee "$OUT/checkpoint_ls.txt"
du -sh "$RUNS/${N}gpu/checkpoints/"* | tee -a "$OUT/checkpoint_ls.txt"
for r in 1gpu ${N}gpu resume1; do cp "$RUNS/$r/metrics.jsonl" "$OUT/metrics_$r.jsonl" 2>/dev/null; done
python3 benchmarks/multigpu_summary.py --runs "$RUNS" --ngpu "$N" --output "$OUT/multigpu_h100.json" \
  --plot "$OUT/multigpu_loss_h100.png" | tee "$OUT/multigpu_summary.txt"
