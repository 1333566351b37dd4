"""Input checks of flashlm.attention's public functions: shapes, dtypes, devices, int32 offsets,
head counts, scalars, windows, and flash_attn_with_kvcache's cache, bounds and rotary arguments
(no host syncs unless data checks are on: ``_data_checks``, or the kvcache bounds check:
``_bounds_checked``). Each refusal raises :class:`flashlm.errors.InputError` before any kernel runs."""

from __future__ import annotations

import itertools
import math
import os
from typing import NamedTuple

import torch

from ..errors import InputError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# validation helpers (no host syncs unless data checks are enabled)


def _data_checks(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # a data-dependent branch would break the traced graph
        return False
    if t.device.type == "cpu":
        return True
    # reading device data syncs, which a CUDA graph being captured cannot do
    return os.environ.get("FLASHLM_ATTN_CHECKS") == "1" and not torch.cuda.is_current_stream_capturing()


def _tensor(x, name: str, ndim: int | tuple[int, ...], layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in dims:
        raise InputError(f"{name} must be {layout} ({' or '.join(map(str, dims))}-D), got shape {tuple(x.shape)}")
    return x


def _check_qkv_dtypes_devices(q, named: dict[str, torch.Tensor]) -> None:
    if q.dtype not in _FLOAT_DTYPES:
        raise InputError(f"q dtype must be one of float16, bfloat16, float32, float64, got {q.dtype}")
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise InputError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}; all must match")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device} but q is on {q.device}; all must be on one device")
    for name in ("k_cache", "v_cache"):  # written in place, so they cannot be made contiguous here
        t = named.get(name)
        if t is not None and t.stride(-1) != 1:
            raise InputError(f"{name} must have a contiguous last dimension (stride(-1) == 1) to be updated in place")


def _check_heads(nheads: int, nheads_k: int, hd_q: int, hd_k: int, nheads_v: int) -> None:
    if nheads_k < 1 or nheads % nheads_k:
        raise InputError(f"nheads ({nheads}) must be divisible by nheads_k ({nheads_k}) (MQA/GQA)")
    if nheads_v != nheads_k:
        raise InputError(f"k and v must have the same number of heads, got {nheads_k} and {nheads_v}")
    if hd_q != hd_k:
        raise InputError(f"q and k head_dim must match, got {hd_q} and {hd_k}")
    if hd_q < 1:
        raise InputError("head_dim must be >= 1")


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, torch.Tensor) or not isinstance(softmax_scale, (int, float)):
        raise InputError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise InputError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _window(window_size, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's normalization: ints or a 2-element tensor; a side >= seqlen_k is unbounded (-1);
    causal forces right = 0 (reported as (-1, -1) when there is no left window)."""
    if isinstance(window_size, torch.Tensor):
        if window_size.numel() != 2:
            raise InputError(f"window_size tensor must have 2 elements, got shape {tuple(window_size.shape)}")
        window_size = [int(x) for x in window_size.tolist()]
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise InputError(f"window_size must be (left, right) ints, -1 = unbounded; got {window_size!r}") from None
    if isinstance(left, bool) or isinstance(right, bool) or not (isinstance(left, int) and isinstance(right, int)):
        raise InputError(f"window_size must hold ints, got {window_size!r}")
    if left < -1 or right < -1:
        raise InputError(f"window_size sides must be >= -1 (-1 = unbounded), got {(left, right)}")
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0 if left >= 0 else -1
    return left, right


def _check_scalars(dropout_p, softcap, deterministic, causal) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise InputError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0 or not math.isfinite(softcap):
        raise InputError(f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    for name, val in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(val, bool):
            raise InputError(f"{name} must be a bool, got {type(val).__name__}")


def _check_alibi(alibi_slopes, nheads: int, batch: int, device) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise InputError("alibi_slopes must be a tensor (nheads,) or (batch, nheads) of float32")
    if alibi_slopes.dtype != torch.float32:
        raise InputError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise InputError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise InputError(f"alibi_slopes is on {alibi_slopes.device}, q on {device}")


def _check_int32_vec(t, name: str, length: int, device, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be an int32 tensor {what}, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise InputError(f"{name} must be torch.int32 {what} (flash-attn kernels read int32), got {t.dtype}")
    if t.dim() != 1 or t.numel() != length:
        raise InputError(f"{name} must be 1-D of length {length} {what}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise InputError(f"{name} is on {t.device} but q is on {device}")


def _check_cu_seqlens(cu, name: str, batch: int, total: int | None, max_seqlen: int, device) -> None:
    _check_int32_vec(cu, name, batch + 1, device, "(batch + 1,)")
    if not _data_checks(cu):
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise InputError(f"{name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in itertools.pairwise(vals)]
    if any(n < 0 for n in lens):
        raise InputError(f"{name} must be non-decreasing, got {vals}")
    if total is not None and vals[-1] != total:
        rows = {"cu_seqlens_q": "q holds", "cu_seqlens_k": "k and v hold"}.get(name, "the packed rows hold")
        raise InputError(f"{name}[-1] = {vals[-1]} but {rows} {total} packed tokens (dim 0): the "
                         f"offsets must cover every token exactly (pass the cu_seqlens built with this batch)")
    if lens and max(lens) > max_seqlen:
        raise InputError(f"a sequence in {name} has {max(lens)} tokens, more than max_seqlen {max_seqlen}")


def _check_max_seqlen(x, name: str) -> int:
    if isinstance(x, (torch.Tensor, bool)) or not isinstance(x, int):
        raise InputError(f"{name} must be a Python int (computed once per batch), got {type(x).__name__}")
    if x < 0:
        raise InputError(f"{name} must be >= 0, got {x}")
    return x


def _check_block_table(block_table, batch: int, device) -> None:
    """Type, shape and device of block_table (its entries: _check_cache_bounds / _check_paged_varlen)."""
    if not isinstance(block_table, torch.Tensor):
        raise InputError("block_table must be an int32 tensor (batch, max_blocks_per_seq)")
    if block_table.dtype != torch.int32:
        raise InputError(f"block_table must be torch.int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise InputError(f"block_table must have shape ({batch}, max_blocks_per_seq), got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise InputError(f"block_table is on {block_table.device} but q is on {device}")


def _check_paged_varlen(cu_seqlens_k, block_table, page: int, num_blocks: int) -> None:
    """Varlen with block_table: every sequence's keys fit in its row of block_table and every entry is
    a page of the pool (one host read for both)."""
    capacity = block_table.shape[1] * page
    lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    stats = [lens.max() if lens.numel() else lens.new_zeros(())]
    if block_table.numel():
        stats += [block_table.min(), block_table.max()]
    vals = torch.stack([t.to(torch.int64) for t in stats]).tolist()  # the one host sync
    if vals[0] > capacity:
        raise InputError(f"a sequence in cu_seqlens_k has {vals[0]} keys but block_table holds "
                         f"{block_table.shape[1]} blocks per sequence x page_block_size {page} = {capacity}; "
                         "give block_table more blocks per sequence")
    if block_table.numel() and (vals[1] < 0 or vals[2] >= num_blocks):
        raise InputError(f"block_table entries must be page indices in [0, {num_blocks}) (the pool's "
                         f"num_blocks), got [{vals[1]}, {vals[2]}]")


# ----------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: the cache, row-mapping, bounds and rotary arguments


class _KVCachePlan(NamedTuple):
    """What flash_attn_with_kvcache learned from its arguments (all validated)."""

    cache_seqlens: torch.Tensor  # int32 (batch,), keys per row before the append
    paged: bool
    page: int | None  # page_block_size when paged
    capacity: int  # keys a row can hold: seqlen_cache, or max_blocks_per_seq * page_block_size
    s_new: int  # keys appended by this call


def _check_kv_shapes(q, k_cache, v_cache, k, v, paged: bool) -> None:
    """Shapes, dtypes, devices and head counts of q, the caches and the appended k/v."""
    _tensor(q, "q", 4, "(batch, seqlen_q, nheads, headdim)")
    layout = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else \
        "(batch_cache, seqlen_cache, nheads_k, headdim)"
    _tensor(k_cache, "k_cache", 4, layout)
    _tensor(v_cache, "v_cache", 4, layout)
    named = {"k_cache": k_cache, "v_cache": v_cache}
    if (k is None) != (v is None):
        raise InputError("k and v must be given together (or neither)")
    B, _, H, D = q.shape
    if k is not None:
        _tensor(k, "k", 4, "(batch, seqlen_new, nheads_k, headdim)")
        _tensor(v, "v", 4, "(batch, seqlen_new, nheads_k, headdim_v)")
        named.update(k=k, v=v)
    _check_qkv_dtypes_devices(q, named)
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise InputError(f"k_cache and v_cache shapes disagree: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    Hk = k_cache.shape[2]
    _check_heads(H, Hk, D, k_cache.shape[3], v_cache.shape[2])
    if k is not None:
        exp_k = (B, k.shape[1], Hk, D)
        if tuple(k.shape) != exp_k or tuple(v.shape[:3]) != exp_k[:3] or v.shape[3] != v_cache.shape[3]:
            raise InputError(f"k/v must be {exp_k} (v's last dim {v_cache.shape[3]}), "
                             f"got {tuple(k.shape)} / {tuple(v.shape)}")


def _check_cache_rows(q, k_cache, cache_batch_idx, cache_leftpad, block_table, check: bool) -> tuple:
    """Row mapping arguments -> (paged, page, capacity); data is read only when ``check``."""
    B = q.shape[0]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise InputError("cache_batch_idx cannot be combined with block_table (paged KV), as in flash-attn")
        if cache_leftpad is not None:
            raise InputError("cache_leftpad cannot be combined with block_table (paged KV), as in flash-attn")
        _check_block_table(block_table, B, q.device)
        return True, k_cache.shape[1], block_table.shape[1] * k_cache.shape[1]
    if cache_batch_idx is not None:
        _check_int32_vec(cache_batch_idx, "cache_batch_idx", B, q.device, "(batch,)")
        if check and B and not (0 <= int(cache_batch_idx.min()) and int(cache_batch_idx.max()) < k_cache.shape[0]):
            raise InputError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]})")
    elif k_cache.shape[0] != B:
        raise InputError(f"k_cache batch {k_cache.shape[0]} != q batch {B} (pass cache_batch_idx to map rows)")
    if cache_leftpad is not None:
        _check_int32_vec(cache_leftpad, "cache_leftpad", B, q.device, "(batch,)")
    return False, None, k_cache.shape[1]


def _check_cache_bounds(cache_seqlens, cache_leftpad, block_table, s_new: int, capacity: int,
                        num_blocks: int) -> None:
    """Every key a kernel will touch lies inside the cache: one device->host read for all the bounds.

    Without this, a row whose cache_seqlens (+ the appended keys) passes the end of its pages makes a
    kernel index past block_table's row (a device fault that kills the CUDA context) and the append
    write into another row's pages; a block_table entry >= num_blocks reads or writes outside the pool.
    """
    if cache_seqlens.numel() == 0:
        return
    stats = [cache_seqlens.min(), cache_seqlens.max()]
    if block_table is not None and block_table.numel():
        stats += [block_table.min(), block_table.max()]
    if cache_leftpad is not None:
        stats.append(((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).any())
    vals = torch.stack([s.to(torch.int64) for s in stats]).tolist()  # the one host sync
    lo, hi = vals[0], vals[1]
    if block_table is not None:
        nb, page = block_table.shape[1], capacity // max(block_table.shape[1], 1)
        if lo < 0 or hi + s_new > capacity:
            raise InputError(
                f"cache_seqlens (+ {s_new} new keys) must stay in [0, {capacity}]: block_table holds "
                f"{nb} blocks per sequence x page_block_size {page} = {capacity} keys, but a row needs "
                f"{hi + s_new if lo >= 0 else lo}; give block_table more blocks per sequence")
        if block_table.numel() and (vals[2] < 0 or vals[3] >= num_blocks):
            raise InputError(f"block_table entries must be page indices in [0, {num_blocks}) (the pool's "
                             f"num_blocks), got [{vals[2]}, {vals[3]}]")
    elif lo < 0 or hi + s_new > capacity:
        raise InputError(f"cache_seqlens (+ {s_new} new keys) must stay in [0, {capacity}] (the cache's "
                         f"seqlen_cache), got [{lo}, {hi}]")
    if cache_leftpad is not None and vals[-1]:
        raise InputError("cache_leftpad must be in [0, cache_seqlens] for every row")


def _bounds_checked(t: torch.Tensor, paged: bool, check_bounds: bool | None) -> bool:
    """Whether this kvcache call reads its bounds back from the device (see flash_attn_with_kvcache)."""
    if check_bounds is False or torch.compiler.is_compiling():
        return False
    if t.device.type != "cpu" and torch.cuda.is_current_stream_capturing():
        # a CUDA graph cannot read device data; the graph decode path (flashlm.generation.cuda_graph.DecodeStep) keeps
        # cache_seqlens inside the static cache by construction (its host-side room check)
        return False
    return bool(check_bounds) or paged or _data_checks(t)


def _prepare_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                     check_bounds) -> _KVCachePlan:
    """Validate the cache arguments of flash_attn_with_kvcache (before anything is written)."""
    paged = block_table is not None
    _check_kv_shapes(q, k_cache, v_cache, k, v, paged)
    check = _bounds_checked(q, paged, check_bounds)
    paged, page, capacity = _check_cache_rows(q, k_cache, cache_batch_idx, cache_leftpad, block_table, check)
    B = q.shape[0]
    s_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise InputError("cache_seqlens is required when k/v are appended (where to write them)")
        cache_seqlens = torch.full((B,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity - s_new:  # a host int: checked without a sync
            where = "block_table's capacity" if paged else "the cache's seqlen_cache"
            raise InputError(f"cache_seqlens {cache_seqlens} (+ {s_new} new keys) outside [0, {capacity}] "
                             f"({where})")
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        _check_int32_vec(cache_seqlens, "cache_seqlens", B, q.device, "(batch,)")
    if check:
        _check_cache_bounds(cache_seqlens, cache_leftpad, block_table, s_new, capacity, k_cache.shape[0])
    return _KVCachePlan(cache_seqlens, paged, page, capacity, s_new)


def _check_rotary(q, rotary_cos, rotary_sin, k, cache_seqlens, s_new: int, check: bool) -> None:
    if (rotary_cos is None) != (rotary_sin is None):
        raise InputError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is None:
        return
    if k is None:
        raise InputError("rotary_cos/rotary_sin need k and v (flash-attn rotates the appended keys)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _tensor(t, name, 2, "(seqlen_ro, rotary_dim / 2)")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device} but q is on {q.device}")
        if not t.is_floating_point():
            raise InputError(f"{name} must be floating point, got {t.dtype}")
    if rotary_cos.shape != rotary_sin.shape:
        raise InputError(f"rotary_cos {tuple(rotary_cos.shape)} and rotary_sin {tuple(rotary_sin.shape)} differ")
    if rotary_cos.shape[1] * 2 > q.shape[-1]:
        raise InputError(f"rotary_dim {rotary_cos.shape[1] * 2} exceeds headdim {q.shape[-1]}")
    if check and q.shape[0] and int(cache_seqlens.max()) + max(s_new, q.shape[1]) > rotary_cos.shape[0]:
        raise InputError(f"rotary_cos has {rotary_cos.shape[0]} positions, fewer than cache_seqlens + new tokens")


def _check_kvcache_options(q, plan: _KVCachePlan, k, rotary_cos, rotary_sin, num_splits, softmax_scale,
                           causal, window_size, softcap, alibi_slopes) -> tuple[float, tuple[int, int]]:
    """The non-cache arguments of flash_attn_with_kvcache, after _prepare_kvcache: -> (scale, window)."""
    B, _, H, D = q.shape
    _check_rotary(q, rotary_cos, rotary_sin, k, plan.cache_seqlens, plan.s_new, _data_checks(plan.cache_seqlens))
    if not isinstance(num_splits, int) or num_splits < 0:
        raise InputError(f"num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    _check_scalars(0.0, softcap, False, causal)
    _check_alibi(alibi_slopes, H, B, q.device)
    return _scale(softmax_scale, D), _window(window_size, causal, plan.capacity)
