"""Which attention kernel each flash attention layer calls, chosen when the layer is built or moved.

A :class:`~flashlm.models.flash.FlashMultiHeadAttention` has a fixed call shape (heads, head_dim, causal,
window, softcap), so the registry's choice depends only on (kind, dtype, needs_grad, dropout): the layer
binds that table once (:func:`_select_backends`), with the backend a compiled plan takes where the
registry's first choice cannot be traced (:func:`_traceable_backend`), and whether its small plain causal
dense calls on CUDA go straight to aten's FA2 op (:func:`aten_dense_eligible`, :func:`_aten_flash_dense`).
These lived in :mod:`flashlm.models.flash` before; the ones it uses are importable from there too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .flash import FlashMultiHeadAttention

__all__ = ["ATEN_DENSE_MAX_TOKENS", "aten_dense_eligible"]


_HALF = (torch.float16, torch.bfloat16)
# Dense causal calls of at most this many tokens (batch * seqlen) go to aten's FA2 op: measured on the
# H200 (GPU_NOTES.md 06:00, 512 tokens, (2, 256, 12, 64) bf16) it costs 380 us of host time per
# fwd+bwd against 830 through the registry's choice (cuDNN), and small steps are host-bound. Larger
# calls are GPU-bound, where cuDNN / FA4 run faster kernels (DESIGN.md: 4k causal fwd+bwd FA4 522,
# cuDNN 475, FA2 283 TFLOP/s). PROVISIONAL bound between the two measured regimes (the seed's 512
# tokens and llama-1b's 16384); the lead's bench of both configs decides it.
ATEN_DENSE_MAX_TOKENS = 4096


def _aten_flash_dense(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, scale: float) -> Tensor:
    """Causal attention of BSHD q (B, S, H, D), k/v (B, S, KV, D) through ``aten._scaled_dot_product_
    flash_attention`` on BHSD views (no copies; GQA read natively; seqlen_q == seqlen_k, so its
    top-left causal mask is the bottom-right one). Returns (B, S, H, D) BSHD (a view)."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, True, False, scale=scale)[0]
    return out.transpose(1, 2)


def aten_dense_eligible(attn: FlashMultiHeadAttention, device: torch.device) -> bool:
    """Whether ``attn``'s plain causal dense calls on ``device`` may use :func:`_aten_flash_dense`:
    PyTorch's own FA2 op serves them on CUDA (no window/softcap, head_dim a multiple of 8 up to 256)
    with the least host time; a forced backend (``use_backend``, ``FLASHLM_ATTN_BACKEND``) turns it off.
    The caller still checks each call's dtype (fp16/bf16) and size (``ATEN_DENSE_MAX_TOKENS``)."""
    from flashlm.attention import registry

    return (device.type == "cuda" and attn.window_size == (-1, -1) and not attn.softcap_value
            and attn.head_dim % 8 == 0 and attn.head_dim <= 256
            and registry.forced_backend()[0] is None)


def _select_backends(attn: FlashMultiHeadAttention, device: torch.device) -> dict:
    """{(kind, dtype, needs_grad, dropout): Backend} for ``attn``'s dense and varlen calls on ``device``.

    The layer's call shape is fixed when it is built (heads, head_dim, causal, window, softcap), so the
    registry's choice depends only on these keys: choosing them once saves the per-call registry work
    (building and hashing an AttnCall, the forced-backend lookups) and keeps the registry, which reads a
    context variable, out of torch.compile's graph. A forced backend (``use_backend``,
    ``FLASHLM_ATTN_BACKEND``) applies when the model is built or moved (``.to``), or at
    :meth:`~flashlm.models.flash.FlashForCausalLM.bind_attention`. Calls no backend serves stay unbound
    and go through the public API, which raises its error naming every refusal."""
    from flashlm.attention import registry
    from flashlm.attention.backends.base import AttnCall

    table: dict = {}
    if device.type == "meta":
        return table
    capability = registry.compute_capability(device)

    def call(kind, dtype, grad, dropout):
        return AttnCall(kind=kind, device_type=device.type, compute_capability=capability, dtype=dtype,
                        head_dim=attn.head_dim, head_dim_v=attn.head_dim, nheads=attn.num_heads,
                        nheads_k=attn.num_kv_heads, seqlen_q=None, seqlen_k=None, causal=True,
                        window=attn.window_size != (-1, -1), softcap=attn.softcap_value > 0, alibi=False,
                        dropout=dropout, needs_grad=grad, deterministic=False,
                        seqlens_equal=kind != "kvcache")

    dtypes = {next(attn.parameters()).dtype, torch.bfloat16, torch.float16, torch.float32}
    dropouts = (False, True) if attn.attention_dropout > 0 else (False,)
    keys = [("kvcache", dtype, False, False) for dtype in dtypes]
    keys += [(kind, dtype, grad, dropout) for kind in ("dense", "varlen") for dtype in dtypes
             for grad in (False, True) for dropout in dropouts]
    for key in keys:
        c = call(*key)
        try:
            table[key] = registry.select(c)
        except (ValueError, TypeError):
            pass
        traced = _traceable_backend(c) if key[0] != "kvcache" else None
        if traced is not None:
            table[key + ("compiled",)] = traced
    return table


def _traceable_backend(call):
    """The registry's choice for ``call`` among the backends torch.compile can trace (each backend's
    ``traceable_kinds``: FA4 through its custom ops, sdpa_cpu dense only), or None. Compiled plans take
    it; a backend that cannot be traced would end the graph (fullgraph: an error)."""
    from flashlm.attention import registry

    if registry.forced_backend()[0] is not None:
        return None  # a forced backend is used as is (an untraceable one then fails to compile, loudly)
    exp = registry.explain_call(call)
    name = next((n for n, why in exp.reasons.items()
                 if why is None and call.kind in registry.get_backend(n).traceable_kinds), None)
    return None if name is None or name == "reference" and call.device_type != "cpu" else registry.get_backend(name)
