#!/usr/bin/env bash
# First GPU call of a session (FA4 not carried; Liger carried as .whl): issue 15's GPU tests, then the
# profiles that steer issue 16's work. From the repo root on the GPU machine: OUT=... bash benchmarks/h200_probe.sh
source benchmarks/gpu_env.sh
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())"
git log -1 --format='commit %h %s' 2>/dev/null || true
timeout 60 python benchmarks/diag_varlen_grads.py > $OUT/diag_varlen_grads.txt 2>&1; echo "diag_varlen_grads rc=$?"; tail -n 12 $OUT/diag_varlen_grads.txt
timeout "${TESTS_TIMEOUT:-260}" python -m pytest -n "${NPROC:-8}" -q -m cuda -p no:cacheprovider --no-header -rfE \
  tests/test_attention_gpu.py tests/test_attention_bounds.py tests/test_flash_model.py tests/test_flash_fused.py \
  tests/test_decode_compile.py tests/test_triton.py tests/ops tests/test_decode.py tests/test_generation.py \
  tests/test_safety.py tests/test_registry.py tests/test_losses.py > $OUT/gpu_tests.log 2>&1
echo "pytest rc=$?"; tail -n 30 $OUT/gpu_tests.log
timeout 40 python benchmarks/optim_bench.py 2>&1 | tee $OUT/optim_bench.txt
timeout 150 python benchmarks/profile_steps.py --preset small --batch 2 --seqlen 256 --out $OUT 2>&1 | tail -n 12
timeout 100 python benchmarks/profile_steps.py --preset llama-1b --batch 8 --seqlen 2048 --models flash --modes eager \
  --cases train --warmup 2 --steps 3 --out $OUT 2>&1 | tail -n 4
