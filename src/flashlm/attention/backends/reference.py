"""Reference backend: attention written out in plain torch, the ground truth every kernel is tested against.

Computes in fp32 whatever the input dtype (``upcast=False`` keeps the input dtype; tests use that to
measure how far an honest low-precision computation drifts, Dao's error rule). Explicit masks:
bottom-right causal, inclusive sliding window, tanh softcap, ALiBi, dropout from torch's default
generator of the device. Supports every feature (dense, varlen, kvcache, paged KV, GQA, different v
head_dim, attention probabilities) on any device; the backward is autograd through the torch math.
Memory is O(batch * heads * seqlen_q * seqlen_k): a correctness tool, not a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Backend, Capabilities


def within_window(keep: Tensor, key_pos: Tensor, diag: Tensor, causal: bool, window: tuple[int, int]) -> Tensor:
    """``keep`` and flash-attn's band: key position ``key_pos`` in [diag - left, diag + right], inclusive,
    -1 unbounded, ``causal`` meaning right = 0 (``diag``: the key aligned with the query, bottom-right)."""
    left, right = window
    if causal:
        right = 0
    if right >= 0:
        keep = keep & (key_pos <= diag + right)
    if left >= 0:
        keep = keep & (key_pos >= diag - left)
    return keep


def attention_core(q, k, v, *, q_lens=None, k_lo=None, k_hi=None, softmax_scale: float,
                   causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                   alibi_slopes=None, dropout_p: float = 0.0, upcast: bool = True,
                   return_probs: bool = False):
    """Padded-batch attention with per-row valid ranges.

    q (batch, seqlen_q, nheads, d); k (batch, seqlen_k, nheads_k, d); v (batch, seqlen_k, nheads_k, d_v).
    Row b has valid queries [0, q_lens[b]) and valid keys [k_lo[b], k_hi[b]) (int tensors (batch,),
    default: everything). Causal/window/ALiBi positions are relative to the valid keys and aligned
    bottom-right: query i sits on key column ``i + (k_hi - k_lo) - q_len``; it sees key column c when
    ``c <= diag + right`` (causal: right = 0) and ``c >= diag - left`` (-1 = unbounded).

    Returns out (batch, seqlen_q, nheads, d_v) in fp32 (input dtype if not upcast), lse (batch, nheads,
    seqlen_q) fp32 (+inf for rows with no visible key, whose out is 0, as flash-attn 2 returns), and when return_probs the
    probabilities (batch, nheads, seqlen_q, seqlen_k) with dropped entries negated (flash-attn's S_dmask).
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    cdtype = torch.float32 if upcast else q.dtype
    if q_lens is None:
        q_lens = torch.full((B,), Sq, device=dev, dtype=torch.long)
    if k_lo is None:
        k_lo = torch.zeros(B, device=dev, dtype=torch.long)
    if k_hi is None:
        k_hi = torch.full((B,), Sk, device=dev, dtype=torch.long)
    q_lens, k_lo, k_hi = (t.to(device=dev, dtype=torch.long).view(B, 1, 1) for t in (q_lens, k_lo, k_hi))

    i = torch.arange(Sq, device=dev).view(1, Sq, 1)
    j = torch.arange(Sk, device=dev).view(1, 1, Sk)
    col = j - k_lo
    diag = i + (k_hi - k_lo) - q_lens  # key column aligned with query i (bottom-right)
    keep = within_window((col >= 0) & (j < k_hi) & (i < q_lens), col, diag, causal, window_size)  # (B, Sq, Sk)
    # keys no query sees (past cache_seqlens, before cache_leftpad, padding, outside every window) are
    # never read: zeroed by selection, so NaN/inf left in such slots cannot reach the output (0 * NaN)
    used = keep.any(dim=1)[:, :, None, None]  # (B, Sk, 1, 1)
    k = torch.where(used, k, torch.zeros((), dtype=k.dtype, device=dev))
    v = torch.where(used, v, torch.zeros((), dtype=v.dtype, device=dev))
    keep = keep[:, None, None]  # (B, 1, 1, Sq, Sk)

    # scores laid out (B, Hk, G, Sq, Sk): GQA by broadcasting k/v over the G query heads per kv head
    qg = q.to(cdtype).reshape(B, Sq, Hk, G, D)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(cdtype)).float() * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.float()
        slopes = slopes.view(1, Hk, G, 1, 1) if slopes.dim() == 1 else slopes.view(B, Hk, G, 1, 1)
        s = s - slopes * (diag - col).abs()[:, None, None].float()
    s = s.masked_fill(~keep, float("-inf"))

    # softmax with empty rows -> 0 (the row max is detached: it cancels mathematically); Sk == 0 has
    # no max to take: every row is empty
    m = s.detach().amax(dim=-1, keepdim=True) if Sk else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(z > 0, z, torch.ones_like(z))
    lse = (m + torch.log(z)).squeeze(-1).detach()
    # empty rows: log(0) = -inf; flash-attn 2's kernels (and PyTorch's) report +inf there
    lse = torch.where(z.squeeze(-1) > 0, lse, torch.full_like(lse, float("inf")))
    probs = p
    if dropout_p > 0:
        keep_drop = torch.rand(p.shape, device=dev) >= dropout_p
        p = p * keep_drop / (1.0 - dropout_p)
        if return_probs:
            probs = torch.where(keep_drop, probs, -probs)
    out = _pv(p.to(cdtype), v.to(cdtype), keep).reshape(B, Sq, H, v.shape[-1])
    lse = lse.reshape(B, H, Sq)
    if return_probs:
        return out, lse, probs.detach().reshape(B, H, Sq, Sk)
    return out, lse


def _pv(p, v, keep):
    """out[q] = sum_k p[q, k] v[k] where a row reads only the keys it sees (``keep``).

    p (B, Hk, G, Sq, Sk), v (B, Sk, Hk, Dv), keep bool broadcastable to p -> (B, Sq, Hk, G, Dv).
    A plain product would give 0 * inf = NaN in a row that does not see a non-finite v (a causally
    masked row of the same sequence): the non-finite values are taken out of the product and put back,
    by selection, only into the rows that see them (+inf, -inf, or NaN when both or a NaN are seen).
    """
    finite = torch.isfinite(v)
    # the common case (every v finite) skips the bookkeeping: one read of a flag (a sync on GPU, where
    # this backend is the slow path anyway); traced code takes the general path (no data branch)
    if not torch.compiler.is_compiling() and bool(finite.all()):
        return torch.einsum("bhgqk,bkhd->bqhgd", p, v)
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, torch.where(finite, v, torch.zeros((), dtype=v.dtype,
                                                                                  device=v.device)))
    # how many +inf / -inf / NaN values of each column every row sees (counts in v's dtype are exact
    # up to 2048 keys in fp16, which is all a "> 0" test needs: counts never round down to 0)
    kinds = torch.cat([v == float("inf"), v == float("-inf"), torch.isnan(v)], dim=-1).to(p.dtype)
    seen = torch.einsum("bhgqk,bkhd->bqhgd", keep.expand_as(p).to(p.dtype), kinds) > 0
    pos, neg, nan = seen.chunk(3, dim=-1)
    out = torch.where(pos, float("inf"), out)
    out = torch.where(neg, float("-inf"), out)
    return torch.where(nan | (pos & neg), float("nan"), out)


def _token_rows(cu_seqlens, total: int):
    """For each packed token t: its sequence b and position within it (no host sync)."""
    t = torch.arange(total, device=cu_seqlens.device, dtype=torch.long)
    b = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return b, t - cu_seqlens.long()[b]


def _pad_packed(x, cu_seqlens, max_seqlen: int):
    """(total, ...) packed rows -> (batch, max_seqlen, ...) zero-padded, by index arithmetic."""
    batch = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long().view(batch, 1)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().view(batch, 1)
    pos = torch.arange(max_seqlen, device=x.device).view(1, max_seqlen)
    valid = pos < lens
    x_ext = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])  # row `total` is the zero pad
    idx = torch.where(valid, starts + pos, torch.full_like(pos, x.shape[0]))
    return x_ext[idx], lens.view(batch)


def _gather_pages(cache, block_table):
    """Paged cache (num_blocks, page, h, d) + block_table (batch, nblocks) -> (batch, nblocks*page, h, d)."""
    b, nb = block_table.shape
    pages = cache[block_table.long()]  # (batch, nblocks, page, h, d)
    return pages.reshape(b, nb * cache.shape[1], *cache.shape[2:])


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        head_dims=(1, 1024), varlen=True, kvcache=True, paged_kv=True, window=True, softcap=True,
        alibi=True, dropout=True, backward=True, deterministic=True, head_dim_v_differs=True,
        attn_probs=True, leftpad=True, empty_kv=True,
        notes=("pure torch, fp32 math, O(seqlen_q * seqlen_k) memory: a correctness tool",))

    def __init__(self, upcast: bool = True):
        self.upcast = upcast  # False: math in the input dtype (tests measure low-precision drift with it)

    def dense(self, q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic, return_probs: bool = False):
        res = attention_core(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                             return_probs=return_probs, upcast=self.upcast)
        return (res[0].to(q.dtype),) + tuple(res[1:])

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None,
               return_probs: bool = False):
        total_q = q.shape[0]
        q_pad, q_lens = _pad_packed(q, cu_seqlens_q, max_seqlen_q)
        k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        if block_table is not None:
            k_pad, v_pad = _gather_pages(k, block_table), _gather_pages(v, block_table)
        else:
            k_pad, _ = _pad_packed(k, cu_seqlens_k, max_seqlen_k)
            v_pad, _ = _pad_packed(v, cu_seqlens_k, max_seqlen_k)
        res = attention_core(q_pad, k_pad, v_pad, q_lens=q_lens, k_hi=k_lens, softmax_scale=softmax_scale,
                             causal=causal, window_size=window_size, softcap=softcap,
                             alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_probs=return_probs,
                             upcast=self.upcast)
        b, pos = _token_rows(cu_seqlens_q, total_q)
        out = res[0][b, pos].to(q.dtype)  # (total_q, nheads, d_v)
        lse = res[1][b, :, pos].transpose(0, 1).contiguous()  # (nheads, total_q)
        return (out, lse) + tuple(res[2:])

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad, block_table,
                softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
        if block_table is not None:
            k_cache, v_cache = _gather_pages(k_cache, block_table), _gather_pages(v_cache, block_table)
        elif cache_batch_idx is not None:
            k_cache, v_cache = k_cache[cache_batch_idx.long()], v_cache[cache_batch_idx.long()]
        out, lse = attention_core(q, k_cache, v_cache, k_lo=cache_leftpad, k_hi=cache_seqlens,
                                  softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                  softcap=softcap, alibi_slopes=alibi_slopes, upcast=self.upcast)
        return out.to(q.dtype), lse


BACKEND = ReferenceBackend()
