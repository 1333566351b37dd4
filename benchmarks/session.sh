#!/usr/bin/env bash
# The GPU work of one session (H200 or H100), as stages run in back-to-back device calls (the machine keeps
# /tmp between calls that follow within ~30 s). From the repo root on the GPU machine:
#   OUT=... STAGE=... [MACHINE=h200] bash benchmarks/session.sh
#   STAGE=fa4a   carry .fa4a .whl     unpack FA4 part a + Liger; CUDA tests of the fused ops/loss/optimizer/models/
#                                     generation/train; the seed's train-memory probe (bench memory --residue)
#   STAGE=fa4b   carry .fa4b .whl     unpack FA4 part b; FA4 compile tests; the model benchmarks (run.sh)
#   STAGE=bench  (after fa4b)         more run.sh configs (CONFIGS), flashlm train llama-1b 20 steps,
#                                     the llama-1b flash train step's profile
#   STAGE=rest   (after fa4b)         attention GPU tests with FA4 (TESTS_K), decode profile + grid, flashlm train
#   STAGE=check  carry .whl           (FA4 not needed) CUDA tests of the ops/models/train, the seed's memory
#                                     residue probe, the compiled llama-1b step's profile, flashlm train
#   STAGE=profile carry .fa4b .whl    (after fa4a) unpack part b + Liger; profiles of the llama-1b train step
#                                     (flash eager/compiled, hf-sdpa, hf-flashlm); FA4 compile tests
# Each stage writes its logs/JSON under $OUT; COMMANDS.md says which file came from which stage.
# Knobs: TESTS_TIMEOUT, TESTS_K (pytest -k of stage rest), DECODE_MODELS, DECODE_TIMEOUT, TRAIN_TIMEOUT,
# TRAIN_FLAGS, CONFIGS (run.sh), MACHINE (run.sh's machine name, default h200).
# Was h200_session.sh; results/COMMANDS.md names the commit each committed result came from.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT}"
site=/tmp/site
export PYTHONPATH="$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD/src"
# the random-word corpus flashlm train reads (COMMANDS.md: 6000 jsonl documents of 50-400 words)
corpus() { python -c "import random,json;r=random.Random(0);W=[''.join(r.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(r.randint(2,9))) for _ in range(20000)];f=open('/tmp/c.jsonl','w');[f.write(json.dumps({'text':' '.join(r.choice(W) for _ in range(r.randint(50,400)))})+'\\n') for _ in range(6000)]"; }
pyt() { timeout "$1" python -m pytest -q -m cuda -p no:cacheprovider --no-header -rfE "${@:2}"; }
case "${STAGE:?}" in
  fa4a)
    mkdir -p $site && tar -C $site -xJf .fa4a/a.tar.xz
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())"
    # the fused ops / loss / optimizer kernels, the models and generation that use them, flashlm train
    # (FA4 not importable yet: its compile tests skip here and run in stage fa4b)
    pyt "${TESTS_TIMEOUT:-150}" -n 8 tests/ops tests/test_loss_kernels.py tests/test_losses.py tests/test_optim_kernel.py \
      tests/test_optim.py tests/test_flash_model.py tests/test_flash_fused.py tests/test_decode.py \
      tests/test_decode_compile.py tests/test_train.py tests/test_registry.py 2>&1 | tee $OUT/gpu_tests_new_ops.log | tail -n 15
    timeout 60 python -m flashlm.bench memory --residue --output $OUT/memory_peak_small.json 2>&1 | grep -v Warn | tail -n 40
    ;;
  fa4b)
    tar -C $site -xJf .fa4b/b.tar.xz && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target $site .whl/*.whl
    python -c "import flash_attn.cute, liger_kernel; print('FA4 and Liger importable')"
    pyt 120 tests/test_fa4_compile.py 2>&1 | tee $OUT/gpu_tests_fa4_compile.log | tail -n 4
    OUT=$OUT CONFIGS="${CONFIGS:-seed seed_compile 1b 1b_compile}" bash benchmarks/run.sh "${MACHINE:-h200}"
    ;;
  bench)  # after fa4b (FA4 and Liger in /tmp/site): more configs of run_h200.sh, then flashlm train
    OUT=$OUT CONFIGS="${CONFIGS:-seed_compile 1b_compile}" bash benchmarks/run.sh "${MACHINE:-h200}"
    corpus
    timeout "${TRAIN_TIMEOUT:-150}" python -m flashlm.train --model llama-1b --data /tmp/c.jsonl --seq-length 2048 \
      --batch-size 8 --max-steps 20 --warmup-steps 5 --eval-every 0 --save-every 0 --no-progress --output /tmp/r1 \
      --cache-dir /tmp/cache 2>&1 | grep -v "Warn\|warn" | tail -n 3 | tee $OUT/train_llama1b_h200_s4.log
    timeout 90 python -m flashlm.bench profile --preset llama-1b --batch 8 --seqlen 2048 --cases train \
      --warmup 3 --steps 5 --models flash --modes eager --output $OUT/profile_llama-1b_b8x2048.json 2>&1 | grep -v Warn | tail -n 2
    ;;
  check)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    git log -1 --format='commit %h %s' 2>/dev/null || true
    pyt "${TESTS_TIMEOUT:-180}" -n 8 tests/ops tests/test_flash_fused.py tests/test_flash_model.py tests/test_train.py \
      tests/test_fa4_compile.py tests/test_losses.py 2>&1 | tee $OUT/gpu_tests_check.log | tail -n 8
    timeout 90 python -m flashlm.bench memory --models flash --residue --output $OUT/memory_peak_small.json 2>&1 | grep -v Warn | tail -n 40
    timeout 200 python -m flashlm.bench profile --preset llama-1b --batch 8 --seqlen 2048 --cases train --warmup 3 \
      --steps 5 --models flash --modes compiled --output $OUT/compiled/profile_llama-1b_b8x2048.json 2>&1 | grep -v Warn | tail -n 4
    corpus
    timeout 150 python -m flashlm.train --model llama-1b --data /tmp/c.jsonl --seq-length 2048 --batch-size 8 \
      --max-steps 20 --warmup-steps 5 --eval-every 0 --save-every 0 --no-progress --output /tmp/r1 \
      --cache-dir /tmp/cache 2>&1 | grep -v Warn | tail -n 3 | tee $OUT/train_llama1b_check.log
    ;;
  profile)
    tar -C $site -xJf .fa4b/b.tar.xz && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target $site .whl/*.whl
    python -c "import flash_attn.cute, liger_kernel; print('FA4 and Liger importable')"
    git log -1 --format='commit %h %s' 2>/dev/null || true
    pyt 150 tests/test_fa4_compile.py 2>&1 | tee $OUT/gpu_tests_fa4_compile.log | tail -n 12
    p1b="--preset llama-1b --batch 8 --seqlen 2048 --cases train --warmup 3 --steps 5"
    timeout 200 python -m flashlm.bench profile $p1b --models flash,hf-sdpa,hf-flashlm --modes eager \
      --output $OUT/eager/profile_llama-1b_b8x2048.json 2>&1 | grep -v Warn | tail -n 8
    timeout 200 python -m flashlm.bench profile $p1b --models flash --modes compiled \
      --output $OUT/compiled/profile_llama-1b_b8x2048.json 2>&1 \
      | grep -v Warn | tail -n 8
    ;;
  rest)
    pyt "${TESTS_TIMEOUT:-75}" -n 8 tests/test_attention_gpu.py tests/test_attention_bounds.py \
      -k "${TESTS_K:-tiny or repeat}" 2>&1 | tee $OUT/gpu_tests_attention_fa4.log | tail -n 12
    timeout 60 python -m flashlm.bench profile --preset llama-1b --models flash --cases decode --points 1x128 \
      --output $OUT/profile_decode_llama-1b.json 2>&1 | grep -v Warn | tail -n 14
    timeout "${DECODE_TIMEOUT:-150}" python -m flashlm.bench.decode --preset llama-1b --dtype bf16 \
      --batch-sizes "${DECODE_BATCHES:-1,32}" --contexts "${DECODE_CONTEXTS:-128,8192}" --models "${DECODE_MODELS:-flashlm-graph,flashlm-graph-inductor,hf-static-compile}" \
      --new-tokens 32 --repeats 2 \
      --output $OUT/decode_grid_h200.json 2>&1 | tail -n 30
    # flashlm train llama-1b on packed real-looking text (the corpus generator of COMMANDS.md)
    corpus
    timeout "${TRAIN_TIMEOUT:-120}" python -m flashlm.train --model llama-1b --data /tmp/c.jsonl --seq-length 2048 \
      --batch-size 8 --max-steps "${TRAIN_STEPS:-15}" --warmup-steps 5 --eval-every 0 --save-every 0 --no-progress --output /tmp/r1 \
      --cache-dir /tmp/cache ${TRAIN_FLAGS:-} 2>&1 | tail -n 5 | tee $OUT/train_llama1b_h200.log
    ;;
esac
