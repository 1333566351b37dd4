"""Input checks of flashlm.attention's public functions: shapes, dtypes, devices, int32 offsets,
head counts, scalars, windows (no host syncs unless data checks are on: ``_data_checks``). Each
refusal raises :class:`flashlm.errors.InputError` before any kernel runs."""

from __future__ import annotations

import itertools
import math
import os

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
