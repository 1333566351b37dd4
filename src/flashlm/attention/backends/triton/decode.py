"""Split-KV attention over a KV cache (flash_attn_with_kvcache), plus the kernel that combines splits.

Decoding is bandwidth-bound: one program owns one kv head and packs every query head of its GQA
group (times the few query positions) into the M dimension, so each cached key/value is read once
per kv head, not once per query head. The key range of each row is cut into ``num_splits`` chunks
run by separate programs (enough programs to fill the GPU even at batch 1); each writes a partial
output and its log-sum-exp in fp32, and ``_combine_kernel`` merges them.

Per row b: keys live at cache positions [cache_leftpad[b], cache_seqlens[b]) of cache row
cache_batch_idx[b] (or b), or, with block_table, at page block_table[b, pos // page_size], slot
pos % page_size. Causal/window alignment is bottom-right over the row's valid keys.
"""

import torch
import triton
import triton.language as tl

from .common import (
    DECODE_BLOCK_M,
    alibi_batch_stride,
    block_d,
    decode_config,
    device_info,
    dot_precision,
    next_pow2,
    pv_dot,
    tanh,
    window_bounds,
)
from .fwd import scale_args


@triton.jit
def _decode_tile(acc, l_i, m_i, q, qpos, K, V, BlockTable, j0, end, leftpad, b64, cache_b, hk, off, wl, wr,
                 page_size, qk_scale, softcap, slope, offs_n, offs_d, d_mask,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                 PAGED: tl.constexpr, BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 PARTIAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """One BLOCK_N tile of keys [j0, j0 + BLOCK_N) for the packed rows; PARTIAL: rows see different keys
    of this tile (keys past ``end`` are never loaded: their loads are masked to 0)."""
    cols = j0 + offs_n
    col_ok = cols < end
    pos = (leftpad + cols).to(tl.int64)
    if PAGED:
        page = tl.load(BlockTable + b64 * stride_bt + pos // page_size, mask=col_ok, other=0).to(tl.int64)
        kv_row_k = page * stride_kb + (pos % page_size) * stride_ks
        kv_row_v = page * stride_vb + (pos % page_size) * stride_vs
    else:
        kv_row_k = cache_b * stride_kb + pos * stride_ks
        kv_row_v = cache_b * stride_vb + pos * stride_vs
    kv_mask = col_ok[:, None] & d_mask[None, :]
    k = tl.load(K + kv_row_k[:, None] + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if SOFTCAP:
        s = tanh(qk * qk_scale) * softcap
    else:
        s = qk * qk_scale
    if ALIBI:
        s = s - slope[:, None] * tl.abs((qpos[:, None] + off - cols[None, :]).to(tl.float32))
    valid = col_ok[None, :]
    if BANDED:
        valid = valid & (cols[None, :] >= qpos[:, None] + off - wl) & (cols[None, :] <= qpos[:, None] + off + wr)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + kv_row_v[:, None] + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if PARTIAL:
        acc = pv_dot(acc * alpha[:, None], p, v, p > 0, DOT_PREC)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _decode_kernel(
    Q, K, V, OPart, LPart, CacheSeqlens, LeftPad, BatchIdx, BlockTable, Alibi,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_opb, stride_ops, stride_oph, stride_opx, stride_lpb, stride_lps, stride_lph,
    stride_bt, stride_ab,
    nheads_k, group, seqlen_q, num_splits, page_size, qk_scale, softcap, wl, wr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr,
    BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    b64 = b.to(tl.int64)
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(LeftPad + b)
    seqlen_k = tl.load(CacheSeqlens + b) - leftpad
    cache_b = b64
    if HAS_BATCH_IDX:
        cache_b = tl.load(BatchIdx + b).to(tl.int64)
    off = seqlen_k - seqlen_q

    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows: (query position, head in group)
    row_ok = r < seqlen_q * group
    qpos = r // group
    h = hk * group + r % group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(Q + b64 * stride_qb + qpos[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    # This split's keys, intersected with the keys any of these rows may see.
    chunk = tl.cdiv(tl.cdiv(seqlen_k, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seqlen_k)
    if BANDED:
        q_first = (pid_r * BLOCK_M) // group
        q_last = (tl.minimum(pid_r * BLOCK_M + BLOCK_M, seqlen_q * group) - 1) // group
        start = tl.maximum(start, tl.maximum(q_first + off - wl, 0) // BLOCK_N * BLOCK_N)
        end = tl.minimum(end, q_last + off + wr + 1)

    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # [start, full_lo) and [full_hi, end): tiles whose keys some rows of this block see and others do
    # not (window's left edge, causal diagonal): their PV product must not read a v row a query does
    # not see (pv_dot). Between them every row sees every valid key: a plain dot.
    full_lo = start
    full_hi = end
    if BANDED:
        full_lo = tl.minimum(tl.maximum((q_last + off - wl + BLOCK_N - 1) // BLOCK_N * BLOCK_N, start), end)
        full_hi = tl.maximum(tl.minimum((q_first + off + wr + 1 - start) // BLOCK_N * BLOCK_N + start, end),
                             full_lo)
    for j0 in range(start, full_lo, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, qpos, K, V, BlockTable, j0, end, leftpad, b64, cache_b,
                                     hk, off, wl, wr, page_size, qk_scale, softcap, slope, offs_n, offs_d, d_mask,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                                     PAGED, BANDED, SOFTCAP, ALIBI, True, DOT_PREC)
    for j0 in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, qpos, K, V, BlockTable, j0, end, leftpad, b64, cache_b,
                                     hk, off, wl, wr, page_size, qk_scale, softcap, slope, offs_n, offs_d, d_mask,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                                     PAGED, BANDED, SOFTCAP, ALIBI, False, DOT_PREC)
    for j0 in range(full_hi, end, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, qpos, K, V, BlockTable, j0, end, leftpad, b64, cache_b,
                                     hk, off, wl, wr, page_size, qk_scale, softcap, slope, offs_n, offs_d, d_mask,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                                     PAGED, BANDED, SOFTCAP, ALIBI, True, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))  # log2 units; -inf: split saw nothing
    o_ptrs = (OPart + b64 * stride_opb + qpos[:, None] * stride_ops + h[:, None] * stride_oph
              + pid_s * stride_opx + offs_d[None, :])
    tl.store(o_ptrs, acc / l_safe[:, None], mask=q_mask)
    tl.store(LPart + b64 * stride_lpb + qpos * stride_lps + h * stride_lph + pid_s, lse2, mask=row_ok)


@triton.jit
def _combine_kernel(OPart, LPart, Out, Lse, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                    nheads, seqlen_q, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # one (b, query position, head) row; partials are (B, Sq, H, S, D) contiguous
    h = pid % nheads
    bs = pid // nheads
    qpos = bs % seqlen_q
    b = bs // seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    p64 = pid.to(tl.int64)
    lse = tl.load(LPart + p64 * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    w_sum = tl.sum(w, 0)
    o = tl.load(OPart + (p64 * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    lse_out = tl.where(w_sum == 0.0, float("inf"), (m_safe + tl.log2(tl.where(w_sum == 0.0, 1.0, w_sum)))
                       * 0.6931471805599453)
    tl.store(Out + b.to(tl.int64) * stride_ob + qpos * stride_os + h * stride_oh + offs_d,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + qpos, lse_out)


def auto_num_splits(q: torch.Tensor, programs: int, max_keys: int, block_n: int) -> int:
    """Enough splits for ~2 waves of programs, never chunks shorter than 4 key blocks (2 on Hopper,
    where the H200 sweep found b1 ctx2048 fastest at 16 splits of 64-key tiles: 6.3 us vs 7.5 at 8)."""
    cc, n_sm = device_info(q)
    want = triton.cdiv(2 * n_sm, max(programs, 1))
    min_blocks = 2 if cc is not None and cc[0] == 9 else 4
    return int(max(1, min(want, triton.cdiv(max_keys, min_blocks * block_n), 64)))


def attn_decode(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                alibi_slopes, num_splits: int, *, block_n: int | None = None, num_warps: int | None = None):
    """q (B, Sq, H, D); k/v_cache (B_cache, S_cache, Hk, D) or paged (num_blocks, page_size, Hk, D)
    with block_table int32 (B, max_blocks); cache_seqlens int32 (B,) keys per row after the append.
    Returns out (B, Sq, H, D) in q's dtype and lse (B, H, Sq) fp32. num_splits <= 0: heuristic.
    ``block_n`` / ``num_warps``: override the tuned config (`flashlm bench decode-probe --parts kernel` sweeps them)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    max_keys = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    rows = seqlen_q * group
    block_m = max(DECODE_BLOCK_M, min(next_pow2(rows), 64))
    n_row_blocks = triton.cdiv(rows, block_m)
    cfg = decode_config(q, head_dim, batch * nheads_k * n_row_blocks)
    if block_n is not None or num_warps is not None:
        cfg = cfg._replace(block_n=block_n or cfg.block_n, num_warps=num_warps or cfg.num_warps)
    if num_splits <= 0:
        num_splits = auto_num_splits(q, batch * nheads_k * n_row_blocks, max_keys, cfg.block_n)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    o_part = torch.empty((batch, seqlen_q, nheads, num_splits, head_dim), device=q.device, dtype=torch.float32)
    l_part = torch.empty((batch, seqlen_q, nheads, num_splits), device=q.device, dtype=torch.float32)
    banded, wl, wr = window_bounds(causal, (window_left, window_right))
    qk_scale, cap = scale_args(softmax_scale, softcap)
    stride_ab = alibi_batch_stride(alibi_slopes)
    dummy = cache_seqlens
    bd = block_d(head_dim)
    _decode_kernel[(num_splits, batch * nheads_k, n_row_blocks)](
        q, k_cache, v_cache, o_part, l_part, cache_seqlens,
        cache_leftpad if cache_leftpad is not None else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        block_table if paged else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *o_part.stride()[:4], *l_part.stride()[:3],
        block_table.stride(0) if paged else 0, stride_ab,
        nheads_k, group, seqlen_q, num_splits, page_size, qk_scale, cap, wl, wr,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        HAS_LEFTPAD=cache_leftpad is not None, HAS_BATCH_IDX=cache_batch_idx is not None and not paged,
        PAGED=paged, BANDED=banded, SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None,
        DOT_PREC=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _combine_kernel[(batch * seqlen_q * nheads,)](
        o_part, l_part, out, lse, *out.stride()[:3], lse.stride(0), lse.stride(1),
        nheads, seqlen_q, num_splits, HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_S=max(2, next_pow2(num_splits)),
        num_warps=4 if q.is_cuda else 1,
    )
    return out, lse


_DECODE_SCHEMA = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? cache_batch_idx, "
                  "Tensor? cache_leftpad, Tensor? block_table, float softmax_scale, bool causal, int window_left, "
                  "int window_right, float softcap, Tensor? alibi_slopes, int num_splits) -> (Tensor, Tensor)")


@torch.library.custom_op("flashlm_triton::decode", mutates_args=(), schema=_DECODE_SCHEMA)
def decode_op(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale,
              causal, window_left, window_right, softcap, alibi_slopes, num_splits):
    return attn_decode(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                       softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, num_splits)


@decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, *args):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
