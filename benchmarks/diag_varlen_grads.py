"""GPU check of varlen attention gradients per backend in bf16 (the flash model's Dao-rule test failed
for window/softcap on the H200): error of each backend and of the reference run in bf16, against the
fp32 reference, for out/dq/dk/dv. Prints one line per (case, backend, tensor)."""
import torch

from flashlm.attention import available_backends, flash_attn_varlen_func, use_backend

torch.manual_seed(0)
lens = [300, 17, 128]
H, KV, D = 4, 2, 64
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
T, M = sum(lens), max(lens)
for name, kw in {"plain": {}, "window": {"window_size": (2, 0)}, "softcap": {"softcap": 2.0}}.items():
    q32, k32, v32 = (torch.randn(T, h, D, device="cuda") for h in (H, KV, KV))
    g32 = torch.randn(T, H, D, device="cuda")
    def run(backend, dt, qkv=(q32, k32, v32), g32=g32, kw=kw):
        q, k, v = (t.to(dt).requires_grad_() for t in qkv)
        with use_backend(backend):
            o = flash_attn_varlen_func(q, k, v, cu, cu, M, M, causal=True, **kw)
            return (o, *torch.autograd.grad(o, (q, k, v), g32.to(dt)))
    ref = run("reference", torch.float32)
    ref16 = run("reference", torch.bfloat16)
    for b in available_backends():
        try:
            got = run(b, torch.bfloat16)
        except Exception as e:  # noqa: BLE001
            print(f"{name:8s} {b:12s} refused/error: {str(e)[:90]}")
            continue
        errs = []
        for i, t in enumerate(("out", "dq", "dk", "dv")):
            e_ref = (ref16[i].float() - ref[i]).abs().max().item()
            e = (got[i].float() - ref[i]).abs().max().item()
            errs.append(f"{t} {e:.2e} ({e / max(e_ref, 1e-9):.1f}x ref16)")
        print(f"{name:8s} {b:12s} " + "  ".join(errs))
