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
import torch.nn.functional as F

from flashlm._util import next_pow2
from flashlm.errors import InputError

from ._dispatch import dispatch, num_programs, row_warps, triton

if triton is not None:
    import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Torch reference (== ``flashlm.models.reference.RMSNorm``). x (..., N), weight (N,)."""
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



if triton is not None:

    @triton.jit
    def _fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
                    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, OFFSET: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:  # new_residual = x + residual, rounded to x's dtype as the eager add does
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(S.dtype.element_ty)
            tl.store(S + row * stride_s + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = xf * rstd
        if OFFSET:  # Gemma: (1 + w) in fp32, one cast
            y = xhat * (1.0 + w)
        else:  # Llama: cast to x's dtype before the weight multiply
            y = xhat.to(x.dtype).to(tl.float32) * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(DY, DS, X, W, RSTD, DX, DW, stride_dy, stride_ds, stride_x, stride_dx, n_rows, n_cols,
                    BLOCK: tl.constexpr, HAS_DRES: tl.constexpr, OFFSET: tl.constexpr):
        # Persistent: program p owns rows p, p + P, ... and writes its fp32 partial of grad_w to DW[p].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if OFFSET:
            w = w + 1.0
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        step = tl.num_programs(0)
        for i in range(tl.cdiv(n_rows - pid, step)):
            row = pid.to(tl.int64) + i * step
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x.to(tl.float32) * rstd
            if OFFSET:
                dw += dy * xhat
            else:  # the weight multiplied the rounded xhat
                dw += dy * xhat.to(x.dtype).to(tl.float32)
            wdy = w * dy
            dx = rstd * (wdy - xhat * (tl.sum(wdy * xhat, axis=0) / n_cols))
            if HAS_DRES:
                dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., N) as (rows, N) with a contiguous last dim (a view when the strides allow)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(x, residual, weight, eps, unit_offset):
    """-> (y, new_residual or None, rstd (rows,) fp32), y and new_residual shaped like x."""
    n = x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if residual is None:
        r2 = s = x2
    else:
        r2 = _rows(residual)
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows:
        block = next_pow2(n)
        _fwd_kernel[(rows,)](x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), n, n, n, eps,
                             BLOCK=block, HAS_RES=residual is not None, OFFSET=unit_offset,
                             num_warps=row_warps(block))
    return y, (None if residual is None else s), rstd


def _launch_bwd(dy, ds, x, weight, rstd, unit_offset):
    """-> (dx shaped like x, dw like weight). ds: the new_residual's gradient (add_rms_norm) or None."""
    n = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = dy2 if ds is None else _rows(ds)
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = max(min(num_programs(x.device), rows), 1)
    # every program writes its partial row; with no rows the one partial must start at zero
    dw = (torch.empty if rows else torch.zeros)((programs, n), dtype=torch.float32, device=x.device)
    if rows:
        block = next_pow2(n)
        _bwd_kernel[(programs,)](dy2, ds2, x2, weight, rstd, dx, dw, dy2.stride(0), ds2.stride(0),
                                 x2.stride(0), n, rows, n, BLOCK=block, HAS_DRES=ds is not None,
                                 OFFSET=unit_offset, num_warps=row_warps(block))
    return dx, dw.sum(0, dtype=weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        y, _, rstd = _launch_fwd(x, None, weight, eps, unit_offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _launch_bwd(dy, None, x, weight, rstd, ctx.unit_offset)
        return dx, dw, None, None


class _AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, unit_offset):
        y, s, rstd = _launch_fwd(x, residual, weight, eps, unit_offset)
        ctx.save_for_backward(s, weight, rstd)
        ctx.unit_offset = unit_offset
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = _launch_bwd(dy, ds, s, weight, rstd, ctx.unit_offset)
        return dx, dx, dw, None, None


# torch.compile path: custom ops (opaque to inductor) with fakes and autograd formulas.
@torch.library.custom_op("flashlm_ops::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = _launch_fwd(x, residual, weight, eps, unit_offset)
    return y, (torch.empty(0, dtype=x.dtype, device=x.device) if s is None else s), rstd


@_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps, unit_offset):
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    s = x.new_empty(0) if residual is None else torch.empty_like(x)
    return x.new_empty(x.shape, dtype=out_dtype), s, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("flashlm_ops::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor, unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(dy, ds, x, weight, rstd, unit_offset)


@_rms_norm_bwd_op.register_fake
def _(dy, ds, x, weight, rstd, unit_offset):
    return torch.empty_like(x), torch.empty_like(weight)


def _op_setup(ctx, inputs, output):
    x, residual, weight, _, unit_offset = inputs
    ctx.save_for_backward(x if residual is None else output[1], weight, output[2])
    ctx.unit_offset, ctx.has_res = unit_offset, residual is not None


def _op_backward(ctx, dy, ds, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(dy, ds if ctx.has_res else None, x, weight, rstd, ctx.unit_offset)
    return dx, (dx if ctx.has_res else None), dw, None, None


_rms_norm_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def _rms_norm_nograd(x, weight, eps, unit_offset):
    return _launch_fwd(x, None, weight, eps, unit_offset)[0]


def _rms_norm_compiled(x, weight, eps, unit_offset):
    return _rms_norm_fwd_op(x, None, weight, eps, unit_offset)[0]


def _add_rms_norm_nograd(x, residual, weight, eps, unit_offset):
    y, s, _ = _launch_fwd(x, residual, weight, eps, unit_offset)
    return y, s


def _add_rms_norm_compiled(x, residual, weight, eps, unit_offset):
    y, s, _ = _rms_norm_fwd_op(x, residual, weight, eps, unit_offset)
    return y, s


_rms_norm = dispatch(_RMSNormFunction, _rms_norm_nograd, _rms_norm_compiled, rms_norm_ref)
_add_rms_norm = dispatch(_AddRMSNormFunction, _add_rms_norm_nograd, _add_rms_norm_compiled, add_rms_norm_ref)


def _check(x: torch.Tensor, weight: torch.Tensor, where: str) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise InputError(f"{where}: weight must be (N,) with N = x.shape[-1] = {x.shape[-1]}, got weight "
                         f"{tuple(weight.shape)}; pass the norm's (hidden,) weight")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Fused RMSNorm (Triton) over the last dim. x (..., N) with a contiguous last dim, weight (N,).
    Returns y shaped like x, dtype ``promote(x.dtype, weight.dtype)`` (x.dtype with ``unit_offset``)."""
    _check(x, weight, "rms_norm")
    return _rms_norm(x, weight, eps, unit_offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm (Triton). x, residual (..., N) same shape and dtype, weight (N,).
    Returns (y, new_residual = x + residual), both shaped like x."""
    _check(x, weight, "add_rms_norm")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise InputError(f"add_rms_norm: residual must match x's shape and dtype {tuple(x.shape)} {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    return _add_rms_norm(x, residual, weight, eps, unit_offset)


def rms_norm_aten(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """torch's own fused ``F.rms_norm`` (one CUDA kernel forward, C++ autograd): the least host time
    per call on the H200 (the run behind commit 2458bb7: 159 us fwd+bwd vs 708 for the 6-op torch RMSNorm).
    It rounds once (normalized x times weight in fp32, then the cast), not twice as HF Llama does:
    results differ from :func:`rms_norm_ref` by at most one ulp, on the side of the fp32 truth.
    Taken when x and weight share a dtype and ``unit_offset`` is False; otherwise :func:`rms_norm`."""
    if unit_offset or weight.dtype != x.dtype:
        return rms_norm(x, weight, eps, unit_offset)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm_aten(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + residual`` then :func:`rms_norm_aten`: two aten ops, no Python autograd."""
    new_residual = x + residual
    return rms_norm_aten(new_residual, weight, eps, unit_offset), new_residual
