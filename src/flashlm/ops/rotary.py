"""Rotary position embedding (RoPE) in BSHD, fused with the q/k/v split.

``rotary_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> (q, k, v)``: qkv (batch, seqlen,
(H + 2 * KV) * D) is the fused q/k/v projection output; one launch writes a (batch, seqlen,
H + 2 * KV, D) buffer with q and k rotated and v copied, and returns its three BSHD views
q (B, S, H, D), k (B, S, KV, D), v (B, S, KV, D) (last dim contiguous, heads strided). The backward
takes grad_q, grad_k, grad_v (any strides, last dim contiguous) and writes grad_qkv in one launch.

``rotary(x, cos, sin) -> x rotated``: the single-tensor form (x (B, S, H, D)), for the kv-cache path.

cos/sin: (batch or 1, seqlen, D // 2) fp32 half-width tables, one row per token (per-row positions,
so left padding and packing just work), in transformers' rotate_half convention: pairs (i, i + D/2)
rotate as ``(x1 * c - x2 * s, x2 * c + x1 * s)``. The math is fp32 with one rounding to x's dtype,
as the Triton kernel the flash model used before (``attention/backends/triton/rotary.py``); the
default model's full-table torch path (tables cast to x's dtype first) agrees bit for bit in fp32.
"""

from __future__ import annotations

import torch

from flashlm.errors import InputError


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Torch reference: x (B, S, H, D), cos/sin (B or 1, S, D // 2) -> rotated x, fp32 math, x's dtype."""
    c = cos[:, :, None, :].float()
    s = sin[:, :, None, :].float()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rotary_qkv_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`rotary_qkv`: split, rotate q and k, return (q, k, v) in BSHD."""
    qkv = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    q, k, v = qkv.split((num_heads, num_kv_heads, num_kv_heads), dim=2)
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin), v


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, batch: int, seqlen: int, head_dim: int,
                  where: str) -> None:
    if (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seqlen
            or 2 * cos.shape[2] != head_dim):
        raise InputError(f"{where}: cos/sin must both be (batch or 1, seqlen, head_dim // 2) = "
                         f"({batch} or 1, {seqlen}, {head_dim // 2}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}; pass the half-width tables (rope_tables)")


def _check_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim) -> None:
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 3 or qkv.shape[-1] != width or head_dim % 2:
        raise InputError(f"rotary_qkv: qkv must be (batch, seqlen, (num_heads + 2 * num_kv_heads) * "
                         f"head_dim) = (., ., {width}) with an even head_dim, got {tuple(qkv.shape)} "
                         f"and head_dim {head_dim}")
    _check_tables(cos, sin, qkv.shape[0], qkv.shape[1], head_dim, "rotary_qkv")


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused split + RoPE of q and k (Triton); see the module docstring for shapes."""
    _check_qkv(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    return rotary_qkv_ref(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of one BSHD tensor x (B, S, H, D) (Triton); returns a new contiguous tensor."""
    if x.dim() != 4:
        raise InputError(f"rotary: x must be (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
    _check_tables(cos, sin, x.shape[0], x.shape[1], x.shape[-1], "rotary")
    return rotary_ref(x, cos, sin)
