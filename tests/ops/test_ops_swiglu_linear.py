"""swiglu_linear (SwiGLU + the down projection, the activation not saved): the Triton op (interpreter on
CPU), its torch recompute twin and the custom op's autograd formula against F.linear(swiglu_ref(.)),
forward and every gradient; what autograd saves; the sized switch."""

import importlib

import pytest
import torch
from _judge import grads, judge, leaf

from flashlm import ops
from flashlm.errors import InputError

swi = importlib.import_module("flashlm.ops.swiglu")  # flashlm.ops.swiglu is the function
IMPLS = {"triton": ops.swiglu_linear, "recompute": ops.swiglu_linear_recompute,
         "custom_op": swi._swiglu_linear_fwd_op}  # the op torch.compile traces, run eagerly here


def _inputs(shape, out, bias):
    gu = torch.randn(shape) * 3
    w = torch.randn(out, shape[-1] // 2) / (shape[-1] // 2) ** 0.5
    return [gu, w] + ([torch.randn(out)] if bias else [])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape,out", [((1, 1, 2 * 75), 33), ((2, 37, 2 * 80), 48), ((29, 2 * 650), 17)])
def test_swiglu_linear_matches_reference(impl, dtype, bias, shape, out):
    """Forward and the gradients of gate_up, weight and bias within 2x (3x) the torch reference's own
    error in the same dtype against the truth (fp64: weight's gradient sums over the rows, so fp32's
    own rounding is not negligible against the fp32 atol)."""
    inputs = _inputs(shape, out, bias)
    truth_in, low_in, got_in = ([leaf(t, d) for t in inputs] for d in (torch.float64, dtype, dtype))
    truth, ref, got = ops.swiglu_linear_ref(*truth_in), ops.swiglu_linear_ref(*low_in), IMPLS[impl](*got_in)
    judge(got, ref, truth.to(dtype), dtype, "out")
    g = torch.randn(truth.shape)
    judge(grads(got, got_in, [g.to(dtype)]), grads(ref, low_in, [g.to(dtype)]), grads(truth, truth_in, [g]),
          dtype, "grad", factor=3.0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("wanted", [(0,), (1,), (1, 2), (0, 2)])
def test_only_the_needed_gradients(impl, wanted):
    """Frozen inputs get no gradient; the others are the reference's (fp32: the same math)."""
    inputs = _inputs((3, 5, 2 * 24), 16, True)
    got_in = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    ref_in = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    got, ref = IMPLS[impl](*got_in), ops.swiglu_linear_ref(*ref_in)
    g = torch.randn(got.shape)
    got.backward(g)
    ref.backward(g)
    for a, b in zip(got_in, ref_in, strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_kernel_recomputes_the_forward_activation_bitwise(dtype):
    """One pass writes grad_gate_up and (STORE_ACT) the activation exactly as _fwd_kernel does."""
    gu = (torch.randn(7, 2 * 80) * 3).to(dtype)
    d_act = torch.randn(7, 80).to(dtype)
    dgu, act = swi._launch_bwd_act(d_act, gu)
    assert act.equal(swi._launch_fwd(gu)) and dgu.equal(swi._launch_bwd(d_act, gu))


def _saved(fn, *args):
    """(shapes, bytes) of the tensors autograd saves for fn(*args)'s backward."""
    shapes, nbytes = [], 0

    def pack(t):
        nonlocal nbytes
        shapes.append(tuple(t.shape))
        nbytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return shapes, nbytes


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("bias", [False, True])
def test_the_activation_is_not_saved(impl, bias):
    """The op saves gate_up and weight only; the reference also saves the activation and silu(gate)."""
    gu, w, *b = (leaf(t, torch.float32) for t in _inputs((2, 9, 2 * 40), 24, bias))
    act_shape = (2, 9, 40)
    shapes, nbytes = _saved(IMPLS[impl], gu, w, *b)
    assert sorted(shapes) == sorted([tuple(gu.shape), tuple(w.shape)])
    ref_shapes, ref_bytes = _saved(ops.swiglu_linear_ref, gu, w, *b)
    assert act_shape in ref_shapes
    assert ref_bytes - nbytes >= 2 * 9 * 40 * 4  # at least the activation's bytes


def test_bad_inputs_are_refused():
    gu, w = torch.randn(2, 2 * 8), torch.randn(5, 8)
    for fn in (ops.swiglu_linear, ops.swiglu_linear_recompute, ops.swiglu_linear_sized):
        with pytest.raises(InputError, match="2 \\* intermediate"):
            fn(torch.randn(2, 7), w)
        with pytest.raises(InputError, match="weight must be \\(out, 8\\)"):
            fn(gu, torch.randn(5, 9))
        with pytest.raises(InputError, match="bias must be \\(5,\\)"):
            fn(gu, w, torch.randn(4))


def test_sized_switches_at_the_threshold(monkeypatch):
    gu, w = (leaf(t, torch.float16) for t in _inputs((3, 4, 2 * 30), 8, False))
    monkeypatch.setattr(swi, "SIZED_MIN_NUMEL", gu.numel() + 1)
    assert type(ops.swiglu_linear_sized(gu, w).grad_fn).__name__.startswith("_SwiGLULinearRecompute")
    monkeypatch.setattr(swi, "SIZED_MIN_NUMEL", gu.numel())
    assert type(ops.swiglu_linear_sized(gu, w).grad_fn).__name__.startswith("_SwiGLULinearFunction")


@pytest.mark.parametrize("impl", ["triton", "recompute"])
def test_autocast_casts_like_f_linear(impl):
    """Under autocast, after an autocast gate_up projection (as in the model), the op casts weight and
    bias as F.linear does; the fp32 parameters get fp32 gradients, as the reference's."""
    x, w_gu = leaf(torch.randn(2, 5, 12), torch.float32), leaf(torch.randn(2 * 16, 12) / 12**0.5, torch.float32)
    _, w, b = (leaf(t, torch.float32) for t in _inputs((2 * 16,), 8, True))
    params = [x, w_gu, w, b]
    ref_params = [leaf(t, torch.float32) for t in params]
    with torch.autocast("cpu", dtype=torch.float16):
        got = IMPLS[impl](torch.nn.functional.linear(x, w_gu), w, b)
        ref = ops.swiglu_linear_ref(torch.nn.functional.linear(*ref_params[:2]), *ref_params[2:])
    assert got.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    g = torch.randn(got.shape, dtype=torch.float16)
    for a, r in zip(grads(got, params, [g]), grads(ref, ref_params, [g]), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, atol=2e-3, rtol=2e-3)


def test_custom_op_opcheck():
    """Schema, fake (meta) and autograd registration of the op torch.compile traces."""
    gu, w, b = (leaf(t, torch.float32) for t in _inputs((2, 3, 2 * 12), 8, True))
    torch.library.opcheck(swi._swiglu_linear_fwd_op, (gu, w, b))
    torch.library.opcheck(swi._swiglu_linear_fwd_op, (gu, w, None))
    torch.library.opcheck(swi._swiglu_bwd_act_op, (torch.randn(2, 3, 12), gu.detach()))
