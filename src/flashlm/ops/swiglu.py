"""SwiGLU on the fused gate/up projection output.

``swiglu(gate_up) -> silu(gate) * up`` where gate_up (..., 2 * I) holds ``[gate | up]`` halves
along the last dim. Rounding as torch's ``F.silu(gate) * up`` in the input dtype (silu rounded to
the dtype, then the product rounded). The backward writes grad_gate_up as ONE tensor in one kernel.

``swiglu_linear(gate_up, weight, bias) -> F.linear(swiglu(gate_up), weight, bias)``: the MLP's
activation and down projection as one autograd node that saves gate_up and weight but never the
activation (tokens x I per layer, ~4.3 GB of llama-1b's bs8x2048 training peak); the backward
recomputes it in the same kernel pass that writes grad_gate_up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flashlm._util import next_pow2
from flashlm.errors import InputError

from ._dispatch import SIZED_MIN_NUMEL, autocast_linear_inputs, dispatch, triton

if triton is not None:
    import triton.language as tl


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference: gate_up (..., 2 * I) -> (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_BLOCK = 1024  # columns per program: (rows, cdiv(I, _BLOCK)) programs

if triton is not None:

    @triton.jit
    def _fwd_kernel(GU, OUT, n_cols, stride_gu, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
        up = tl.load(GU + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g * tl.sigmoid(g)).to(gate.dtype)  # torch rounds silu to the dtype, then the product
        tl.store(OUT + row * n_cols + cols, (act.to(tl.float32) * up.to(tl.float32)).to(OUT.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _bwd_kernel(DO, GU, DGU, ACT, n_cols, stride_do, stride_gu, BLOCK: tl.constexpr, STORE_ACT: tl.constexpr):
        """grad_gate_up (one tensor) and, with STORE_ACT, the activation recomputed and rounded exactly
        as _fwd_kernel stores it (swiglu_linear's backward: the activation was not saved)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
        up = tl.load(GU + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dgate = do * up * sig * (1.0 + g * (1.0 - sig))
        out = DGU + row * (2 * n_cols) + cols
        tl.store(out, dgate.to(DGU.dtype.element_ty), mask=mask)
        tl.store(out + n_cols, (do * silu).to(DGU.dtype.element_ty), mask=mask)
        if STORE_ACT:
            act = silu.to(gate.dtype)
            tl.store(ACT + row * n_cols + cols, (act.to(tl.float32) * up).to(ACT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    gu = _rows(gate_up)
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0] and inter:
        block = min(next_pow2(inter), _BLOCK)
        _fwd_kernel[(gu.shape[0], triton.cdiv(inter, block))](gu, out, inter, gu.stride(0), BLOCK=block)
    return out


def _launch_bwd(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    gu, do = _rows(gate_up), _rows(grad)
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0] and inter:
        block = min(next_pow2(inter), _BLOCK)
        _bwd_kernel[(gu.shape[0], triton.cdiv(inter, block))](do, gu, dgu, dgu, inter, do.stride(0), gu.stride(0),
                                                              BLOCK=block, STORE_ACT=False)
    return dgu


def _launch_bwd_act(grad: torch.Tensor, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (..., I) of the activation, gate_up (..., 2 * I) -> (grad_gate_up (..., 2 * I), the
    activation as (rows, I), bitwise the forward's) in one pass over gate_up."""
    inter = gate_up.shape[-1] // 2
    gu, do = _rows(gate_up), _rows(grad)
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    act = torch.empty((gu.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0] and inter:
        block = min(next_pow2(inter), _BLOCK)
        _bwd_kernel[(gu.shape[0], triton.cdiv(inter, block))](do, gu, dgu, act, inter, do.stride(0),
                                                              gu.stride(0), BLOCK=block, STORE_ACT=True)
    return dgu, act


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _launch_fwd(gate_up)

    @staticmethod
    def backward(ctx, grad):
        return _launch_bwd(grad, ctx.saved_tensors[0])


@torch.library.custom_op("flashlm_ops::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate_up: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(gate_up)


@_swiglu_fwd_op.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("flashlm_ops::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return _launch_bwd(grad, gate_up)


@_swiglu_bwd_op.register_fake
def _(grad, gate_up):
    return torch.empty_like(gate_up)


def _op_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _op_backward(ctx, grad):
    return _swiglu_bwd_op(grad, ctx.saved_tensors[0])


_swiglu_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)
_swiglu = dispatch(_SwiGLUFunction, _launch_fwd, _swiglu_fwd_op, swiglu_ref)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU (Triton). gate_up (..., 2 * I) with a contiguous last dim -> (..., I) contiguous."""
    _check_width("swiglu", gate_up)
    return _swiglu(gate_up)


def _check_width(name: str, gate_up: torch.Tensor) -> None:
    if gate_up.shape[-1] % 2:
        raise InputError(f"{name}: gate_up's last dim must be 2 * intermediate ([gate | up]), got "
                         f"{gate_up.shape[-1]} (odd)")


# Below this many gate_up elements torch's two ops cost less host time than our kernel's autograd
# Function; above it our one-pass kernel wins on GPU time. H200 (`flashlm bench ops`, the run behind
# commit 1659dfa), fwd+bwd: seed
# shape (2M elements) torch 218 vs Triton 373 us host; llama-1b (268M) torch 1932 vs Triton 523 us
# wall: the ~155 us host premium is repaid at ~30M elements (a linear fit of the two points).
def swiglu_sized(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_ref` for small inputs (host-bound), :func:`swiglu` (Triton) from
    ``SIZED_MIN_NUMEL`` elements of gate_up on."""
    if gate_up.numel() < SIZED_MIN_NUMEL:
        return swiglu_ref(gate_up)
    return swiglu(gate_up)


# --- swiglu_linear: SwiGLU and the down projection as one node that does not save the activation ---


def swiglu_linear_ref(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: gate_up (..., 2 * I), weight (out, I), bias (out,) or None -> (..., out).
    Autograd saves the activation (..., I) for weight's gradient, and silu(gate) for the product's."""
    return F.linear(swiglu_ref(gate_up), weight, bias)


def _ref_bwd_act(grad: torch.Tensor, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`_launch_bwd_act`: swiglu_ref recomputed and differentiated by autograd, so
    both results are bitwise the reference's."""
    with torch.enable_grad():  # backward runs with grad mode off
        gu = gate_up.detach().requires_grad_(True)
        act = swiglu_ref(gu)
        (dgu,) = torch.autograd.grad(act, gu, grad)
    return dgu, act.detach()


# (grad_gate_up and the activation, grad_gate_up alone, the activation alone) from (grad, gate_up) /
# gate_up: what _linear_backward runs, per implementation
_TRITON_BWD = (_launch_bwd_act, _launch_bwd, _launch_fwd)
_TORCH_BWD = (_ref_bwd_act, lambda grad, gate_up: _ref_bwd_act(grad, gate_up)[0], swiglu_ref)


def _linear_backward(grad, gate_up, weight, needs, kernels) -> tuple:
    """(grad_gate_up (..., 2 * I), grad_weight (out, I), grad_bias (out,)) for grad (..., out), each
    None unless ``needs`` (autograd's needs_input_grad; False for an absent bias) asks for it.
    ``kernels``: as ``_TRITON_BWD``. The activation is recomputed only when weight needs a gradient."""
    both, grad_only, act_only = kernels
    grad_rows = grad.reshape(-1, grad.shape[-1])
    dgu = dw = act = None
    if needs[0]:
        d_act = grad @ weight  # (..., I), rounded as F.linear's backward rounds grad_input
        if needs[1]:
            dgu, act = both(d_act, gate_up)
        else:
            dgu = grad_only(d_act, gate_up)
    elif needs[1]:
        act = act_only(gate_up)
    if act is not None:
        dw = grad_rows.t() @ act.reshape(-1, act.shape[-1])
    return dgu, dw, grad_rows.sum(0) if needs[2] else None


def _swiglu_linear_launch(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(_launch_fwd(gate_up), weight, bias)


class _SwiGLULinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, bias):
        ctx.save_for_backward(gate_up, weight)  # never the activation: the point of the op
        return _swiglu_linear_launch(gate_up, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _linear_backward(grad, *ctx.saved_tensors, ctx.needs_input_grad, _TRITON_BWD)


class _SwiGLULinearRecompute(torch.autograd.Function):
    """The torch-only twin: swiglu_ref recomputed in the backward (no Triton needed)."""

    @staticmethod
    def forward(ctx, gate_up, weight, bias):
        ctx.save_for_backward(gate_up, weight)
        return swiglu_linear_ref(gate_up, weight, bias)  # grad mode is off here: nothing else saved

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _linear_backward(grad, *ctx.saved_tensors, ctx.needs_input_grad, _TORCH_BWD)


@torch.library.custom_op("flashlm_ops::swiglu_linear_fwd", mutates_args=())
def _swiglu_linear_fwd_op(gate_up: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    return _swiglu_linear_launch(gate_up, weight, bias)


@_swiglu_linear_fwd_op.register_fake
def _(gate_up, weight, bias=None):
    return gate_up.new_empty((*gate_up.shape[:-1], weight.shape[0]))


@torch.library.custom_op("flashlm_ops::swiglu_bwd_act", mutates_args=())
def _swiglu_bwd_act_op(grad: torch.Tensor, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd_act(grad, gate_up)


@_swiglu_bwd_act_op.register_fake
def _(grad, gate_up):
    return torch.empty_like(gate_up), gate_up.new_empty((math.prod(gate_up.shape[:-1]), gate_up.shape[-1] // 2))


def _linear_op_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _linear_op_backward(ctx, grad):
    # the matmuls stay traceable torch code (inductor sees them); only the elementwise pass is opaque
    needs = (*ctx.needs_input_grad, False)[:3]  # bias left out of the call: two entries
    return _linear_backward(grad, *ctx.saved_tensors, needs, (_swiglu_bwd_act_op, _swiglu_bwd_op, _swiglu_fwd_op))


_swiglu_linear_fwd_op.register_autograd(_linear_op_backward, setup_context=_linear_op_setup)
_swiglu_linear = dispatch(_SwiGLULinearFunction, _swiglu_linear_launch, _swiglu_linear_fwd_op, swiglu_linear_ref)
# torch code only: no device check (reference None); the reference compiled and without grad
_swiglu_linear_recompute = dispatch(_SwiGLULinearRecompute, swiglu_linear_ref, swiglu_linear_ref)


def _linear_inputs(name: str, gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """Validated inputs, cast as autocast casts F.linear's (:func:`autocast_linear_inputs`). gate_up is
    cast before the activation where F.linear would cast the activation: the same in the model, whose
    gate_up comes out of an autocast linear already in the autocast dtype."""
    _check_width(name, gate_up)
    inter = gate_up.shape[-1] // 2
    if weight.dim() != 2 or weight.shape[1] != inter:
        raise InputError(f"{name}: weight must be (out, {inter}) for gate_up {tuple(gate_up.shape)}, got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputError(f"{name}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    return autocast_linear_inputs(gate_up, weight, bias)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(swiglu(gate_up), weight, bias)`` (Triton SwiGLU) whose autograd saves gate_up and
    weight, not the activation: the backward's one kernel pass writes grad_gate_up and recomputes the
    activation (bitwise the forward's) for weight's gradient. gate_up (..., 2 * I) with a contiguous
    last dim, weight (out, I), bias (out,) or None -> (..., out)."""
    return _swiglu_linear(*_linear_inputs("swiglu_linear", gate_up, weight, bias))


def swiglu_linear_recompute(gate_up: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`swiglu_linear` in torch alone (no Triton): saves gate_up and weight, and recomputes
    :func:`swiglu_ref` in the backward. Shapes as :func:`swiglu_linear`. Under torch.compile the
    reference (AOTAutograd's partitioner recomputes cheap elementwise ops itself)."""
    return _swiglu_linear_recompute(*_linear_inputs("swiglu_linear_recompute", gate_up, weight, bias))


def swiglu_linear_sized(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`swiglu_linear_recompute` below ``SIZED_MIN_NUMEL`` elements of gate_up (host-bound, as
    :func:`swiglu_sized`), :func:`swiglu_linear` (Triton) from there on. Shapes as :func:`swiglu_linear`."""
    if gate_up.numel() < SIZED_MIN_NUMEL:
        return swiglu_linear_recompute(gate_up, weight, bias)
    return swiglu_linear(gate_up, weight, bias)
