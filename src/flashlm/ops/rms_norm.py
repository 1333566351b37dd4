"""RMSNorm over the last dim, plain and fused with the residual add.

``rms_norm(x, weight, eps, unit_offset=False)``: ``y = weight * (x / sqrt(mean(x^2) + eps))`` with
the math in fp32 and HF Llama's rounding (the normalized x is cast to x.dtype before the weight
multiply; the output dtype is ``promote(x.dtype, weight.dtype)``, as ``weight * x.to(dtype)`` gives).
``unit_offset=True`` is Gemma's: scale ``1 + weight`` applied in fp32 before the one cast to x.dtype.

``add_rms_norm(x, residual, weight, eps, unit_offset=False) -> (y, new_residual)``: the pre-norm
block's ``new_residual = x + residual`` (rounded to x.dtype, as the eager model does) and
``y = rms_norm(new_residual)`` in one kernel; its backward takes (grad_y, grad_new_residual) and
gives grad_x == grad_residual in one kernel (plus grad_weight: per-program fp32 partial sums, then
one sum, as Liger does).
"""

from __future__ import annotations

import torch

from flashlm.errors import InputError


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Torch reference (== ``flashlm.models.layers.RMSNorm``). x (..., N), weight (N,)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: ``new_residual = x + residual``; ``(rms_norm_ref(new_residual), new_residual)``."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps, unit_offset), new_residual


def _check(x: torch.Tensor, weight: torch.Tensor, where: str) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise InputError(f"{where}: weight must be (N,) with N = x.shape[-1] = {x.shape[-1]}, got weight "
                         f"{tuple(weight.shape)}; pass the norm's (hidden,) weight")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Fused RMSNorm (Triton) over the last dim. x (..., N) with a contiguous last dim, weight (N,).
    Returns y shaped like x, dtype ``promote(x.dtype, weight.dtype)`` (x.dtype with ``unit_offset``)."""
    _check(x, weight, "rms_norm")
    return rms_norm_ref(x, weight, eps, unit_offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm (Triton). x, residual (..., N) same shape and dtype, weight (N,).
    Returns (y, new_residual = x + residual), both shaped like x."""
    _check(x, weight, "add_rms_norm")
    return add_rms_norm_ref(x, residual, weight, eps, unit_offset)
