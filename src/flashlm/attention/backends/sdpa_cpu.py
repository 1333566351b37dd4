"""PyTorch's CPU flash kernel: ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``.

The kernel behind ``F.scaled_dot_product_attention`` on CPU (blocked online softmax, no
(seqlen_q x seqlen_k) score matrix in memory, threaded over batch x heads). Called directly, not
through ``F.scaled_dot_product_attention``: the aten op has its own autograd formula (its backward is
``_scaled_dot_product_flash_attention_for_cpu_backward``) and returns the logsumexp, which SDPA
drops; host time is the same at the tiny preset's shapes (measured in docs/attention.md).

Layout: the kernel takes BHSD; our BSHD tensors go in as ``transpose(1, 2)`` views (no copy) and its
output, allocated (B, S, H, D) inside, comes back as a contiguous BSHD view. GQA is native (fewer k/v
heads, no repeat). The kernel's ``is_causal`` aligns TOP-LEFT; flash-attn aligns bottom-right. So
``is_causal`` is used only where the two coincide (seqlen_q == seqlen_k); a single query (decode)
sees every key and needs no mask; every other causal or sliding-window call gets an additive float
mask built from flash-attn's rule (cached per shape).
Rows that see no key (bottom-right causal with seqlen_q > seqlen_k, an empty KV-cache row) come out
of the kernel as zeros with lse 0: their lse is set to +inf, flash-attn 2's convention.

Non-finite values (masked slots must select, not multiply: flash-attn never reads them). The kernel multiplies the zero
probabilities of masked keys by v (0 * inf = NaN in every row of the tile), adds its float mask to the
scores (inf + -inf = NaN) and returns 0 for a row whose scores are all NaN (a NaN query). So keys no
query reads are selected away: sliced off when a left window leaves them out of every row, zeroed
(``torch.where``) in KV-cache slots past cache_seqlens or before cache_leftpad when they hold a
NaN/inf. A NaN/inf some query reads sends the call to the reference's math (:func:`_exact`), which
puts it only in the rows that see it; :func:`_checked` finds it (q and k before the kernel, the output
after). Such a call has a NaN or inf in its output anyway, so its speed does not matter; a clean call
pays three sums. Under torch.compile (dense calls) the check is skipped: a data-dependent branch would
end the graph, so a compiled call keeps the kernel's arithmetic for values some query reads (the
slicing still holds).

Varlen runs the kernel once per sequence (cu_seqlens read on the host: free on CPU), or, when many
short sequences would make the per-call host cost dominate, once on a zero-padded batch with a
per-row mask (``CALL_COST``); KV cache runs once per batch, keys sliced to the longest row,
with a mask from ``cache_seqlens`` (and ``cache_leftpad``) only when rows differ.
Refused (the reference serves them): softcap, ALiBi, dropout, paged KV, v head_dim != q/k head_dim,
calls with seqlen_q or (max_)seqlen_k 0 (the kernel divides by zero), deterministic backward (the
backward was bit-identical over 10 repeats with GQA on 2 threads, but that is not a guarantee).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch

from .base import AttnCall, Backend, Capabilities
from .reference import attention_core, within_window

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_INF = float("inf")


def _keep(sq: int, sk: int, causal: bool, window: tuple[int, int], hi=None, lo=None, q_lens=None):
    """Boolean (sq, sk) — (B, 1, sq, sk) with per-row ``hi``/``lo`` — of the keys each query sees.

    flash-attn's rule, bottom-right aligned: query i sits on key ``i + hi - q_len`` (hi = valid keys,
    default sk; q_len = valid queries, default sq); it sees key j when j <= diag + right (causal:
    right = 0) and j >= diag - left (-1 = unbounded), and lo <= j < hi.
    """
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    if hi is not None:
        hi = hi.long().view(-1, 1, 1, 1)
        i, j = i.view(1, 1, sq, 1), j.view(1, 1, 1, sk)
    diag = i + (sk if hi is None else hi) - (sq if q_lens is None else q_lens.long().view(-1, 1, 1, 1))
    keep = j < (sk if hi is None else hi)
    if lo is not None:
        keep = keep & (j >= lo.long().view(-1, 1, 1, 1))
    return within_window(keep, j, diag, causal, window)


def _finite(*tensors) -> bool:
    """Whether every value is finite: one sum per tensor, read back (a NaN or inf anywhere makes the
    total non-finite; an overflowing sum is a false alarm that only costs the exact path; fp16 sums
    in fp32, whose range bf16 shares). The cheapest check measured (one thread, a decode step's q and
    two 256-key cache slices): 13 µs, where fp32-accumulated sums took 44 and ``isfinite().all()``
    costs ~7x a sum. Traced code trusts its inputs (see the module docstring)."""
    if torch.compiler.is_compiling():
        return True
    total = 0.0
    for t in tensors:
        t = t.detach() if t.requires_grad else t  # no autograd node (a no_grad block costs more than a sum)
        total += t.sum(dtype=torch.float32 if t.dtype == torch.float16 else None).item()
    return math.isfinite(total)


def _checked(q, k, v, kernel):
    """``kernel(k, v)`` -> (out, lse), or None where a non-finite value could have changed it. q and k
    are checked before (a row whose scores are all NaN comes back 0, finite); v through the output
    after (with q and k finite, a NaN/inf in v the kernel multiplies, by a probability or a masked
    zero, always shows there; one it skips cannot matter): a decode step sums its tiny output, not the
    cache's v."""
    if not _finite(q, k):
        return None
    out, lse = kernel(k, v)
    return (out, lse) if _finite(out) else None


def _exact(q, k, v, scale: float, causal: bool, window: tuple[int, int], k_lo=None, k_hi=None):
    """The reference's math (fp32, selection: NaN/inf reach only the rows that see them), for calls
    whose inputs hold a non-finite value some query reads."""
    out, lse = attention_core(q, k, v, k_lo=k_lo, k_hi=k_hi, softmax_scale=scale, causal=causal,
                              window_size=window)
    return out.to(q.dtype), lse


def _first_key(sq: int, sk: int, window: tuple[int, int]) -> int:
    """Keys before this one are outside every query's window (bottom-right: query 0 sits on key
    sk - sq); the last query sits on the last key, so no window leaves keys out on the right."""
    return max(0, sk - sq - window[0]) if window[0] >= 0 else 0


def _additive(keep, dtype):
    """The kernel takes a float mask in the query's dtype: 0 where kept, -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, -_INF)


@lru_cache(maxsize=32)
def _dense_mask(sq: int, sk: int, causal: bool, window: tuple[int, int], dtype: torch.dtype):
    """(is_causal, float mask or None, empty-rows bool (sq,) or None) for a dense call.

    The kernel's top-left ``is_causal`` equals flash-attn's bottom-right one when sq == sk; with one
    query (a decode step) bottom-right causal sees every key, so no mask at all.
    """
    if window == (-1, -1) and (not causal or sq == sk or sq == 1):
        return causal and sq == sk, None, None
    keep = _keep(sq, sk, causal, window)
    # rows with no key exist only for bottom-right masks with sq > sk; decided on host ints, not by
    # reading the mask back (a data-dependent branch would break a torch.compile graph)
    left, right = window
    right = 0 if causal else right
    diag0 = sk - sq  # query i sits on key i + diag0
    some_empty = (right >= 0 and diag0 + right < 0) or (left >= 0 and sq - 1 + diag0 - left > sk - 1)
    return False, _additive(keep, dtype), (~keep.any(-1) if some_empty else None)


def _attend(q, k, v, scale: float, causal: bool, window: tuple[int, int]):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) BSHD -> out (B, Sq, H, D), lse (B, H, Sq) fp32."""
    lo = _first_key(q.shape[1], k.shape[1], window)
    if lo:  # keys no query sees: never handed to the kernel (same mask: every position shifts by lo)
        k, v = k[:, lo:], v[:, lo:]
    res = _checked(q, k, v, lambda k, v: _kernel(q, k, v, scale, causal, window))
    return res if res is not None else _exact(q, k, v, scale, causal, window)


def _kernel(q, k, v, scale: float, causal: bool, window: tuple[int, int]):
    sq, sk = q.shape[1], k.shape[1]
    is_causal, mask, empty = _dense_mask(sq, sk, causal, window, q.dtype)
    out, lse = _FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal,
                    attn_mask=mask, scale=scale)
    if empty is not None:
        lse = lse.masked_fill(empty.view(1, 1, sq), _INF)
    return out.transpose(1, 2), lse


# Varlen: per-sequence calls cost ~100 µs each (fwd+bwd: split, dispatch, autograd nodes) plus ~45 ns
# per score entry computed (causal: half the rectangle); one padded call costs ~22 ns per entry of the
# padded rectangle (a mask: no causal block skipping). Measured on one thread at head_dim 16, 4/2
# heads, fwd+bwd (e.g. 200 sequences of 1-39 tokens: 23.3 ms per sequence vs 17.5 ms padded; 16 of
# 20-116 tokens: 4.3 vs 6.7 ms). In units of padded entries: CALL_COST per call, 2 per entry computed.
CALL_COST = 4_500


def _varlen_loop(q, k, v, cu_q, cu_k, lens_q, lens_k, scale, causal, window):
    # split, not slices: one backward node that concatenates the gradients, where a slice per
    # sequence would each write a zero tensor of the whole packed size
    qs, ks, vs = q.split(lens_q), k.split(lens_k), v.split(lens_k)
    outs, lses = [], []
    for q_b, k_b, v_b in zip(qs, ks, vs):
        if q_b.shape[0] == 0:
            continue
        if k_b.shape[0] == 0:  # queries with no key: 0 out, +inf lse (flash-attn's rule)
            outs.append(q_b.new_zeros(q_b.shape[:2] + (v.shape[-1],)))
            lses.append(torch.full(q_b.shape[1::-1], _INF))
            continue
        o, lse = _attend(q_b[None], k_b[None], v_b[None], scale, causal, window)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _pad_index(cu: list[int], lens: list[int], width: int, total: int):
    """(batch, width) row indices into a packed tensor with one zero row appended at ``total``, and
    the flat (batch * width) positions of the packed tokens."""
    t = torch.arange(width).view(1, width)
    valid = t < torch.tensor(lens).view(-1, 1)
    idx = torch.where(valid, torch.tensor(cu[:-1]).view(-1, 1) + t, total)
    return idx, torch.arange(valid.numel()).view(valid.shape)[valid]


def _varlen_padded(q, k, v, cu_q, cu_k, lens_q, lens_k, scale, causal, window):
    """One call on (batch, max_len) zero-padded BSHD with a per-row mask; padded queries discarded."""
    wq, wk = max(lens_q), max(lens_k)
    idx_q, flat = _pad_index(cu_q, lens_q, wq, q.shape[0])
    idx_k, _ = _pad_index(cu_k, lens_k, wk, k.shape[0])

    def pad(x, idx):
        return torch.cat([x, x.new_zeros((1,) + x.shape[1:])])[idx]

    keep = _keep(wq, wk, causal, window, hi=torch.tensor(lens_k), q_lens=torch.tensor(lens_q))
    out, lse = _FWD(pad(q, idx_q).transpose(1, 2), pad(k, idx_k).transpose(1, 2), pad(v, idx_k).transpose(1, 2),
                    0.0, False, attn_mask=_additive(keep, q.dtype), scale=scale)
    lse = lse.masked_fill(~keep.any(-1), _INF)  # (B, H, wq): rows that see no key
    out = out.transpose(1, 2).reshape(len(lens_q) * wq, *out.shape[1:2], out.shape[-1])[flat]
    return out, lse.transpose(0, 1).reshape(lse.shape[1], -1)[:, flat]


class SdpaCpuBackend(Backend):
    name = "sdpa_cpu"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
        head_dims=(1, 512), varlen=True, kvcache=True, leftpad=True, window=True, backward=True,
        notes=("aten._scaled_dot_product_flash_attention_for_cpu (+ its backward via autograd)",
               "bottom-right causal and windows through a float mask"))
    traceable_kinds = frozenset({"dense"})  # varlen / KV-cache calls read cu_seqlens / lengths on the host

    def unavailable_reason(self) -> str | None:
        if _FWD is None:
            return "torch has no aten._scaled_dot_product_flash_attention_for_cpu"
        return None

    def refuse(self, call: AttnCall) -> str | None:
        why = super().refuse(call)
        if why:
            return why
        if call.seqlen_q == 0 or call.seqlen_k == 0:  # None: not known yet (a model binding at build)
            return "empty (max_)seqlen_q or seqlen_k (the CPU kernel divides by zero)"
        return None

    def dense(self, q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic):
        return _attend(q, k, v, softmax_scale, causal, tuple(window_size))

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None):
        """Packed (total, H, D) in and out, lse (H, total_q): one kernel call per sequence, or one
        call on a zero-padded batch when per-call overhead would cost more than the padding."""
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # CPU tensors: no device sync
        lens_q = [b - a for a, b in itertools.pairwise(cu_q)]
        lens_k = [b - a for a, b in itertools.pairwise(cu_k)]
        args = (q, k, v, cu_q, cu_k, lens_q, lens_k, softmax_scale, causal, tuple(window_size))
        if max(lens_k, default=0) == 0 or max(lens_q, default=0) == 0:  # nothing to attend: no kernel
            return q.new_zeros(q.shape[:2] + (v.shape[-1],)), torch.full((q.shape[1], q.shape[0]), _INF)
        work = sum(a * b for a, b in zip(lens_q, lens_k)) // (2 if causal else 1)
        padded = len(lens_q) * max(lens_q) * max(lens_k)  # a mask: no causal block skipping
        if padded < 2 * work + len(lens_q) * CALL_COST:
            res = _checked(q, k, v, lambda k, v: _varlen_padded(q, k, v, *args[3:]))
            if res is not None:
                return res
        return _varlen_loop(*args)  # non-finite values: each sequence checked once its unseen keys are cut

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad, block_table,
                softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
        """q (B, Sq, H, D), caches (B_cache, cap, Hk, D), cache_seqlens (B,) valid keys per row."""
        if cache_batch_idx is not None:
            idx = cache_batch_idx.long()
            k_cache, v_cache = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
        lens = cache_seqlens.tolist()  # CPU: no device sync; decides the slice and whether rows differ
        n = max(lens)
        if n == 0:
            B, Sq, H, _ = q.shape
            return q.new_zeros(B, Sq, H, v_cache.shape[-1]), torch.full((B, H, Sq), _INF)
        k_cache, v_cache = k_cache[:, :n], v_cache[:, :n]
        if cache_leftpad is None and min(lens) == n:  # every row as long: a dense call on the slice
            return _attend(q, k_cache, v_cache, softmax_scale, causal, tuple(window_size))
        keep = _keep(q.shape[1], n, causal, tuple(window_size), hi=cache_seqlens, lo=cache_leftpad)

        def kernel(k, v):
            out, lse = _FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                            attn_mask=_additive(keep, q.dtype), scale=softmax_scale)
            return out.transpose(1, 2), lse.masked_fill(~keep.any(-1), _INF)  # (B, 1, Sq): empty rows

        res = _checked(q, k_cache, v_cache, kernel)
        if res is None:
            # slots no query reads (past cache_seqlens, before cache_leftpad, outside every window) may
            # hold garbage: selected away, so only a NaN/inf some query reads takes _exact
            used = keep.any(-2).view(keep.shape[0], n, 1, 1)
            k_cache, v_cache = (torch.where(used, c, torch.zeros((), dtype=c.dtype)) for c in (k_cache, v_cache))
            res = _checked(q, k_cache, v_cache, kernel)
        return res if res is not None else _exact(q, k_cache, v_cache, softmax_scale, causal, tuple(window_size),
                                                  cache_leftpad, cache_seqlens)


BACKEND = SdpaCpuBackend()
