"""Per-call host+kernel time of attention on CPU at the tiny preset's shapes (µs per call).

Compares the flashlm backends through the public API (dispatch included) with the raw kernels:
the aten CPU flash op called directly and ``F.scaled_dot_product_attention`` (enable_gqa), forward
and forward+backward, plus one KV-cache decode step. One thread, CPU time of the calling thread
(``time.thread_time``): on a shared machine wall-clock medians of multi-threaded ops swing by 10x
(threads wait on each other's time slices). Run: ``PYTHONPATH=src python
benchmarks/cpu_attention_micro.py [--json PATH]``; prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from flashlm.attention import flash_attn_func, flash_attn_with_kvcache

OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _us(fn, iters: int) -> float:
    for _ in range(max(3, iters // 10)):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--heads", default="4,2", help="q heads, kv heads (tiny preset: 4,2)")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--cache", type=int, default=512, help="KV-cache capacity (tiny: max positions 512)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    h, hk = (int(x) for x in a.heads.split(","))
    B, S, D = a.batch, a.seqlen, a.head_dim
    q = torch.randn(B, S, h, D, requires_grad=True)
    k = torch.randn(B, S, hk, D, requires_grad=True)
    v = torch.randn(B, S, hk, D, requires_grad=True)
    g = torch.randn(B, S, h, D)

    variants = {
        "reference": lambda: flash_attn_func(q, k, v, causal=True, backend="reference"),
        "sdpa_cpu": lambda: flash_attn_func(q, k, v, causal=True, backend="sdpa_cpu"),
        "auto": lambda: flash_attn_func(q, k, v, causal=True),
        "aten_op_raw": lambda: OP(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True)[0],
        "F.sdpa_raw": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), is_causal=True, enable_gqa=True),
    }
    rows = []
    for name, fn in variants.items():
        with torch.no_grad():
            fwd = _us(fn, a.iters)

        def step(fn=fn):
            out = fn()
            out = out if out.shape == g.shape else out.transpose(1, 2)
            torch.autograd.grad(out, (q, k, v), g)

        rows.append({"variant": name, "fwd_us": round(fwd, 1), "fwd_bwd_us": round(_us(step, a.iters), 1)})

    qd = torch.randn(B, 1, h, D)
    kc, vc = torch.randn(B, a.cache, hk, D), torch.randn(B, a.cache, hk, D)
    kn, vn = torch.randn(B, 1, hk, D), torch.randn(B, 1, hk, D)
    lens = torch.full((B,), S, dtype=torch.int32)
    ragged = torch.tensor([S - 7 * i for i in range(B)], dtype=torch.int32)
    for name in ("reference", "sdpa_cpu"):
        for tag, sl in (("equal", lens), ("ragged", ragged)):
            us = _us(lambda sl=sl, name=name: flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=sl,
                                                                      causal=True, backend=name), a.iters)
            rows.append({"variant": f"{name} decode ({tag} rows)", "decode_us": round(us, 1)})

    print(f"CPU attention, batch {B}, seqlen {S}, heads {h}/{hk}, head_dim {D}, fp32, causal; "
          f"decode: cache {a.cache}, {S} keys; torch {torch.__version__}, {torch.get_num_threads()} thread, CPU µs (median)")
    print(f"{'variant':<32} {'fwd µs':>9} {'fwd+bwd µs':>11} {'decode µs':>10}")
    for r in rows:
        cells = [f"{r[c]:>{w}.1f}" if c in r else " " * w for c, w in (("fwd_us", 9), ("fwd_bwd_us", 11),
                                                                       ("decode_us", 10))]
        print(f"{r['variant']:<32} {' '.join(cells)}")
    payload = {"config": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
