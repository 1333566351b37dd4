"""RoPE on BSHD q/k for the flash model: one position per (row, token), no transpose.

:func:`apply_rope_bshd` rotates with either the full tables (torch, bit for bit the default model's
``apply_rope``) or the half-width ones (the fused Triton kernel on CUDA, or its math in torch ops under
torch.compile). Used by a flash attention layer called on its own (no model plan); the model itself
rotates with ``flashlm.ops.rotary_qkv``. Re-exported by :mod:`flashlm.models.flash`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from flashlm.attention.interface import apply_rotary

from .layers import rotate_half

__all__ = ["apply_rope_bshd"]


@functools.lru_cache(maxsize=1)
def _triton_rotary():
    """The fused Triton rotary kernel, or None when the Triton backend is not importable."""
    try:
        from flashlm.attention.backends.triton.rotary import apply_rotary_bshd
    except (ImportError, RuntimeError):  # no triton / no kernel module: the torch path is exact anyway
        return None
    return apply_rotary_bshd


def apply_rope_bshd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (batch, seqlen, heads, head_dim) and k (batch, seqlen, kv_heads, head_dim) — BSHD, no
    transpose — with one position per (row, token), so left padding and packing just work.

    cos/sin fp32 in the rotate_half convention: either the full tables (batch or 1, seqlen, head_dim)
    with duplicated halves, rotated here in torch with the tables cast to q's dtype first, exactly as
    the default model's ``apply_rope`` does (fp32 results agree bit for bit); or the half-width tables
    (batch, seqlen, head_dim // 2) (``cos[..., :head_dim // 2]``), which go to the fused Triton kernel
    ``apply_rotary_bshd`` (CUDA). Compiled without gradients (a compiled decode step), the half-width
    tables take that kernel's math (fp32, one rounding) written in torch ops, which inductor fuses
    with the neighbouring elementwise work (the cache append, ...) instead of launching the opaque
    kernel op twice per layer; compiled training keeps the kernel's op and its backward.
    """
    head_dim = q.shape[-1]
    if cos.shape[-1] != head_dim:  # half-width tables
        if torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            return apply_rotary(q, cos, sin, False), apply_rotary(k, cos, sin, False)
        rotary = _triton_rotary() if q.is_cuda else None
        if rotary is not None:
            return rotary(q, cos, sin), rotary(k, cos, sin)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    cos = cos.unsqueeze(2).to(q.dtype)
    sin = sin.unsqueeze(2).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
