"""Padding utilities: go between padded (batch, seqlen, ...) tensors and packed (total_tokens, ...) ones.

Compute these once per batch (after the embedding), not per layer: ``get_unpad_data`` and
``prepare_from_position_ids`` read tensor data (one host sync each, for max_seqlen), the rest is
index arithmetic. cu_seqlens are int32 (what flash kernels read); totals of 2**31 tokens or more
are refused rather than overflowed.
"""

from __future__ import annotations

import torch

from ..errors import InputError

_INT32_MAX = 2**31 - 1


def _cu_from_lengths(seqlens: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=seqlens.device)
    cu[1:] = torch.cumsum(seqlens, dim=0, dtype=torch.int32)
    return cu


def get_unpad_data(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """attention_mask (batch, seqlen), 1/True = real token (any padding side)
    -> (indices (total,) int64 into the flattened batch*seqlen tokens, cu_seqlens (batch + 1,) int32,
    max_seqlen int). One host sync (max_seqlen)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise InputError("attention_mask must be a (batch, seqlen) tensor of 0/1 or bool, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if attention_mask.numel() > _INT32_MAX:
        raise InputError(f"{attention_mask.numel()} tokens overflow int32 cu_seqlens")
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0  # host sync, once per batch
    return indices, _cu_from_lengths(seqlens), max_seqlen


class _IndexFirstAxis(torch.autograd.Function):
    """x[indices] along dim 0 with a backward that scatters into zeros (indices are unique)."""

    @staticmethod
    def forward(ctx, x, indices):
        ctx.save_for_backward(indices)
        ctx.first = x.shape[0]
        return x.index_select(0, indices)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        grad_in = grad.new_zeros((ctx.first,) + grad.shape[1:])
        grad_in.index_copy_(0, indices, grad)
        return grad_in, None


class _IndexPutFirstAxis(torch.autograd.Function):
    """zeros(first, ...) with rows ``indices`` set to x; backward gathers."""

    @staticmethod
    def forward(ctx, x, indices, first):
        ctx.save_for_backward(indices)
        out = x.new_zeros((first,) + x.shape[1:])
        out.index_copy_(0, indices, x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad.index_select(0, indices), None, None


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather rows of x (first, ...) at unique int64 ``indices`` (n,) -> (n, ...). The backward is one
    scatter into zeros (no atomic accumulation: indices from get_unpad_data are unique)."""
    if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
        raise InputError(f"indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
    return _IndexFirstAxis.apply(x, indices.long())


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    """hidden_states (batch, seqlen, ...), attention_mask (batch, seqlen) ->
    (hidden_unpad (total, ...), indices (total,), cu_seqlens (batch + 1,) int32, max_seqlen int,
    seqused (batch,) int32 real tokens per row). Left or right padding, or holes, all work."""
    if hidden_states.shape[:2] != attention_mask.shape:
        raise InputError(f"hidden_states {tuple(hidden_states.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} disagree on (batch, seqlen)")
    indices, cu_seqlens, max_seqlen = get_unpad_data(attention_mask)
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    seqused = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: (total, ...) -> (batch, seqlen, ...), zeros at the padding."""
    if hidden_unpad.shape[0] != indices.shape[0]:
        raise InputError(f"hidden_unpad has {hidden_unpad.shape[0]} rows but indices {indices.shape[0]}")
    out = _IndexPutFirstAxis.apply(hidden_unpad, indices.long(), batch * seqlen)
    return out.view(batch, seqlen, *hidden_unpad.shape[1:])


def prepare_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Packed rows -> (cu_seqlens (n_seqs + 1,) int32 over the flattened batch*seqlen tokens, max_seqlen).

    position_ids (batch, seqlen) or (seqlen,). A sequence starts at the first token of every row and
    wherever a position is not the previous one + 1 (a reset to 0, or any jump). So a row whose
    positions start at k > 0 (a continuation chunk) is one sequence from its first token, and
    [0 1 2 0 1 5 6] is three sequences [0 1 2] [0 1] [5 6].

    Refused (InputError): seqlen == 1 (a one-token decode step is not a packed batch: use the KV cache
    path), and position ids of more than 2 dims (e.g. multimodal 3-D RoPE ids are not packing).
    One host sync (max_seqlen), once per batch.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2):
        raise InputError("position_ids must be (batch, seqlen) or (seqlen,); multi-dimensional position ids "
                         f"are not packing, got {getattr(position_ids, 'shape', type(position_ids).__name__)}")
    if position_ids.is_floating_point():
        raise InputError(f"position_ids must be integers, got {position_ids.dtype}")
    pos = position_ids.reshape(1, -1) if position_ids.dim() == 1 else position_ids
    batch, seqlen = pos.shape
    if seqlen == 1:
        raise InputError("position_ids with one token per row are a decode step, not a packed batch; "
                         "use flash_attn_with_kvcache / the dense path")
    if pos.numel() > _INT32_MAX:
        raise InputError(f"{pos.numel()} tokens overflow int32 cu_seqlens")
    flat = pos.reshape(-1).long()
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1] + 1
    start.view(batch, seqlen)[:, 0] = True
    starts = torch.nonzero(start, as_tuple=False).flatten()
    cu = torch.empty(starts.numel() + 1, dtype=torch.int32, device=flat.device)
    cu[:-1] = starts
    cu[-1] = flat.numel()
    max_seqlen = int((cu[1:] - cu[:-1]).max())  # host sync, once per batch
    return cu, max_seqlen


def position_ids_are_packed(position_ids: torch.Tensor) -> bool:
    """True when some row of (batch, seqlen > 1) position ids restarts or jumps inside the row (packed
    sequences); False for plain rows (including continuation rows starting at k > 0) and for one-token
    decode steps. One host sync."""
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return False
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())
