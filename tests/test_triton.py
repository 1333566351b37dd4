"""Tests of the Triton attention backend (flashlm.attention.backends.triton).

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before any
kernel is decorated) in fp32/fp16 on tiny shapes; the interpreter mis-computes tl.dot on bf16, so bf16
is only tested on CUDA (tests marked ``cuda``). Errors follow Dao's rule: the kernel's error against
a high-precision reference must be at most 2x (3x for gradients) the error of the same reference
math run in the kernel's own dtype, plus a small atol.
"""

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from triton_aot import run_aot

from flashlm.attention.backends.triton import BACKEND
from flashlm.errors import InputError

GRADS = ("dq", "dk", "dv")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


@pytest.fixture(scope="module", autouse=True)
def _interpreter_active():
    """On CPU every @triton.jit function must be interpreted, triton.language's own (tl.sum, tl.sigmoid)
    included: those are decorated when triton is first imported, so TRITON_INTERPRET=1 must be set
    before that (tests/conftest.py's job when another test module imports triton first)."""
    if ON_GPU:
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from flashlm.attention.backends.triton import fwd
    if not (isinstance(tl.sum, InterpretedFunction) and isinstance(fwd._fwd_kernel, InterpretedFunction)):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py "
                    "(or the environment) to run the Triton kernels in the CPU interpreter")
    yield


# ---------------------------------------------------------------- local reference (fp32/fp64 math)

def ref_attn(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None, dtype=torch.float32):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) (+inf if empty).
    The matmuls run in ``dtype``; bottom-right causal/window alignment."""
    _b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    kf = k.to(dtype).repeat_interleave(h // hk, 2)
    vf = v.to(dtype).repeat_interleave(h // hk, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), kf).to(torch.promote_types(dtype, torch.float32)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None]
    if alibi is not None:
        slopes = alibi.to(s.dtype).view(-1 if alibi.dim() == 2 else 1, h, 1, 1)
        s = s - slopes * (i - j).abs().to(s.dtype)
    left, right = window
    right = 0 if causal else right
    ok = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dtype), vf)
    return out.to(q.dtype), lse.float()


def ref_varlen(q, k, v, cu_q, cu_k, **kw):
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        o, lse = ref_attn(q[None, a:b], k[None, c:d], v[None, c:d], **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def hi_lo(dtype):
    """(reference dtype, low-precision dtype, atol) for Dao's rule."""
    if dtype == torch.float32:
        return torch.float64, torch.float32, 1e-5
    return torch.float32, dtype, 1e-3 if dtype == torch.float16 else 1e-2


def assert_close_rule(name, got, ref, ref_lo, mult=2.0, atol=1e-5):
    err = (got.double() - ref.double()).abs().max().item()
    base = (ref_lo.double() - ref.double()).abs().max().item()
    assert err <= mult * base + atol, f"{name}: error {err:.3g} > {mult} x {base:.3g} + {atol}"


def inputs(shape_q, shape_k, dtype, grad=False):
    q = torch.randn(shape_q, device=DEV, dtype=dtype, requires_grad=grad)
    k = torch.randn(shape_k, device=DEV, dtype=dtype, requires_grad=grad)
    v = torch.randn(shape_k, device=DEV, dtype=dtype, requires_grad=grad)
    return q, k, v


def dense(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    return BACKEND.dense(q, k, v, dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5, causal=causal,
                         window_size=window, softcap=softcap, alibi_slopes=alibi, deterministic=False)


# ------------------------------------------------------------------------------------- CPU (interpreter)

CASES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, window, softcap, alibi)
    (2, 37, 37, 2, 2, 64, False, (-1, -1), 0.0, False),  # plain, ragged last block
    (2, 20, 45, 4, 2, 40, True, (-1, -1), 0.0, False),  # causal q < k, GQA, head_dim 40
    (1, 45, 20, 2, 1, 96, True, (-1, -1), 0.0, False),  # causal q > k (empty rows), MQA, 96
    (1, 33, 33, 2, 2, 64, False, (5, 3), 0.0, False),  # two-sided window
    (1, 24, 40, 2, 2, 128, True, (7, -1), 5.0, True),  # causal + window + softcap + alibi, 128
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}h{c[3]}/{c[4]}d{c[5]}"
                         f"{'c' if c[6] else ''}w{c[7][0]},{c[7][1]}s{c[8]}{'a' if c[9] else ''}")
def test_forward_backward_fp32(case):
    b, sq, sk, h, hk, d, causal, window, softcap, alibi = case
    q, k, v = inputs((b, sq, h, d), (b, sk, hk, d), torch.float32, grad=True)
    slopes = torch.rand(h, device=DEV) * 0.5 if alibi else None
    kw = {"causal": causal, "window": window, "softcap": softcap, "alibi": slopes}
    out, lse = dense(q, k, v, **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_lse = ref_attn(q, k, v, dtype=torch.float64, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    lo, lo_lse = ref_attn(q, k, v, dtype=torch.float32, **kw)
    lo_grads = torch.autograd.grad(lo, (q, k, v), do)
    assert out.shape == q.shape and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    if sq > sk and causal:  # rows that see no key: out 0, lse +inf (flash-attn's convention)
        assert torch.isinf(lse[:, :, : sq - sk]).all() and (out[:, : sq - sk] == 0).all()
    assert_close_rule("out", out, ref, lo)
    assert_close_rule("lse", lse.nan_to_num(posinf=0), ref_lse.nan_to_num(posinf=0), lo_lse.nan_to_num(posinf=0))
    for name, g, r, gl in zip(GRADS, grads, ref_grads, lo_grads):
        assert g.shape == r.shape
        assert_close_rule(name, g, r, gl, mult=3.0)


def test_forward_backward_fp16_gqa_window_softcap():
    q, k, v = inputs((2, 33, 4, 64), (2, 33, 2, 64), torch.float16, grad=True)
    kw = {"causal": True, "window": (9, -1), "softcap": 10.0}
    out, _ = dense(q, k, v, **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, _ = ref_attn(q, k, v, dtype=torch.float32, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    lo, _ = ref_attn(q, k, v, dtype=torch.float16, **kw)
    lo_grads = torch.autograd.grad(lo, (q, k, v), do)
    assert out.dtype == torch.float16
    assert_close_rule("out", out, ref, lo, atol=1e-3)
    for name, g, r, gl in zip(GRADS, grads, ref_grads, lo_grads):
        assert_close_rule(name, g, r, gl, mult=3.0, atol=1e-3)


def test_strided_inputs_and_deterministic_backward():
    # q/k/v as views into one packed (B, S, 3, H, D) tensor: the kernels take strides, no copies.
    qkv = torch.randn(1, 40, 3, 2, 48, device=DEV, requires_grad=True)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out, _ = dense(q, k, v, causal=True)
    do = torch.randn_like(out)
    (g1,) = torch.autograd.grad(out, qkv, do, retain_graph=True)
    (g2,) = torch.autograd.grad(out, qkv, do)
    assert torch.equal(g1, g2)  # no atomics: bitwise reproducible
    ref, _ = ref_attn(q, k, v, causal=True, dtype=torch.float64)
    (gref,) = torch.autograd.grad(ref, qkv, do)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g1, gref.float(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_zero_and_one_token_sequences(dtype):
    seqlens_q = [0, 1, 17, 33, 0, 5]
    seqlens_k = [3, 1, 17, 40, 0, 9]  # q <= k per row (bottom-right causal), one empty pair
    cu_q = torch.tensor([0] + seqlens_q, device=DEV).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, device=DEV).cumsum(0).to(torch.int32)
    q, k, v = inputs((int(cu_q[-1]), 4, 40), (int(cu_k[-1]), 2, 40), dtype, grad=True)
    kw = {"causal": True, "window": (-1, -1), "softcap": 5.0 if dtype == torch.float16 else 0.0}
    out, lse = BACKEND.varlen(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), dropout_p=0.0,
                              softmax_scale=40 ** -0.5, causal=kw["causal"], window_size=kw["window"],
                              softcap=kw["softcap"], alibi_slopes=None, deterministic=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    hi, lo_dt, atol = hi_lo(dtype)
    ref, ref_lse = ref_varlen(q, k, v, cu_q, cu_k, dtype=hi, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    lo, _ = ref_varlen(q, k, v, cu_q, cu_k, dtype=lo_dt, **kw)
    lo_grads = torch.autograd.grad(lo, (q, k, v), do)
    assert_close_rule("out", out, ref, lo, atol=atol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    for name, g, r, gl in zip(GRADS, grads, ref_grads, lo_grads):
        assert_close_rule(name, g, r, gl, mult=3.0, atol=atol)
    # keys of the zero-length query row get exactly zero gradient
    assert (grads[1][: seqlens_k[0]] == 0).all()


def _decode_case(batch, seqlen_q, nheads, nheads_k, head_dim, cache_len, dtype, paged=False,
                 leftpad=False, batch_idx=False, **kw):
    page = 16
    if paged:
        nblocks = batch * (cache_len // page) + 3
        k_cache = torch.randn(nblocks, page, nheads_k, head_dim, device=DEV, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        perm = torch.randperm(nblocks, device=DEV)[: batch * (cache_len // page)]
        block_table = perm.view(batch, cache_len // page).to(torch.int32)
    else:
        rows = batch + 2 if batch_idx else batch
        k_cache = torch.randn(rows, cache_len, nheads_k, head_dim, device=DEV, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        block_table = None
    seqlens = torch.randint(seqlen_q, cache_len + 1, (batch,), device=DEV, dtype=torch.int32)
    seqlens[0] = cache_len
    pad = torch.minimum(torch.randint(0, 5, (batch,), device=DEV), seqlens - seqlen_q).to(torch.int32)
    pad = pad if leftpad else None
    bidx = torch.randperm(batch + 2, device=DEV)[:batch].to(torch.int32) if batch_idx else None
    q = torch.randn(batch, seqlen_q, nheads, head_dim, device=DEV, dtype=dtype)
    out, lse = BACKEND.kvcache(q, k_cache, v_cache, seqlens, cache_batch_idx=bidx, cache_leftpad=pad,
                               block_table=block_table, softmax_scale=head_dim ** -0.5,
                               causal=kw.get("causal", True), window_size=kw.get("window", (-1, -1)),
                               softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi"),
                               num_splits=kw.get("num_splits", 0))
    assert out.shape == q.shape and lse.shape == (batch, nheads, seqlen_q)
    hi, lo_dt, atol = hi_lo(dtype)
    for b in range(batch):
        if paged:
            kk = k_cache[block_table[b].long()].flatten(0, 1)
            vv = v_cache[block_table[b].long()].flatten(0, 1)
        else:
            row = int(bidx[b]) if batch_idx else b
            kk, vv = k_cache[row], v_cache[row]
        s0 = int(pad[b]) if leftpad else 0
        sl = slice(s0, int(seqlens[b]))
        alibi = kw.get("alibi")
        if alibi is not None and alibi.dim() == 2:  # per-(batch, head) slopes
            alibi = alibi[b]
        rkw = {"causal": kw.get("causal", True), "window": kw.get("window", (-1, -1)),
                   "softcap": kw.get("softcap", 0.0), "alibi": alibi}
        ref, ref_lse = ref_attn(q[b: b + 1], kk[None, sl], vv[None, sl], dtype=hi, **rkw)
        lo, _ = ref_attn(q[b: b + 1], kk[None, sl], vv[None, sl], dtype=lo_dt, **rkw)
        assert_close_rule(f"row {b}", out[b: b + 1], ref, lo, atol=atol)
        torch.testing.assert_close(lse[b: b + 1], ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("variant", ["leftpad_batchidx_splits", "paged", "window_softcap_alibi", "fp16"])
def test_decode(variant):
    if variant == "leftpad_batchidx_splits":  # 3 query tokens, per-row lengths, 3 splits to combine
        _decode_case(3, 3, 4, 1, 40, 48, torch.float32, leftpad=True, batch_idx=True, num_splits=3)
    elif variant == "paged":
        _decode_case(2, 1, 4, 2, 64, 64, torch.float32, paged=True, num_splits=2)
    elif variant == "window_softcap_alibi":
        _decode_case(2, 2, 2, 2, 96, 40, torch.float32, leftpad=True, window=(9, -1), softcap=5.0,
                     alibi=torch.rand(2, 2, device=DEV) * 0.5)
    else:
        _decode_case(2, 1, 8, 2, 128, 64, torch.float16, num_splits=2)


def test_custom_ops_trace_under_compile():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    rot = importlib.import_module("flashlm.ops.rotary")  # flashlm.ops.rotary is also a function's name

    q, k, v = inputs((1, 8, 2, 16), (1, 8, 1, 16), torch.float32, grad=True)
    angle = torch.rand(1, 8, 4, device=DEV)
    cos, sin = angle.cos(), angle.sin()
    targets = []

    def record(gm, example_inputs):  # the AOT forward and backward graphs
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def f(q, k, v):
        out, _ = dense(rot._rotary(q, cos, sin, False), k, v, causal=True)
        return out.square().sum()

    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    # Compiled code calls the custom ops (eager calls take autograd.Functions around the same launchers).
    for op in ("flashlm_triton.fwd", "flashlm_triton.bwd", "flashlm_ops.rotary_fwd"):
        assert any(t.startswith(op) for t in targets), (op, targets)
    ref_loss = f(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_eager_autograd_functions_match_custom_ops():
    """Eager calls needing gradients take autograd.Functions (less host time than the custom ops'
    dispatch): same launchers, so bitwise the same outputs and gradients as the ops."""
    from flashlm.attention.backends.triton.bwd import fwd_op

    def check(eager, op, args, grad_fn):
        assert type(eager[0].grad_fn).__name__ == grad_fn
        assert eager[1].requires_grad == op[1].requires_grad  # lse: as the op (gradient ignored)
        do = torch.randn_like(op[0])
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        for e, o in zip(eager, op):
            assert torch.equal(e, o)
        for ge, go in zip(torch.autograd.grad(eager[0], leaves, do), torch.autograd.grad(op[0], leaves, do)):
            assert torch.equal(ge, go)

    # dense: GQA, causal + window
    q, k, v = inputs((2, 19, 4, 32), (2, 23, 2, 32), torch.float32, grad=True)
    args = (q, k, v, None, None, 19, 23, 32 ** -0.5, True, 5, -1, 0.0, None)
    check(dense(q, k, v, causal=True, window=(5, -1)), fwd_op(*args), args, "AttnFunctionBackward")
    # varlen: softcap + alibi (a saved optional tensor)
    cu = torch.tensor([0, 7, 20], device=DEV, dtype=torch.int32)
    q, k, v = inputs((20, 4, 24), (20, 2, 24), torch.float32, grad=True)
    alibi = torch.rand(4, device=DEV)
    eager = BACKEND.varlen(q, k, v, cu, cu, 13, 13, dropout_p=0.0, softmax_scale=0.2, causal=True,
                           window_size=(-1, -1), softcap=3.0, alibi_slopes=alibi, deterministic=True)
    args = (q, k, v, cu, cu, 13, 13, 0.2, True, -1, -1, 3.0, alibi)
    check(eager, fwd_op(*args), args, "AttnFunctionBackward")


def test_capabilities_and_refusals():
    from flashlm.attention.backends.base import AttnCall

    caps = BACKEND.capabilities
    assert caps.varlen and caps.kvcache and caps.paged_kv and caps.window and caps.softcap and caps.alibi
    assert caps.backward and caps.deterministic and not caps.dropout and caps.head_dims == (1, 256)
    call = {"kind": "dense", "device_type": "cuda", "compute_capability": (9, 0), "dtype": torch.bfloat16, "head_dim": 96,
                "head_dim_v": 96, "nheads": 8, "nheads_k": 2, "seqlen_q": 100, "seqlen_k": 50, "causal": True, "window": True,
                "softcap": True, "alibi": True, "dropout": False, "needs_grad": True, "deterministic": True}
    assert BACKEND.refuse(AttnCall(**call)) is None
    assert "dropout" in BACKEND.refuse(AttnCall(**{**call, "dropout": True}))
    assert "head_dim" in BACKEND.refuse(AttnCall(**{**call, "head_dim": 320, "head_dim_v": 320}))
    assert "device" in BACKEND.refuse(AttnCall(**{**call, "device_type": "cpu"}))
    assert "paged" in BACKEND.refuse(AttnCall(**{**call, "kind": "varlen", "paged": True}))
    with pytest.raises(InputError, match="dropout_p"):
        q, k, v = inputs((1, 4, 1, 16), (1, 4, 1, 16), torch.float32)
        BACKEND.dense(q, k, v, dropout_p=0.1, softmax_scale=0.25, causal=False, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None, deterministic=False)


# ------------------------------------------------------------------------------------------ CUDA

GPU_CASES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, window, softcap)
    (2, 512, 512, 8, 8, 128, True, (-1, -1), 0.0),
    (2, 300, 700, 8, 2, 64, True, (-1, -1), 0.0),
    (1, 700, 300, 4, 1, 96, True, (-1, -1), 0.0),
    (2, 513, 513, 4, 4, 256, False, (-1, -1), 0.0),
    (1, 1000, 1000, 8, 2, 128, True, (127, 0), 30.0),
    (2, 257, 257, 4, 4, 40, False, (32, 16), 0.0),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_dense_fwd_bwd(case, dtype):
    b, sq, sk, h, hk, d, causal, window, softcap = case
    q, k, v = inputs((b, sq, h, d), (b, sk, hk, d), dtype, grad=True)
    kw = {"causal": causal, "window": window, "softcap": softcap}
    out, lse = dense(q, k, v, **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_lse = ref_attn(q, k, v, dtype=torch.float32, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    lo, _ = ref_attn(q, k, v, dtype=dtype, **kw)
    lo_grads = torch.autograd.grad(lo, (q, k, v), do)
    atol = 1e-3 if dtype == torch.float16 else 1e-2
    assert_close_rule("out", out, ref, lo, atol=atol)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-2, rtol=1e-3)
    for name, g, r, gl in zip(GRADS, grads, ref_grads, lo_grads):
        assert_close_rule(name, g, r, gl, mult=3.0, atol=atol)


@pytest.mark.cuda
def test_cuda_varlen_and_decode_bf16():
    torch.manual_seed(1)
    seqlens = [0, 1, 300, 1025, 64]
    cu = torch.tensor([0] + seqlens, device=DEV).cumsum(0).to(torch.int32)
    q, k, v = inputs((int(cu[-1]), 8, 128), (int(cu[-1]), 2, 128), torch.bfloat16, grad=True)
    out, _ = BACKEND.varlen(q, k, v, cu, cu, max(seqlens), max(seqlens), dropout_p=0.0, softmax_scale=128 ** -0.5,
                            causal=True, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, _ = ref_varlen(q, k, v, cu, cu, causal=True, dtype=torch.float32)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    lo, _ = ref_varlen(q, k, v, cu, cu, causal=True, dtype=torch.bfloat16)
    lo_grads = torch.autograd.grad(lo, (q, k, v), do)
    assert_close_rule("out", out, ref, lo, atol=1e-2)
    for name, g, r, gl in zip(GRADS, grads, ref_grads, lo_grads):
        assert_close_rule(name, g, r, gl, mult=3.0, atol=1e-2)
    _decode_case(4, 1, 32, 8, 128, 1024, torch.bfloat16)
    _decode_case(3, 4, 16, 4, 128, 512, torch.bfloat16, paged=True, leftpad=False, window=(100, -1), softcap=20.0)
    _decode_case(2, 1, 8, 8, 64, 300, torch.float16, leftpad=True, batch_idx=True, num_splits=5)


# ---------------------------------------------------------------- ahead-of-time compile (no GPU needed)

_AOT_SCRIPT = r"""
from triton_aot import compile_sm90
from flashlm.attention.backends.triton import bwd, decode, fwd

INT_PTRS = {"CuQ", "CuK", "CacheSeqlens", "LeftPad", "BatchIdx", "BlockTable"}
F32_PTRS = {"Lse", "Delta", "Alibi", "LPart", "OPart"}
PTRS = {**dict.fromkeys(INT_PTRS, "*i32"), **dict.fromkeys(F32_PTRS, "*fp32")}
SCALARS = dict.fromkeys(("qk_scale", "softcap", "softmax_scale"), "fp32")
FLAGS = {"BANDED": True, "SOFTCAP": False, "ALIBI": False, "IS_VARLEN": False, "EVEN_D": True, "PAGED": True,
         "HAS_LEFTPAD": False, "HAS_BATCH_IDX": False, "HEAD_DIM": 128, "BLOCK_D": 128, "DOT_PREC": "tf32"}
# the Hopper tiles of common.fwd_config / bwd_config / decode_config at head_dim 128
for jit, bm, bn, warps in [(fwd._fwd_kernel, 128, 64, 8), (bwd._dq_kernel, 128, 64, 8),
                           (bwd._dkdv_kernel, 64, 128, 8), (decode._decode_kernel, 16, 128, 4)]:
    compile_sm90(jit, {**FLAGS, "BLOCK_M": bm, "BLOCK_N": bn}, PTRS, "*fp16", SCALARS, num_warps=warps)
# decode_config's Hopper tile at head_dim 64 (64-key tiles, 2 warps past one wave of programs)
compile_sm90(decode._decode_kernel, {**FLAGS, "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_M": 16, "BLOCK_N": 64}, PTRS,
             "*fp16", SCALARS, num_warps=2)
compile_sm90(bwd._bwd_preprocess, {**FLAGS, "BLOCK_M": 64}, PTRS, "*fp16", SCALARS)
compile_sm90(decode._combine_kernel, {**FLAGS, "BLOCK_S": 8}, PTRS, "*fp16", SCALARS)
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile the kernels")
def test_masked_tile_kernels_compile_for_sm90():
    """The interpreter runs a kernel's Python and misses what only the compiler checks (a variable's
    type changed across if/else, dots inside branches): compile the banded forward, backward (preprocess,
    dK/dV, dQ), decode and combine kernels for sm90 (RoPE's: tests/ops/test_ops_aot.py) ahead of time, in a process
    without TRITON_INTERPRET (no GPU needed)."""
    run_aot(_AOT_SCRIPT)
