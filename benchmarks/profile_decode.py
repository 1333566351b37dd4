"""Where a decode step's time goes (issue 17): per (batch, context), the flash model's CUDA-graph decode
(``generate(cuda_graph=True)``, optionally ``compile=``) timed per token, then one profiled generate of
``--tokens`` steps: GPU kernels per step, their summed GPU time per step (vs the wall time per step: the
gap is launch latency / idle GPU), the top kernels by GPU time, and the bytes a step must read (weights
+ live KV) as GB/s of the measured copy bandwidth.

    python benchmarks/profile_decode.py --preset llama-1b --points 1x128,32x128 [--compile default] --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flashlm.bench.bandwidth import peak_bandwidth
from flashlm.bench.decode import weight_read_bytes
from flashlm.bench.models import kv_bytes_per_token
from flashlm.generation import generate
from flashlm.models import build_model


def _profile_point(model, batch: int, ctx: int, tokens: int, compile_mode) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, ctx), device="cuda")
    kw = {"max_new_tokens": tokens, "eos_token_id": [], "cuda_graph": True, "compile": compile_mode}
    generate(model, ids, **kw)  # capture (and compile) once
    runs = [generate(model, ids, **kw) for _ in range(3)]
    per_token_ms = sorted(r.per_token_s for r in runs)[1] * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = generate(model, ids, **kw)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:100], []).append(e.device_time)
    steps = max(1, tokens - 1)
    weights = weight_read_bytes(model)  # as flashlm bench decode counts a step's reads
    kv = kv_bytes_per_token(cfg, next(model.parameters()).dtype) * batch * (ctx + tokens / 2)
    top = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:25]
    return {"batch": batch, "context": ctx, "compile": compile_mode, "per_token_ms": per_token_ms,
            "profiled_per_token_ms": out.per_token_s * 1e3,
            "kernels_total": len(kernels), "gpu_ms_total": sum(e.device_time for e in kernels) / 1e3,
            "bytes_per_step": weights + kv, "gb_per_s": (weights + kv) / per_token_ms / 1e6,
            "top_kernels": [{"name": n, "calls": c, "gpu_ms": t / 1e3, "per_step_us": t / steps}
                            for t, c, n in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--points", default="1x128,32x128")
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--compile", default=None, help="inductor mode of the decode step (default: not compiled)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model(args.preset, attn="flash", device="cuda", dtype=torch.bfloat16).eval()
    peak = peak_bandwidth(torch.cuda.get_device_name())
    copy_gbs = peak.gbs if peak else None
    res = {"preset": args.preset, "device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "points": []}
    for pt in args.points.split(","):
        b, c = (int(x) for x in pt.lower().split("x"))
        r = _profile_point(model, b, c, args.tokens, args.compile)
        if copy_gbs:
            r["pct_of_copy"] = 100 * r["gb_per_s"] / copy_gbs
        print(f"b{b} ctx{c} compile={args.compile}: {r['per_token_ms']:.3f} ms/token, {r['gb_per_s']:.0f} GB/s, "
              f"{r['kernels_total'] / (args.tokens - 1):.0f} kernels/step (incl. prefill), "
              f"GPU {r['gpu_ms_total']:.2f} ms total", flush=True)
        for k in r["top_kernels"][:12]:
            print(f"   {k['per_step_us']:8.1f} us/step {k['calls']:5d}x  {k['name']}")
        res["points"].append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.compile}" if args.compile else ""
    (out / f"profile_decode_{args.preset}{tag}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
