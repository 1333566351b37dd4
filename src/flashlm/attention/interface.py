"""flash-attn 2.8 compatible attention functions, dispatched to a measured backend.

Same argument names, defaults, return values and semantics as Dao-AILab flash-attn 2.8's
``flash_attn_interface.py``; every function also takes a keyword-only ``backend=`` (a backend name,
see ``flashlm.attention.available_backends()``), overriding ``use_backend()`` and
``FLASHLM_ATTN_BACKEND``.

Layouts ("BSHD"): q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim);
varlen: (total_tokens, nheads, headdim) with cu_seqlens int32 (batch + 1,). nheads % nheads_k == 0:
query heads [i * g, (i + 1) * g) use kv head i (g = nheads // nheads_k), no copies of k/v.

Causal masks align bottom-right when seqlen_q != seqlen_k (flash-attn >= 2.1). For seqlen_q = 2,
seqlen_k = 5 (1 = keep)::

    1 1 1 1 0
    1 1 1 1 1

and for seqlen_q = 5, seqlen_k = 2 the first three rows see nothing (their output is 0)::

    0 0
    0 0
    0 0
    1 0
    1 1

A sliding window (left, right) lets query i see keys [i + seqlen_k - seqlen_q - left,
i + seqlen_k - seqlen_q + right], inclusive; -1 is unbounded. A window of W tokens is (W - 1, 0).

Every argument is checked before any kernel runs (shapes, dtypes, devices, int32 offsets, head
counts, values). Checks that would read tensor data (cu_seqlens monotone, cache lengths in range)
run for CPU tensors always and for GPU tensors when FLASHLM_ATTN_CHECKS=1, since reading GPU data is
a host sync per layer; paged KV (block_table) is checked on GPU too, with one read per call, since an
overflow there is a device fault (see flash_attn_with_kvcache's ``check_bounds``). Every refusal
raises ``flashlm.errors.InputError`` (a ValueError and a RuntimeError, as flash-attn raises).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..ops.rotary import rotary_ref
from . import registry
from .backends.base import AttnCall
from .checks import (  # noqa: F401  (the kvcache checks stay importable from here)
    _bounds_checked,
    _check_alibi,
    _check_block_table,
    _check_cache_bounds,
    _check_cache_rows,
    _check_cu_seqlens,
    _check_heads,
    _check_int32_vec,
    _check_kv_shapes,
    _check_kvcache_options,
    _check_max_seqlen,
    _check_paged_varlen,
    _check_qkv_dtypes_devices,
    _check_rotary,
    _check_scalars,
    _data_checks,
    _KVCachePlan,
    _prepare_kvcache,
    _scale,
    _tensor,
    _window,
)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _call(kind, q, nheads_k, head_dim_v, seqlen_q, seqlen_k, causal, window, softcap, alibi_slopes,
          dropout_p, needs_grad, deterministic, paged=False, probs=False, page_block_size=None,
          leftpad=False, seqlens_equal=None) -> AttnCall:
    return AttnCall(
        kind=kind, device_type=q.device.type, compute_capability=registry.compute_capability(q.device),
        dtype=q.dtype, head_dim=q.shape[-1], head_dim_v=head_dim_v, nheads=q.shape[-2], nheads_k=nheads_k,
        # window is normalized by _window: with causal it is (left, 0) or (-1, -1) for plain causal
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal, window=window != (-1, -1), softcap=softcap > 0, alibi=alibi_slopes is not None,
        dropout=dropout_p > 0, needs_grad=needs_grad, deterministic=deterministic, paged=paged,
        return_attn_probs=probs, page_block_size=page_block_size, leftpad=leftpad,
        seqlens_equal=(seqlen_q == seqlen_k) if seqlens_equal is None else seqlens_equal)


def _contig(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _empty_probs(q):
    return torch.empty((0,), dtype=q.dtype, device=q.device)


# ----------------------------------------------------------------------------------------------------
# dense


def _prepare_dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   deterministic, return_attn_probs):
    _tensor(q, "q", 4, "(batch, seqlen_q, nheads, headdim)")
    _tensor(k, "k", 4, "(batch, seqlen_k, nheads_k, headdim)")
    _tensor(v, "v", 4, "(batch, seqlen_k, nheads_k, headdim_v)")
    _check_qkv_dtypes_devices(q, {"k": k, "v": v})
    B, Sq, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise InputError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise InputError(f"k and v seqlen differ: {k.shape[1]} vs {v.shape[1]}")
    _check_heads(H, k.shape[2], D, k.shape[3], v.shape[2])
    _check_scalars(dropout_p, softcap, deterministic, causal)
    _check_alibi(alibi_slopes, H, B, q.device)
    scale = _scale(softmax_scale, D)
    window = _window(window_size, causal, k.shape[1])
    call = _call("dense", q, k.shape[2], v.shape[3], Sq, k.shape[1], causal, window, softcap, alibi_slopes,
                 dropout_p, _needs_grad(q, k, v), deterministic, probs=bool(return_attn_probs) and dropout_p > 0)
    return scale, window, call


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    backend: str | None = None):
    """Attention on dense BSHD tensors (flash-attn 2.8 ``flash_attn_func``).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_k, headdim);
        v: (batch, seqlen_k, nheads_k, headdim_v). nheads % nheads_k == 0.
        dropout_p: dropout probability (0.0 for evaluation).
        softmax_scale: scaling of QK^T before the softmax; default 1 / sqrt(headdim).
        causal: bottom-right aligned causal mask (see the module docstring).
        window_size: (left, right) sliding window, ints or a 2-element tensor; -1 = unbounded.
        softcap: > 0 applies ``softcap * tanh(scores / softcap)`` to the scaled scores.
        alibi_slopes: (nheads,) or (batch, nheads) fp32; adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: ask for a deterministic backward (the choice skips backends that cannot).
        return_attn_probs: also return softmax_lse and S_dmask (testing only).
        backend: keyword-only backend name; overrides use_backend() and FLASHLM_ATTN_BACKEND.
    Returns:
        out (batch, seqlen_q, nheads, headdim_v); with return_attn_probs also softmax_lse
        (batch, nheads, seqlen_q) fp32 and S_dmask: (batch, nheads, seqlen_q, seqlen_k) probabilities
        with dropped entries negated when dropout_p > 0 (reference backend), else an empty tensor.
    """
    scale, window, call = _prepare_dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                         alibi_slopes, deterministic, return_attn_probs)
    be = registry.select(call, backend)
    kwargs = {"dropout_p": float(dropout_p), "softmax_scale": scale, "causal": causal, "window_size": window,
              "softcap": float(softcap), "alibi_slopes": alibi_slopes, "deterministic": deterministic}
    if call.return_attn_probs:  # (out, lse, S_dmask) from a backend declaring attn_probs
        return be.dense(_contig(q), _contig(k), _contig(v), **kwargs, return_probs=True)
    out, lse = be.dense(_contig(q), _contig(k), _contig(v), **kwargs)
    return (out, lse, _empty_probs(q)) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              *, backend: str | None = None):
    """``flash_attn_func`` on qkv (batch, seqlen, 3, nheads, headdim); gradients flow into qkv."""
    _tensor(qkv, "qkv", 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise InputError(f"qkv dim 2 must be 3 (q, k, v), got shape {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             *, backend: str | None = None):
    """``flash_attn_func`` with kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    _tensor(kv, "kv", 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise InputError(f"kv dim 2 must be 2 (k, v), got shape {tuple(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


# ----------------------------------------------------------------------------------------------------
# varlen


def _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                    softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs, block_table):
    _tensor(q, "q", 3, "(total_q, nheads, headdim)")
    paged = block_table is not None
    kv_layout = "(num_blocks, page_block_size, nheads_k, headdim) with block_table" if paged \
        else "(total_k, nheads_k, headdim)"
    _tensor(k, "k", 4 if paged else 3, kv_layout)
    _tensor(v, "v", 4 if paged else 3, kv_layout)
    _check_qkv_dtypes_devices(q, {"k": k, "v": v})
    if k.shape[:-1] != v.shape[:-1]:
        raise InputError(f"k and v shapes disagree: {tuple(k.shape)} vs {tuple(v.shape)}")
    H, D = q.shape[1], q.shape[2]
    _check_heads(H, k.shape[-2], D, k.shape[-1], v.shape[-2])
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise InputError("cu_seqlens_q must be a 1-D int32 tensor (batch + 1,) with batch >= 1")
    batch = cu_seqlens_q.numel() - 1
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, q.shape[0], max_seqlen_q, q.device)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, None if paged else k.shape[0], max_seqlen_k,
                      q.device)
    page = None
    if paged:
        # paged KV reads the device once per call even on GPU (as flash-attn's own guard does): a
        # block_table overflow is a device fault that kills the CUDA context, not a wrong number
        check = not torch.compiler.is_compiling() and not (
            q.device.type != "cpu" and torch.cuda.is_current_stream_capturing())
        _check_block_table(block_table, batch, q.device)
        page = k.shape[1]
        if max_seqlen_k > block_table.shape[1] * page:
            raise InputError(f"max_seqlen_k {max_seqlen_k} exceeds the paged capacity "
                             f"{block_table.shape[1]} blocks x {page} tokens")
        if check:
            _check_paged_varlen(cu_seqlens_k, block_table, page, k.shape[0])
    _check_scalars(dropout_p, softcap, deterministic, causal)
    _check_alibi(alibi_slopes, H, batch, q.device)
    scale = _scale(softmax_scale, D)
    window = _window(window_size, causal, max_seqlen_k)
    call = _call("varlen", q, k.shape[-2], v.shape[-1], max_seqlen_q, max_seqlen_k, causal, window, softcap,
                 alibi_slopes, dropout_p, _needs_grad(q, k, v), deterministic, paged=paged,
                 probs=bool(return_attn_probs) and dropout_p > 0, page_block_size=page,
                 seqlens_equal=cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k)
    return scale, window, call


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
                           *, backend: str | None = None):
    """Attention on packed variable-length sequences (flash-attn 2.8 ``flash_attn_varlen_func``).

    Arguments:
        q: (total_q, nheads, headdim); k/v: (total_k, nheads_k, headdim), or with block_table the paged
            pools (num_blocks, page_block_size, nheads_k, headdim).
        cu_seqlens_q/k: int32 (batch + 1,) cumulative lengths (sequence b is rows
            [cu[b], cu[b+1]); zero-length sequences are allowed). With block_table, cu_seqlens_k gives
            the key lengths and block_table (batch, max_blocks) int32 the pages of each sequence.
        max_seqlen_q/k: Python ints, the longest sequence (compute once per batch, no host sync here).
        The other arguments are as in ``flash_attn_func``; masks align per sequence.
    Returns:
        out (total_q, nheads, headdim_v); with return_attn_probs also softmax_lse (nheads, total_q) fp32
        and S_dmask (batch, nheads, max_seqlen_q, max_seqlen_k) or an empty tensor (see flash_attn_func).
    """
    scale, window, call = _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                          deterministic, return_attn_probs, block_table)
    be = registry.select(call, backend)
    kwargs = {"dropout_p": float(dropout_p), "softmax_scale": scale, "causal": causal, "window_size": window,
              "softcap": float(softcap), "alibi_slopes": alibi_slopes, "deterministic": deterministic,
              "block_table": block_table}
    args = (_contig(q), _contig(k), _contig(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if call.return_attn_probs:
        return be.varlen(*args, **kwargs, return_probs=True)
    out, lse = be.varlen(*args, **kwargs)
    return (out, lse, _empty_probs(q)) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False, *, backend: str | None = None):
    """``flash_attn_varlen_func`` on qkv (total, 3, nheads, headdim) with one cu_seqlens for q and k."""
    _tensor(qkv, "qkv", 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise InputError(f"qkv dim 1 must be 3 (q, k, v), got shape {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, *, backend: str | None = None):
    """``flash_attn_varlen_func`` with kv (total_k, 2, nheads_k, headdim)."""
    _tensor(kv, "kv", 4, "(total_k, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise InputError(f"kv dim 1 must be 2 (k, v), got shape {tuple(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


# ----------------------------------------------------------------------------------------------------
# KV cache


def apply_rotary(x, cos, sin, interleaved: bool):
    """Rotate the first rotary_dim dims of x (batch, seqlen, nheads, headdim) by per-row cos/sin
    (batch, seqlen, rotary_dim // 2); math in fp32, result in x's dtype, the tail passes through.
    interleaved: pairs (0, 1), (2, 3), ... (GPT-J); else (i, i + rotary_dim/2) (GPT-NeoX / LLaMA).
    flashlm's one RoPE's torch form (:func:`flashlm.ops.rotary.rotary_ref`), as flash-attn's kvcache
    rotary is torch math here on every device."""
    return rotary_ref(x, cos, sin, interleaved)


def _select_kvcache_backend(q, k_cache, v_cache, plan: _KVCachePlan, causal, window, softcap, alibi_slopes,
                            cache_leftpad, backend):
    """The registry's backend for this kvcache call, or None while torch.compile traces.

    The registry's choice reads a context variable, the environment and module-level caches: Dynamo
    cannot trace it (and guards on those caches would recompile). Compiled code calls one opaque op
    for the attention proper instead (_kvcache_attention), which chooses when it runs; the rotary and
    the in-place append stay torch ops that the compiler sees (and fuses)."""
    if torch.compiler.is_compiling():
        return None
    call = _call("kvcache", q, k_cache.shape[2], v_cache.shape[3], q.shape[1], plan.capacity, causal, window,
                 softcap, alibi_slopes, 0.0, False, False, paged=plan.paged, page_block_size=plan.page,
                 leftpad=cache_leftpad is not None, seqlens_equal=False)
    return registry.select(call, backend)


def _rotate_new_tokens(q, k, rotary_cos, rotary_sin, plan: _KVCachePlan, causal, window, interleaved):
    """RoPE on the appended keys at cache_seqlens + j and on the queries (index arithmetic on device,
    no host read) -> (q, k) rotated."""
    B, Sq = q.shape[:2]
    cache_seqlens = plan.cache_seqlens
    pos_k = cache_seqlens.long()[:, None] + torch.arange(plan.s_new, device=q.device)
    k = apply_rotary(k, rotary_cos[pos_k], rotary_sin[pos_k], interleaved)
    if causal or window != (-1, -1):
        pos_q = cache_seqlens.long()[:, None] + torch.arange(Sq, device=q.device)
    else:  # every query sits at position cache_seqlens
        pos_q = cache_seqlens.long()[:, None].expand(B, Sq)
    q = apply_rotary(q, rotary_cos[pos_q], rotary_sin[pos_q], interleaved)
    return q, k


def _append_to_cache(k_cache, v_cache, k, v, plan: _KVCachePlan, block_table, cache_batch_idx) -> torch.Tensor:
    """Write k/v (batch, s_new, nheads_k, headdim) in place at positions cache_seqlens[b] + j of each
    row (through block_table's pages when paged) -> int32 (batch,) key counts including them."""
    B, s_new = k.shape[0], plan.s_new
    pos = plan.cache_seqlens.long()[:, None] + torch.arange(s_new, device=k.device)  # (B, s_new)
    if plan.paged:
        blk = block_table.long().gather(1, torch.div(pos, plan.page, rounding_mode="floor"))
        idx = (blk, pos % plan.page)
    else:
        rows = torch.arange(B, device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        idx = (rows[:, None].expand(B, s_new), pos)
    k_cache.index_put_(idx, k)
    v_cache.index_put_(idx, v)
    return (plan.cache_seqlens + s_new).to(torch.int32)


def _kvcache_attention(be, q, k_cache, v_cache, seqlens, cache_batch_idx, cache_leftpad, block_table, scale,
                       causal, window, softcap, alibi_slopes, num_splits, backend):
    """Attention over the (appended) cache -> (out, lse): through the chosen backend ``be``, or, when
    torch.compile traces (be is None), through the opaque op that chooses when it runs."""
    if be is None:
        return kvcache_attention_op(_contig(q), k_cache, v_cache, seqlens, cache_batch_idx, cache_leftpad,
                                    block_table, scale, causal, window[0], window[1], float(softcap),
                                    alibi_slopes, num_splits, backend)
    return be.kvcache(_contig(q), k_cache, v_cache, seqlens, cache_batch_idx=cache_batch_idx,
                      cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=scale,
                      causal=causal, window_size=window, softcap=float(softcap),
                      alibi_slopes=alibi_slopes, num_splits=num_splits)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, backend: str | None = None, check_bounds: bool | None = None):
    """Attention against a KV cache, appending new keys/values in place (flash-attn 2.8).

    If k/v are given they are written *in place* into k_cache/v_cache at positions cache_seqlens[b],
    cache_seqlens[b] + 1, ... of each row (index arithmetic, no host sync); attention then uses
    cache_seqlens + seqlen_new keys per row. With rotary_cos/sin (seqlen_ro, rotary_dim / 2), k is
    rotated at those positions before it is stored; q is rotated at cache_seqlens + i when causal or
    windowed, else at cache_seqlens for every query. No backward.

    Under torch.compile (fullgraph) no data is checked and the attention itself is one opaque op,
    ``flashlm::kvcache_attention``, whose backend is chosen when it runs; the rotary and the append
    stay torch ops (in place on the caches).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with block_table the paged
            pools (num_blocks, page_block_size, nheads_k, headdim). Last dim contiguous.
        k, v: optional (batch, seqlen_new, nheads_k, headdim) to append.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2); needs k and v.
        cache_seqlens: int or int32 (batch,): valid keys per row before the append (None: whole cache).
        cache_batch_idx: optional int32 (batch,): cache row of each batch row (not with block_table).
        cache_leftpad: optional int32 (batch,): keys start at this index in each row (not with block_table).
        block_table: optional int32 (batch, max_blocks_per_seq) for a paged cache.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func, aligned to
            the valid keys [cache_leftpad, cache_seqlens + seqlen_new) of each row.
        rotary_interleaved: GPT-J pairs (True, flash-attn's default) or GPT-NeoX halves (False).
        num_splits: split-KV hint for backends that split (0 = heuristic).
        return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q) fp32.
        check_bounds: keyword-only. Whether cache_seqlens (+ the new keys), cache_leftpad and the
            block_table entries are checked against the cache before anything runs, which reads them
            back from the device (one host sync). None (default): on CPU always; on GPU for paged
            caches (a block_table overflow is a device fault that kills the CUDA context, so this call
            pays the sync as flash-attn's own guard does) and, for unpaged caches, when
            FLASHLM_ATTN_CHECKS=1. False: never (for a caller that keeps the bounds by construction,
            such as the model's decode step). Never while torch.compile traces or a CUDA graph captures.
    Returns:
        out (batch, seqlen_q, nheads, headdim), and softmax_lse if return_softmax_lse.
        Rows that see no key (cache_seqlens 0 and no new keys) give out 0 and lse +inf.
    """
    plan = _prepare_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                            block_table, check_bounds)
    scale, window = _check_kvcache_options(q, plan, k, rotary_cos, rotary_sin, num_splits, softmax_scale,
                                           causal, window_size, softcap, alibi_slopes)
    be = _select_kvcache_backend(q, k_cache, v_cache, plan, causal, window, softcap, alibi_slopes, cache_leftpad,
                                 backend)
    with torch.no_grad():
        if rotary_cos is not None:
            q, k = _rotate_new_tokens(q, k, rotary_cos, rotary_sin, plan, causal, window, rotary_interleaved)
        seqlens = plan.cache_seqlens
        if k is not None:
            seqlens = _append_to_cache(k_cache, v_cache, k, v, plan, block_table, cache_batch_idx)
        out, lse = _kvcache_attention(be, q, k_cache, v_cache, seqlens, cache_batch_idx, cache_leftpad,
                                      block_table, scale, causal, window, softcap, alibi_slopes, num_splits,
                                      backend)
    return (out, lse) if return_softmax_lse else out


_KVCACHE_SCHEMA = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? cache_batch_idx, "
                   "Tensor? cache_leftpad, Tensor? block_table, float softmax_scale, bool causal, int window_left, "
                   "int window_right, float softcap, Tensor? alibi_slopes, int num_splits, str? backend) "
                   "-> (Tensor, Tensor)")


@torch.library.custom_op("flashlm::kvcache_attention", mutates_args=(), schema=_KVCACHE_SCHEMA)
def kvcache_attention_op(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                         softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, num_splits,
                         backend):
    """The attention half of ``flash_attn_with_kvcache`` (keys already appended, ``cache_seqlens``
    counting them) as one op for compiled code: at run time it is the eager function without k/v,
    so the backend is chosen (``use_backend``, ``FLASHLM_ATTN_BACKEND``, the registry) when the
    compiled graph runs, or when a CUDA graph captures it. Returns (out, lse) like the backends."""
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
        window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
        num_splits=num_splits, return_softmax_lse=True, backend=backend)
    # the compiler assumes the fake's contiguous layout for what follows
    return out.contiguous(), lse.contiguous()


@kvcache_attention_op.register_fake
def _(q, k_cache, v_cache, *args):
    b, sq, h, _ = q.shape
    return q.new_empty((b, sq, h, v_cache.shape[-1])), q.new_empty((b, h, sq), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# explain


def explain(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
            deterministic=False, requires_grad: bool | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, block_table=None, kvcache: bool = False,
            backend: str | None = None) -> registry.Explanation:
    """Which backend a call with these inputs would use, and why each other backend refused.

    Pass the tensors of a ``flash_attn_func`` call; with cu_seqlens_q/k and max_seqlen_q/k those of a
    ``flash_attn_varlen_func`` call (block_table for paged); with ``kvcache=True`` k and v are the
    caches of a ``flash_attn_with_kvcache`` call. ``requires_grad`` defaults to whether any input
    requires grad. Tensors on the "meta" device work too (no data is read). ``print(explain(...))``
    gives a table; the returned object has ``.chosen``, ``.reasons`` and ``.call``.
    """
    if cu_seqlens_q is not None:
        _, _, call = _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     None, causal, window_size, softcap, alibi_slopes, deterministic, False,
                                     block_table)
    elif kvcache:
        paged = block_table is not None
        _check_kv_shapes(q, k, v, None, None, paged)  # k and v are the caches here
        if paged:
            _check_block_table(block_table, q.shape[0], q.device)
        cap = block_table.shape[1] * k.shape[1] if paged else k.shape[1]
        window = _window(window_size, causal, cap)
        call = _call("kvcache", q, k.shape[2], v.shape[3], q.shape[1], cap, causal, window, softcap,
                     alibi_slopes, 0.0, False, False, paged=paged, page_block_size=k.shape[1] if paged else None,
                     seqlens_equal=False)
    else:
        _, _, call = _prepare_dense(q, k, v, dropout_p, None, causal, window_size, softcap, alibi_slopes,
                                    deterministic, False)
    if requires_grad is not None and call.kind != "kvcache":
        call = AttnCall(**{**call.__dict__, "needs_grad": bool(requires_grad)})
    return registry.explain_call(call, backend)
