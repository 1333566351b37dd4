"""Every available attention backend vs the reference on the GPU, in bf16 and fp16 (Dao's rule).

A backend's max error vs the fp32 reference must be <= 2x (3x for gradients) the error of the
reference computed in the low-precision dtype itself, plus a small atol (the dtype's rounding at the
output's magnitude). Calls a backend refuses are skipped with its reason: what a backend declares
is exactly what these tests check.
"""

from __future__ import annotations

import pytest
import torch
from nonfinite_cases import SPECS, assert_like_reference, check_case

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
    # tiny shapes (issue 15 §3: cuDNN's backward raised at seqlen 1): seqlen 1-3, head_dim 16-64
    (2, 1, 1, 5, 5, 16, False, (-1, -1), 0.0),
    (2, 1, 1, 5, 5, 32, True, (-1, -1), 0.0),
    (2, 1, 1, 5, 5, 64, True, (-1, -1), 0.0),
    (2, 2, 2, 5, 5, 16, True, (-1, -1), 0.0),
    (2, 3, 3, 5, 5, 32, False, (-1, -1), 0.0),
    (2, 1, 3, 5, 5, 16, True, (-1, -1), 0.0),
    (2, 3, 2, 4, 2, 32, True, (-1, -1), 0.0),
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


# ---------------------------------------------------------------------------------------------------- tiny shapes


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("seqlen", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_registry_choice_runs_forward_and_backward_at_tiny_seqlens(seqlen, head_dim, causal):
    """Issue 15 §3: whatever the registry picks must run the backward (a backend that cannot must
    refuse in refuse(), so the registry moves on), not raise inside a kernel."""
    q, k, v = (torch.randn(2, seqlen, 5, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    out = flash_attn_func(q, k, v, causal=causal)
    out.backward(torch.randn_like(out))
    r32, _ = attention_core(q, k, v, softmax_scale=head_dim ** -0.5, causal=causal)
    torch.testing.assert_close(out.float(), r32.float(), atol=2e-3, rtol=2e-3)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), str(explain(q, k, v, causal=causal))


# ---------------------------------------------------------------------------------------------------- determinism

# batch >= 60 so that races between thread blocks show; the first two rows are issue 15 §4's case
REPEAT = [  # batch, seqlen_q, seqlen_k, nheads, head_dim, causal
    (60, 1, 239, 4, 32, False),
    (60, 1, 239, 4, 160, False),
    (60, 7, 239, 4, 64, True),
    (60, 128, 128, 4, 128, True),
    (60, 64, 300, 4, 96, False),
    (60, 256, 1024, 4, 256, False),
    (60, 1024, 1024, 4, 32, True),
]


def _repeat_fwd(fn, n):
    first = fn()
    mism = sum(any(not torch.equal(a, b) for a, b in zip(first, fn())) for _ in range(n - 1))
    return first, mism


@pytest.mark.parametrize("case", REPEAT, ids=lambda c: "b{}-sq{}-sk{}-h{}-d{}-c{}".format(*c[:5], int(c[5])))
@pytest.mark.parametrize("name", [*BACKENDS, "auto"])
def test_repeated_calls_are_bitwise_identical(name, case):
    """Issue 15 §4: the same call twice gives the same bits. flash-attn 2.8's contract, which ours
    follows: "the forward pass is always deterministic" (every backend, and the registry's default
    choice), the backward when deterministic=True (every backend that accepts it, and the choice the
    registry makes for it)."""
    B, Sq, Sk, H, D, causal = case
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(B, Sk, H, D, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(B, Sk, H, D, device="cuda", dtype=torch.float16, requires_grad=True)
    be = None if name == "auto" else name
    if be is not None:
        _need(be, explain(q, k, v, causal=causal, requires_grad=False))
    with torch.no_grad():
        def fwd():
            return flash_attn_func(q, k, v, 0.0, causal=causal, return_attn_probs=True, backend=be)[:2]

        chosen = explain(q, k, v, causal=causal, requires_grad=False, backend=be).chosen
        _, mism = _repeat_fwd(fwd, 12 if Sq <= 7 else 4)
    assert mism == 0, f"{chosen}: {mism} of the repeated forwards differ bitwise from the first"
    g = torch.randn(B, Sq, H, D, device="cuda", dtype=torch.float16)
    exp = explain(q, k, v, causal=causal, deterministic=True, backend=be)
    if exp.chosen is None:
        return  # this backend has no deterministic backward: refused (what explain() says), tested above

    def bwd():
        out = flash_attn_func(q, k, v, causal=causal, deterministic=True, backend=be)
        return torch.autograd.grad(out, (q, k, v), g)

    _, mism = _repeat_fwd(bwd, 4)
    assert mism == 0, f"{exp.chosen} (deterministic=True): {mism} of the repeated backwards differ bitwise"


# ---------------------------------------------------------------------------------------------------- paged bounds


PAGED_BACKENDS = [*BACKENDS, "reference"]


@pytest.mark.parametrize("name", PAGED_BACKENDS)
def test_paged_overflow_is_an_input_error_and_the_context_survives(name):
    """Issue 15 §2 on the GPU: capacity + 1 key (appended or not) is refused before any kernel runs
    (it was a CUDA fault that killed the context); exactly full works, before and after."""
    from flashlm.errors import InputError

    B, H, Hk, D, page, nb, pool = 2, 8, 2, 64, 256, 2, 6
    cap = nb * page
    kc = torch.randn(pool, page, Hk, D, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device="cuda")
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.float16)
    kn, vn = torch.randn(B, 1, Hk, D, device="cuda", dtype=torch.float16), torch.randn(B, 1, Hk, D,
                                                                                        device="cuda", dtype=torch.float16)
    _need(name, explain(q, kc, vc, kvcache=True, block_table=table))
    full = torch.full((B,), cap, dtype=torch.int32, device="cuda")
    ref = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full, block_table=table, backend="reference")
    before = kc.clone()
    with pytest.raises(RuntimeError, match=rf"block_table holds {nb} blocks .* = {cap} keys"):
        flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=full, block_table=table, backend=name)
    with pytest.raises(InputError, match="block_table"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full + 1, block_table=table, backend=name)
    bad = table.clone()
    bad[0, 1] = pool
    with pytest.raises(InputError, match="block_table entries"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full, block_table=bad, backend=name)
    torch.cuda.synchronize()
    assert torch.equal(kc, before)
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full, block_table=table, backend=name)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------------- masked slots


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("name", PAGED_BACKENDS)
def test_kvcache_masked_slots_are_never_read(name, paged):
    """Issue 18 §5: NaN/inf in slots past cache_seqlens, before cache_leftpad and in unused pages."""
    B, H, Hk, D, page = 2, 8, 2, 64, 256
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.float16)
    seqlens = torch.tensor([100, 300], dtype=torch.int32, device="cuda")
    if paged:
        kc = torch.randn(6, page, Hk, D, device="cuda", dtype=torch.float16)
        table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device="cuda")
        pad = None
    else:
        kc = torch.randn(B, 512, Hk, D, device="cuda", dtype=torch.float16)
        table = None
        pad = torch.tensor([10, 0], dtype=torch.int32, device="cuda")
    vc = torch.randn_like(kc)
    exp = explain(q, kc, vc, kvcache=True, block_table=table, causal=True)
    _need(name, exp)
    kw = {"cache_seqlens": seqlens, "block_table": table, "causal": True, "backend": name}
    if pad is not None:
        if registry.get_backend(name).capabilities.leftpad is False:
            pad = None
        kw["cache_leftpad"] = pad
    clean = flash_attn_with_kvcache(q, kc, vc, **kw)
    kp, vp = kc.clone(), vc.clone()
    if paged:
        kp[4, 100:], vp[4, 100:] = float("nan"), float("inf")  # row 0: keys 100.. live in page 4 and 1
        kp[1], vp[1] = float("nan"), float("inf")
        kp[5, 300 - page:], vp[5, 300 - page:] = float("nan"), float("-inf")
        kp[[2, 3]], vp[[2, 3]] = float("nan"), float("nan")  # pages no row uses
    else:
        kp[0, 100:], vp[0, 100:] = float("nan"), float("inf")
        kp[1, 300:], vp[1, 300:] = float("inf"), float("nan")
        if pad is not None:
            kp[0, :10], vp[0, :10] = float("nan"), float("inf")
    out = flash_attn_with_kvcache(q, kp, vp, **kw)
    assert torch.isfinite(out).all(), f"{name}: a masked slot reached the output"
    torch.testing.assert_close(out, clean, atol=0, rtol=0)


ROW_EXACT = ("reference", "triton")  # ours: a query never reads a v row it does not see, even in a shared tile


def _masked_rows_equal(name, got, clean, what):
    if torch.equal(got, clean):
        return
    if name not in ROW_EXACT:  # say so, loudly, but it is the vendor kernel's (and flash-attn's) behaviour
        pytest.xfail(f"{name} ({what}): a vendor kernel multiplies the zero probabilities of a partly masked "
                     "tile by v (0 * inf = NaN), as flash-attn itself does; flashlm cannot change that kernel")
    torch.testing.assert_close(got, clean, atol=0, rtol=0, msg=f"{name}: {what}")


@pytest.mark.parametrize("name", PAGED_BACKENDS)
def test_causally_masked_v_rows_are_never_read(name):
    """Issue 18 §5: inf in v row 100 of a causal call: queries 0..99 do not see it and must equal the
    clean output; the same for a varlen batch. Our kernels must; vendor kernels xfail with the reason."""
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    _need(name, explain(q, k, v, causal=True, requires_grad=False))
    clean = flash_attn_func(q, k, v, causal=True, backend=name)
    vp = v.clone()
    vp[:, 100] = float("inf")
    out = flash_attn_func(q, k, vp, causal=True, backend=name)
    _masked_rows_equal(name, out[:, :100], clean[:, :100], "dense")
    cu = torch.tensor([0, 256, 512], dtype=torch.int32, device="cuda")
    flat = [t.flatten(0, 1) for t in (q, k, vp)]
    exp = explain(*flat, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=256, max_seqlen_k=256,
                  requires_grad=False)
    if exp.reasons.get(name) is None:
        out = flash_attn_varlen_func(*flat, cu, cu, 256, 256, causal=True, backend=name).view(2, 256, 4, 64)
        _masked_rows_equal(name, out[:, :100], clean[:, :100], "varlen")


# ---------------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("name", BACKENDS)
def test_non_finite_values_reach_only_the_rows_that_see_them(name, spec, dtype):
    """Issue 25 §6, the CPU test's table (tests/nonfinite_cases.py) on every capable CUDA backend: the
    output equals the reference's, NaN/inf only in the rows that see them. Values in a key tile that
    some query reads may be multiplied by a masked zero in a vendor kernel (as flash-attn does): a
    vendor kernel whose non-finite rows differ xfails with the reason; ours (reference, triton) must
    match, and so must every kernel for cache slots past cache_seqlens or before cache_leftpad."""
    case = spec.build("cuda", dtype, 64)
    _need(name, case.explain())
    if case.leftpad and not registry.get_backend(name).capabilities.leftpad:
        pytest.skip(f"{name} refuses cache_leftpad")
    ref = case.run("reference")
    check_case(spec, ref)
    got = case.run(name)
    rows_differ = not torch.equal(torch.isfinite(got[0]), torch.isfinite(ref[0]))
    if rows_differ and spec.tile_read and name not in ROW_EXACT:
        pytest.xfail(f"{name} ({spec.name}): a vendor kernel multiplies the zero probabilities of a partly "
                     "masked tile by v (0 * inf = NaN), as flash-attn itself does")
    # our Triton kernel keeps NaN/inf to the rows that see them, but a row that sees both a NaN key and
    # an inf value may come out inf where the reference's softmax gives NaN (H100: dense-window-partly-seen)
    assert_like_reference(got, ref, dtype, same_nonfinite_kind=name == "reference")
