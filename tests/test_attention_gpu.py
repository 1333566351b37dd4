"""Every available attention backend vs the reference on the GPU, in bf16 and fp16 (Dao's rule).

A backend's max error vs the fp32 reference must be <= 2x (3x for gradients) the error of the
reference computed in the low-precision dtype itself, plus a small atol (the dtype's rounding at the
output's magnitude). Calls a backend refuses are skipped with its reason: what a backend declares
is exactly what these tests check.
"""

from __future__ import annotations

import pytest
import torch

from flashlm.attention import (
    apply_rotary,
    explain,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    known_backends,
    registry,
)
from flashlm.attention.backends.reference import ReferenceBackend, attention_core

pytestmark = pytest.mark.cuda

BACKENDS = [n for n in known_backends() if n != "reference"]
DTYPES = [torch.bfloat16, torch.float16]
LP = ReferenceBackend(upcast=False)
F32 = ReferenceBackend(upcast=True)


def _atol(ref, dtype):
    r = ref.float()
    return 2 * ((r + 0.3).to(dtype).float() - 0.3 - r).abs().max().item() + 1e-5


def _check(got, ref32, ref_lp, mult, what):
    err = (got.float() - ref32.float()).abs().max().item()
    base = (ref_lp.float() - ref32.float()).abs().max().item()
    atol = _atol(ref32, got.dtype if got.dtype != torch.float32 else torch.bfloat16)
    assert err <= mult * base + atol, f"{what}: max err {err:.5f} > {mult} x {base:.5f} + {atol:.5f}"


def _need(name, call_explanation):
    why = registry.unavailable_reason(name)
    if why:
        pytest.skip(f"{name} unavailable: {why}")
    why = call_explanation.reasons.get(name)
    if why:
        pytest.skip(f"{name} refuses: {why}")


DENSE = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, window, softcap
    (2, 128, 128, 8, 8, 64, False, (-1, -1), 0.0),
    (2, 255, 255, 8, 2, 128, True, (-1, -1), 0.0),
    (1, 17, 1024, 8, 1, 128, True, (-1, -1), 0.0),
    (2, 128, 17, 8, 8, 64, True, (-1, -1), 0.0),
    (3, 1, 255, 8, 2, 128, True, (-1, -1), 0.0),
    (2, 256, 256, 8, 2, 128, True, (63, 0), 0.0),
    (2, 128, 200, 8, 8, 64, False, (32, 16), 0.0),
    (2, 128, 128, 8, 8, 128, True, (-1, -1), 30.0),
    (2, 128, 128, 4, 4, 256, True, (-1, -1), 0.0),
    (2, 96, 96, 4, 4, 96, True, (-1, -1), 0.0),
    (2, 64, 64, 4, 4, 32, False, (-1, -1), 0.0),
    (4, 1024, 1024, 8, 2, 128, True, (-1, -1), 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("name", BACKENDS)
def test_dense_vs_reference(name, case, dtype):
    B, Sq, Sk, H, Hk, D, causal, window, softcap = case
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    _need(name, explain(q, k, v, causal=causal, window_size=window, softcap=softcap, requires_grad=False))
    grad_ok = explain(q, k, v, causal=causal, window_size=window, softcap=softcap).reasons.get(name) is None
    with torch.set_grad_enabled(grad_ok):
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                      return_attn_probs=True, backend=name)
    kw = {"softmax_scale": D ** -0.5, "causal": causal, "window_size": window if not causal else (window[0], 0),
              "softcap": softcap}
    r32, lse32 = attention_core(q, k, v, **kw)
    rlp, _ = attention_core(q, k, v, upcast=False, **kw)
    _check(out, r32, rlp, 2, f"{name} out")
    fin = torch.isfinite(lse32)
    assert (lse.float()[fin] - lse32[fin]).abs().max().item() < 2e-2, f"{name} lse"
    assert out.dtype == dtype and out.shape == (B, Sq, H, D)
    if not grad_ok:
        return  # forward only for this backend
    g = torch.randn_like(out)
    d_be = torch.autograd.grad(out, (q, k, v), g)
    d32 = torch.autograd.grad(r32, (q, k, v), g)
    dlp = torch.autograd.grad(rlp.float(), (q, k, v), g)
    for n, a, b, c in zip("qkv", d_be, d32, dlp):
        _check(a, b, c, 3, f"{name} d{n}")


VARLEN = [  # lens_q, lens_k (None = same cu_seqlens), nheads, nheads_k, head_dim, causal, window
    ([100, 0, 1, 256, 37], None, 8, 2, 128, True, (-1, -1)),
    ([10, 50, 3], [40, 60, 7], 8, 8, 64, False, (-1, -1)),
    ([10, 50, 3], [40, 60, 7], 8, 8, 64, True, (-1, -1)),
    ([300, 17, 1], None, 8, 8, 128, True, (31, 0)),
]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{len(c[0])}seqs-{c[2]}/{c[3]}-d{c[4]}-c{int(c[5])}-w{c[6][0]}")
@pytest.mark.parametrize("name", BACKENDS)
def test_varlen_vs_reference(name, case, dtype):
    lens_q, lens_k, H, Hk, D, causal, window = case
    cu_q = _cu(lens_q)
    cu_k = cu_q if lens_k is None else _cu(lens_k)
    lens_k = lens_k or lens_q
    q = torch.randn(sum(lens_q), H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    mq, mk = max(lens_q), max(lens_k)
    _need(name, explain(q, k, v, causal=causal, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        max_seqlen_q=mq, max_seqlen_k=mk, requires_grad=False))
    grad_ok = explain(q, k, v, causal=causal, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                      max_seqlen_q=mq, max_seqlen_k=mk).reasons.get(name) is None
    with torch.set_grad_enabled(grad_ok):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal, window_size=window,
                                             return_attn_probs=True, backend=name)
    kw = {"dropout_p": 0.0, "softmax_scale": D ** -0.5, "causal": causal,
              "window_size": (window[0], 0) if causal and window[0] >= 0 else window, "softcap": 0.0,
              "alibi_slopes": None, "deterministic": False}
    r32, lse32 = F32.varlen(q, k, v, cu_q, cu_k, mq, mk, **kw)
    rlp, _ = LP.varlen(q, k, v, cu_q, cu_k, mq, mk, **kw)
    _check(out, r32, rlp, 2, f"{name} varlen out")
    fin = torch.isfinite(lse32)
    assert lse.shape == lse32.shape
    assert (lse.float()[fin] - lse32[fin]).abs().max().item() < 2e-2, f"{name} varlen lse"
    if not grad_ok:
        return
    g = torch.randn_like(out)
    d_be = torch.autograd.grad(out, (q, k, v), g)
    d32 = torch.autograd.grad(r32.float(), (q, k, v), g)
    dlp = torch.autograd.grad(rlp.float(), (q, k, v), g)
    for n, a, b, c in zip("qkv", d_be, d32, dlp):
        _check(a, b, c, 3, f"{name} varlen d{n}")


KVCACHE = [  # nheads, nheads_k, head_dim, seqlen_new, causal, window, rotary, paged
    (8, 2, 128, 1, True, (-1, -1), False, False),
    (8, 2, 128, 5, True, (-1, -1), True, False),
    (8, 8, 64, 3, False, (-1, -1), True, False),
    (8, 1, 128, 1, True, (127, 0), False, False),
    (8, 2, 128, 1, True, (-1, -1), False, True),
    (8, 2, 128, 4, True, (-1, -1), True, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", KVCACHE, ids=lambda c: f"{c[0]}/{c[1]}-d{c[2]}-new{c[3]}-c{int(c[4])}-w{c[5][0]}"
                                                        f"-rot{int(c[6])}-paged{int(c[7])}")
@pytest.mark.parametrize("name", BACKENDS)
def test_kvcache_vs_reference(name, case, dtype):
    H, Hk, D, s_new, causal, window, rotary, paged = case
    B, cap, page = 3, 512, 256
    seqlens = torch.tensor([0, 77, 400], dtype=torch.int32, device="cuda")
    q = torch.randn(B, s_new, H, D, device="cuda", dtype=dtype)
    k = torch.randn(B, s_new, Hk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, s_new, Hk, D, device="cuda", dtype=dtype)
    if paged:
        nblocks = 8
        kc = torch.randn(nblocks, page, Hk, D, device="cuda", dtype=dtype)
        block_table = torch.tensor([[5, 1], [0, 7], [3, 2]], dtype=torch.int32, device="cuda")
    else:
        kc = torch.randn(B, cap, Hk, D, device="cuda", dtype=dtype)
        block_table = None
    vc = torch.randn_like(kc)
    cos = sin = None
    if rotary:
        ang = torch.rand(cap, D // 4, device="cuda") * 6.28
        cos, sin = ang.cos(), ang.sin()
    _need(name, explain(q, kc, vc, causal=causal, window_size=window, kvcache=True, block_table=block_table))
    kw = {"rotary_cos": cos, "rotary_sin": sin, "cache_seqlens": seqlens, "block_table": block_table, "causal": causal,
              "window_size": window, "rotary_interleaved": False, "return_softmax_lse": True}
    kc_b, vc_b = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(q, kc_b, vc_b, k, v, backend=name, **kw)
    kc_r, vc_r = kc.clone(), vc.clone()
    r32, lse32 = flash_attn_with_kvcache(q, kc_r, vc_r, k, v, backend="reference", **kw)
    assert torch.equal(kc_b, kc_r) and torch.equal(vc_b, vc_r)
    q_rot = q
    if rotary:
        pos = seqlens.long()[:, None] + (torch.arange(s_new, device="cuda") if causal else 0)
        pos = pos.expand(B, s_new)
        q_rot = apply_rotary(q, cos[pos], sin[pos], False)
    rlp, _ = LP.kvcache(q_rot, kc_r, vc_r, seqlens + s_new, cache_batch_idx=None, cache_leftpad=None,
                        block_table=block_table, softmax_scale=D ** -0.5, causal=causal,
                        window_size=(window[0], 0) if causal and window[0] >= 0 else window, softcap=0.0,
                        alibi_slopes=None, num_splits=0)
    _check(out, r32, rlp, 2, f"{name} kvcache out")
    fin = torch.isfinite(lse32)
    assert (lse.float()[fin] - lse32[fin]).abs().max().item() < 2e-2, f"{name} kvcache lse"


def test_auto_choice_is_not_reference_for_bf16():
    q = torch.randn(2, 256, 8, 128, device="cuda", dtype=torch.bfloat16)
    exp = explain(q, q, q, causal=True)
    assert exp.chosen not in (None, "reference"), str(exp)
