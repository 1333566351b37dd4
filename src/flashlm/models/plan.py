"""The ONE planner: what a batch's attention looks like, decided once per forward, before the layers.

:func:`plan_batch` makes the :class:`BatchPlan` of every forward of the flash model; its ``kind``:

- "dense":  no padding, no packing: (batch, seqlen) tokens, dense attention.
- "varlen": padding removed (one host read: the token count and the longest row), or packed
            sequences (``cu_seqlens`` given, or ``position_ids`` restarting inside a row): (1, total)
            tokens, varlen attention with ``cu_seqlens``.
- "append": tokens appended to every row of a non-empty static cache, no padding (decode steps,
            unpadded chunks; :func:`append_plan`): the kernel appends k/v at each row's length.
- "chunk":  a left-padded chunk appended to a non-empty cache: the real tokens are scattered first.

A plan also carries the op set of its mode (:func:`flashlm.models.kernels.mode_of`) and the maps back
to the caller's layout (:meth:`BatchPlan.to_padded`, :meth:`BatchPlan.shifted_targets`). The packing
test (:func:`packed_sequences`) and the per-mask unpadding (:func:`unpad_data`) are also what
``FlashAttentionMixin`` and :mod:`flashlm.hf` use, for calls that come without a plan.

``compiled=True`` (said by the caller that compiles: the model's ``prepare_compile``) plans without
reading the device, so a compiled graph has no break and a fixed shape per input shape:

- padding (``attention_mask``) keeps every token and splits each row into three varlen segments
  [leading padding][real tokens][trailing padding] (``cu_seqlens`` of fixed length 3 * batch + 1,
  ``max_seqlen`` = seqlen, an upper bound). Padding tokens attend only among themselves; their outputs
  are zeroed and their targets ignored (``BatchPlan.token_mask``). Rows must hold their real tokens in one
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
import torch.nn.functional as F
from torch import Tensor

from flashlm.attention.padding import (
    get_unpad_data,
    index_first_axis,
    pad_input,
    prepare_from_position_ids,
    unpad_input,
)
from flashlm.ops import Ops

from .kernels import mode_of
from .kv_cache import StaticKVCache
from .reference import check_inputs, check_token_range

__all__ = ["BatchPlan", "append_plan", "check_call", "packed_sequences", "plan_batch", "positions_from_cu_seqlens",
           "unpad_data", "unpad_qkv"]


class BatchPlan(NamedTuple):
    """What every layer of one forward needs, computed once after the embedding.

    kind, compiled, ops: see the module docstring; ``ops`` is the op set of the plan's mode.
    token_ids / position_ids: (batch, seqlen), or (1, total) for "varlen" (position_ids may be (1, seqlen),
    broadcast over rows). ``indices`` int64 (total,) into batch * seqlen when padding was removed;
    ``token_mask`` (batch * seqlen,) bool, False at padding, when a compiled plan kept it; ``packed``:
    varlen over all batch * seqlen tokens. ``cu_seqlens`` int32 (num_seqs + 1,), ``max_seqlen``: varlen.
    Cache (``cache`` set): ``cache_lengths`` tokens added per row (int or (batch,) int32);
    ``cache_seqlens`` the keys per row the kernel sees (before the append for "append", after the
    scatter for "chunk"); ``seqlens_after`` ("append", eager) the lengths after it; ``query_mask``
    (batch, seqlen, 1, 1) zeroes a "chunk"'s padding queries. Writes: "dense" prefill copies k/v to
    slots [0, seqlen); "varlen" prefill and "chunk" scatter token t (``write_token_idx`` into the layer's
    flattened k, or every token when None) to row ``write_batch_idx[t]``, slot ``write_slot_idx[t]``;
    an eager "append" writes at (write_batch_idx, write_slot_idx), (batch, seqlen) each.
    """

    kind: Literal["dense", "varlen", "append", "chunk"]
    compiled: bool
    ops: Ops | None
    token_ids: Tensor
    position_ids: Tensor
    indices: Tensor | None = None
    token_mask: Tensor | None = None
    packed: bool = False
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0
    cache: StaticKVCache | None = None
    cache_lengths: Tensor | int | None = None
    cache_seqlens: Tensor | None = None
    seqlens_after: Tensor | None = None
    query_mask: Tensor | None = None
    write_token_idx: Tensor | None = None
    write_batch_idx: Tensor | None = None
    write_slot_idx: Tensor | None = None

    @property
    def mode(self) -> str:
        """The op-set mode: "eager", "compiled" or "decode" (:func:`~flashlm.models.kernels.mode_of`)."""
        return mode_of(self.kind, self.compiled)

    def to_padded(self, x: Tensor, batch: int, seqlen: int) -> Tensor:
        """(1, total, ...) or (batch, seqlen, ...) compute layout -> (batch, seqlen, ...), zeros at padding."""
        if self.indices is not None:
            return pad_input(x[0], self.indices, batch, seqlen)
        if self.token_mask is not None:  # sync-free padding: zero what the padding tokens computed
            x = x * self.token_mask.view(1, -1, *([1] * (x.dim() - 2)))
        return x.reshape(batch, seqlen, *x.shape[2:])

    def shifted_targets(self, labels: Tensor) -> Tensor:
        """Targets (tokens,) aligned with the compute-layout tokens: token t predicts labels[t + 1] of its
        row; the last position of a row (and, packed, of each sequence) and padding predict nothing (-100)."""
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        if self.indices is not None:
            return shifted[self.indices]
        if self.token_mask is not None:
            return shifted.masked_fill(~self.token_mask, -100)
        if self.packed:
            shifted = shifted.clone()
            shifted[self.cu_seqlens[1:].long() - 1] = -100
        return shifted


def _with_ops(plan: BatchPlan, op_sets: dict[str, Ops] | None) -> BatchPlan:
    return plan._replace(ops=None if op_sets is None else op_sets[plan.mode])


# --------------------------------------------------------------------------------------------
# Metadata shared with the unplanned callers (FlashAttentionMixin, flashlm.hf)
# --------------------------------------------------------------------------------------------
def _memo_on(t: Tensor, attr: str, fn, refresh: bool):
    """``fn(t)``, kept on the tensor itself with its in-place version: every layer of one forward gets the
    same mask / position-ids object, so the metadata (a host read) is computed once per forward; a new
    tensor, or one changed in place, gets it afresh. Inference tensors have no version counter: they are
    recomputed when ``refresh`` (the caller's first layer)."""
    version = -1 if t.is_inference() else t._version
    hit = getattr(t, attr, None)
    if hit is not None and hit[0] == version and not (refresh and version == -1):
        return hit[1]
    value = fn(t)
    setattr(t, attr, (version, value))
    return value


def unpad_data(attention_mask: Tensor, refresh: bool = False) -> tuple[Tensor, Tensor, int]:
    """``get_unpad_data(attention_mask)`` (indices int64 (total,), cu_seqlens int32 (batch + 1,),
    max_seqlen), kept on the mask for the other layers of the forward (one host read in all)."""
    return _memo_on(attention_mask, "_flashlm_unpad", get_unpad_data, refresh)


def _packing(position_ids: Tensor) -> tuple[Tensor, int] | None:
    cu, max_len = prepare_from_position_ids(position_ids)
    return (cu, max_len) if cu.numel() - 1 > position_ids.shape[0] else None


def packed_sequences(position_ids: Tensor, batch: int, refresh: bool = False) -> tuple[Tensor, int] | None:
    """(cu_seqlens int32, max_seqlen) of the sequences in ``position_ids`` (batch or 1, seqlen) when the
    rows hold more sequences than there are rows (positions restart or jump inside a row: a packed
    batch), else None. One host read, kept on the tensor for the other layers of the forward. Callers
    ask only for a prefill (q_len == kv_len > 1, no mask): a decode step is not a packed batch."""
    # kept on the caller's tensor, not on the (batch, seqlen) view: a fresh view per layer would miss
    return _memo_on(position_ids, f"_flashlm_packing_{batch}", lambda t: _packing(t.expand(batch, -1)), refresh)


def unpad_qkv(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor, query_length: int,
              unpadded: tuple[Tensor, Tensor, int]):
    """Remove padding from q (batch, query_length, heads, d) and k/v (batch, kv_len, kv_heads, d).

    ``attention_mask`` (batch, mask_len) covers the keys; keys beyond ``mask_len`` (a static cache
    longer than what was written) are sliced off. Three cases for the queries: (a) query_length ==
    kv_len (prefill): the keys' indices and cu_seqlens; (b) query_length == 1 (decode): one query per
    row; (c) otherwise (chunked prefill): the last ``query_length`` mask columns, which requires left
    padding (checked: one host read). Returns (q (total_q, heads, d), k, v (total_k, kv_heads, d),
    indices_q, (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k)). ``unpadded``: the mask's
    :func:`unpad_data`."""
    indices_k, cu_seqlens_k, max_seqlen_k = unpadded  # unpad_data(attention_mask)
    batch, kv_len, kv_heads, head_dim = key.shape
    mask_len = attention_mask.shape[-1]
    if kv_len < mask_len:
        raise ValueError(f"attention_mask covers {mask_len} keys but only {kv_len} were given")
    if kv_len > mask_len:  # static cache: only the first mask_len slots are described
        key, value = key[:, :mask_len], value[:, :mask_len]
        kv_len = mask_len
    key = index_first_axis(key.reshape(batch * kv_len, kv_heads, head_dim), indices_k)
    value = index_first_axis(value.reshape(batch * kv_len, kv_heads, value.shape[-1]), indices_k)
    if query_length == kv_len:
        query = index_first_axis(query.reshape(batch * kv_len, query.shape[2], head_dim), indices_k)
        return query, key, value, indices_k, (cu_seqlens_k, cu_seqlens_k), (max_seqlen_k, max_seqlen_k)
    if query_length == 1:
        cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
        return (query.squeeze(1), key, value, cu_seqlens_q[:-1].long(), (cu_seqlens_q, cu_seqlens_k),
                (1, max_seqlen_k))
    q_mask = attention_mask[:, -query_length:]
    if bool((q_mask[:, 1:].long() < q_mask[:, :-1].long()).any()):
        raise ValueError("attention_mask over the new queries must be left-padded (rows 0..0 1..1) "
                         f"when query_length ({query_length}) differs from the key length ({kv_len})")
    query, indices_q, cu_seqlens_q, max_seqlen_q, _ = unpad_input(query, q_mask)
    return query, key, value, indices_q, (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) position of each packed token inside its sequence (no host sync)."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)
    return (t - cu_seqlens.long()[seq])[None]


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------
def plan_batch(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
               cache: StaticKVCache | None, cu_seqlens: Tensor | None, max_seqlen: int | None, *,
               compiled: bool = False, op_sets: dict[str, Ops] | None = None) -> BatchPlan:
    """The plan of one forward of ``input_ids`` (batch, seqlen); arguments as ``FlashModel.forward``;
    ``op_sets`` the model's {mode: Ops} (:func:`flashlm.models.kernels.op_sets`)."""
    batch, seqlen = input_ids.shape
    if cache is not None and not cache.is_empty:
        return _with_ops(_plan_cached(input_ids, attention_mask, position_ids, cache, cu_seqlens, compiled),
                         op_sets)
    if cache is not None:
        cache.check_room(batch, seqlen)
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("pass either attention_mask (padding) or cu_seqlens (packing), not both")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if max_seqlen is None:  # one host read (a bound when compiled); trainers pass it
            max_seqlen = batch * seqlen if compiled else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        plan = _packed_plan(input_ids, position_ids, cache, cu_seqlens, max_seqlen, compiled)
    elif attention_mask is not None and compiled and cache is None:
        plan = _masked_plan(input_ids, attention_mask, position_ids)
    elif attention_mask is not None:
        plan = _unpadded_plan(input_ids, attention_mask, position_ids, cache, compiled)
    elif position_ids is not None and seqlen > 1 and compiled and cache is None:
        plan = _packed_plan(input_ids, position_ids, None, _starts_cu_seqlens(position_ids, batch), seqlen, True)
    elif position_ids is not None and seqlen > 1:
        found = _packing(position_ids.expand(batch, -1))
        plan = None if found is None else _packed_plan(input_ids, position_ids, cache, *found, compiled)
    else:
        plan = None
    if plan is None:  # no padding, no packing
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=input_ids.device)[None]
        plan = BatchPlan("dense", compiled, None, input_ids, position_ids, cache=cache,
                         cache_lengths=seqlen if cache is not None else None)
    return _with_ops(plan, op_sets)


def _unpadded_plan(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None,
                   cache: StaticKVCache | None, compiled: bool) -> BatchPlan | None:
    """Padding removed (one host sync); None when the mask has no padding."""
    batch, seqlen = input_ids.shape
    indices, cu, max_len = get_unpad_data(attention_mask)  # the one host sync of this forward
    if indices.numel() == batch * seqlen:
        return None
    ranks = attention_mask.long().cumsum(-1) - 1
    if position_ids is None:
        position_ids = ranks.clamp(min=0)
    positions = position_ids.expand(batch, -1).reshape(-1)[indices][None]
    writes = {}
    if cache is not None:
        writes = {"write_batch_idx": indices // seqlen, "write_slot_idx": ranks.reshape(-1)[indices],
                  "cache_lengths": attention_mask.sum(-1, dtype=torch.int32)}
    return BatchPlan("varlen", compiled, None, input_ids.reshape(-1)[indices][None], positions, indices=indices,
                     cu_seqlens=cu, max_seqlen=max_len, cache=cache, **writes)


def _masked_plan(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None) -> BatchPlan:
    """Sync-free padding: every token kept, each row three segments (see the module docstring)."""
    batch, seqlen = input_ids.shape
    mask = attention_mask.bool()
    counts = mask.long().cumsum(-1)
    lengths = counts[:, -1]
    lead = (counts == 0).sum(-1)  # leading padding per row
    segments = torch.stack((lead, lengths, seqlen - lead - lengths), dim=-1).reshape(-1)
    cu = F.pad(segments.cumsum(0), (1, 0)).to(torch.int32)
    if position_ids is None:
        position_ids = (counts - 1).clamp(min=0)
    total = batch * seqlen
    return BatchPlan("varlen", True, None, input_ids.reshape(1, total),
                     position_ids.expand(batch, -1).reshape(1, total), token_mask=mask.reshape(-1),
                     cu_seqlens=cu, max_seqlen=seqlen)


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
                 cu_seqlens: Tensor, max_seqlen: int, compiled: bool) -> BatchPlan:
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
    return BatchPlan("varlen", compiled, None, input_ids.reshape(1, total), positions, packed=True,
                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def append_plan(input_ids: Tensor, cache: StaticKVCache, position_ids: Tensor | None, *,
                compiled: bool = False, op_sets: dict[str, Ops] | None = None) -> BatchPlan:
    """Tokens appended to every row of a non-empty cache, no padding: k/v go to each row's slots
    ``cache_seqlens + arange(seqlen)`` and positions continue from there. Reads no host state of the
    cache. Eager: the slots and the new lengths are computed here once for all layers, which then append
    and call their bound backend themselves; compiled: each layer calls ``flash_attn_with_kvcache``,
    whose attention is one opaque op under torch.compile."""
    batch, seqlen = input_ids.shape
    before = cache.seqlens(batch)  # live: the layers read it before the lengths are bumped
    slots = before.long()[:, None] + torch.arange(seqlen, device=input_ids.device)
    if position_ids is None:
        position_ids = slots
    plan = BatchPlan("append", compiled, None, input_ids, position_ids, cache=cache, cache_lengths=seqlen,
                     cache_seqlens=before)
    if not compiled:
        rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, seqlen)
        plan = plan._replace(write_batch_idx=rows, write_slot_idx=slots, seqlens_after=before + seqlen)
    return _with_ops(plan, op_sets)


def _plan_cached(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                 cache: StaticKVCache, cu_seqlens: Tensor | None, compiled: bool) -> BatchPlan:
    """Decode step or a chunk appended to a non-empty cache (no host sync without a mask)."""
    batch, seqlen = input_ids.shape
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens (packing) cannot be combined with a non-empty cache")
    cache.check_room(batch, seqlen)
    if attention_mask is None:
        return append_plan(input_ids, cache, position_ids, compiled=compiled)
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
    return BatchPlan("chunk", compiled, None, input_ids, position_ids, cache=cache, cache_lengths=lengths,
                     cache_seqlens=before + lengths, query_mask=mask.bool()[:, :, None, None],
                     write_token_idx=indices, write_batch_idx=indices // seqlen,
                     write_slot_idx=(before.long()[:, None] + ranks).reshape(-1)[indices])


def check_call(config, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
               past_key_values: StaticKVCache | None, labels: Tensor | None, use_cache: bool, logits_to_keep: int,
               host_checks: bool = True) -> None:
    """A flash causal LM's forward arguments checked before planning (``host_checks``: read the token range
    back to the host). Raises TypeError / ValueError / InputError naming the argument."""
    if past_key_values is not None and not isinstance(past_key_values, StaticKVCache):
        raise TypeError("FlashForCausalLM takes a StaticKVCache (model.allocate_cache(batch, max_len)) as "
                        f"past_key_values, got {type(past_key_values).__name__}")
    if use_cache and past_key_values is None:
        raise ValueError("use_cache=True needs past_key_values=model.allocate_cache(max_batch_size, "
                         "max_seqlen): the flash model's cache is static and sized up front")
    if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
    seqlen = input_ids.shape[1] if input_ids.dim() == 2 else 0
    if past_key_values is not None and not past_key_values.is_empty and seqlen == 1:  # a decode step
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        # one host read per step; generate() decodes through decode_logits, whose tokens come from the
        # model, without it
        if host_checks:
            check_token_range(config, input_ids)
    else:
        check_inputs(config, input_ids, attention_mask, position_ids, labels, 0, check_range=host_checks)
