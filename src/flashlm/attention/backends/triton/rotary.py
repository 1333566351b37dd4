"""Rotary position embedding on BSHD tensors with per-row positions (a fused Triton kernel + a torch reference).

``apply_rotary_bshd(x, cos, sin)`` rotates the first ``rotary_dim = 2 * cos.shape[-1]`` dims of each
head of ``x`` (batch, seqlen, nheads, headdim) by the angles whose cos/sin the caller gathered per row
and position ((batch, seqlen, rotary_dim // 2), fp32): left-padded rows and packed sequences have
their own positions. Non-rotated tail dims pass through. ``interleaved=False`` is the GPT-NeoX /
HF "rotate_half" pairing (d, d + rotary_dim/2); ``True`` the GPT-J pairing (2d, 2d + 1).

The kernel runs for CUDA tensors (one program per (batch, position), all heads at once, so cos/sin
are read once per token); CPU tensors take the torch reference. The kernel is jitted on first use,
so importing this module never depends on how TRITON_INTERPRET is set at import time.
"""

import functools

import torch

from ....errors import InputError
from . import is_compiling

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None

    class tl:
        constexpr = None


def apply_rotary_bshd_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          interleaved: bool = False) -> torch.Tensor:
    """Torch reference of ``apply_rotary_bshd`` (math in fp32, result in x's dtype)."""
    r2 = cos.shape[-1]
    rd = 2 * r2
    c = cos[:, :, None, :].float()
    s = sin[:, :, None, :].float()
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :r2], xr[..., r2:]
        rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., rd:]], dim=-1)


def _rotary_kernel(X, COS, SIN, OUT, seqlen, nheads,
                   stride_xb, stride_xs, stride_xh, stride_cb, stride_cs, stride_sb, stride_ss,
                   stride_ob, stride_os, stride_oh,
                   HEAD_DIM: tl.constexpr, R2: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                   BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // seqlen).to(tl.int64)
    s = (pid % seqlen).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R2)
    r_ok = offs_r < R2
    c = tl.load(COS + b * stride_cb + s * stride_cs + offs_r, mask=r_ok, other=1.0)
    sn = tl.load(SIN + b * stride_sb + s * stride_ss + offs_r, mask=r_ok, other=0.0)
    if CONJUGATE:  # rotation by -theta: the backward
        sn = -sn
    if INTERLEAVED:
        d1 = 2 * offs_r
        d2 = 2 * offs_r + 1
    else:
        d1 = offs_r
        d2 = offs_r + R2
    h_ok = offs_h < nheads
    mask = h_ok[:, None] & r_ok[None, :]
    x_row = X + b * stride_xb + s * stride_xs + offs_h[:, None] * stride_xh
    o_row = OUT + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh
    x1 = tl.load(x_row + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + d1[None, :], (x1 * c[None, :] - x2 * sn[None, :]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_row + d2[None, :], (x2 * c[None, :] + x1 * sn[None, :]).to(OUT.dtype.element_ty), mask=mask)
    if BLOCK_TAIL > 0:  # dims past rotary_dim are copied
        offs_t = 2 * R2 + tl.arange(0, BLOCK_TAIL)
        t_mask = h_ok[:, None] & (offs_t[None, :] < HEAD_DIM)
        tl.store(o_row + offs_t[None, :], tl.load(x_row + offs_t[None, :], mask=t_mask), mask=t_mask)


@functools.cache
def _kernel():
    return triton.jit(_rotary_kernel)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                   conjugate: bool) -> torch.Tensor:
    batch, seqlen, nheads, head_dim = x.shape
    r2 = cos.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return out
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    block_h = min(_next_pow2(nheads), 16)
    tail = head_dim - 2 * r2
    _kernel()[(batch * seqlen, triton.cdiv(nheads, block_h))](
        x, cos, sin, out, seqlen, nheads,
        *x.stride()[:3], cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), *out.stride()[:3],
        HEAD_DIM=head_dim, R2=r2, BLOCK_R2=max(_next_pow2(r2), 2), BLOCK_TAIL=_next_pow2(tail) if tail else 0,
        BLOCK_H=block_h, INTERLEAVED=interleaved, CONJUGATE=conjugate, num_warps=4 if x.is_cuda else 1,
    )
    return out


@torch.library.custom_op("flashlm_triton::rotary", mutates_args=(),
                         schema="(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool conjugate) -> Tensor")
def rotary_op(x, cos, sin, interleaved, conjugate):
    return _rotary_launch(x, cos, sin, interleaved, conjugate)


@rotary_op.register_fake
def _(x, cos, sin, interleaved, conjugate):
    return torch.empty_like(x)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin)
    ctx.flags = (interleaved, conjugate)


def _rotary_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    interleaved, conjugate = ctx.flags
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    return rotary_op(grad, cos, sin, interleaved, not conjugate), None, None, None, None


rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)


class RotaryFunction(torch.autograd.Function):
    """Eager twin of ``flashlm_triton::rotary`` with its autograd formula (same launcher, outputs and
    gradients, differentiable twice like the op) without the op's ~150 us host-side dispatch per call
    and per generated backward. Not traceable by torch.compile: compiled code calls ``rotary_op``."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, conjugate):
        ctx.save_for_backward(cos, sin)
        ctx.flags = (interleaved, conjugate)
        return _rotary_launch(x, cos, sin, interleaved, conjugate)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        interleaved, conjugate = ctx.flags
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _rotary(grad, cos, sin, interleaved, not conjugate), None, None, None, None


def _rotary(x, cos, sin, interleaved: bool, conjugate: bool) -> torch.Tensor:
    """The custom op under torch.compile; in eager mode the launcher itself when no gradient is
    needed, else ``RotaryFunction``."""
    if is_compiling():
        return rotary_op(x, cos, sin, interleaved, conjugate)
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return RotaryFunction.apply(x, cos, sin, interleaved, conjugate)
    return _rotary_launch(x, cos, sin, interleaved, conjugate)


def apply_rotary_bshd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      interleaved: bool = False) -> torch.Tensor:
    """Rotate x (batch, seqlen, nheads, headdim) by per-row angles; returns a new tensor in x's dtype.

    cos, sin: (batch, seqlen, rotary_dim // 2), fp32 (any float dtype works), rotary_dim <= headdim.
    Differentiable in x. CUDA tensors run the Triton kernel, others the torch reference.
    """
    if x.dim() != 4:
        raise InputError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    expected = (x.shape[0], x.shape[1])
    if cos.shape != sin.shape or cos.dim() != 3 or tuple(cos.shape[:2]) != expected:
        raise InputError(f"cos/sin must both be (batch, seqlen, rotary_dim // 2) = {expected} + (r,), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if 2 * cos.shape[-1] > x.shape[-1]:
        raise InputError(f"rotary_dim {2 * cos.shape[-1]} exceeds headdim {x.shape[-1]}")
    if x.is_cuda and triton is not None:
        if x.stride(-1) != 1:
            x = x.contiguous()
        return _rotary(x, cos, sin, interleaved, False)
    return apply_rotary_bshd_ref(x, cos, sin, interleaved)
