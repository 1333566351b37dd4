"""Rotary position embedding (RoPE): the one implementation flashlm has (torch reference + Triton kernels).

``rotary(x, cos, sin, interleaved=False) -> x rotated``: one BSHD tensor x (B, S, H, D) (a layer on
its own, the kv-cache path). The first ``rotary_dim = 2 * cos.shape[-1]`` dims of each head are
rotated, the tail passes through; ``interleaved=False`` pairs (i, i + rotary_dim/2) (GPT-NeoX / HF
rotate_half), ``True`` pairs (2i, 2i + 1) (GPT-J, flash-attn's ``rotary_interleaved``).

``rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> (q, k, v)``: qkv (batch, seqlen,
(H + 2 * KV) * D) is the fused q/k/v projection output; one launch writes a (batch, seqlen,
H + 2 * KV, D) buffer with q and k rotated and v copied, and returns its three BSHD views
q (B, S, H, D), k (B, S, KV, D), v (B, S, KV, D) (last dim contiguous, heads strided). The backward
takes grad_q, grad_k, grad_v (any strides, last dim contiguous) and writes grad_qkv in one launch.

``rotary_qkv_append(qkv, cos, sin, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slots) -> q``:
a decode step's form (inference only, no autograd): q rotated into a new (B, S, H, D) buffer, k rotated
and v copied straight into the caches (B_cache >= B, capacity, KV, D) at row b, slot ``slots[b, s]``,
in one launch instead of the rotation and two ``index_put_``.

cos/sin: (batch or 1, seqlen, rotary_dim // 2) fp32 half-width tables, one row per token (per-row
positions, so left padding and packing just work): pairs rotate as ``(x1 * c - x2 * s, x2 * c + x1 * s)``
in fp32 with one rounding to x's dtype. :func:`rotary_ref` also takes transformers' full tables
(width D, rotate_half form, tables cast to x's dtype first: bit for bit with transformers; the default
model's path) and BHSD x (``head_axis=1``).
"""

from __future__ import annotations

import torch

from flashlm._util import next_pow2
from flashlm.errors import InputError

from ._dispatch import SIZED_MIN_NUMEL, dispatch, triton, triton_usable

if triton is not None:
    import triton.language as tl


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
               head_axis: int = 2) -> torch.Tensor:
    """Torch reference of RoPE: x (B, S, H, D) (``head_axis=2``) or (B, H, S, D) (``head_axis=1``).

    cos/sin (B or 1, S, r) with r <= D // 2: half-width tables, rotary_dim 2r, math in fp32, one
    rounding to x's dtype, the tail dims passed through. r == D: transformers' full tables (rotate_half
    form, non-interleaved): cast to x's dtype first and computed in it, bit for bit as transformers."""
    c, s = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
    if cos.shape[-1] == x.shape[-1]:
        if interleaved:
            raise InputError("rotary_ref: full-width (rotate_half) tables are not interleaved; pass the "
                             "half-width tables (cos[..., :head_dim // 2]) for interleaved pairs")
        c, s = c.to(x.dtype), s.to(x.dtype)
        return x * c + rotate_half(x) * s
    c, s = c.float(), s.float()
    r2 = cos.shape[-1]
    xr = x[..., :2 * r2].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :r2], xr[..., r2:]
        rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    if 2 * r2 == x.shape[-1]:  # no tail: no copy of an empty one
        return rot.to(x.dtype)
    return torch.cat([rot.to(x.dtype), x[..., 2 * r2:]], dim=-1)


def rotary_qkv_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`rotary_qkv`: split, rotate q and k, return (q, k, v) in BSHD."""
    qkv = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    q, k, v = qkv.split((num_heads, num_kv_heads, num_kv_heads), dim=2)
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin), v


def rotary_qkv_append_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                          num_kv_heads: int, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`rotary_qkv_append`: :func:`rotary_qkv_ref`, then k/v written in place
    to cache row b, slot ``slots[b, s]`` (slots int (B, S)); returns q (B, S, H, D)."""
    q, k, v = rotary_qkv_ref(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    idx = (torch.arange(slots.shape[0], device=slots.device)[:, None].expand(slots.shape), slots.long())
    with torch.no_grad():
        k_cache.index_put_(idx, k.to(k_cache.dtype))
        v_cache.index_put_(idx, v.to(v_cache.dtype))
    return q


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, batch: int, seqlen: int, head_dim: int,
                  where: str, partial: bool = False) -> None:
    half = cos.shape[-1] if cos.dim() == 3 else -1
    width_ok = 0 < 2 * half <= head_dim if partial else 2 * half == head_dim
    if (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seqlen
            or not width_ok or head_dim % 2):
        want = "rotary_dim // 2 <= head_dim // 2" if partial else f"head_dim // 2 = {head_dim // 2}"
        raise InputError(f"{where}: cos/sin must both be (batch or 1, seqlen, {want}) with ({batch} or 1, "
                         f"{seqlen}) and an even head_dim {head_dim}, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}; pass the half-width tables (cos[..., :rotary_dim // 2])")


def _check_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> None:
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 3 or qkv.shape[-1] != width or head_dim % 2:
        raise InputError(f"rotary_qkv: qkv must be (batch, seqlen, (num_heads + 2 * num_kv_heads) * "
                         f"head_dim) = (., ., {width}) with an even head_dim, got {tuple(qkv.shape)} "
                         f"and head_dim {head_dim}")
    _check_tables(cos, sin, qkv.shape[0], qkv.shape[1], head_dim, "rotary_qkv")


_MAX_BLOCK_H = 16  # heads per program: (batch * seqlen, cdiv(heads, BLOCK_H)) programs

if triton is not None:

    @triton.jit
    def _rotated_heads(X, COS, SIN, b, s, heads, n_rot, n_heads, stride_xb, stride_xs, stride_xh, stride_cb,
                       stride_cs, R2: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr,
                       CONJUGATE: tl.constexpr):
        # Token (b, s)'s heads of X, the pairs of heads < n_rot rotated (by -theta when CONJUGATE), the
        # rest as loaded: (o1, o2, mask over (heads, pairs), the pairs' dims d1, d2). Pairs (d, d + R2),
        # or (2d, 2d + 1) when INTERLEAVED.
        d = tl.arange(0, BLOCK_D)
        d_ok = d < R2
        c = tl.load(COS + b * stride_cb + s * stride_cs + d, mask=d_ok, other=1.0).to(tl.float32)
        sn = tl.load(SIN + b * stride_cb + s * stride_cs + d, mask=d_ok, other=0.0).to(tl.float32)
        if CONJUGATE:
            sn = -sn
        if INTERLEAVED:
            d1 = 2 * d
            d2 = 2 * d + 1
        else:
            d1 = d
            d2 = d + R2
        mask = (heads < n_heads)[:, None] & d_ok[None, :]
        x_ptr = X + b * stride_xb + s * stride_xs + heads[:, None] * stride_xh
        x1 = tl.load(x_ptr + d1[None, :], mask=mask, other=0.0)
        x2 = tl.load(x_ptr + d2[None, :], mask=mask, other=0.0)
        rot = (heads < n_rot)[:, None]
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        o1 = tl.where(rot, (x1f * c[None, :] - x2f * sn[None, :]).to(x1.dtype), x1)
        o2 = tl.where(rot, (x2f * c[None, :] + x1f * sn[None, :]).to(x1.dtype), x2)
        return o1, o2, mask, d1, d2

    @triton.jit
    def _fwd_kernel(X, COS, SIN, OUT, seqlen, n_rot, n_heads, stride_xb, stride_xs, stride_xh, stride_cb,
                    stride_cs, HEAD_DIM: tl.constexpr, R2: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
                    CONJUGATE: tl.constexpr):
        # heads [0, n_rot) are rotated (by -theta when CONJUGATE: the backward), [n_rot, n_heads) copied;
        # dims past 2 * R2 (partial rotary_dim) copied; OUT is a contiguous (batch, seqlen, n_heads, HEAD_DIM).
        pid = tl.program_id(0)
        b = (pid // seqlen).to(tl.int64)
        s = (pid % seqlen).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        o1, o2, mask, d1, d2 = _rotated_heads(X, COS, SIN, b, s, heads, n_rot, n_heads, stride_xb, stride_xs,
                                              stride_xh, stride_cb, stride_cs, R2, BLOCK_D, INTERLEAVED, CONJUGATE)
        o_row = OUT + (pid.to(tl.int64) * n_heads + heads[:, None]) * HEAD_DIM
        tl.store(o_row + d1[None, :], o1, mask=mask)
        tl.store(o_row + d2[None, :], o2, mask=mask)
        if BLOCK_TAIL > 0:
            t = 2 * R2 + tl.arange(0, BLOCK_TAIL)
            t_mask = (heads < n_heads)[:, None] & (t < HEAD_DIM)[None, :]
            x_row = X + b * stride_xb + s * stride_xs + heads[:, None] * stride_xh
            tl.store(o_row + t[None, :], tl.load(x_row + t[None, :], mask=t_mask), mask=t_mask)

    @triton.jit
    def _append_kernel(X, COS, SIN, Q, KC, VC, SLOTS, seqlen, n_q, n_kv, capacity, stride_xb, stride_xs,
                       stride_xh, stride_cb, stride_cs, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                       stride_vh, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
        # One token's heads: q rotated into Q (contiguous (batch, seqlen, n_q, 2 * HALF)), k rotated into
        # KC[b, slot], v copied into VC[b, slot]; a slot outside the cache is never written.
        pid = tl.program_id(0)
        b = (pid // seqlen).to(tl.int64)
        s = (pid % seqlen).to(tl.int64)
        slot = tl.load(SLOTS + pid).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        o1, o2, mask, d, _ = _rotated_heads(X, COS, SIN, b, s, heads, n_q + n_kv, n_q + 2 * n_kv, stride_xb,
                                            stride_xs, stride_xh, stride_cb, stride_cs, HALF, BLOCK_D, False, False)
        slot_h = tl.zeros([BLOCK_H], tl.int64) + slot  # per head: the interpreter masks with tensors only
        in_cache = (slot_h >= 0) & (slot_h < capacity)
        is_q = mask & (heads < n_q)[:, None]
        is_k = mask & ((heads >= n_q) & (heads < n_q + n_kv) & in_cache)[:, None]
        is_v = mask & ((heads >= n_q + n_kv) & in_cache)[:, None]
        q_ptr = Q + (pid.to(tl.int64) * n_q + heads[:, None]) * (2 * HALF) + d[None, :]
        k_ptr = KC + b * stride_kb + slot * stride_ks + (heads[:, None] - n_q) * stride_kh + d[None, :]
        v_ptr = VC + b * stride_vb + slot * stride_vs + (heads[:, None] - n_q - n_kv) * stride_vh + d[None, :]
        tl.store(q_ptr, o1, mask=is_q)
        tl.store(q_ptr + HALF, o2, mask=is_q)
        tl.store(k_ptr, o1.to(KC.dtype.element_ty), mask=is_k)
        tl.store(k_ptr + HALF, o2.to(KC.dtype.element_ty), mask=is_k)
        tl.store(v_ptr, o1.to(VC.dtype.element_ty), mask=is_v)
        tl.store(v_ptr + HALF, o2.to(VC.dtype.element_ty), mask=is_v)

    @triton.jit
    def _qkv_bwd_kernel(GQ, GK, GV, COS, SIN, DQKV, seqlen, n_q, n_kv,
                        sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, stride_cb, stride_cs,
                        HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
        # Gathers grad_q / grad_k / grad_v heads (any strides) into one contiguous grad_qkv row,
        # rotating q's and k's back by -theta and copying v's.
        pid = tl.program_id(0)
        b = (pid // seqlen).to(tl.int64)
        s = (pid % seqlen).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        n_heads = n_q + 2 * n_kv
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HALF
        c = tl.load(COS + b * stride_cb + s * stride_cs + d, mask=d_ok, other=1.0).to(tl.float32)
        sn = tl.load(SIN + b * stride_cb + s * stride_cs + d, mask=d_ok, other=0.0).to(tl.float32)
        is_q = (heads < n_q)[:, None]
        is_k = ((heads >= n_q) & (heads < n_q + n_kv))[:, None]
        is_v = ((heads >= n_q + n_kv) & (heads < n_heads))[:, None]
        dm = d_ok[None, :]
        pq = GQ + b * sq_b + s * sq_s + heads[:, None] * sq_h + d[None, :]
        pk = GK + b * sk_b + s * sk_s + (heads[:, None] - n_q) * sk_h + d[None, :]
        pv = GV + b * sv_b + s * sv_s + (heads[:, None] - n_q - n_kv) * sv_h + d[None, :]
        g1 = tl.where(is_q, tl.load(pq, mask=is_q & dm, other=0.0),
                      tl.where(is_k, tl.load(pk, mask=is_k & dm, other=0.0), tl.load(pv, mask=is_v & dm, other=0.0)))
        g2 = tl.where(is_q, tl.load(pq + HALF, mask=is_q & dm, other=0.0),
                      tl.where(is_k, tl.load(pk + HALF, mask=is_k & dm, other=0.0),
                               tl.load(pv + HALF, mask=is_v & dm, other=0.0)))
        g1f, g2f = g1.to(tl.float32), g2.to(tl.float32)
        rot = heads[:, None] < n_q + n_kv
        o1 = tl.where(rot, (g1f * c[None, :] + g2f * sn[None, :]).to(g1.dtype), g1)
        o2 = tl.where(rot, (g2f * c[None, :] - g1f * sn[None, :]).to(g1.dtype), g2)
        o_ptr = DQKV + (pid.to(tl.int64) * n_heads + heads[:, None]) * (2 * HALF) + d[None, :]
        mask = (heads < n_heads)[:, None] & dm
        tl.store(o_ptr, o1, mask=mask)
        tl.store(o_ptr + HALF, o2, mask=mask)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cos/sin with one shared (batch, seqlen) stride pair and a contiguous last dim; a batch-1
    table gets batch stride 0 (broadcast)."""
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_rotate(x, cos, sin, n_rot, conjugate, interleaved=False):
    """x (B, S, N, D) any strides (last dim contiguous) -> contiguous (B, S, N, D), heads < n_rot rotated
    over their first 2 * cos.shape[-1] dims."""
    batch, seqlen, n_heads, head_dim = x.shape
    out = torch.empty((batch, seqlen, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel():
        cos, sin, scb, scs = _tables(cos, sin)
        r2 = cos.shape[-1]
        tail = head_dim - 2 * r2
        block_h = min(next_pow2(n_heads), _MAX_BLOCK_H)
        _fwd_kernel[(batch * seqlen, triton.cdiv(n_heads, block_h))](
            x, cos, sin, out, seqlen, n_rot, n_heads, x.stride(0), x.stride(1), x.stride(2), scb, scs,
            HEAD_DIM=head_dim, R2=r2, BLOCK_D=next_pow2(r2), BLOCK_TAIL=next_pow2(tail) if tail else 0,
            BLOCK_H=block_h, INTERLEAVED=interleaved, CONJUGATE=conjugate)
    return out


def _launch_qkv_fwd(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    """-> the contiguous (B, S, H + 2 KV, D) buffer: q and k rotated, v copied."""
    qkv = _last_contiguous(qkv).unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    return _launch_rotate(qkv, cos, sin, num_heads + num_kv_heads, False)


def _launch_qkv_bwd(gq, gk, gv, cos, sin):
    """grad_q (B, S, H, D), grad_k / grad_v (B, S, KV, D), any strides -> grad_qkv (B, S, (H + 2 KV) * D)."""
    batch, seqlen, n_q, head_dim = gq.shape
    n_kv = gk.shape[2]
    gq, gk, gv = _last_contiguous(gq), _last_contiguous(gk), _last_contiguous(gv)
    n_heads = n_q + 2 * n_kv
    out = torch.empty((batch, seqlen, n_heads * head_dim), dtype=gq.dtype, device=gq.device)
    if out.numel():
        cos, sin, scb, scs = _tables(cos, sin)
        block_h = min(next_pow2(n_heads), _MAX_BLOCK_H)
        _qkv_bwd_kernel[(batch * seqlen, triton.cdiv(n_heads, block_h))](
            gq, gk, gv, cos, sin, out, seqlen, n_q, n_kv, *gq.stride()[:3], *gk.stride()[:3], *gv.stride()[:3],
            scb, scs, HALF=head_dim // 2, BLOCK_D=next_pow2(head_dim // 2), BLOCK_H=block_h)
    return out


def _split(buf, num_heads, num_kv_heads):
    return buf[:, :, :num_heads], buf[:, :, num_heads:num_heads + num_kv_heads], buf[:, :, num_heads + num_kv_heads:]


class _RotaryQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads, num_kv_heads, head_dim):
        ctx.save_for_backward(cos, sin)
        return _split(_launch_qkv_fwd(qkv, cos, sin, num_heads, num_kv_heads, head_dim), num_heads, num_kv_heads)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        return _launch_qkv_bwd(gq, gk, gv, cos, sin), None, None, None, None, None


def _rotation_function(conjugate: bool) -> type[torch.autograd.Function]:
    """The eager autograd Function rotating by theta (by -theta when ``conjugate``: the backward's);
    its backward is the other one under create_graph, so the op is differentiable twice."""

    class _RotaryFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin, interleaved):
            ctx.save_for_backward(cos, sin)
            ctx.interleaved = interleaved
            return _launch_rotate(_last_contiguous(x), cos, sin, x.shape[2], conjugate, interleaved)

        @staticmethod
        def backward(ctx, grad):
            cos, sin = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True
                return _ROTATIONS[not conjugate].apply(grad, cos, sin, ctx.interleaved), None, None, None
            grad = _launch_rotate(_last_contiguous(grad), cos, sin, grad.shape[2], not conjugate, ctx.interleaved)
            return grad, None, None, None

    return _RotaryFunction


_ROTATIONS = {False: _rotation_function(False), True: _rotation_function(True)}


# torch.compile path. A custom op may not return aliasing outputs: it returns the buffer, and the
# caller splits it; the backward receives the buffer's gradient and hands its three views to the
# gather kernel.
@torch.library.custom_op("flashlm_ops::rotary_qkv_fwd", mutates_args=())
def _rotary_qkv_fwd_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                       num_kv_heads: int, head_dim: int) -> torch.Tensor:
    return _launch_qkv_fwd(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


@_rotary_qkv_fwd_op.register_fake
def _(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], num_heads + 2 * num_kv_heads, head_dim))


@torch.library.custom_op("flashlm_ops::rotary_qkv_bwd", mutates_args=())
def _rotary_qkv_bwd_op(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    return _launch_qkv_bwd(gq, gk, gv, cos, sin)


@_rotary_qkv_bwd_op.register_fake
def _(gq, gk, gv, cos, sin):
    return gq.new_empty((gq.shape[0], gq.shape[1], (gq.shape[2] + 2 * gk.shape[2]) * gq.shape[3]))


def _qkv_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.heads = inputs[3:5]


def _qkv_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return _rotary_qkv_bwd_op(*_split(grad, *ctx.heads), cos, sin), None, None, None, None, None


_rotary_qkv_fwd_op.register_autograd(_qkv_backward, setup_context=_qkv_setup)


@torch.library.custom_op("flashlm_ops::rotary_fwd", mutates_args=())
def _rotary_fwd_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                   conjugate: bool) -> torch.Tensor:
    return _launch_rotate(_last_contiguous(x), cos, sin, x.shape[2], conjugate, interleaved)


@_rotary_fwd_op.register_fake
def _(x, cos, sin, interleaved, conjugate):
    return x.new_empty(x.shape)


def _rot_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.flags = inputs[3:5]


def _rot_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    interleaved, conjugate = ctx.flags
    return _rotary_fwd_op(grad, cos, sin, interleaved, not conjugate), None, None, None, None


_rotary_fwd_op.register_autograd(_rot_backward, setup_context=_rot_setup)


def _qkv_nograd(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    return _split(_launch_qkv_fwd(qkv, cos, sin, num_heads, num_kv_heads, head_dim), num_heads, num_kv_heads)


def _qkv_compiled(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    return _split(_rotary_qkv_fwd_op(qkv, cos, sin, num_heads, num_kv_heads, head_dim), num_heads, num_kv_heads)


def _rot_nograd(x, cos, sin, interleaved):
    return _launch_rotate(_last_contiguous(x), cos, sin, x.shape[2], False, interleaved)


def _rot_compiled(x, cos, sin, interleaved):
    return _rotary_fwd_op(x, cos, sin, interleaved, False)


_rotary_qkv = dispatch(_RotaryQKVFunction, _qkv_nograd, _qkv_compiled, rotary_qkv_ref)
_rotary = dispatch(_ROTATIONS[False], _rot_nograd, _rot_compiled, rotary_ref)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused split + RoPE of q and k (Triton); see the module docstring for shapes."""
    _check_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    return _rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE of one BSHD tensor x (B, S, H, D) by cos/sin (B or 1, S, rotary_dim // 2), rotary_dim <=
    D (the tail copied), pairs interleaved or not (Triton; the reference off Triton's devices);
    returns a new contiguous tensor in x's dtype."""
    if x.dim() != 4:
        raise InputError(f"rotary: x must be (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
    _check_tables(cos, sin, x.shape[0], x.shape[1], x.shape[-1], "rotary", partial=True)
    return _rotary(x, cos, sin, interleaved)


def rotary_qkv_sized(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rotary_qkv_ref` below ``SIZED_MIN_NUMEL`` elements of qkv (host-bound), :func:`rotary_qkv`
    (Triton) from there on. Shapes as :func:`rotary_qkv`."""
    if qkv.numel() < SIZED_MIN_NUMEL:
        return rotary_qkv_ref(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    return rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


def rotary_sized(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotary_ref` below ``SIZED_MIN_NUMEL`` elements of x, :func:`rotary` (Triton) from there on."""
    if x.numel() < SIZED_MIN_NUMEL:
        return rotary_ref(x, cos, sin)
    return rotary(x, cos, sin)


def _check_append(qkv, cos, sin, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slots) -> None:
    _check_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    batch, seqlen = qkv.shape[:2]
    want = f"(>= {batch}, capacity, {num_kv_heads}, {head_dim})"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 4 or cache.shape[0] < batch or cache.shape[2:] != (num_kv_heads, head_dim)
                or cache.stride(-1) != 1):
            raise InputError(f"rotary_qkv_append: {name} must be {want} with a contiguous last dim, got "
                             f"{tuple(cache.shape)}")
    if k_cache.shape[1] != v_cache.shape[1] or k_cache.dtype != v_cache.dtype:
        raise InputError("rotary_qkv_append: k_cache and v_cache must share capacity and dtype, got "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    if slots.shape != (batch, seqlen) or slots.dtype not in (torch.int32, torch.int64):
        raise InputError(f"rotary_qkv_append: slots must be int32/int64 (batch, seqlen) = ({batch}, {seqlen}), "
                         f"got {slots.dtype} {tuple(slots.shape)}")


def _launch_append(qkv, cos, sin, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slots):
    batch, seqlen = qkv.shape[:2]
    x = _last_contiguous(qkv).unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    q = torch.empty((batch, seqlen, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if q.numel():
        cos, sin, scb, scs = _tables(cos, sin)
        n_heads = num_heads + 2 * num_kv_heads
        block_h = min(next_pow2(n_heads), _MAX_BLOCK_H)
        with torch.no_grad():
            _append_kernel[(batch * seqlen, triton.cdiv(n_heads, block_h))](
                x, cos, sin, q, k_cache, v_cache, slots.contiguous(), seqlen, num_heads, num_kv_heads,
                k_cache.shape[1], x.stride(0), x.stride(1), x.stride(2), scb, scs, *k_cache.stride()[:3],
                *v_cache.stride()[:3], HALF=head_dim // 2, BLOCK_D=next_pow2(head_dim // 2), BLOCK_H=block_h)
    return q


# inference only: no autograd Function, and the launch under torch.compile too (as before dispatch)
_rotary_qkv_append = dispatch(None, _launch_append, _launch_append, rotary_qkv_append_ref)


def rotary_qkv_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                      num_kv_heads: int, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor) -> torch.Tensor:
    """Split + RoPE of q and k with k/v appended to the cache, one Triton launch (inference only).

    qkv (batch, seqlen, (H + 2 * KV) * D); cos/sin (batch or 1, seqlen, D // 2) fp32; k_cache / v_cache
    (B_cache >= batch, capacity, KV, D) written in place at row b, slot ``slots[b, s]`` (int (batch,
    seqlen); the caller keeps slots inside the capacity: a slot outside it is not written). Returns q
    (batch, seqlen, H, D), contiguous. No autograd: the cache write is not differentiable."""
    _check_append(qkv, cos, sin, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slots)
    return _rotary_qkv_append(qkv, cos, sin, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slots)


def apply_rope_bshd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, seqlen, heads, head_dim) and k (batch, seqlen, kv_heads, head_dim) — BSHD, no
    transpose — with one position per (row, token), so left padding and packing just work.

    cos/sin fp32 in the rotate_half convention: the full tables (batch or 1, seqlen, head_dim), rotated
    in torch with the tables cast to q's dtype first, exactly as the default model's ``apply_rope``; or
    the half-width ones (batch, seqlen, head_dim // 2): the fused Triton kernel (``ops.rotary``) on
    CUDA, except when ``compiled`` (the caller compiles) without gradients, where its math in torch ops
    (``ops.rotary.rotary_ref``) lets inductor fuse it with its neighbours (compiled training keeps the
    kernel's op and its backward). The flash model's unplanned calls (a layer on its own, transformers'
    attention hook) use it."""
    if cos.shape[-1] != q.shape[-1]:  # half-width tables
        if compiled and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
        if q.is_cuda and triton_usable(q.device):
            return rotary(q, cos, sin), rotary(k, cos, sin)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)


# The deleted flashlm.attention.backends.triton.rotary's public functions (its old path serves this module,
# flashlm._moved): the same signatures and results.
apply_rotary_bshd = rotary
apply_rotary_bshd_ref = rotary_ref
