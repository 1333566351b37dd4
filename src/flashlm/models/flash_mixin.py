"""FlashAttentionMixin: BSHD q/k/v plus a padding mask, packed position ids or explicit ``cu_seqlens``
-> the right ``flashlm.attention`` entry point (dense, or unpad -> varlen -> re-pad).

The standalone helper for callers without a precomputed plan: a :class:`~flashlm.models.flash.
FlashMultiHeadAttention` used on its own, and transformers' attention hook (:mod:`flashlm.hf`). The flash
model itself plans once per forward instead (:mod:`flashlm.models.plan`). Re-exported by
:mod:`flashlm.models.flash`, where it lived before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashlm.attention import flash_attn_func, flash_attn_varlen_func
from flashlm.attention.padding import (
    get_unpad_data,
    index_first_axis,
    pad_input,
    prepare_from_position_ids,
    unpad_input,
)

__all__ = ["FlashAttentionMixin"]


class FlashAttentionMixin:
    """Calls ``flashlm.attention`` on BSHD q/k/v, removing padding when there is any.

    Standalone helpers for callers that have a padding mask or packed position ids but no
    precomputed metadata (the flash model itself precomputes once per forward, see
    :class:`~flashlm.models.plan.FlashMeta`; transformers' attention hook, :mod:`flashlm.hf`, subclasses
    this one with unpadding memoized per forward).
    """

    @staticmethod
    def _get_unpad_data(attention_mask: Tensor) -> tuple[Tensor, Tensor, int]:
        """attention_mask (batch, seqlen), 1 = token -> (indices int64 (total,) into the flattened
        batch * seqlen, cu_seqlens int32 (batch + 1,), max_seqlen_in_batch int). One host sync."""
        return get_unpad_data(attention_mask)

    def _upad_input(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                    query_length: int):
        """Remove padding from q (batch, query_length, heads, d) and k/v (batch, kv_len, kv_heads, d).

        ``attention_mask`` (batch, mask_len) covers the keys; keys beyond ``mask_len`` (a static cache
        longer than what was written) are sliced off. Three cases for the queries:
          (a) query_length == kv_len (prefill): queries share the keys' indices and cu_seqlens;
          (b) query_length == 1 (decode): one query per row, cu_seqlens_q = arange(batch + 1);
          (c) otherwise (chunked prefill, speculative steps): the queries are the last
              ``query_length`` mask columns, which requires left padding (checked: one host read).
        Returns (q (total_q, heads, d), k, v (total_k, kv_heads, d), indices_q,
        (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k)).
        """
        indices_k, cu_seqlens_k, max_seqlen_k = self._get_unpad_data(attention_mask)
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

    def _flash_attention_forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None, *,
        dropout: float = 0.0, softmax_scale: float | None = None, causal: bool = True,
        training: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
        position_ids: Tensor | None = None, cu_seqlens_q: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None, max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None, deterministic: bool = False,
    ) -> Tensor:
        """Attention on BSHD q (batch, q_len, heads, d), k/v (batch, kv_len, kv_heads, d).

        Chooses the entry point from what is given (explicitly, in this order):
          - ``cu_seqlens_q/k`` (+ max_seqlen_q/k): the batch*seqlen tokens are packed sequences;
          - ``attention_mask`` (batch, kv_len) with 1 = token: unpad (see `_upad_input`), varlen, re-pad;
          - ``position_ids`` (batch, q_len) restarting at 0 inside a row (q_len == kv_len > 1):
            packed sequences found by ``prepare_from_position_ids`` (one host sync);
          - otherwise ``flash_attn_func``.
        ``dropout`` applies only when ``training``. Returns (batch, q_len, heads, d_v), zeros at padding.
        """
        batch, q_len, heads = query.shape[:3]
        kwargs = {"dropout_p": dropout if training else 0.0, "softmax_scale": softmax_scale,
                  "causal": causal, "window_size": window_size, "softcap": softcap,
                  "deterministic": deterministic}
        if cu_seqlens_q is None and attention_mask is None and position_ids is not None and \
                q_len == key.shape[1] and q_len > 1 and position_ids.dim() == 2:
            cu, max_len = prepare_from_position_ids(position_ids.expand(batch, -1))
            if cu.numel() - 1 > batch:  # more sequences than rows: packed
                cu_seqlens_q = cu_seqlens_k = cu
                max_seqlen_q = max_seqlen_k = max_len
        if cu_seqlens_q is not None:
            if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
                raise ValueError("cu_seqlens_q needs cu_seqlens_k, max_seqlen_q and max_seqlen_k")
            out = flash_attn_varlen_func(
                query.reshape(batch * q_len, heads, query.shape[-1]),
                key.reshape(-1, *key.shape[2:]), value.reshape(-1, *value.shape[2:]),
                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
            return out.view(batch, q_len, heads, out.shape[-1])
        if attention_mask is not None:
            q, k, v, indices_q, (cu_q, cu_k), (max_q, max_k) = self._upad_input(
                query, key, value, attention_mask, q_len)
            out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
            return pad_input(out, indices_q, batch, q_len)
        return flash_attn_func(query, key, value, **kwargs)
