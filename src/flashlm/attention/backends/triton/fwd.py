"""Forward attention kernel (FlashAttention-2 online softmax), dense and varlen in one kernel family.

One program computes BLOCK_M query rows of one (batch, head) against all the keys it may see. The
key range is split into three loops: masked blocks at the window's left edge, unmasked blocks in
the middle (no mask arithmetic at all) and masked blocks at the diagonal / the sequence end. The
scores live in the log2 domain (scale * log2(e) folded in) so the softmax uses exp2.

Semantics (flash-attn 2.8): causal is bottom-right aligned (query i sees keys j <= i + Sk - Sq);
window (left, right) is inclusive with the same alignment; softcap s -> cap * tanh(s / cap) is
applied to the scaled scores; alibi adds -slope * |i + Sk - Sq - j|; GQA maps head h to kv head
h // (nheads // nheads_k) without copying k/v. Rows that see no key give out = 0 and lse = +inf.
"""

import torch
import triton
import triton.language as tl

from .common import (
    alibi_batch_stride,
    banded_key_range,
    block_d,
    bshd_strides,
    dot_precision,
    fwd_config,
    mask_scores,
    pv_dot,
    tanh,
    varlen_bounds,
    window_bounds,
)

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, start, end, rows, offs_n, d_mask,
               stride_ks, stride_vs, seqlen_k, off, qk_scale, softcap, slope, wl, wr,
               MASKED: tl.constexpr, BANDED: tl.constexpr, SOFTCAP: tl.constexpr,
               ALIBI: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
            k = tl.load(k_ptrs + start_n * stride_ks, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs + start_n * stride_ks)
        else:
            k = tl.load(k_ptrs + start_n * stride_ks, mask=d_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SOFTCAP:
            s = tanh(qk * qk_scale) * softcap  # qk_scale = scale / cap, softcap = cap * log2(e)
        else:
            s = qk * qk_scale  # qk_scale = scale * log2(e)
        if ALIBI:
            dist = (rows[:, None] + off - cols[None, :]).to(tl.float32)
            s = s - slope * tl.abs(dist)
        if MASKED:
            s = mask_scores(s, rows, cols, seqlen_k, off, wl, wr, BANDED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may have seen only masked keys so far: avoid (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:  # rows of this tile see different keys: none may read a v row it does not see
            v = tl.load(v_ptrs + start_n * stride_vs, mask=kv_mask, other=0.0)
            acc = pv_dot(acc, p, v, p > 0, DOT_PREC)
        else:
            if EVEN_D:
                v = tl.load(v_ptrs + start_n * stride_vs)
            else:
                v = tl.load(v_ptrs + start_n * stride_vs, mask=d_mask[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, Alibi,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ab,
    nheads, group, seqlen_q, seqlen_k,
    qk_scale, softcap, wl, wr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, IS_VARLEN: tl.constexpr, BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Highest query blocks first: under causal masks they have the most keys (shorter tail).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group
    if IS_VARLEN:
        q_start, seqlen_q, k_start, seqlen_k = varlen_bounds(CuQ, CuK, b)
    else:
        q_start = 0
        k_start = 0
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_ptrs = (Q + b64 * stride_qb + (q_start + rows[:, None]).to(tl.int64) * stride_qs + h * stride_qh
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=(rows[:, None] < seqlen_q) & d_mask[None, :], other=0.0)
    k_ptrs = (K + b64 * stride_kb + (k_start + offs_n[:, None]).to(tl.int64) * stride_ks + hk * stride_kh
              + offs_d[None, :])
    v_ptrs = (V + b64 * stride_vb + (k_start + offs_n[:, None]).to(tl.int64) * stride_vs + hk * stride_vh
              + offs_d[None, :])
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634

    # Key ranges: [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked.
    if BANDED:
        lo, full_lo, full_hi, hi = banded_key_range(m0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M, BLOCK_N)
    else:
        lo = 0
        full_lo = 0
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        hi = seqlen_k

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, full_lo, rows, offs_n, d_mask,
                               stride_ks, stride_vs, seqlen_k, off, qk_scale, softcap, slope, wl, wr,
                               True, BANDED, SOFTCAP, ALIBI, EVEN_D, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_lo, full_hi, rows, offs_n, d_mask,
                               stride_ks, stride_vs, seqlen_k, off, qk_scale, softcap, slope, wl, wr,
                               False, BANDED, SOFTCAP, ALIBI, EVEN_D, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, rows, offs_n, d_mask,
                               stride_ks, stride_vs, seqlen_k, off, qk_scale, softcap, slope, wl, wr,
                               True, BANDED, SOFTCAP, ALIBI, EVEN_D, BLOCK_N, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row_ok = rows < seqlen_q
    o_ptrs = (Out + b64 * stride_ob + (q_start + rows[:, None]).to(tl.int64) * stride_os
              + h * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tl.store(Lse + b64 * stride_lb + h * stride_lh + q_start + rows, lse, mask=row_ok)


def scale_args(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, softcap) kernel arguments for the log2-domain scores."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 0.0


def attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
             softmax_scale: float, causal: bool, window_left: int, window_right: int,
             softcap: float, alibi_slopes):
    """Launch the forward kernel.

    Dense: q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq) fp32.
    Varlen (cu_seqlens_q given): q (Tq, H, D), k/v (Tk, Hk, D), cu_seqlens int32 (B + 1,)
    -> out (Tq, H, D), lse (H, Tq) fp32. Any strides with a contiguous last dim.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        total_q, nheads, head_dim = q.shape
        nheads_k = k.shape[1]
        lse = torch.empty((nheads, total_q), device=q.device, dtype=torch.float32)
        stride_lb, stride_lh = 0, lse.stride(0)
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, nheads, head_dim = q.shape
        seqlen_k, nheads_k = k.shape[1], k.shape[2]
        lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    sq, sk, sv, so = (bshd_strides(t, varlen) for t in (q, k, v, out))
    banded, wl, wr = window_bounds(causal, (window_left, window_right))
    qk_scale, cap = scale_args(softmax_scale, softcap)
    stride_ab = alibi_batch_stride(alibi_slopes)
    cfg = fwd_config(q, head_dim, seqlen_q)
    grid = (triton.cdiv(max(seqlen_q, 1), cfg.block_m), batch * nheads)
    if batch * nheads == 0 or q.numel() == 0:
        return out, lse.fill_(float("inf"))
    dummy = lse  # never dereferenced when its flag is off
    _fwd_kernel[grid](
        q, k, v, out, lse,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        *sq, *sk, *sv, *so, stride_lb, stride_lh, stride_ab,
        nheads, nheads // nheads_k, seqlen_q, seqlen_k,
        qk_scale, cap, wl, wr,
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN_D=head_dim == block_d(head_dim),
        IS_VARLEN=varlen, BANDED=banded, SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None,
        DOT_PREC=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


# torch.library op so torch.compile traces the call (schema spelled out: no annotation inference).
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
               "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, "
               "float softcap, Tensor? alibi_slopes) -> (Tensor, Tensor)")


@torch.library.custom_op("flashlm_triton::fwd", mutates_args=(), schema=_FWD_SCHEMA)
def fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
           window_left, window_right, softcap, alibi_slopes):
    return attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, window_left, window_right, softcap, alibi_slopes)


@fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes):
    out = torch.empty_like(q)
    if cu_seqlens_q is not None:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
