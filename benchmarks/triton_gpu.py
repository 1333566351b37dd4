"""GPU benchmark and tuning script of flashlm's Triton attention backend (needs CUDA).

Measures, in bf16 on the current GPU, with PyTorch's SDPA flash backend (FA2) in the same run:
  - dense forward and forward+backward TFLOP/s at (4 x 4k) and (1 x 16k) tokens, 16 heads, D=128
    (the shapes of `flashlm bench kernels`), causal and not; forward also at D=64 and D=256;
  - decode bandwidth (K+V bytes read / time) over an 8k cache, batch 8, 32 query / 8 kv heads, D=128,
    against aten._flash_attention_forward (PyTorch's FA2, native GQA).
FLOPs: 4 * B * H * Sq * Sk * D forward (half if causal), 3.5x that for forward+backward.

``--sweep`` also times candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward
and both backward kernels at 4k causal; the best ones go into common.py's table by hand.

  python benchmarks/triton_gpu.py --sweep --json $OUT/triton_h100.json

The last stdout line is one JSON object (a summary); --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from flashlm.attention.backends.triton import BACKEND
from flashlm.attention.backends.triton import bwd as bwd_mod
from flashlm.attention.backends.triton import fwd as fwd_mod
from flashlm.attention.backends.triton.common import BwdCfg, Cfg
from flashlm.bench.timing import time_loop


def flops(batch, nheads, sq, sk, d, causal, mode):
    f = 4 * batch * nheads * sq * sk * d / (2 if causal else 1)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def _ms(fn, grads=None):
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def bench_dense(batch, seqlen, nheads, d, causal, mode, dtype=torch.bfloat16):
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)

    def tri():
        out, _ = BACKEND.dense(q, k, v, dropout_p=0.0, softmax_scale=d ** -0.5, causal=causal,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False)
        if mode == "fwd_bwd":
            out.backward(do)
        return out

    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        if mode == "fwd_bwd":
            out.backward(dot)
        return out

    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        err = (tri().float() - sdpa().float().transpose(1, 2)).abs().max().item()
        t_ms = _ms(tri, [q, k, v])
        s_ms = _ms(sdpa, [qt, kt, vt])
    f = flops(batch, nheads, seqlen, seqlen, d, causal, mode)
    return {"mode": mode, "batch": batch, "seqlen": seqlen, "nheads": nheads, "head_dim": d, "causal": causal,
                "triton_ms": t_ms, "triton_tflops": f / t_ms * 1e-9, "sdpa_flash_ms": s_ms,
                "sdpa_flash_tflops": f / s_ms * 1e-9, "ratio": s_ms / t_ms, "max_abs_diff_vs_sdpa": err}


def bench_decode(batch, hq, hk, d, cache_len, dtype=torch.bfloat16):
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=dtype)
    kc = torch.randn(batch, cache_len, hk, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    seqlens = torch.full((batch,), cache_len, device="cuda", dtype=torch.int32)

    def tri():
        return BACKEND.kvcache(q, kc, vc, seqlens, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                               softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, num_splits=0)[0]

    def fa2():
        return torch.ops.aten._flash_attention_forward(q, kc, vc, None, None, 1, cache_len, 0.0, True, False,
                                                       scale=d ** -0.5)[0]

    def graphed(fn):  # GPU time alone: a CUDA graph removes the host launch cost between calls
        try:
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001
            print("cudagraph timing failed:", str(e)[:200], flush=True)
            return float("nan")

    nbytes = 2 * kc.numel() * kc.element_size()
    row = {"batch": batch, "nheads": hq, "nheads_k": hk, "head_dim": d, "cache_len": cache_len, "kv_bytes": nbytes}
    t_ms = _ms(tri)
    g_ms = graphed(tri)
    # back to back, no cache flush: max(host launch cost, GPU time) per call
    loop_ms = time_loop(tri, iters=200, device="cuda").wall_s * 1e3
    row.update(triton_ms=t_ms, triton_tbps=nbytes / t_ms * 1e-9, triton_graph_ms=g_ms,
               triton_graph_tbps=nbytes / g_ms * 1e-9, triton_loop_ms=loop_ms)
    try:
        row["max_abs_diff_vs_fa2"] = (tri().float() - fa2().float()).abs().max().item()
        f_ms = _ms(fa2)
        fg_ms = graphed(fa2)
        row.update(torch_fa2_ms=f_ms, torch_fa2_tbps=nbytes / f_ms * 1e-9, ratio=f_ms / t_ms,
                   torch_fa2_graph_ms=fg_ms, torch_fa2_graph_tbps=nbytes / fg_ms * 1e-9, graph_ratio=fg_ms / g_ms)
    except (RuntimeError, TypeError) as e:  # older torch: no GQA or another signature
        row["torch_fa2_error"] = str(e)[:200]
    return row


FWD_CANDIDATES = [Cfg(128, 64, 8, 3), Cfg(128, 128, 8, 3), Cfg(128, 64, 4, 3), Cfg(128, 128, 8, 4),
                  Cfg(128, 32, 4, 4), Cfg(64, 64, 4, 3)]
BWD_CANDIDATES = [BwdCfg(Cfg(64, 128, 8, 2), Cfg(128, 64, 8, 2)), BwdCfg(Cfg(32, 128, 4, 3), Cfg(128, 32, 4, 3)),
                  BwdCfg(Cfg(64, 128, 8, 3), Cfg(128, 64, 8, 3)), BwdCfg(Cfg(32, 64, 4, 3), Cfg(64, 32, 4, 3)),
                  BwdCfg(Cfg(64, 64, 4, 3), Cfg(64, 64, 4, 3)), BwdCfg(Cfg(32, 128, 8, 3), Cfg(128, 32, 8, 3))]


def sweep_d64():
    """Forward tiles at head_dim 64 (4 x 4k causal, 32 heads)."""
    rows, default_fwd = [], fwd_mod.fwd_config
    try:
        for cfg in (Cfg(128, 64, 4, 3), Cfg(128, 64, 8, 3), Cfg(128, 128, 8, 3), Cfg(64, 64, 4, 3)):
            fwd_mod.fwd_config = lambda *a, c=cfg: c
            try:
                r = bench_dense(4, 4096, 32, 64, True, "fwd")
                rows.append({"kernel": "fwd", "head_dim": 64, "cfg": list(cfg), "seqlen": 4096, "causal": True,
                             "ok": r["max_abs_diff_vs_sdpa"] < 0.05, "tflops": r["triton_tflops"]})
            except Exception as e:  # noqa: BLE001
                rows.append({"kernel": "fwd", "head_dim": 64, "cfg": list(cfg), "error": str(e)[:200]})
            print("sweep", rows[-1], flush=True)
    finally:
        fwd_mod.fwd_config = default_fwd
    return rows


def sweep():
    """Time candidate tiles; a config that fails to compile or gives a wrong answer is recorded, not kept."""
    rows = []
    default_fwd, default_bwd = fwd_mod.fwd_config, bwd_mod.bwd_config
    try:
        for cfg in FWD_CANDIDATES:
            fwd_mod.fwd_config = lambda *a, c=cfg: c
            for batch, seqlen, causal in ((4, 4096, True), (1, 16384, False)):
                try:
                    r = bench_dense(batch, seqlen, 16, 128, causal, "fwd")
                    ok = r["max_abs_diff_vs_sdpa"] < 0.05
                    rows.append({"kernel": "fwd", "cfg": list(cfg), "seqlen": seqlen, "causal": causal, "ok": ok,
                                     "tflops": r["triton_tflops"]})
                except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
                    rows.append({"kernel": "fwd", "cfg": list(cfg), "seqlen": seqlen, "causal": causal, "error": str(e)[:200]})
        fwd_mod.fwd_config = default_fwd
        for cfg in BWD_CANDIDATES:
            bwd_mod.bwd_config = lambda *a, c=cfg: c
            try:
                r = bench_dense(4, 4096, 16, 128, True, "fwd_bwd")
                rows.append({"kernel": "bwd", "cfg": [list(cfg.kv), list(cfg.q)], "seqlen": 4096, "causal": True,
                                 "ok": r["max_abs_diff_vs_sdpa"] < 0.05, "tflops": r["triton_tflops"]})
            except Exception as e:  # noqa: BLE001
                rows.append({"kernel": "bwd", "cfg": [list(cfg.kv), list(cfg.q)], "error": str(e)[:200]})
    finally:
        fwd_mod.fwd_config, bwd_mod.bwd_config = default_fwd, default_bwd
    for r in rows:
        print("sweep", r, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    p.add_argument("--sweep-d64", action="store_true", help="time forward tiles at head_dim 64")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--quick", action="store_true", help="only the 4k D=128 rows and decode")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "dtype": "bf16", "dense": [], "decode": []}
    shapes = [(4, 4096, 16, 128)] if args.quick else [(4, 4096, 16, 128), (1, 16384, 16, 128)]
    for batch, seqlen, nheads, d in shapes:
        for causal in (True, False):
            for mode in ("fwd", "fwd_bwd"):
                r = bench_dense(batch, seqlen, nheads, d, causal, mode)
                res["dense"].append(r)
                print(f"{mode:8} {batch}x{seqlen} h{nheads} d{d} causal={causal!s:5} triton "
                      f"{r['triton_tflops']:6.1f} TFLOP/s  sdpa-flash {r['sdpa_flash_tflops']:6.1f}  "
                      f"ratio {r['ratio']:.2f}  maxdiff {r['max_abs_diff_vs_sdpa']:.3g}", flush=True)
    if not args.quick:
        for d, nheads in ((64, 32), (256, 8)):
            r = bench_dense(4, 4096, nheads, d, True, "fwd")
            res["dense"].append(r)
            print(f"fwd      4x4096 h{nheads} d{d} causal=True  triton {r['triton_tflops']:6.1f} "
                  f"sdpa-flash {r['sdpa_flash_tflops']:6.1f} ratio {r['ratio']:.2f}", flush=True)
    for cache_len in (8192,) if args.quick else (8192, 32768):
        r = bench_decode(8, 32, 8, 128, cache_len)
        res["decode"].append(r)
        print(f"decode cache {cache_len}: triton {r['triton_tbps']:.2f} TB/s (graph {r['triton_graph_tbps']:.2f}, "
              f"loop {r['triton_loop_ms'] * 1e3:.0f} us/call)  torch-fa2 {r.get('torch_fa2_tbps', float('nan')):.2f} "
              f"TB/s (graph {r.get('torch_fa2_graph_tbps', float('nan')):.2f})", flush=True)
    if args.sweep:
        res["sweep"] = sweep()
    if args.sweep_d64:
        res["sweep_d64"] = sweep_d64()
    res["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    pick = {f"{r['mode']}_{r['seqlen']}_{'causal' if r['causal'] else 'full'}_d{r['head_dim']}":
            round(r["triton_tflops"], 1) for r in res["dense"]}
    pick["decode_8k_tbps"] = round(res["decode"][0]["triton_tbps"], 3)
    pick["decode_8k_graph_tbps"] = round(res["decode"][0]["triton_graph_tbps"], 3)
    print(json.dumps({"summary": pick, "seconds": res["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
