"""Static KV cache in BSHD for the flash model (`StaticKVCache`).

Every layer owns two pre-allocated tensors ``k``/``v`` of shape
``(max_batch_size, max_seqlen, num_kv_heads, head_dim)`` (flash-attn's ``k_cache``/``v_cache``
layout), and the cache holds one ``cache_seqlens`` int32 ``(max_batch_size,)``: the number of valid
keys of each row. Rows are stored *left-aligned*: row ``b``'s tokens sit at slots
``[0, cache_seqlens[b])`` whatever padding its prompt had, so the next token of row ``b`` goes to slot
``cache_seqlens[b]`` and its RoPE position is ``cache_seqlens[b]``. Nothing is ever re-allocated,
concatenated or transposed: prefill scatters the prompt's keys into their slots, each decode step
appends one key per row through ``flash_attn_with_kvcache`` (in place, at per-row offsets), and the
model bumps ``cache_seqlens`` in place once per step. Shapes are fixed, the decode step reads no
value back to the host, so a decode step can be captured in a CUDA graph (issue 7).

Host-side bookkeeping and CUDA graphs: the cache keeps two host values so the model never reads the
device to plan a forward: ``batch_size`` (None = empty: the next forward is a prefill) and
``max_len_bound`` (an upper bound on any row's length, used by :meth:`check_room`). A graph replay runs
no Python, so it updates ``cache_seqlens`` on the device but not these; a compiled decode step
(``FlashForCausalLM.decode_logits`` under ``torch.compile``) must not touch them either, since Dynamo
would guard on a Python int that changes every token and recompile. Whoever replays or runs such a
step calls :meth:`check_room` before and :meth:`note_appended` after it (see ``flashlm.generation.cuda_graph``). Nothing else on the decode path depends on a host value that changes between
steps: the kernels see the full cache (its capacity ``max_seqlen`` is the key length they are sized
for) and mask each row by ``cache_seqlens``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Pre-allocated per-layer k/v in BSHD plus per-row lengths.

    Attributes:
        k, v: lists (one per layer) of ``(max_batch_size, max_seqlen, num_kv_heads, head_dim)``.
        cache_seqlens: int32 ``(max_batch_size,)``, valid keys per row (left-aligned rows).
    """

    def __init__(self, num_layers: int, max_batch_size: int, max_seqlen: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("max_batch_size", max_batch_size),
                            ("max_seqlen", max_seqlen), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"StaticKVCache: dtype must be a floating dtype, got {dtype}")
        shape = (max_batch_size, max_seqlen, num_kv_heads, head_dim)
        # zeros, not empty: unwritten slots are never attended to, but NaN garbage there would still
        # poison a backend that multiplies masked probabilities (0 * NaN) instead of skipping them.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.cache_seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        # Host-side state, so the model can tell prefill from decode without reading the device:
        # batch size in use (None = empty) and an upper bound on any row's length.
        self.batch_size: int | None = None
        self.max_len_bound = 0

    # --- properties -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def max_batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seqlen(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k[0].shape[2]

    @property
    def head_dim(self) -> int:
        return self.k[0].shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def is_empty(self) -> bool:
        return self.batch_size is None

    def nbytes(self) -> int:
        """Bytes held by the k/v tensors (all layers)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # --- state --------------------------------------------------------------------------------
    def reset(self) -> StaticKVCache:
        """Forget every row (k/v memory is kept and simply overwritten later)."""
        self.cache_seqlens.zero_()
        self.batch_size = None
        self.max_len_bound = 0
        return self

    def layer(self, layer_idx: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """The k/v cache of one layer for the first ``batch_size`` rows (the tensors themselves when
        every row is used, else contiguous views)."""
        return _rows(self.k[layer_idx], batch_size), _rows(self.v[layer_idx], batch_size)

    def seqlens(self, batch_size: int) -> Tensor:
        """int32 ``(batch_size,)``: ``cache_seqlens`` of the first rows (the live tensor or a view of it,
        updated in place)."""
        return _rows(self.cache_seqlens, batch_size)

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        """Raise before any kernel runs if ``new_tokens`` more tokens per row could overflow the cache.

        Uses the host-side bound only (no device read)."""
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the cache's max_batch_size "
                             f"{self.max_batch_size}; allocate a larger cache")
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows but the input has {batch_size}; "
                             "call cache.reset() before a new batch")
        if self.max_len_bound + new_tokens > self.max_seqlen:
            raise ValueError(f"the cache has room for {self.max_seqlen} tokens per row; it holds up to "
                             f"{self.max_len_bound} and {new_tokens} more were given")

    def write(self, layer_idx: int, k_new: Tensor, v_new: Tensor, batch_idx: Tensor,
              slot_idx: Tensor) -> None:
        """Scatter tokens into one layer's cache in place.

        Args:
            k_new, v_new: ``(total, num_kv_heads, head_dim)`` keys/values of the real tokens.
            batch_idx, slot_idx: int64 ``(total,)``: the row and the slot of each token.
        """
        self.k[layer_idx].index_put_((batch_idx, slot_idx), k_new.to(self.dtype))
        self.v[layer_idx].index_put_((batch_idx, slot_idx), v_new.to(self.dtype))

    def advance(self, batch_size: int, lengths: Tensor | int, max_new: int) -> None:
        """Add ``lengths`` (int32 ``(batch_size,)`` or an int) to the rows' lengths, in place, once per
        forward after all layers have written; ``max_new`` is the host-side bound of that increase."""
        self.bump(batch_size, lengths)
        self.note_appended(batch_size, max_new)

    def bump(self, batch_size: int, lengths: Tensor | int) -> None:
        """Device half of :meth:`advance`: ``cache_seqlens[:batch_size] += lengths`` in place, nothing
        else. What a compiled or captured decode step runs (its caller does the host half)."""
        self.seqlens(batch_size).add_(lengths)

    def note_appended(self, batch_size: int, max_new: int) -> None:
        """Host-side half of :meth:`advance`: record that ``batch_size`` rows hold up to ``max_new`` more
        tokens. Called on its own after a CUDA-graph replay or a compiled decode step, whose device half
        (:meth:`bump`) ran inside; keeps :meth:`check_room` truthful so any kinds of steps can mix."""
        self.batch_size = batch_size
        self.max_len_bound += max_new

    def prepare_for_capture(self, batch_size: int) -> StaticKVCache:
        """Zero the rows' lengths and mark ``batch_size`` rows as held, so that a forward of one token per
        row takes the model's decode path (used to warm up and capture a decode step). The warm-up steps
        write k/v into the first slots: call :meth:`reset` before the real prefill."""
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the cache's max_batch_size {self.max_batch_size}")
        self.cache_seqlens.zero_()
        self.batch_size = batch_size
        self.max_len_bound = 0
        return self

    def __repr__(self) -> str:
        return (f"StaticKVCache(layers={self.num_layers}, max_batch_size={self.max_batch_size}, "
                f"max_seqlen={self.max_seqlen}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device})")


def _rows(t: Tensor, batch_size: int) -> Tensor:
    # The tensor itself when every row is used: a compiled step then updates the cache in place
    # without a slice view, which inductor could otherwise turn into a copy of the whole cache.
    return t if batch_size == t.shape[0] else t[:batch_size]
