"""A decode step's linears fused with their neighbours, on the weight-streaming kernels of
:mod:`flashlm.ops.int8_linear` (GEMV for one row, ``tl.dot`` tiles for a few; int8 weights with scales or
bf16/fp16 weights as they are).

A decode step reads every weight once per token while the ops between the GEMVs (RMSNorm, SwiGLU) are
each a launch of a few microseconds over a few KB: putting them in the GEMV's prologue removes the
launches (issue 27, item 4). Inference only; anything else runs the unfused ops.

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
from .int8_linear import int8_linear, int8_linear_ref, launch_kernels, launch_norm_linear
from .rms_norm import add_rms_norm, rms_norm, rms_norm_ref
from .swiglu import swiglu_linear

__all__ = ["FUSED_MAX_M", "norm_linear", "norm_linear_ref", "norm_linear_rows", "swiglu_gemv_linear"]

# Rows up to which the fusions run (the decode batches: M buckets 1-64); above, a bf16 weight is faster in
# cuBLAS's tensor-core GEMM (compute starts to count), and the norm is one launch among much larger ones.
FUSED_MAX_M = 64


def norm_linear_ref(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, unit_offset: bool,
                    weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`norm_linear`: h = x (+ residual); (linear(rms_norm_ref(h)), h)."""
    h = x if residual is None else x + residual
    return int8_linear_ref(rms_norm_ref(h, norm_weight, eps, unit_offset), weight, scale, bias), h


def norm_linear_rows(rows: int, dtype: torch.dtype) -> bool:
    """Whether :func:`norm_linear`'s kernel serves ``rows`` rows of ``dtype`` activations: at most
    FUSED_MAX_M, and fp16 only as one row (the GEMV keeps ``h * g`` in fp32 until the rstd is applied at
    the end; the tl.dot tiles round it to x's dtype first, where fp16 can overflow or lose small values;
    bf16 has fp32's range). ``flashlm.models.kernels.fuses_norm`` asks here too, so explain() agrees."""
    return 0 < rows <= FUSED_MAX_M and (dtype != torch.float16 or rows == 1)


def _kernels_take(x: Tensor, weight: Tensor, *others: Tensor | None) -> bool:
    """Triton can run here, the weight's rows are contiguous, no gradient is wanted (of x, the weight or
    ``others``: the kernels have no backward) and not under torch.compile (the fallbacks are traceable)."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, *others))
    return (triton_usable(x.device) and weight.stride(-1) == 1 and not wants_grad
            and not torch.compiler.is_compiling())


def _check_norm_linear(x, residual, norm_weight, weight, scale, bias) -> None:
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or norm_weight.shape != (k,) or k == 0:
        raise InputError(f"norm_linear: x (..., K={k}) needs a norm weight (K,) and a weight (N, K), got "
                         f"{tuple(norm_weight.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise InputError(f"norm_linear: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"norm_linear: x must be bf16/fp16/fp32, got {x.dtype}")
    if (weight.dtype == torch.int8) != (scale is not None):
        raise InputError("norm_linear: an int8 weight needs its scale, a float weight none")
    if scale is not None and (scale.shape != (weight.shape[0],) or not scale.is_floating_point()):
        raise InputError(f"norm_linear: scale must be a float (N={weight.shape[0]},) tensor, got "
                         f"{tuple(scale.shape)} {scale.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InputError(f"norm_linear: bias must be (N={weight.shape[0]},) or None, got {tuple(bias.shape)}")
    if any(t is not None and t.device != x.device for t in (residual, norm_weight, weight, scale, bias)):
        raise InputError("norm_linear: x, residual, norm weight, weight, scale and bias must be on one device")


def norm_linear(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, unit_offset: bool,
                weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """x, residual (..., K) (residual None: x is the whole stream) -> (y (..., N), h (..., K)) with h = x +
    residual (rounded to x's dtype) and y = linear(rms_norm(h, norm_weight, eps, unit_offset)): weight
    (N, K) int8 with its ``scale`` (N,), or bf16/fp16 (scale None); bias (N,) or None. One kernel for decode
    rows (:func:`norm_linear_rows`); otherwise (more rows, fp16 rows, a gradient wanted, no Triton, a
    weight whose rows are not contiguous) the norm then the linear: ``F.linear``, or for int8 weights
    ``int8_linear``, which is inference-only and wants row-major weights (InputError otherwise)."""
    _check_norm_linear(x, residual, norm_weight, weight, scale, bias)
    rows = x.numel() // x.shape[-1]
    if norm_linear_rows(rows, x.dtype) and _kernels_take(x, weight, residual, norm_weight, bias):
        return launch_norm_linear(x, residual, norm_weight, eps, unit_offset, weight, scale, bias)
    if residual is None:
        h, normed = x, rms_norm(x, norm_weight, eps, unit_offset)
    else:
        normed, h = add_rms_norm(x, residual, norm_weight, eps, unit_offset)
    if scale is not None:
        return int8_linear(normed, weight, scale, bias), h
    return int8_linear_ref(normed, weight, None, bias), h  # a float weight: F.linear in normed's dtype


def swiglu_gemv_linear(gate_up: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``linear(swiglu(gate_up), weight, bias)``: gate_up (..., 2K), weight (N, K) bf16/fp16 -> (..., N);
    the SwiGLU in the GEMV's prologue for decode rows (at most FUSED_MAX_M), else
    :func:`~flashlm.ops.swiglu.swiglu_linear` (which also serves a backward, and checks the shapes)."""
    rows = gate_up.numel() // max(gate_up.shape[-1], 1)
    fits = (weight.dim() == 2 and weight.dtype != torch.int8 and gate_up.shape[-1] == 2 * weight.shape[1]
            and (bias is None or bias.shape == (weight.shape[0],)) and 0 < rows <= FUSED_MAX_M)
    if fits and _kernels_take(gate_up, weight, bias):
        return launch_kernels(gate_up, weight, None, bias, swiglu=True)
    return swiglu_linear(gate_up, weight, bias)
