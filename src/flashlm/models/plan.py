"""Plan a batch once: which attention entry point the flash model's layers call, with what metadata.

One planner for every forward of :class:`~flashlm.models.flash.FlashModel` (:func:`plan_batch`):

- "dense":   no padding, no packing: ``flash_attn_func`` on (batch, seqlen).
- "varlen":  padding removed (one host read: the token count and the longest row), or packed
             sequences (``cu_seqlens`` given, or ``position_ids`` restarting inside a row):
             ``flash_attn_varlen_func`` on (1, total) tokens.
- "kvcache": tokens appended to a non-empty static cache (:func:`plan_cached`, :func:`append_plan`).

``sync_free=True`` (what the model passes under torch.compile) plans without reading the device, so
a compiled graph has no break and a fixed shape per input shape:

- padding (``attention_mask``) keeps every token and splits each row into three varlen segments
  [leading padding][real tokens][trailing padding] (``cu_seqlens`` of fixed length 3 * batch + 1,
  ``max_seqlen`` = seqlen, an upper bound). Padding tokens attend only among themselves; their outputs
  are zeroed and their targets ignored (``Plan.token_mask``). Rows must hold their real tokens in one
  run (left or right padding), which eager mode does not need;
- packing by ``position_ids`` finds the sequence starts with ``nonzero`` (an output of data-dependent
  size: compile with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``, or pass
  ``cu_seqlens``) and uses ``max_seqlen`` = seqlen;
- ``cu_seqlens`` without ``max_seqlen`` uses the total token count as the bound.
Kernels read ``max_seqlen`` only to size their grids: an upper bound gives the same result.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from flashlm.attention.padding import get_unpad_data, prepare_from_position_ids

from .flash_cache import StaticKVCache

__all__ = ["FlashMeta", "Plan", "append_plan", "plan_batch", "plan_cached", "positions_from_cu_seqlens"]


class FlashMeta(NamedTuple):
    """What every layer needs to call the kernel, computed once per forward after the embedding.

    mode:
      "dense":   no padding; hidden (batch, seqlen, hidden); ``flash_attn_func``.
      "varlen":  padding removed or packed sequences; hidden (1, total, hidden);
                 ``flash_attn_varlen_func`` with ``cu_seqlens`` int32 (num_seqs + 1,), ``max_seqlen``.
      "kvcache": the static cache already holds tokens; hidden (batch, seqlen, hidden);
                 ``flash_attn_with_kvcache``. ``append``: the kernel appends k/v at ``cache_seqlens``
                 (keys per row before this step; decode and unpadded chunks); otherwise the real
                 tokens were scattered first and ``cache_seqlens`` counts them (padded chunks), and
                 ``query_mask`` (batch, seqlen, 1, 1) zeroes the padding queries' output.
    Cache writes in "dense"/"varlen" (a prefill into an empty cache): "dense" copies k/v to
    slots [0, seqlen); "varlen" scatters token t (``write_token_idx`` into the layer's flattened k,
    or every token when None) to row ``write_batch_idx[t]``, slot ``write_slot_idx[t]``.
    """

    mode: Literal["dense", "varlen", "kvcache"]
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0
    cache: StaticKVCache | None = None
    cache_seqlens: Tensor | None = None
    append: bool = True
    query_mask: Tensor | None = None
    write_token_idx: Tensor | None = None
    write_batch_idx: Tensor | None = None
    write_slot_idx: Tensor | None = None
    # "kvcache" with append, planned eagerly (decode steps, eager or captured): the layers append k/v at
    # (write_batch_idx, write_slot_idx) ((batch, seqlen) each; fused with RoPE: ops.rotary_qkv_append)
    # and call their bound backend with ``seqlens_after`` keys per row, skipping the public API's per-call
    # checks and registry (what a compiled step does instead: see append_plan); they also take the
    # decode op set (``ops_for``: least GPU time)
    direct: bool = False
    seqlens_after: Tensor | None = None
    # planned under torch.compile: layers take the ops meant for inductor (flashlm.ops.resolve(compiled=True))
    compiled: bool = False


class Plan(NamedTuple):
    """Planning result of one forward: the layers' meta plus how to map outputs back."""

    meta: FlashMeta
    token_ids: Tensor  # (batch, seqlen) or (1, total)
    position_ids: Tensor  # same shape as token_ids (or (1, seqlen) broadcast over rows)
    indices: Tensor | None  # unpadding: int64 (total,) into batch * seqlen; None otherwise
    packed: bool  # varlen over all batch * seqlen tokens (packing)
    cache_lengths: Tensor | int | None  # tokens added per row to the cache (None: no cache)
    token_mask: Tensor | None = None  # "masked" varlen: (batch * seqlen,) bool, False at padding


def append_plan(input_ids: Tensor, cache: StaticKVCache, position_ids: Tensor | None,
                direct: bool = False) -> Plan:
    """Tokens appended to every row of a non-empty cache, no padding: k/v go to each row's slots
    ``cache_seqlens + arange(seqlen)`` and positions continue from there. Reads no host state of the
    cache. ``direct`` (eager steps): the slots and the new lengths are computed here once for all layers,
    which then append and call their bound backend themselves; otherwise (compiled steps) each layer
    calls ``flash_attn_with_kvcache``, whose attention is one opaque op under torch.compile."""
    batch, seqlen = input_ids.shape
    before = cache.seqlens(batch)  # live: the layers read it before the lengths are bumped
    slots = before.long()[:, None] + torch.arange(seqlen, device=input_ids.device)
    if position_ids is None:
        position_ids = slots
    if not direct:
        return Plan(FlashMeta("kvcache", cache=cache, cache_seqlens=before, append=True), input_ids,
                    position_ids, None, False, seqlen)
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, seqlen)
    meta = FlashMeta("kvcache", cache=cache, cache_seqlens=before, append=True, write_batch_idx=rows,
                     write_slot_idx=slots, direct=True, seqlens_after=before + seqlen)
    return Plan(meta, input_ids, position_ids, None, False, seqlen)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) position of each packed token inside its sequence (no host sync)."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return (t - cu_seqlens.long()[seq])[None]


def plan_batch(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
               cache: StaticKVCache | None, cu_seqlens: Tensor | None, max_seqlen: int | None, *,
               sync_free: bool = False) -> Plan:
    """The plan of one forward of ``input_ids`` (batch, seqlen); arguments as ``FlashModel.forward``."""
    batch, seqlen = input_ids.shape
    if cache is not None and not cache.is_empty:
        return plan_cached(input_ids, attention_mask, position_ids, cache, cu_seqlens, direct=not sync_free)
    if cache is not None:
        cache.check_room(batch, seqlen)
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("pass either attention_mask (padding) or cu_seqlens (packing), not both")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if max_seqlen is None:  # one host read (a bound when sync-free); trainers pass it
            max_seqlen = batch * seqlen if sync_free else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return _packed_plan(input_ids, position_ids, cache, cu_seqlens, max_seqlen)
    if attention_mask is not None:
        if sync_free and cache is None:
            return _masked_plan(input_ids, attention_mask, position_ids)
        plan = _unpadded_plan(input_ids, attention_mask, position_ids, cache)
        if plan is not None:
            return plan
    elif position_ids is not None and seqlen > 1:
        if sync_free and cache is None:
            return _packed_plan(input_ids, position_ids, None, _starts_cu_seqlens(position_ids, batch), seqlen)
        cu, max_len = prepare_from_position_ids(position_ids.expand(batch, -1))
        if cu.numel() - 1 > batch:  # more sequences than rows: a packed batch
            return _packed_plan(input_ids, position_ids, cache, cu, max_len)
    if position_ids is None:
        position_ids = torch.arange(seqlen, device=input_ids.device)[None]
    lengths = seqlen if cache is not None else None
    return Plan(FlashMeta("dense", cache=cache), input_ids, position_ids, None, False, lengths)


def _unpadded_plan(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None,
                   cache: StaticKVCache | None) -> Plan | None:
    """Padding removed (one host sync); None when the mask has no padding."""
    batch, seqlen = input_ids.shape
    indices, cu, max_len = get_unpad_data(attention_mask)  # the one host sync of this forward
    if indices.numel() == batch * seqlen:
        return None
    ranks = attention_mask.long().cumsum(-1) - 1
    if position_ids is None:
        position_ids = ranks.clamp(min=0)
    positions = position_ids.expand(batch, -1).reshape(-1)[indices][None]
    write_batch = write_slot = lengths = None
    if cache is not None:
        write_batch = indices // seqlen
        write_slot = ranks.reshape(-1)[indices]
        lengths = attention_mask.sum(-1, dtype=torch.int32)
    meta = FlashMeta("varlen", cu_seqlens=cu, max_seqlen=max_len, cache=cache,
                     write_batch_idx=write_batch, write_slot_idx=write_slot)
    return Plan(meta, input_ids.reshape(-1)[indices][None], positions, indices, False, lengths)


def _masked_plan(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None) -> Plan:
    """Sync-free padding: every token kept, each row three segments (see the module docstring)."""
    batch, seqlen = input_ids.shape
    mask = attention_mask.bool()
    counts = mask.long().cumsum(-1)
    lengths = counts[:, -1]
    lead = (counts == 0).sum(-1)  # leading padding per row
    segments = torch.stack((lead, lengths, seqlen - lead - lengths), dim=-1).reshape(-1)
    cu = torch.nn.functional.pad(segments.cumsum(0), (1, 0)).to(torch.int32)
    if position_ids is None:
        position_ids = (counts - 1).clamp(min=0)
    total = batch * seqlen
    meta = FlashMeta("varlen", cu_seqlens=cu, max_seqlen=seqlen)
    return Plan(meta, input_ids.reshape(1, total), position_ids.expand(batch, -1).reshape(1, total), None,
                False, None, mask.reshape(-1))


def _starts_cu_seqlens(position_ids: Tensor, batch: int) -> Tensor:
    """cu_seqlens int32 of the sequences in packed ``position_ids`` (batch or 1, seqlen), without a host
    read: a sequence starts at each row start and wherever a position is not the previous one + 1."""
    pos = position_ids.expand(batch, -1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = torch.nonzero(start.reshape(-1), as_tuple=False).flatten()
    total = torch.full((1,), pos.numel(), dtype=starts.dtype, device=starts.device)
    return torch.cat((starts, total)).to(torch.int32)


def _packed_plan(input_ids: Tensor, position_ids: Tensor | None, cache: StaticKVCache | None,
                 cu_seqlens: Tensor, max_seqlen: int) -> Plan:
    """Varlen over all batch * seqlen tokens, sequences as in ``cu_seqlens``."""
    if cache is not None:
        raise ValueError("packed sequences (cu_seqlens / position_ids restarting at 0) cannot be "
                         "written to a StaticKVCache; generation uses left padding")
    batch, seqlen = input_ids.shape
    total = batch * seqlen
    if position_ids is None:
        positions = positions_from_cu_seqlens(cu_seqlens, total)
    else:
        positions = position_ids.expand(batch, -1).reshape(1, total)
    meta = FlashMeta("varlen", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return Plan(meta, input_ids.reshape(1, total), positions, None, True, None)


def plan_cached(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                cache: StaticKVCache, cu_seqlens: Tensor | None, direct: bool = False) -> Plan:
    """Decode step or a chunk appended to a non-empty cache (no host sync without a mask)."""
    batch, seqlen = input_ids.shape
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens (packing) cannot be combined with a non-empty cache")
    cache.check_room(batch, seqlen)
    if attention_mask is None:
        return append_plan(input_ids, cache, position_ids, direct)
    before = cache.seqlens(batch)  # live view: the layers read it before `advance` bumps it
    if seqlen == 1:
        raise ValueError("a decode step on a StaticKVCache takes no attention_mask: the cache keeps each "
                         "row's length (cache_seqlens); pass attention_mask=None")
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):  # one host read (chunked prefill only)
        raise ValueError("attention_mask over a chunk appended to the cache must be left-padded "
                         "(rows 0..0 1..1)")
    ranks = (mask.cumsum(-1) - 1).clamp(min=0)
    if position_ids is None:
        position_ids = before.long()[:, None] + ranks
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).flatten()
    lengths = mask.sum(-1, dtype=torch.int32)
    meta = FlashMeta("kvcache", cache=cache, cache_seqlens=before + lengths, append=False,
                     query_mask=mask.bool()[:, :, None, None], write_token_idx=indices,
                     write_batch_idx=indices // seqlen,
                     write_slot_idx=(before.long()[:, None] + ranks).reshape(-1)[indices])
    return Plan(meta, input_ids, position_ids, None, False, lengths)

