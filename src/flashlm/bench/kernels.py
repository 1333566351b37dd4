"""`flashlm bench kernels`: attention kernel throughput of every available backend.

Dense attention through flashlm's API with each backend forced (what a model gets, dispatch
included), forward and forward+backward, causal and not, at a fixed token budget (batch = total /
seqlen), plus KV-cache decode bandwidth. TFLOP/s count 4 * B * H * Sq * Sk * D for the forward (half
if causal) and 3.5x that for forward+backward (backward = 2.5x forward). Decode GB/s count the K and
V bytes read. "auto" is the registry's own choice; "fa4_direct" calls flash_attn.cute without
flashlm (to measure dispatch overhead) when FA4 is installed.

A backend that refuses a configuration (cuDNN has no KV-cache entry point, fp32 on a half-only
kernel, ...) gets a "refused: <reason>" row, from the registry before anything runs; refusals stay out
of the figures and of the suggested orders (JSON: the separate ``refused`` list). Errors raised while
running are kept as ``error`` rows.

Prints a table, writes JSON (``--json PATH``) and ends with one JSON line on stdout: the suggested
registry order per call kind (``suggested_orders``: dense by mean TFLOP/s, kvcache by mean decode
GB/s), the data behind ``flashlm.attention.order.ORDERS``. On a machine without CUDA it runs a tiny
fp32 configuration (CPU backends: sdpa_cpu and the reference) and says the numbers mean little.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from functools import partial

import torch

from flashlm._util import DTYPES
from flashlm.attention import available_backends, explain, flash_attn_func, flash_attn_with_kvcache, registry
from flashlm.bench.timing import time_calls


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="flashlm bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=None,
                   help="comma list (default: every available backend except reference on GPU, plus auto)")
    p.add_argument("--seqlens", type=_ints, default=[1024, 4096, 16384])
    p.add_argument("--total-tokens", type=int, default=16384)
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--hidden", type=int, default=2048, help="nheads = hidden / head_dim (FA papers: 2048)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--causal", default="0,1", help="comma list of 0/1")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--decode-cache", type=_ints, default=[1024, 8192, 32768])
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-heads", default="32,8", help="q heads, kv heads")
    p.add_argument("--decode-head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without CUDA)")
    return p.parse_args(argv)


def _time_ms(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median ms per call: GPU time between CUDA events on CUDA, host wall time on the CPU."""
    return time_calls(fn, warmup=warmup, iters=iters, device="cuda" if cuda else "cpu",
                      clock="cuda_event").median_ms


def _fa4_direct():
    try:
        from flash_attn.cute import flash_attn_func as f

        return f
    except Exception:  # noqa: BLE001
        return None


class Refused(Exception):
    """The backend refuses this configuration (the registry's reason); not a measurement."""


def _check_refusal(name: str, explain_call) -> None:
    """Raise Refused when backend ``name`` ("auto": every backend) cannot serve the call."""
    if name == "fa4_direct":
        return
    exp = explain_call(backend=None if name == "auto" else name)
    if exp.chosen is None:
        raise Refused("; ".join(f"{n}: {w}" for n, w in exp.reasons.items() if w))


def bench_dense(name, b, s, h, d, causal, mode, dtype, device, warmup, iters):
    q = torch.randn(b, s, h, d, device=device, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fwd_bwd = mode == "fwd_bwd"
    _check_refusal(name, lambda backend: explain(q, k, v, causal=causal, requires_grad=fwd_bwd, backend=backend))
    if fwd_bwd:
        for t in (q, k, v):
            t.requires_grad_(True)
    dout = torch.randn_like(q)
    if name == "fa4_direct":
        f = _fa4_direct()

        def attn():
            res = f(q, k, v, causal=causal)
            return res[0] if isinstance(res, tuple) else res
    else:
        backend = None if name == "auto" else name

        def attn():
            return flash_attn_func(q, k, v, causal=causal, backend=backend)

    def step():
        out = attn()
        if fwd_bwd:
            torch.autograd.grad(out, (q, k, v), dout)

    ctx = torch.enable_grad() if fwd_bwd else torch.no_grad()
    with ctx:
        ms = _time_ms(step, warmup, iters, device.type == "cuda")
    flops = 4 * b * h * s * s * d / (2 if causal else 1) * (3.5 if fwd_bwd else 1.0)
    return ms, flops / (ms * 1e-3) / 1e12


def bench_decode(name, batch, hq, hk, d, cache_len, dtype, device, warmup, iters):
    q = torch.randn(batch, 1, hq, d, device=device, dtype=dtype)
    k_cache = torch.randn(batch, cache_len, hk, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
    _check_refusal(name, lambda backend: explain(q, k_cache, v_cache, causal=True, kvcache=True, backend=backend))
    backend = None if name == "auto" else name
    with torch.no_grad():
        ms = _time_ms(lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True,
                                                      backend=backend), warmup, iters, device.type == "cuda")
    nbytes = 2 * k_cache.numel() * k_cache.element_size()
    return ms, nbytes / (ms * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    note = None
    if not cuda or args.tiny:
        args.seqlens, args.total_tokens, args.head_dims, args.hidden = [64, 128], 256, [32], 128
        args.decode_cache, args.decode_batch, args.decode_head_dim = [256], 2, 32
        args.warmup, args.iters = 2, 5
        if not cuda:
            args.dtype = "fp32"
            note = "no CUDA device: tiny fp32 CPU run (sdpa_cpu, reference); says nothing about GPU speed"
    dtype = DTYPES[args.dtype]
    if args.backends:
        names = args.backends.split(",")
    else:
        names = [n for n in available_backends() if not (cuda and n == "reference")] + ["auto"]
        if cuda and _fa4_direct() is not None:
            names.append("fa4_direct")
    hq, hk = _ints(args.decode_heads)
    results, decode, refused = [], [], []
    # backends innermost: every backend of a config runs back to back, so clock drift over a long run
    # does not favour whichever backend happens to run first
    for d in args.head_dims:
        h = max(1, args.hidden // d)
        for s in args.seqlens:
            b = max(1, args.total_tokens // s)
            for causal in (bool(int(c)) for c in args.causal.split(",")):
                for mode in args.modes.split(","):
                    for name in names:
                        row = {"kind": "dense", "backend": name, "mode": mode, "causal": causal, "head_dim": d,
                               "seqlen": s, "batch": b, "nheads": h}
                        _run_row(row, results, refused, partial(
                            bench_dense, name, b, s, h, d, causal, mode, dtype, device, args.warmup, args.iters),
                                 "tflops")
                        if cuda:
                            torch.cuda.empty_cache()
    for L in args.decode_cache:
        for name in names:
            if name == "fa4_direct":
                continue
            row = {"kind": "kvcache", "backend": name, "batch": args.decode_batch, "nheads": hq, "nheads_k": hk,
                   "head_dim": args.decode_head_dim, "cache_len": L}
            _run_row(row, decode, refused, partial(
                bench_decode, name, args.decode_batch, hq, hk, args.decode_head_dim, L, dtype, device, args.warmup,
                args.iters), "gbps")

    suggested_orders = {"dense": _suggest(results, names, "tflops"), "kvcache": _suggest(decode, names, "gbps")}
    suggested = suggested_orders["dense"]

    print(_table(results, decode, refused))
    if note:
        print(f"note: {note}")
    payload = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "dtype": args.dtype, "note": note,
        "config": {"total_tokens": args.total_tokens, "hidden": args.hidden, "warmup": args.warmup, "iters": args.iters},
        "command": "flashlm bench kernels " + " ".join(sys.argv[1:] if argv is None else argv),
        "dense": results, "decode": decode, "refused": refused, "suggested_order": suggested,
        "suggested_orders": suggested_orders}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps({"suggested_orders": suggested_orders, "rows": len(results), "decode_rows": len(decode),
                      "refused_rows": len(refused), "note": note}))
    return 0


def _run_row(row: dict, figures: list, refused: list, measure, unit: str) -> None:
    """Measure one row into ``figures``; a refusal goes to ``refused`` instead, an error stays a row."""
    try:
        ms, value = measure()
        # significant digits, not decimals: a CPU's ~0.005 TFLOP/s must not be stored as 0.0
        row.update(ms=round(ms, 4), **{unit: float(f"{value:.4g}")})
    except Refused as exc:
        refused.append({**row, "refused": str(exc)})
        return
    except Exception as exc:  # noqa: BLE001 (a kernel error is a result)
        row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
    figures.append(row)


def _suggest(rows: list, names: list, unit: str) -> list[str]:
    """Backends by mean ``unit`` over the rows each served (refusals are not rows); the reference last."""
    score = {}
    for n in names:
        vals = [r[unit] for r in rows if r["backend"] == n and unit in r]
        if vals and n in registry.known_backends() and n != "reference":
            score[n] = statistics.mean(vals)
    suggested = sorted(score, key=score.get, reverse=True)
    return suggested + [n for n in registry.known_backends() if n not in suggested and n != "reference"] + [
        "reference"]


def _sig(x: float, digits: int = 3) -> str:
    """``x`` in fixed notation with ``digits`` significant digits (568 TFLOP/s on a GPU, 0.000551 on a
    CPU), so that a small figure is neither 0.0 nor 5.51e-04."""
    if not (math.isfinite(x) and x > 0):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(x)))}f}"


def _table(results, decode, refused=()) -> str:
    def dense_key(r):
        return f"{r['backend']:<12} {r['mode']:<8} {r['causal']!s:<6} {r['head_dim']:>4} {r['seqlen']:>6} {r['batch']:>5}"

    def decode_key(r):
        return f"{r['backend']:<12} {r['cache_len']:>12}"

    lines = [f"{'backend':<12} {'mode':<8} {'causal':<6} {'D':>4} {'seqlen':>6} {'batch':>5} {'ms':>9} {'TFLOP/s':>10}"]
    for r in results:
        val = f"{r['ms']:>9.3f} {_sig(r['tflops']):>10}" if "tflops" in r else f"  {r['error'][:70]}"
        lines.append(f"{dense_key(r)} {val}")
    lines += [f"{dense_key(r)}   refused: {r['refused'][:90]}" for r in refused if r["kind"] == "dense"]
    lines.append("")
    lines.append(f"{'backend':<12} {'decode cache':>12} {'ms':>9} {'GB/s':>10}")
    for r in decode:
        val = f"{r['ms']:>9.4f} {_sig(r['gbps']):>10}" if "gbps" in r else f"  {r['error'][:70]}"
        lines.append(f"{decode_key(r)} {val}")
    lines += [f"{decode_key(r)}   refused: {r['refused'][:90]}" for r in refused if r["kind"] == "kvcache"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
