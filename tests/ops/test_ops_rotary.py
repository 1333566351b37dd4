"""rotary_qkv / rotary: the Triton kernels (interpreter on CPU) against the torch reference, forward
and backward, per-row tables (batch or 1), GQA and MHA head counts, gradients with any strides."""

import importlib

import pytest
import torch
from _judge import grads, judge, leaf

from flashlm import ops
from flashlm.errors import InputError


def _tables(batch, seqlen, head_dim):
    angles = torch.rand(batch, seqlen, head_dim // 2) * 50
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,seqlen,heads,kv_heads,head_dim,table_batch", [
    (1, 1, 3, 1, 10, 1), (2, 37, 4, 2, 16, 2), (2, 9, 3, 3, 6, 1), (1, 40, 20, 5, 8, 1)])
def test_rotary_qkv_matches_reference(batch, seqlen, heads, kv_heads, head_dim, table_batch, dtype):
    qkv = torch.randn(batch, seqlen, (heads + 2 * kv_heads) * head_dim)
    cos, sin = _tables(table_batch, seqlen, head_dim)
    args = (cos, sin, heads, kv_heads, head_dim)
    truth_in, low_in, got_in = leaf(qkv, torch.float32), leaf(qkv, dtype), leaf(qkv, dtype)
    truth = ops.rotary_qkv_ref(truth_in, *args)
    ref = ops.rotary_qkv_ref(low_in, *args)
    got = ops.rotary_qkv(got_in, *args)
    judge(got, ref, tuple(t.to(dtype) for t in truth), dtype, "(q, k, v)")
    # one shared upstream gradient per output, q's in a transposed (BHSD-contiguous) layout
    ups = [torch.randn(t.shape) for t in truth]
    ups[0] = ups[0].transpose(1, 2).contiguous().transpose(1, 2)
    low_ups = [u.to(dtype) for u in ups]
    judge(grads(got, [got_in], low_ups), grads(ref, [low_in], low_ups), grads(truth, [truth_in], ups),
          dtype, "grad_qkv", factor=3.0)


def test_rotary_qkv_layout_and_rounding_match_the_kernel_it_replaces():
    """One (B, S, H + 2 KV, D) buffer behind the three views; q/k bit-equal to the old kernel's
    reference (fp32 math, one rounding), v a copy."""
    qkv = torch.randn(2, 5, (4 + 2 * 2) * 8, dtype=torch.float16)
    cos, sin = _tables(2, 5, 8)
    q, k, v = ops.rotary_qkv(qkv, cos, sin, 4, 2, 8)
    assert q.shape == (2, 5, 4, 8) and k.shape == v.shape == (2, 5, 2, 8)
    assert q.data_ptr() + 4 * 8 * 2 == k.data_ptr() and q.stride() == (5 * 64, 64, 8, 1)
    parts = qkv.unflatten(-1, (8, 8)).split((4, 2, 2), dim=2)
    assert q.equal(ops.rotary_ref(parts[0], cos, sin)) and k.equal(ops.rotary_ref(parts[1], cos, sin))
    assert v.equal(parts[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_single_tensor(dtype):
    x = torch.randn(2, 6, 3, 12).transpose(1, 2).contiguous().transpose(1, 2)  # strided heads
    cos, sin = _tables(2, 6, 12)
    truth_in, low_in, got_in = leaf(x, torch.float32), leaf(x, dtype), leaf(x, dtype)
    truth, ref = ops.rotary_ref(truth_in, cos, sin), ops.rotary_ref(low_in, cos, sin)
    got = ops.rotary(got_in, cos, sin)
    judge(got, ref, truth.to(dtype), dtype, "out")
    g = torch.randn(x.shape)
    judge(grads(got, [got_in], [g.to(dtype)]), grads(ref, [low_in], [g.to(dtype)]),
          grads(truth, [truth_in], [g]), dtype, "grad", factor=3.0)


def test_bad_input_is_refused():
    cos, sin = _tables(1, 4, 8)
    with pytest.raises(InputError, match="qkv must be"):
        ops.rotary_qkv(torch.randn(1, 4, 5 * 8), cos, sin, 2, 2, 8)
    with pytest.raises(InputError, match="cos/sin must"):
        ops.rotary_qkv(torch.randn(1, 4, 4 * 8), cos[:, :3], sin[:, :3], 2, 1, 8)
    with pytest.raises(InputError, match="cos/sin must"):  # rotary_dim 16 > head_dim 8 (16 // 2 is partial: fine)
        ops.rotary(torch.randn(1, 4, 2, 8), *_tables(1, 4, 16))
    with pytest.raises(InputError, match="even head_dim"):
        ops.rotary(torch.randn(1, 4, 2, 9), cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,seqlen,heads,kv_heads,head_dim,cache_rows,table_batch", [
    (1, 1, 4, 2, 8, 1, 1), (3, 1, 20, 5, 16, 4, 3), (2, 3, 3, 3, 10, 2, 2)])
def test_rotary_qkv_append_writes_the_cache_as_rotary_then_index_put(batch, seqlen, heads, kv_heads, head_dim,
                                                                     cache_rows, table_batch, dtype):
    """The decode step's fused op: q equal to rotary_qkv's, k/v in the cache slots equal to an
    index_put_ of rotary_qkv's k and v (bit for bit: same math, one rounding), other slots untouched,
    a slot past the capacity never written."""
    capacity = 12
    qkv = torch.randn(batch, seqlen, (heads + 2 * kv_heads) * head_dim).to(dtype)
    cos, sin = _tables(table_batch, seqlen, head_dim)
    slots = torch.randint(0, capacity - seqlen, (batch, 1)) + torch.arange(seqlen)
    args = (cos, sin, heads, kv_heads, head_dim)
    fill = torch.randn(cache_rows, capacity, kv_heads, head_dim).to(dtype)
    k_ref, v_ref, k_got, v_got = fill.clone(), fill.clone(), fill.clone(), fill.clone()
    q_ref = ops.rotary_qkv_append_ref(qkv, *args, k_ref, v_ref, slots)
    q_got = ops.rotary_qkv_append(qkv, *args, k_got, v_got, slots)
    q, k, v = ops.rotary_qkv(qkv, *args)
    assert torch.equal(q_got, q) and torch.equal(q_ref, q)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    rows = torch.arange(batch)[:, None].expand_as(slots)
    assert torch.equal(k_got[rows, slots], k) and torch.equal(v_got[rows, slots], v)
    untouched = torch.ones(cache_rows, capacity, dtype=torch.bool)
    untouched[rows, slots] = False
    assert torch.equal(k_got[untouched], fill[untouched]) and torch.equal(v_got[untouched], fill[untouched])
    k_out = fill.clone()
    ops.rotary_qkv_append(qkv, *args, k_out, fill.clone(), torch.full((batch, seqlen), capacity))
    assert torch.equal(k_out, fill)  # out of the cache: nothing written


def test_rotary_qkv_append_refuses_bad_caches_and_slots():
    qkv = torch.randn(2, 1, 4 * 8)
    cos, sin = _tables(2, 1, 8)
    cache = torch.zeros(2, 6, 1, 8)
    slots = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(InputError, match="k_cache must be"):
        ops.rotary_qkv_append(qkv, cos, sin, 2, 1, 8, torch.zeros(1, 6, 1, 8), cache, slots)
    with pytest.raises(InputError, match="share capacity and dtype"):
        ops.rotary_qkv_append(qkv, cos, sin, 2, 1, 8, cache, torch.zeros(2, 6, 1, 8, dtype=torch.float64), slots)
    with pytest.raises(InputError, match="slots must be"):
        ops.rotary_qkv_append(qkv, cos, sin, 2, 1, 8, cache, cache.clone(), slots.float())


def test_rotary_sized_picks_by_size(monkeypatch):
    """The sized RoPE ops: the torch reference below SIZED_MIN_NUMEL elements, our Triton op from there
    on (a compiled model's choice at large shapes); both give the reference's values."""
    import sys

    module = sys.modules["flashlm.ops.rotary"]
    torch.manual_seed(0)
    qkv = torch.randn(2, 8, (4 + 2 * 2) * 16)  # (batch, seqlen, (heads + 2 kv_heads) * head_dim)
    x = torch.randn(2, 8, 4, 16)
    cos, sin = torch.rand(2, 8, 8), torch.rand(2, 8, 8)
    calls = []
    monkeypatch.setattr(module, "rotary_qkv", lambda *a: calls.append("triton") or module.rotary_qkv_ref(*a))
    monkeypatch.setattr(module, "rotary", lambda *a: calls.append("triton1") or module.rotary_ref(*a))
    monkeypatch.setattr(module, "SIZED_MIN_NUMEL", qkv.numel() + 1)
    small = module.rotary_qkv_sized(qkv, cos, sin, 4, 2, 16)
    module.rotary_sized(x, cos, sin)
    assert calls == []
    monkeypatch.setattr(module, "SIZED_MIN_NUMEL", qkv.numel())
    large = module.rotary_qkv_sized(qkv, cos, sin, 4, 2, 16)
    module.rotary_sized(x.repeat(1, 1, 2, 1), cos, sin)  # 2048 elements, as qkv
    assert calls == ["triton", "triton1"]
    for a, b in zip(small, large):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_partial_interleaved_per_row(interleaved):
    """ops.rotary (the kernel; moved from the attention backend's own): rotary_dim 24 < head_dim 40,
    per-row positions, the tail passed through, gradients as the reference's; the reference's half
    form equals transformers' rotate_half form."""
    x = torch.randn(2, 5, 3, 40, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # row 1 left-padded
    angle = pos[..., None].float() * torch.rand(12)
    cos, sin = angle.cos(), angle.sin()
    out = ops.rotary(x, cos, sin, interleaved)
    ref = ops.rotary_ref(x, cos, sin, interleaved)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[..., 24:], x[..., 24:])
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    if not interleaved:
        c2, s2 = torch.cat([cos, cos], -1)[:, :, None], torch.cat([sin, sin], -1)[:, :, None]
        xr = x[..., :24]
        half = torch.cat([-xr[..., 12:], xr[..., :12]], -1)
        torch.testing.assert_close(ref[..., :24], xr * c2 + half * s2)


def test_rotary_ref_full_tables_are_transformers_form():
    """Full-width tables: transformers' ``x * cos + rotate_half(x) * sin`` with the tables cast to x's
    dtype, bit for bit, in BSHD and BHSD (the default model's apply_rope)."""
    x = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16)
    angle = torch.rand(2, 5, 4) * 9
    emb = torch.cat((angle, angle), -1)
    c, s = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
    want = x * c + torch.cat((-x[..., 4:], x[..., :4]), -1) * s
    assert torch.equal(ops.rotary_ref(x, emb.cos(), emb.sin(), head_axis=1), want)
    with pytest.raises(InputError, match="not interleaved"):
        ops.rotary_ref(x, emb.cos(), emb.sin(), True, head_axis=1)


def test_rotary_eager_function_matches_custom_op():
    """Eager calls with gradients take the autograd Function (same launcher as the custom op): bitwise
    the same outputs and gradients, differentiable twice like the op."""
    rot = importlib.import_module("flashlm.ops.rotary")  # flashlm.ops.rotary is also a function's name
    x = torch.randn(2, 5, 3, 40, requires_grad=True)
    angle = torch.rand(2, 5, 12)
    cos, sin = angle.cos(), angle.sin()
    for interleaved in (False, True):
        eager, op = rot._rotary(x, cos, sin, interleaved), rot._rotary_fwd_op(x, cos, sin, interleaved, False)
        assert type(eager.grad_fn).__name__ == "_RotaryFunctionBackward" and torch.equal(eager, op)
        g = torch.randn_like(op, requires_grad=True)
        (ge,), (go,) = (torch.autograd.grad(o, x, g, create_graph=True) for o in (eager, op))
        assert torch.equal(ge, go) and ge.requires_grad
        assert torch.equal(torch.autograd.grad(ge.sum(), g)[0], torch.autograd.grad(go.sum(), g)[0])
    with torch.no_grad():
        assert torch.equal(rot._rotary(x, cos, sin, False), rot._rotary_fwd_op(x, cos, sin, False, False))


@pytest.mark.cuda
def test_cuda_rotary_bf16():
    x = torch.randn(3, 257, 16, 128, device="cuda", dtype=torch.bfloat16)
    angle = torch.rand(3, 257, 64, device="cuda") * 100
    out = ops.rotary(x, angle.cos(), angle.sin())
    torch.testing.assert_close(out, ops.rotary_ref(x, angle.cos(), angle.sin()), atol=1e-2, rtol=1e-2)
