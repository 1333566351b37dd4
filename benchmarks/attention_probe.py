"""Probe what PyTorch's cuDNN and FA2 attention ops do on this GPU, against the reference.

Calls the backends' entry points directly (bypassing their declared capabilities) on small bf16
cases and records, per feature, the max error vs the fp32 reference next to the error of the
reference computed in bf16 itself (Dao's rule: ok when <= 2x + 1e-3), or the exception. Used to
decide what backends/cudnn.py and backends/torch_flash.py declare. Writes JSON to argv[1].
"""

from __future__ import annotations

import json
import sys
import traceback

import torch

from flashlm.attention.backends import cudnn, torch_flash
from flashlm.attention.backends.reference import BACKEND as REF
from flashlm.attention.backends.reference import ReferenceBackend, attention_core

DT = torch.bfloat16
dev = torch.device("cuda")


def rnd(*shape, grad=False):
    return torch.randn(*shape, device=dev, dtype=DT, requires_grad=grad)


def judge(out, ref32, ref_lp):
    err = (out.float() - ref32.float()).abs().max().item()
    base = (ref_lp.float() - ref32.float()).abs().max().item()
    return {"err": err, "ref_lp_err": base, "ok": bool(err <= 2 * base + 1e-3)}


def judge_grads(out, r32, rlp, inputs):
    """judge() of dq, dk, dv: the backend's against the fp32 and low-precision references' (same dout)."""
    g = torch.randn_like(out)
    d_be = torch.autograd.grad(out, inputs, g)
    d32 = torch.autograd.grad(r32, inputs, g)
    dlp = torch.autograd.grad(rlp.float(), inputs, g)
    return [judge(a, b, c) for a, b, c in zip(d_be, d32, dlp)]


def dense_case(be, B, Sq, Sk, H, Hk, D, causal, grad):
    q, k, v = rnd(B, Sq, H, D, grad=grad), rnd(B, Sk, Hk, D, grad=grad), rnd(B, Sk, Hk, D, grad=grad)
    kw = {"dropout_p": 0.0, "softmax_scale": D ** -0.5, "causal": causal, "window_size": (-1, -1), "softcap": 0.0,
              "alibi_slopes": None, "deterministic": False}
    out, lse = be.dense(q, k, v, **kw)
    r32, lse32 = attention_core(q, k, v, softmax_scale=D ** -0.5, causal=causal)
    rlp, _ = attention_core(q, k, v, softmax_scale=D ** -0.5, causal=causal, upcast=False)
    res = {"fwd": judge(out, r32, rlp), "lse_shape": list(lse.shape)}
    fin = torch.isfinite(lse32)
    res["lse_err"] = (lse.float()[fin] - lse32[fin]).abs().max().item() if fin.any() else None
    if causal and Sq != Sk:  # which alignment does it use?
        rep = H // Hk
        tl = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().repeat_interleave(rep, 2).transpose(1, 2),
            v.float().repeat_interleave(rep, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
        res["matches_top_left"] = (out.float() - tl).abs().max().item() < 0.05
    if grad:
        res["bwd"] = judge_grads(out, r32, rlp, (q, k, v))
    return res


def varlen_case(be, lens_q, lens_k, H, Hk, D, causal, grad):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=dev)
    cu_k = cu_q if lens_q == lens_k else torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32,
                                                      device=dev)
    q, k, v = rnd(sum(lens_q), H, D, grad=grad), rnd(sum(lens_k), Hk, D, grad=grad), rnd(sum(lens_k), Hk, D, grad=grad)
    kw = {"dropout_p": 0.0, "softmax_scale": D ** -0.5, "causal": causal, "window_size": (-1, -1), "softcap": 0.0,
              "alibi_slopes": None, "deterministic": False}
    out, lse = be.varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    r32, lse32 = REF.varlen(q.float(), k.float(), v.float(), cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    rlp, _ = ReferenceBackend(upcast=False).varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    res = {"fwd": judge(out, r32, rlp), "lse_shape": list(lse.shape)}
    fin = torch.isfinite(lse32)
    try:
        res["lse_err"] = (lse.float()[fin] - lse32[fin]).abs().max().item()
    except Exception as exc:  # noqa: BLE001
        res["lse_err"] = repr(exc)
    if grad:
        res["bwd"] = judge_grads(out, r32, rlp, (q, k, v))
    return res


CASES = {
    "dense_mha": lambda be: dense_case(be, 2, 128, 128, 8, 8, 64, False, True),
    "dense_mha_causal": lambda be: dense_case(be, 2, 128, 128, 8, 8, 128, True, True),
    "dense_gqa": lambda be: dense_case(be, 2, 128, 128, 8, 2, 128, False, True),
    "dense_gqa_causal": lambda be: dense_case(be, 2, 256, 256, 8, 2, 128, True, True),
    "dense_q_lt_k_causal": lambda be: dense_case(be, 2, 64, 256, 8, 8, 128, True, False),
    "dense_q_gt_k_causal": lambda be: dense_case(be, 2, 256, 64, 8, 8, 128, True, False),
    "dense_q_ne_k": lambda be: dense_case(be, 2, 64, 256, 8, 8, 128, False, True),
    "dense_d256": lambda be: dense_case(be, 2, 128, 128, 4, 4, 256, True, True),
    "dense_d96": lambda be: dense_case(be, 2, 128, 128, 4, 4, 96, True, True),
    "dense_odd_seq": lambda be: dense_case(be, 3, 255, 255, 4, 4, 64, True, True),
    "varlen_causal": lambda be: varlen_case(be, [100, 1, 37, 256], [100, 1, 37, 256], 8, 8, 128, True, True),
    "varlen_noncausal_qk": lambda be: varlen_case(be, [10, 50, 3], [40, 60, 7], 8, 8, 64, False, True),
    "varlen_gqa_causal": lambda be: varlen_case(be, [100, 17, 128], [100, 17, 128], 8, 2, 128, True, True),
    "varlen_zero_len": lambda be: varlen_case(be, [5, 0, 64], [5, 0, 64], 4, 4, 64, True, False),
}


def main(path):
    report = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "device": torch.cuda.get_device_name(),
              "schemas": {n: str(getattr(torch.ops.aten, n).default._schema) for n in
                          ("_flash_attention_forward", "_flash_attention_backward", "_cudnn_attention_forward",
                           "_cudnn_attention_backward") if hasattr(torch.ops.aten, n)},
              "torch_flash_flags": {"window": torch_flash.HAS_WINDOW, "seqused_k": torch_flash.HAS_SEQUSED_K,
                                        "alibi": torch_flash.HAS_ALIBI, "block_table": torch_flash.HAS_BLOCK_TABLE}}
    for name, be in (("cudnn", cudnn.BACKEND), ("torch_flash", torch_flash.BACKEND)):
        report[name] = {}
        for case, fn in CASES.items():
            try:
                report[name][case] = fn(be)
            except Exception as exc:  # noqa: BLE001
                report[name][case] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}",
                                      "tb": traceback.format_exc()[-600:]}
            torch.cuda.synchronize()
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for name in ("cudnn", "torch_flash"):
        for case, r in report[name].items():
            if "error" in r:
                print(f"{name:<12} {case:<22} ERROR {r['error'][:150]}")
            else:
                bwd = r.get("bwd")
                print(f"{name:<12} {case:<22} fwd_ok={r['fwd']['ok']} err={r['fwd']['err']:.4f} "
                      f"base={r['fwd']['ref_lp_err']:.4f} lse={r['lse_shape']} lse_err={r.get('lse_err')} "
                      f"top_left={r.get('matches_top_left')} "
                      f"bwd_ok={None if bwd is None else [b['ok'] for b in bwd]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "probe.json")
