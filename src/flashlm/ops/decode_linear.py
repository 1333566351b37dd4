"""A decode step's linears fused with their neighbours, on the weight-streaming kernels of
:mod:`flashlm.ops.int8_linear` (GEMV for one row, ``tl.dot`` tiles for a few; int8 weights with scales or
bf16/fp16 weights as they are).

A decode step reads every weight once per token while the ops between the GEMVs (RMSNorm, SwiGLU) are
each a launch of a few microseconds over a few KB: putting them in the GEMV's prologue removes the
launches (issue 27, item 4). Inference only; anything else runs the unfused reference.

- :func:`norm_linear`: ``(linear(rms_norm(x + residual)), x + residual)`` in one launch (the pre-norm
  block's add + RMSNorm in the prologue of the projection after it: qkv, gate_up); the rstd of each row is
  applied to the output (``sum_k w * g * h * rstd = rstd * sum_k w * g * h``), so a split over K needs no
  extra pass;
- :func:`swiglu_gemv_linear`: ``linear(swiglu(gate_up))`` for a bf16/fp16 down projection (the int8 form
  is :func:`~flashlm.ops.int8_linear.int8_swiglu_linear`).

Which projections take them: ``flashlm.ops.resolve``'s decode op set and
:func:`flashlm.models.kernels.fuses_norm` (shown by ``explain()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashlm.errors import InputError

from ._dispatch import triton_usable
from .int8_linear import KERNEL_MAX_M, int8_linear_ref, launch_kernels, launch_norm_linear
from .rms_norm import add_rms_norm, rms_norm, rms_norm_ref
from .swiglu import swiglu_linear

__all__ = ["HALF_GEMV_MAX_M", "norm_linear", "norm_linear_ref", "swiglu_gemv_linear"]

# Rows up to which a bf16/fp16 weight goes through our kernels (the decode batches: M buckets 1-64);
# above, cuBLAS's tensor-core GEMM is the faster one (compute starts to count). int8 weights: KERNEL_MAX_M.
HALF_GEMV_MAX_M = 64


def norm_linear_ref(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, unit_offset: bool,
                    weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`norm_linear`: h = x (+ residual); (linear(rms_norm_ref(h)), h)."""
    h = x if residual is None else x + residual
    return int8_linear_ref(rms_norm_ref(h, norm_weight, eps, unit_offset), weight, scale, bias), h


def _kernel_rows(x: Tensor, weight: Tensor, *others: Tensor | None) -> bool:
    """Whether the fused kernels take this call: Triton can run here, no gradient is wanted (of x, the
    weight or ``others``: the kernels have no backward), not under torch.compile, and the rows fit the
    weight kind's bound (int8: KERNEL_MAX_M; bf16/fp16: HALF_GEMV_MAX_M)."""
    rows = x.numel() // max(x.shape[-1], 1)
    limit = KERNEL_MAX_M if weight.dtype == torch.int8 else HALF_GEMV_MAX_M
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, *others))
    return triton_usable(x.device) and not wants_grad and rows <= limit and not torch.compiler.is_compiling()


def norm_linear(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, unit_offset: bool,
                weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """x, residual (..., K) (residual None: x is the whole stream) -> (y (..., N), h (..., K)) with h = x +
    residual (rounded to x's dtype) and y = linear(rms_norm(h, norm_weight, eps, unit_offset)): weight
    (N, K) int8 with its ``scale`` (N,), or bf16/fp16 (scale None); bias (N,) or None. One kernel for decode
    rows (more than the kernels' bound, a gradient wanted, or no Triton: the norm then the linear)."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or norm_weight.shape != (k,) or k == 0:
        raise InputError(f"norm_linear: x (..., K={k}) needs a norm weight (K,) and a weight (N, K), got "
                         f"{tuple(norm_weight.shape)} and {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise InputError(f"norm_linear: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if (weight.dtype == torch.int8) != (scale is not None):
        raise InputError("norm_linear: an int8 weight needs its scale, a float weight none")
    if _kernel_rows(x, weight, residual, norm_weight, bias):
        return launch_norm_linear(x, residual, norm_weight, eps, unit_offset, weight, scale, bias)
    if residual is None:
        h, normed = x, rms_norm(x, norm_weight, eps, unit_offset)
    else:
        normed, h = add_rms_norm(x, residual, norm_weight, eps, unit_offset)
    return int8_linear_ref(normed, weight, scale, bias), h


def swiglu_gemv_linear(gate_up: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``linear(swiglu(gate_up), weight, bias)``: gate_up (..., 2K), weight (N, K) bf16/fp16 -> (..., N);
    the SwiGLU in the GEMV's prologue for decode rows, else :func:`~flashlm.ops.swiglu.swiglu_linear`
    (which also serves a backward)."""
    if _kernel_rows(gate_up, weight, bias) and weight.dtype != torch.int8 and gate_up.shape[-1] == 2 * weight.shape[1]:
        return launch_kernels(gate_up, weight, None, bias, swiglu=True)
    return swiglu_linear(gate_up, weight, bias)
