"""Measurements that pick the decode path's kernels and configs (issue 17), CUDA only.

    python benchmarks/probe_decode.py --out DIR [--parts kernel,ops,prefill]

- ``kernel``: the Triton split-KV decode kernel (``attn_decode``) at the llama-1b attention shape
  (32 query / 8 kv heads, head_dim 64, bf16) for batch 1/8/32 x context 128/2k/8k (cache capacity
  rounded up as generation does), swept over ``num_splits`` x ``block_n`` x ``num_warps``; each
  timed as a CUDA-graph replay (``triton.testing.do_bench_cudagraph``: GPU time, no launch cost).
- ``ops``: the per-token elementwise ops of a decode step, eager vs fused, timed the same way at batch
  1 and 32: add + RMSNorm (aten's two kernels vs our one), SwiGLU (torch vs ours), the k/v cache
  append (two ``index_put_``), greedy argmax over a 128k vocab.
- ``prefill``: where the first token's time goes, llama-1b batch 1 x 128: the prefill forward into an
  empty static cache vs a plain forward (medians, synchronized), ``generate``'s first-token time,
  and one profiled prefill: kernels launched, GPU time, the CPU ops by self time.

Writes ``probe_decode.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.testing

from flashlm.decode_graph import cache_capacity


def _graph_us(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=20)) * 1e3


def probe_kernel() -> list[dict]:
    from flashlm.attention.backends.triton.decode import attn_decode

    rows = []
    heads, kv_heads, dim = 32, 8, 64
    for batch in (1, 8, 32):
        for ctx in (128, 2048, 8192):
            cap = cache_capacity(ctx + 32)  # as generate sizes the cache for 32 new tokens
            q = torch.randn(batch, 1, heads, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, cap, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            seqlens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
            best = None
            for block_n in (32, 64, 128):
                for warps in (2, 4):
                    for splits in (0, 1, 2, 4, 8, 16, 32, 64):
                        if splits > max(1, cap // block_n):
                            continue

                        us = _graph_us(functools.partial(
                            attn_decode, q, k, v, seqlens, None, None, None, dim ** -0.5, True, -1, -1, 0.0,
                            None, splits, block_n=block_n, num_warps=warps))
                        row = {"batch": batch, "context": ctx, "capacity": cap, "block_n": block_n,
                               "num_warps": warps, "num_splits": splits, "us": us,
                               "gb_per_s": kv_bytes / us / 1e3}
                        rows.append(row)
                        if best is None or us < best["us"]:
                            best = row
            auto = next(r for r in rows if r["batch"] == batch and r["context"] == ctx and r["num_splits"] == 0
                        and r["block_n"] == 128 and r["num_warps"] == 4)
            print(f"decode kernel b{batch} ctx{ctx}: today (auto, 128, 4w) {auto['us']:.1f} us; best "
                  f"{best['us']:.1f} us (block_n {best['block_n']}, {best['num_warps']} warps, "
                  f"splits {best['num_splits']}), {best['gb_per_s']:.0f} GB/s", flush=True)
    return rows


def _op_cases(batch: int) -> dict:
    from flashlm import ops

    hidden, inter, vocab, kv_heads, dim = 2048, 8192, 128256, 8, 64
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(batch, 1, hidden, **bf)
    res = torch.randn_like(x)
    w = torch.ones(hidden, **bf)
    gate_up = torch.randn(batch, 1, 2 * inter, **bf)
    logits = torch.randn(batch, vocab, **bf)
    cache = torch.zeros(batch, 512, kv_heads, dim, **bf)
    kv = torch.randn(batch, 1, kv_heads, dim, **bf)
    idx = (torch.arange(batch, device="cuda")[:, None], torch.full((batch, 1), 130, device="cuda"))
    return {
        "add_rms_norm aten": lambda: ops.add_rms_norm_aten(x, res, w, 1e-5),
        "add_rms_norm triton": lambda: ops.add_rms_norm(x, res, w, 1e-5),
        "swiglu torch": lambda: ops.swiglu_ref(gate_up),
        "swiglu triton": lambda: ops.swiglu(gate_up),
        "cache append index_put x2": lambda: (cache.index_put_(idx, kv), cache.index_put_(idx, kv)),
        "argmax": lambda: logits.argmax(-1),
        "argmax two-stage": lambda: _argmax_two_stage(logits),
    }


def probe_ops() -> list[dict]:
    rows = []
    for batch in (1, 32):
        for name, fn in _op_cases(batch).items():
            us = _graph_us(fn)
            rows.append({"batch": batch, "op": name, "us": us})
            print(f"ops b{batch}: {name:28s} {us:7.2f} us", flush=True)
    return rows


def _argmax_two_stage(logits: torch.Tensor, group: int = 256) -> torch.Tensor:
    b, v = logits.shape
    vals, idx = logits.view(b, v // group, group).max(-1)
    g = vals.argmax(-1, keepdim=True)
    return (g * group + idx.gather(-1, g)).squeeze(-1)


def _median_ms(fn, n: int = 15) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def probe_prefill() -> dict:
    from torch.profiler import ProfilerActivity, profile

    from flashlm.generation import generate
    from flashlm.models import build_model

    torch.manual_seed(0)
    model = build_model("llama-1b", attn="flash", device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    cache = model.allocate_cache(1, 256)

    @torch.no_grad()
    def prefill():
        model(ids, past_key_values=cache.reset(), use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def plain():
        model(ids, logits_to_keep=1)

    for _ in range(3):
        prefill(), plain()
    res = {"prefill_ms": _median_ms(prefill), "plain_forward_ms": _median_ms(plain)}
    kw = {"max_new_tokens": 8, "eos_token_id": [], "cuda_graph": True}
    generate(model, ids, **kw)
    res["generate_first_token_ms"] = statistics.median(generate(model, ids, **kw).first_token_s * 1e3
                                                       for _ in range(7))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    res["kernels"] = len(kernels)
    res["gpu_ms"] = sum(e.device_time for e in kernels) / 1e3
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    res["cpu_table"] = table
    print(f"prefill b1x128: {res['prefill_ms']:.2f} ms (plain forward {res['plain_forward_ms']:.2f} ms), "
          f"generate first token {res['generate_first_token_ms']:.2f} ms; {res['kernels']} kernels, "
          f"GPU {res['gpu_ms']:.2f} ms", flush=True)
    print(table, flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="kernel,ops,prefill")
    args = p.parse_args()
    parts = args.parts.split(",")
    res = {"device": torch.cuda.get_device_name()}
    if "ops" in parts:
        res["ops"] = probe_ops()
    if "prefill" in parts:
        res["prefill"] = probe_prefill()
    if "kernel" in parts:
        res["kernel"] = probe_kernel()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_decode.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
