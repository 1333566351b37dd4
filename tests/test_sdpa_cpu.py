"""The sdpa_cpu backend (PyTorch's CPU flash kernel) vs the reference: forward, lse and backward.

Dao's rule as in test_attention_gpu.py: the backend's max error vs the fp32 reference must be <= 2x
(3x for gradients) the error of the reference computed in the low-precision dtype itself, plus the
dtype's rounding at the output's magnitude. Cases cover what the CPU kernel does not do natively:
bottom-right causal with seqlen_q != seqlen_k (including rows that see no key), sliding windows,
GQA, varlen with empty sequences, KV caches with ragged rows, left padding and a batch index.
"""

from __future__ import annotations

import pytest
import torch
from nonfinite_cases import SPECS, assert_like_reference, check_case

from flashlm.attention import (
    explain,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    registry,
)
from flashlm.attention.backends import sdpa_cpu
from flashlm.attention.backends.base import AttnCall
from flashlm.attention.backends.reference import ReferenceBackend
from flashlm.attention.backends.sdpa_cpu import BACKEND as SDPA

F32 = ReferenceBackend(upcast=True)
LP = ReferenceBackend(upcast=False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(got, ref32, ref_lp, mult, what):
    err = (got.float() - ref32.float()).abs().max().item() if got.numel() else 0.0
    base = (ref_lp.float() - ref32.float()).abs().max().item() if got.numel() else 0.0
    scale = ref32.float().abs().max().item() if got.numel() else 0.0
    atol = 1e-5 * max(1.0, scale) if got.dtype == torch.float32 else torch.finfo(got.dtype).eps * max(1.0, scale)
    assert err <= mult * base + atol, f"{what}: max err {err:.3g} > {mult} x {base:.3g} + {atol:.3g}"


def _check_lse(lse, lse32, what):
    assert lse.shape == lse32.shape, what
    fin = torch.isfinite(lse32)
    assert torch.equal(torch.isinf(lse) & (lse > 0), ~fin), f"{what}: rows with no key must have lse +inf"
    assert not fin.any() or (lse[fin] - lse32[fin]).abs().max().item() < 2e-2, f"{what} lse"


def _grads_match(out, r32, rlp, inputs, what):
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    ref = torch.autograd.grad(r32.float(), inputs, g.float())
    low = torch.autograd.grad(rlp.float(), inputs, g.float())
    for n, a, b, c in zip("qkv", got, ref, low):
        _check(a, b, c, 3, f"{what} d{n}")


DENSE = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, window
    (2, 33, 33, 4, 2, 16, True, (-1, -1)),  # the tiny preset's kind of call (is_causal path)
    (2, 7, 40, 4, 1, 32, True, (-1, -1)),  # chunked prefill: bottom-right mask
    (2, 40, 7, 4, 4, 16, True, (-1, -1)),  # seqlen_q > seqlen_k: the first rows see no key
    (1, 1, 50, 6, 2, 64, True, (-1, -1)),  # a decode row sees every key
    (2, 48, 48, 4, 2, 16, True, (7, 0)),  # sliding window
    (2, 30, 45, 4, 4, 24, False, (5, 3)),  # non-causal window, seqlen_q < seqlen_k
    (3, 20, 35, 2, 2, 16, False, (-1, -1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_dense_vs_reference(case, dtype):
    B, Sq, Sk, H, Hk, D, causal, window = case
    torch.manual_seed(0)
    q = torch.randn(B, Sq, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Sk, Hk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, Hk, D, dtype=dtype, requires_grad=True)
    assert explain(q, k, v, causal=causal, window_size=window).chosen == "sdpa_cpu"
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True,
                                  backend="sdpa_cpu")
    kw = {"dropout_p": 0.0, "softmax_scale": D ** -0.5, "causal": causal, "softcap": 0.0, "alibi_slopes": None,
          "deterministic": False, "window_size": (window[0], 0) if causal and window[0] >= 0 else window}
    r32, lse32 = F32.dense(q, k, v, **kw)
    rlp, _ = LP.dense(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (B, Sq, H, D)
    _check(out, r32, rlp, 2, "out")
    _check_lse(lse, lse32, "dense")
    _grads_match(out, r32, rlp, (q, k, v), "dense")


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


VARLEN = [  # lens_q, lens_k (None = same), nheads, nheads_k, head_dim, causal, window
    ([30, 0, 1, 17], None, 4, 2, 16, True, (-1, -1)),
    ([10, 20, 3], [15, 25, 1], 4, 4, 32, True, (-1, -1)),  # q shorter and longer than k
    ([10, 4], [0, 9], 4, 1, 16, False, (-1, -1)),  # a sequence without keys
    ([40, 9], None, 4, 2, 16, True, (5, 0)),
]


@pytest.mark.parametrize("path", ["per_sequence", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{c[0]}-{c[1]}-c{int(c[5])}-w{c[6][0]}".replace(" ", ""))
def test_varlen_vs_reference(case, dtype, path, monkeypatch):
    """Both varlen strategies (one call per sequence; one padded call with a per-row mask)."""
    monkeypatch.setattr(sdpa_cpu, "CALL_COST", -10**9 if path == "per_sequence" else 10**9)
    lens_q, lens_k, H, Hk, D, causal, window = case
    torch.manual_seed(1)
    cu_q = _cu(lens_q)
    cu_k = cu_q if lens_k is None else _cu(lens_k)
    lens_k = lens_k or lens_q
    q = torch.randn(sum(lens_q), H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True)
    mq, mk = max(lens_q), max(lens_k)
    args = (q, k, v, cu_q, cu_k, mq, mk)
    assert explain(q, k, v, causal=causal, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                   max_seqlen_q=mq, max_seqlen_k=mk).chosen == "sdpa_cpu"
    out, lse, _ = flash_attn_varlen_func(*args, causal=causal, window_size=window, return_attn_probs=True,
                                         backend="sdpa_cpu")
    kw = {"dropout_p": 0.0, "softmax_scale": D ** -0.5, "causal": causal, "softcap": 0.0, "alibi_slopes": None,
          "deterministic": False, "window_size": (window[0], 0) if causal and window[0] >= 0 else window}
    r32, lse32 = F32.varlen(*args, **kw)
    rlp, _ = LP.varlen(*args, **kw)
    _check(out, r32, rlp, 2, "varlen out")
    _check_lse(lse, lse32, "varlen")
    _grads_match(out, r32, rlp, (q, k, v), "varlen")


KVCACHE = [  # cache_seqlens before the append, new tokens, leftpad, batch_idx, window
    ([9, 9, 9], 1, False, False, (-1, -1)),  # equal rows: a dense call on the sliced cache
    ([0, 13, 40], 1, False, False, (-1, -1)),  # ragged rows: the per-row mask
    ([5, 13, 30], 3, True, False, (-1, -1)),  # left padding, several new tokens
    ([5, 13, 30], 2, False, True, (4, 0)),  # a cache batch index and a window
    ([0, 0, 0], 0, False, False, (-1, -1)),  # nothing to attend to: out 0, lse +inf
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", KVCACHE, ids=str)
def test_kvcache_vs_reference(case, dtype):
    lens, s_new, leftpad, batch_idx, window = case
    torch.manual_seed(2)
    B, H, Hk, D, cap = 3, 4, 2, 16, 48
    q = torch.randn(B, max(s_new, 1), H, D, dtype=dtype)
    k_new = torch.randn(B, s_new, Hk, D, dtype=dtype) if s_new else None
    v_new = torch.randn(B, s_new, Hk, D, dtype=dtype) if s_new else None
    kc = torch.randn(B + 1, cap, Hk, D, dtype=dtype)
    vc = torch.randn_like(kc)
    kw = {"cache_seqlens": torch.tensor(lens, dtype=torch.int32), "causal": True, "window_size": window,
          "return_softmax_lse": True,
          "cache_leftpad": torch.tensor([2, 0, 7], dtype=torch.int32) if leftpad else None,
          "cache_batch_idx": torch.tensor([3, 0, 1], dtype=torch.int32) if batch_idx else None}
    if batch_idx is False:
        kc, vc = kc[:B], vc[:B]
    assert explain(q, kc, vc, causal=True, window_size=window, kvcache=True).chosen == "sdpa_cpu"
    kc_s, vc_s, kc_r, vc_r = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(q, kc_s, vc_s, k_new, v_new, backend="sdpa_cpu", **kw)
    r32, lse32 = flash_attn_with_kvcache(q, kc_r, vc_r, k_new, v_new, backend="reference", **kw)
    assert torch.equal(kc_s, kc_r) and torch.equal(vc_s, vc_r)
    rows = kc_r if kw["cache_batch_idx"] is None else kc_r[kw["cache_batch_idx"].long()]
    vrows = vc_r if kw["cache_batch_idx"] is None else vc_r[kw["cache_batch_idx"].long()]
    rlp, _ = LP.kvcache(q, rows, vrows, kw["cache_seqlens"] + s_new, cache_batch_idx=None,
                        cache_leftpad=kw["cache_leftpad"], block_table=None, softmax_scale=D ** -0.5, causal=True,
                        window_size=window, softcap=0.0, alibi_slopes=None, num_splits=0)
    _check(out, r32, rlp, 2, "kvcache out")
    _check_lse(lse, lse32, "kvcache")


def _call(**kw):
    base = {"kind": "dense", "device_type": "cpu", "compute_capability": None, "dtype": torch.float32,
            "head_dim": 16, "head_dim_v": 16, "nheads": 4, "nheads_k": 2, "seqlen_q": 64, "seqlen_k": 64,
            "causal": True, "window": False, "softcap": False, "alibi": False, "dropout": False,
            "needs_grad": True, "deterministic": False, "seqlens_equal": True}
    return AttnCall(**{**base, **kw})


@pytest.mark.parametrize(("change", "reason"), [
    ({"softcap": True}, "softcap"), ({"alibi": True}, "alibi"), ({"dropout": True}, "dropout"),
    ({"kind": "kvcache", "paged": True, "needs_grad": False}, "paged"), ({"head_dim_v": 8}, "v head_dim"),
    ({"seqlen_k": 0}, "seqlen_k == 0"), ({"kind": "varlen", "seqlen_q": 0}, "empty"), ({"deterministic": True}, "deterministic"), ({"device_type": "cuda"}, "device"),
    ({"dtype": torch.int8}, "dtype"),
])
def test_refuses_what_it_cannot_do_exactly(change, reason):
    assert SDPA.refuse(_call()) is None
    why = SDPA.refuse(_call(**change))
    assert why is not None and reason in why
    # the registry moves on to the reference for those calls
    assert registry.explain_call(_call(**change)).chosen in ("reference", None)


def test_registry_picks_it_on_cpu_before_the_reference():
    for kind in ("dense", "varlen", "kvcache"):
        call = _call(kind=kind, needs_grad=kind != "kvcache")
        exp = registry.explain_call(call)
        assert exp.chosen == "sdpa_cpu", str(exp)
        assert list(exp.reasons).index("sdpa_cpu") < list(exp.reasons).index("reference")


# ---------------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("spec", "path"), [(s, p) for s in SPECS for p in (("per_sequence", "padded")
                                                                             if s.kind == "varlen" else (None,))],
                         ids=lambda x: getattr(x, "name", x or "any"))
def test_non_finite_values_reach_only_the_rows_that_see_them(spec, path, dtype, monkeypatch):
    """Issue 25 §6: NaN/inf in a v/k row a causal query does not see, a NaN query row, cache slots past
    cache_seqlens or before cache_leftpad, keys outside every window: sdpa_cpu equals the reference
    (NaN/inf in the rows that see them, nowhere else). Varlen runs both strategies. Where no query
    reads the values, the kernel is kept (the reference's slow path would be a silent 5x)."""
    monkeypatch.setattr(sdpa_cpu, "CALL_COST", -10**9 if path == "per_sequence" else 10**9)
    case = spec.build("cpu", dtype, 16)
    assert case.explain().chosen == "sdpa_cpu"
    ref = case.run("reference")
    check_case(spec, ref)
    if spec.kernel_kept:
        monkeypatch.setattr(sdpa_cpu, "_exact", _no_slow_path)
    assert_like_reference(case.run("sdpa_cpu"), ref, dtype)


def _no_slow_path(*args, **kwargs):
    raise AssertionError("sdpa_cpu left its kernel for values no query reads")
