"""flashlm's attention inside transformers models.

```python
import flashlm.hf
name = flashlm.hf.register()              # "FlashLM"
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
```

`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and
:func:`attention_mask` to its ``AttentionMaskInterface`` under one name. The model then keeps all of
its own code (projections, RoPE, cache, MLP) and calls ``flashlm.attention`` for the attention
itself, in BSHD:

- dense batches: ``flash_attn_func`` on BSHD views of HF's (batch, heads, seq, head_dim) tensors
  (a transpose, no copy); GQA reads the fewer k/v heads directly (no ``repeat_kv``);
- padded batches: the mask function hands the model's 2-D padding mask (batch, kv_len) through
  unchanged (as transformers does for "flash_attention_2"); the attention removes the padding and
  calls ``flash_attn_varlen_func``. Unpadding is computed once per forward, not once per layer;
- padding-free packing: ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs (as
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` makes them) go straight to
  ``flash_attn_varlen_func``; without them, ``position_ids`` restarting inside a row are detected
  (once per forward) and treated the same way;
- sliding window (``sliding_window`` kwarg or ``module.sliding_window``: W tokens, itself included,
  i.e. window (W - 1, 0)), logit softcap (``softcap`` kwarg or ``module.config.attn_logit_softcapping``),
  ``scaling``, attention dropout (the model passes 0 outside training), causal bottom-right.

Why the name is not "flashlm": transformers 5 treats every ``attn_implementation`` containing the
substring "flash" as a FlashAttention kernel and tries to load it (from the ``flash_attn`` package or
the Hub) when the model is built, which fails for a name it does not know. "FlashLM" does not match
its (case-sensitive) check, works with 4.x and 5.x alike, and `register` refuses names that would.

Not supported: ``output_attentions`` (no probabilities are formed; None is returned), attention
sinks (``s_aux``), custom 4-D masks, and static caches of sliding-window layers (ring buffers whose
slots are not in position order); full-attention static caches work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_NAME", "attention_forward", "attention_mask", "register"]

DEFAULT_NAME = "FlashLM"


def _mixin():
    """The unplanned attention helper of the flash model (its metadata kept on the mask / position-ids
    tensor of the forward: computed once per forward, see flashlm.models.plan)."""
    global _MIXIN
    if _MIXIN is None:
        from flashlm.models.flash import FlashAttentionMixin

        _MIXIN = FlashAttentionMixin()
    return _MIXIN


_MIXIN = None


def _projection_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of the attention module's projection weights (HF's q_proj, else its first Linear)."""
    proj = getattr(module, "q_proj", None)
    if not isinstance(proj, torch.nn.Linear):
        proj = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    return proj.weight.dtype if proj is not None else default


def _check_supported(attention_mask: Tensor | None, kwargs: dict[str, Any]) -> None:
    """Refuse what this attention cannot do (a custom 4-D mask, attention sinks) before any kernel runs."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation {DEFAULT_NAME!r} takes a 2-D padding mask (batch, kv_len); got a "
            f"{attention_mask.dim()}-D mask {tuple(attention_mask.shape)}. Custom 4-D masks need "
            "attn_implementation='eager' or 'sdpa'"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"attn_implementation {DEFAULT_NAME!r} does not support attention sinks (s_aux)")


def _masking(
    module: torch.nn.Module, sliding_window: int | None, softcap: float | None, is_causal: bool | None
) -> tuple[bool, tuple[int, int], float]:
    """(causal, flash-attn window (left, right), softcap) from the call's arguments, else the module's
    ``is_causal`` / ``sliding_window`` / ``config.attn_logit_softcapping``."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if softcap is None:
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if sliding_window is None:
        window = (-1, -1)
    else:  # W tokens, itself included; non-causal (encoders) looks W - 1 both ways, as HF does
        window = (sliding_window - 1, 0 if is_causal else sliding_window - 1)
    return bool(is_causal), window, float(softcap or 0.0)


def _packing_kwargs(
    kwargs: dict[str, Any], attention_mask: Tensor | None, batch: int, q_len: int, kv_len: int, first_layer: bool
) -> tuple[Tensor | None, Tensor | None, int | None, int | None]:
    """(cu_seqlens_q, cu_seqlens_k int32, max_seqlen_q, max_seqlen_k) of packed rows, or four Nones.

    Explicit: HF's ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs, all four given. Else detected from
    ``position_ids`` (batch or 1, q_len) restarting inside a row, for an unmasked prefill (q_len ==
    kv_len > 1), by the planner's test (``flashlm.models.plan.packed_sequences``: one host read per
    forward, kept on the position-ids tensor)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)  # no-op when int32
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and position_ids.dim() == 2 and q_len == kv_len > 1:
        from flashlm.models.plan import packed_sequences

        packed = packed_sequences(position_ids, batch, refresh=first_layer)
        if packed is not None:
            return packed[0], packed[0], packed[1], packed[1]
    return None, None, None, None


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function running ``flashlm.attention``.

    query (batch, heads, q_len, head_dim), key/value (batch, kv_heads, kv_len, head_dim(_v)): HF's
    BHSD tensors after RoPE and the cache update. attention_mask: None or the 2-D padding mask
    (batch, mask_len <= kv_len), True/1 = token, from :func:`attention_mask`. ``dropout`` is applied
    as given (transformers passes 0 outside training). Keyword arguments read: ``position_ids``
    (batch, q_len) for packing detection, ``cu_seq_lens_q/k`` + ``max_length_q/k`` for explicit
    packing, ``deterministic``. Returns (attn_output (batch, q_len, heads, head_dim_v), None).
    """
    _check_supported(attention_mask, kwargs)
    causal, window, softcap = _masking(module, sliding_window, softcap, is_causal)
    first_layer = getattr(module, "layer_idx", 0) == 0  # inference tensors' metadata is recomputed there

    q = query.transpose(1, 2)  # BSHD views, no copy
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if q.dtype == torch.float32:  # upcast activations (PEFT) in a half model: the half kernels, warned once
        from flashlm.models.kernels import half_precision_inputs

        q, k, v = half_precision_inputs(q, k, v, _projection_dtype(module, q.dtype))
    cu_q, cu_k, max_q, max_k = _packing_kwargs(kwargs, attention_mask, q.shape[0], q.shape[1], k.shape[1],
                                               first_layer)
    out = _mixin()._flash_attention_forward(
        q,
        k,
        v,
        attention_mask,
        dropout=float(dropout),
        training=dropout > 0,
        softmax_scale=scaling,
        causal=causal,
        window_size=window,
        softcap=softcap,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        deterministic=bool(kwargs.get("deterministic") or False),
        first_layer=first_layer,
    )
    return out, None


def attention_mask(
    batch_size: int,
    cache_position: Tensor | None = None,
    kv_length: int | None = None,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    q_length: int | None = None,
    q_offset: int | Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """transformers mask function (AttentionMaskInterface) for :func:`attention_forward`.

    Returns the 2-D padding mask (batch, <= kv_length) bool, sliced to the last ``kv_length`` keys
    (sliding-window caches), or None when every key is a real token (then the attention needs no
    unpadding). Causality, windows and packing are the kernel's business, not the mask's. A static
    cache (more key slots than tokens seen, no padding mask) gets an all-ones mask over its filled
    slots, (batch, seen): the attention ignores the slots past it.
    Accepts the transformers 4.x (``cache_position``) and 5.x (``q_length``/``q_offset``) calls.
    """
    if attention_mask is None:
        # keys seen so far: q_offset + q_length (5.x) or the last query position + 1 (4.x)
        if q_length is not None and q_offset is not None:
            seen = q_offset + q_length
        elif cache_position is not None:
            seen = cache_position[-1] + 1
        else:
            return None
        if isinstance(seen, int) and seen >= kv_length:
            return None  # every slot is a real key (the usual dynamic cache, or no cache)
        device = seen.device if isinstance(seen, Tensor) else kwargs.get("device")
        # A static cache's offset is a tensor: one host read per forward to size the mask; the
        # attention then reads only the first `seen` slots (queries are the last of those).
        seen = int(seen)
        if seen >= kv_length:
            return None
        return torch.ones(batch_size, seen, dtype=torch.bool, device=device)
    mask = attention_mask[:, -kv_length:].bool()
    if mask.shape[1] == kv_length and bool(mask.all()):  # one host read per forward, as HF's FA does
        return None
    return mask


def register(name: str = DEFAULT_NAME) -> str:
    """Register flashlm's attention with transformers as ``attn_implementation=name``.

    Adds :func:`attention_forward` to ``transformers.AttentionInterface`` and :func:`attention_mask`
    to ``transformers.masking_utils.AttentionMaskInterface`` (without the latter transformers would
    drop the padding mask for an implementation it does not know). Idempotent. Returns the name.

    Raises ValueError for a name containing "flash" (transformers 5 would try to load it as a
    FlashAttention kernel, see the module docstring) and ImportError without transformers >= 4.53.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if "flash" in name:
        raise ValueError(
            f"attn_implementation name {name!r} contains 'flash': transformers 5 would treat it as a "
            f"FlashAttention kernel and try to load it when building the model; use e.g. {DEFAULT_NAME!r}"
        )
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "flashlm.hf.register needs transformers >= 4.53 (AttentionInterface and "
            "AttentionMaskInterface): pip install 'flashlm[hf]'"
        ) from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name
