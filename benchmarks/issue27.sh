#!/usr/bin/env bash
# Issue 27's GPU work, one stage per device call (carry .whl: liger-kernel + torchao). From the repo root:
#   OUT=... STAGE=fp8  bash benchmarks/issue27.sh   FP8 train rows (llama-1b eager, llama-3b eager), flashlm train
#                                                   --fp8 vs its bench row, the CUDA tests of fp8/int8
#   OUT=... STAGE=fp8c bash benchmarks/issue27.sh   the compiled llama-1b FP8 rows, the FP8 loss-parity tests
#   OUT=... STAGE=int8 bash benchmarks/issue27.sh   int8 linear tile sweep, int8 decode rows, the seed's rows
#   OUT=... STAGE=gptfast bash benchmarks/issue27.sh  (carry .gptfast too) gpt-fast bf16/int8 decode beside flashlm
#   STAGE=first / last: the most wanted of the above (first: + the decode-fusion A/B) in one call of ~9 / ~5 min
# Every JSON/log lands under $OUT (at most 8 files come back per call: the stages stay under that).
source benchmarks/gpu_env.sh
python -c "import torch, triton, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__)"
corpus() { python -c "import random,json;r=random.Random(0);W=[''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2,9))) for _ in range(20000)];f=open('/tmp/c.jsonl','w');[f.write(json.dumps({'text':' '.join(r.choice(W) for _ in range(r.randint(50,400)))})+'\\n') for _ in range(6000)]"; }
B="python -m flashlm.bench --cases train --seq-length 2048 --warmup-steps 3 --benchmark-steps 10 --no-progress"
case "${STAGE:?}" in
  first)  # the most wanted figures in one call, when machines are scarce (~9 min): llama-1b FP8 eager rows, the
          # int8 tile sweep at decode M (with the bf16-weight twin of our kernels beside cuBLAS), decode A/B of
          # the decode fusions (kernels auto vs triton: the norms in qkv/gate_up, SwiGLU in down; bf16 and int8
          # rows, the sweep's tiles), the CUDA tests of the fusions
    timeout 150 $B --model llama-1b --batch-size 8 --compare flash,hf-liger --fp8 tensorwise,rowwise \
      --output $OUT/fp8_llama1b_eager.json 2>&1 | grep -v "Warn\\|warn" | tail -n 14
    timeout 130 python -m flashlm.bench decode --preset llama-1b --batch-sizes 1,32 --int8-linears --tune \
      --output $OUT/int8_tune.json 2>&1 | grep "best\\|Error" | tail -n 12
    tiles=$([ -s $OUT/int8_tune.json ] && echo "--int8-configs $OUT/int8_tune.json")  # none if the sweep failed
    for k in auto triton; do
      timeout 90 python -m flashlm.bench.decode --preset llama-1b --dtype bf16 --batch-sizes 1,32 --contexts 128 \
        --new-tokens 64 --repeats 3 --models flashlm-graph --quantize int8 $tiles \
        --kernels $k --output $OUT/decode_fuse_$k.json 2>&1 | tail -n 5
    done
    timeout 80 python -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE tests/test_int8_gpu.py \
      -k "norm_linear or fusions or graph_decode" 2>&1 | tail -n 6
    ;;
  last)  # a call with ~5 minutes: llama-1b FP8 eager rows, int8 decode with the default tiles, the M=1 tile sweep
    timeout 140 $B --model llama-1b --batch-size 8 --compare flash,hf-liger --fp8 tensorwise,rowwise \
      --output $OUT/fp8_llama1b_eager.json 2>&1 | grep -v "Warn\\|warn" | tail -n 14
    timeout 80 python -m flashlm.bench.decode --preset llama-1b --dtype bf16 --batch-sizes 1,32 --contexts 128 \
      --new-tokens 64 --repeats 3 --models flashlm-graph --quantize int8 --output $OUT/decode_int8.json 2>&1 | tail -n 8
    timeout 120 python -m flashlm.bench decode --preset llama-1b --batch-sizes 1 --int8-linears --tune \
      --output $OUT/int8_tune.json 2>&1 | grep "best\\|Error" | tail -n 12
    ;;
  fp8)
    timeout 170 $B --model llama-1b --batch-size 8 --compare flash,hf-liger --fp8 tensorwise,rowwise \
      --output $OUT/fp8_llama1b_eager.json 2>&1 | grep -v "Warn\\|warn" | tail -n 14
    timeout 170 $B --model llama-3b --batch-size 4 --compare flash,hf-liger --fp8 tensorwise,rowwise \
      --output $OUT/fp8_llama3b_eager.json 2>&1 | grep -v "Warn\\|warn" | tail -n 14
    corpus
    for f in "" "--fp8 tensorwise"; do
      timeout 90 python -m flashlm.train --model llama-1b --data /tmp/c.jsonl --seq-length 2048 --batch-size 8 \
        --max-steps 20 --warmup-steps 5 --eval-every 0 --save-every 0 --no-progress --output /tmp/r${f:+fp8} \
        --cache-dir /tmp/cache $f 2>&1 | grep -v "Warn\|warn" | tail -n 2
    done 2>&1 | tee $OUT/train_llama1b_fp8.log
    timeout "${TESTS_TIMEOUT:-150}" python -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE -n 8 \
      tests/test_fp8.py tests/test_int8_gpu.py -k "not parity" 2>&1 | tee $OUT/gpu_tests_fp8_int8.log | tail -n 8
    ;;
  gptfast)  # carry .whl .gptfast: gpt-fast's compiled decode (bf16, its int8) beside flashlm's, one machine
    timeout 300 python benchmarks/gpt_fast_decode.py --gpt-fast .gptfast --preset llama-1b --batch-sizes 1,32 \
      --context 128 --new-tokens 64 --output $OUT/gpt_fast_decode.json 2>&1 | grep "^{" | tail -n 4
    timeout 150 python -m flashlm.bench.decode --preset llama-1b --dtype bf16 --batch-sizes 1,32 --contexts 128 \
      --new-tokens 64 --repeats 3 --models flashlm-graph --quantize int8 ${INT8_CONFIGS:+--int8-configs $INT8_CONFIGS} \
      --output $OUT/decode_int8_vs_gptfast.json 2>&1 | tail -n 8
    ;;
  fp8c)
    timeout 330 $B --model llama-1b --batch-size 8 --compare flash,hf-liger --fp8 tensorwise,rowwise --compile \
      --output $OUT/fp8_llama1b_compiled.json 2>&1 | grep -v "Warn\\|warn" | tail -n 14
    timeout 240 python -m pytest -q -s -m cuda -p no:cacheprovider --no-header -rfE -n 2 tests/test_fp8.py -k parity \
      2>&1 | grep -v "Warn\|warn" | tee $OUT/gpu_tests_fp8_parity.log | tail -n 12
    ;;
  int8)  # tiles for decode rows (M 1, 32), then prefill rows; decode with the table's tiles and with them
    timeout 200 python -m flashlm.bench decode --preset llama-1b --batch-sizes 1,32 --int8-linears --tune \
      --output $OUT/int8_tune.json 2>&1 | grep "best\|Error" | tail -n 12
    timeout 100 python -m flashlm.bench decode --preset llama-1b --batch-sizes 512,4096 --int8-linears --tune \
      --output $OUT/int8_tune_prefill.json 2>&1 | grep "best\|Error" | tail -n 12
    d="python -m flashlm.bench.decode --preset llama-1b --dtype bf16 --batch-sizes 1,32 --contexts 128 --new-tokens 64 --repeats 3"
    timeout 120 $d --models flashlm-graph --quantize int8 --output $OUT/decode_int8.json 2>&1 | tail -n 6
    timeout 100 $d --models flashlm-graph-int8 --int8-configs $OUT/int8_tune.json,$OUT/int8_tune_prefill.json \
      --output $OUT/decode_int8_tuned.json 2>&1 | tail -n 4
    # the seed's rows where host time decides, default and flash in one run (eager, then compiled)
    s="python -m flashlm.bench --model small --batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 30 --no-progress --compare default,flash --cases train,forward"
    timeout 60 $s --output $OUT/seed_eager.json 2>&1 | grep "ms)"
    timeout 150 $s --compile --output $OUT/seed_compiled.json 2>&1 | grep "ms)"
    ;;
esac
