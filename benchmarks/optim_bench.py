"""Time one optimizer step over llama-1b's parameter shapes (bf16 model, random grads) on CUDA:
MasterWeightAdamW (fp32 masters) with torch's foreach AdamW, torch's fused AdamW (both forced with
kernel="torch") and its one-pass Triton kernel (kernel="triton", what the default takes on CUDA),
and plain fused AdamW on the bf16 parameters (what `flashlm bench` steps). Prints median ms and
peak memory per variant.

    python benchmarks/optim_bench.py [--preset llama-1b] [--steps 10]
"""
import argparse
import statistics
import time

import torch

from flashlm.models import build_model
from flashlm.optim import MasterWeightAdamW

p = argparse.ArgumentParser()
p.add_argument("--preset", default="llama-1b")
p.add_argument("--steps", type=int, default=10)
args = p.parse_args()
model = build_model(args.preset, attn="flash", device="cuda", dtype=torch.bfloat16)
params = [q for q in model.parameters() if q.requires_grad]
print(f"{sum(q.numel() for q in params) / 1e9:.3f} B parameters in {len(params)} tensors")
variants = {
    "master_foreach": lambda: MasterWeightAdamW([{"params": params}], kernel="torch", lr=1e-5, betas=(0.9, 0.95),
                                                foreach=True),
    "master_fused": lambda: MasterWeightAdamW([{"params": params}], kernel="torch", lr=1e-5, betas=(0.9, 0.95),
                                              fused=True),
    "master_triton": lambda: MasterWeightAdamW([{"params": params}], kernel="triton", lr=1e-5, betas=(0.9, 0.95)),
    "bf16_fused": lambda: torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True),
}
for name, make in variants.items():
    try:
        opt = make()
    except Exception as e:  # noqa: BLE001
        print(f"{name}: {type(e).__name__}: {e}")
        continue
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps + 2):
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
        opt.zero_grad(set_to_none=True)
    print(f"{name:16s} median {statistics.median(times):7.2f} ms  peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB",
          flush=True)
    del opt
    torch.cuda.empty_cache()
