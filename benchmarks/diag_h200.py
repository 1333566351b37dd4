"""One-off GPU diagnostics for issues 15/16 (run on the H200 at session start, on main as it was).

1. which backend fails backward at seqlen 1 (issue 15 §3);
2. which backend serves the non-deterministic call of issue 15 §4, and which backends repeat bit-exactly;
3. host microseconds per call of candidate building blocks for the flash model's fast path (issue 16).
Prints one JSON object per section; `--out` writes them all.
"""
import argparse
import json
import time
import traceback

import torch
import torch.nn.functional as F

from flashlm.attention import available_backends, explain, flash_attn_func, use_backend

dev = "cuda"
R = {}


def seqlen1_backward():
    out = {}
    for name in available_backends():
        for d in (16, 32, 64):
            for causal in (False, True):
                for s in (1, 2, 3):
                    q, k, v = (torch.randn(2, s, 5, d, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
                    key = f"{name} d{d} s{s} causal={causal}"
                    try:
                        with use_backend(name):
                            o = flash_attn_func(q, k, v, causal=causal)
                            o.backward(torch.randn_like(o))
                        torch.cuda.synchronize()
                        out[key] = "ok"
                    except Exception as e:  # noqa: BLE001
                        out[key] = f"{type(e).__name__}: {str(e)[:200]}"
    bad = {k: v for k, v in out.items() if v != "ok"}
    return {"failures": bad, "n_ok": sum(v == "ok" for v in out.values())}


def determinism():
    out = {}
    for d in (32, 160):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(60, 1, 4, d, device=dev, dtype=torch.float16, generator=g)
        k = torch.randn(60, 239, 4, d, device=dev, dtype=torch.float16, generator=g)
        v = torch.randn(60, 239, 4, d, device=dev, dtype=torch.float16, generator=g)
        out[f"d{d} explain"] = str(explain(q, k, v, causal=False))[:600]
        for name in [None] + available_backends():
            try:
                ctx = use_backend(name) if name else use_backend(None)
                with ctx:
                    o0, lse0, _ = flash_attn_func(q, k, v, 0.0, causal=False, return_attn_probs=True)
                    diff = 0
                    for _ in range(100):
                        o, lse, _ = flash_attn_func(q, k, v, 0.0, causal=False, return_attn_probs=True)
                        diff += int(not torch.equal(o, o0)) + int(not torch.equal(lse, lse0))
                out[f"d{d} {name or 'auto'}"] = f"{diff} mismatches / 100"
            except Exception as e:  # noqa: BLE001
                out[f"d{d} {name or 'auto'}"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def host_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / n * 1e6
    return round(host, 1), round(total, 1)


def kernels_per_call(fn):
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    return sum(1 for e in p.events() if e.device_type.name == "CUDA")


def blocks():
    out = {}
    T, Hd, H, D, I = 512, 768, 12, 64, 2048
    bf = torch.bfloat16
    x = torch.randn(1, T, Hd, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(Hd, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(1, T, Hd, device=dev, dtype=bf)

    def hf_rms():
        xf = x.float(); y = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(bf); return y
    cases = {
        "noop_torch_add": lambda: x.detach() + 1,
        "F.rms_norm fwd": lambda: F.rms_norm(x.detach(), (Hd,), w.detach(), 1e-6),
        "F.rms_norm fwd+bwd": lambda: F.rms_norm(x, (Hd,), w, 1e-6).backward(g),
        "hf_rms fwd+bwd": lambda: hf_rms().backward(g),
        "linear fwd+bwd": lambda: F.linear(x, torch.ones(Hd, Hd, device=dev, dtype=bf)).backward(g),
    }
    gu = torch.randn(1, T, 2 * I, device=dev, dtype=bf, requires_grad=True)
    cases["silu*mul (views) fwd+bwd"] = lambda: (F.silu(gu[..., :I]) * gu[..., I:]).backward(torch.ones(1, T, I, device=dev, dtype=bf))

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 1
        @staticmethod
        def backward(ctx, ga):
            return ga
    cases["autograd.Function(a*1) fwd+bwd"] = lambda: Noop.apply(x).backward(g)
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _k(X, Y, N, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + i, tl.load(X + i, mask=i < N), mask=i < N)
        xd = x.detach().reshape(-1); yd = torch.empty_like(xd); N = xd.numel()
        cases["triton copy launch"] = lambda: _k[(triton.cdiv(N, 1024),)](xd, yd, N, BLOCK=1024)
    except Exception as e:  # noqa: BLE001
        out["triton"] = repr(e)
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        cases["liger rms fwd+bwd"] = lambda: LigerRMSNormFunction.apply(x, w, 1e-6).backward(g)
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        a = torch.randn(1, T, I, device=dev, dtype=bf, requires_grad=True); b = torch.randn_like(a, requires_grad=True)
        cases["liger silumul fwd+bwd"] = lambda: LigerSiLUMulFunction.apply(a, b).backward(torch.ones_like(a))
    except Exception as e:  # noqa: BLE001
        out["liger"] = repr(e)
    # attention: BSHD (1, 512... ) seed shape is (2, 256, 12, 64)
    q, k, v = (torch.randn(2, 256, H, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
    go = torch.randn(2, 256, H, D, device=dev, dtype=bf)
    def sdpa_flash():
        o = torch.ops.aten._scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, False, scale=0.125)[0]
        o.transpose(1, 2).backward(go)
    def sdpa_cudnn():
        o = torch.ops.aten._scaled_dot_product_cudnn_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, True, False, scale=0.125)[0]
        o.transpose(1, 2).backward(go)
    def sdpa_F():
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=0.125)
        o.transpose(1, 2).backward(go)
    def ours():
        flash_attn_func(q, k, v, causal=True).backward(go)
    cases.update({"aten sdpa_flash fwd+bwd": sdpa_flash, "aten sdpa_cudnn fwd+bwd": sdpa_cudnn,
                  "F.sdpa fwd+bwd": sdpa_F, "flashlm flash_attn_func fwd+bwd": ours})
    for name in available_backends():
        if name == "reference":
            continue
        def f(name=name):
            with use_backend(name):
                flash_attn_func(q, k, v, causal=True).backward(go)
        cases[f"flashlm[{name}] fwd+bwd"] = f
    # GQA support of aten ops (32/8 heads)
    qg = torch.randn(2, 256, 32, 64, device=dev, dtype=bf).transpose(1, 2)
    kg = torch.randn(2, 256, 8, 64, device=dev, dtype=bf).transpose(1, 2)
    for nm, fn in {"flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(qg, kg, kg, 0.0, True, False, scale=0.125),
                   "cudnn": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qg, kg, kg, None, True, 0.0, True, False, scale=0.125),
                   "F.sdpa enable_gqa": lambda: F.scaled_dot_product_attention(qg, kg, kg, is_causal=True, enable_gqa=True)}.items():
        try:
            fn(); torch.cuda.synchronize(); out[f"gqa {nm}"] = "ok"
        except Exception as e:  # noqa: BLE001
            out[f"gqa {nm}"] = f"{type(e).__name__}: {str(e)[:200]}"
    for name, fn in cases.items():
        try:
            h, tot = host_us(fn)
            out[name] = {"host_us": h, "wall_us": tot, "kernels": kernels_per_call(fn)}
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--out"); a = ap.parse_args()
    for sec, fn in (("blocks", blocks), ("seqlen1_backward", seqlen1_backward), ("determinism", determinism)):
        try:
            R[sec] = fn()
        except Exception:  # noqa: BLE001
            R[sec] = traceback.format_exc()[-2000:]
        print(sec, json.dumps(R[sec], indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(R, f, indent=1)
