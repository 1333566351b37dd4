"""rms_norm / add_rms_norm: the Triton kernels (interpreter on CPU) against the torch reference,
forward and backward, Dao's rule, odd hidden sizes, one token and many tokens."""

import pytest
import torch
from _judge import grads, judge, leaf

from flashlm import ops
from flashlm.errors import InputError
from flashlm.models.reference import RMSNorm

SHAPES = [(1, 1, 77), (2, 37, 77), (3, 5, 300)]
DTYPES = [torch.float32, torch.float16]


def _draw(shape, unit_offset):
    x, r = torch.randn(shape), torch.randn(shape)
    w = torch.randn(shape[-1]) * 0.1 + (0.0 if unit_offset else 1.0)
    return x, r, w


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, unit_offset):
    x, _, w = _draw(shape, unit_offset)
    eps = 1e-6
    truth_in = (leaf(x, torch.float32), leaf(w, torch.float32))
    low_in = (leaf(x, dtype), leaf(w, dtype))
    got_in = (leaf(x, dtype), leaf(w, dtype))
    truth = ops.rms_norm_ref(*truth_in, eps, unit_offset)
    ref = ops.rms_norm_ref(*low_in, eps, unit_offset)
    got = ops.rms_norm(*got_in, eps, unit_offset)
    judge(got, ref, truth.to(dtype), dtype, "y")
    g = torch.randn(shape)
    judge(grads(got, got_in, [g.to(dtype)]), grads(ref, low_in, [g.to(dtype)]),
          grads(truth, truth_in, [g]), dtype, "grad", factor=3.0)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_reference(shape, dtype, unit_offset):
    x, r, w = _draw(shape, unit_offset)
    eps = 1e-5
    truth_in = (leaf(x, torch.float32), leaf(r, torch.float32), leaf(w, torch.float32))
    low_in = (leaf(x, dtype), leaf(r, dtype), leaf(w, dtype))
    got_in = (leaf(x, dtype), leaf(r, dtype), leaf(w, dtype))
    truth = ops.add_rms_norm_ref(*truth_in, eps, unit_offset)
    ref = ops.add_rms_norm_ref(*low_in, eps, unit_offset)
    got = ops.add_rms_norm(*got_in, eps, unit_offset)
    judge(got, ref, tuple(t.to(dtype) for t in truth), dtype, "(y, new_residual)")
    gy, gs = torch.randn(shape), torch.randn(shape)
    judge(grads(got, got_in, [gy.to(dtype), gs.to(dtype)]), grads(ref, low_in, [gy.to(dtype), gs.to(dtype)]),
          grads(truth, truth_in, [gy, gs]), dtype, "grad", factor=3.0)


def test_rms_norm_fp32_weight_promotes_like_the_module():
    """fp32 master weights with fp16 activations: HF's ``weight * x.to(dtype)`` gives fp32; so do we."""
    x = torch.randn(4, 33, dtype=torch.float16)
    norm = RMSNorm(33, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(33))
        want = norm(x)
        assert ops.rms_norm_ref(x, norm.weight, 1e-6) .equal(want)
        got = ops.rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_add_rms_norm_grads_of_x_and_residual_are_one_tensor_value():
    x, r, w = (leaf(t, torch.float32) for t in _draw((2, 3, 40), False))
    y, s = ops.add_rms_norm(x, r, w, 1e-6)
    gx, gr = torch.autograd.grad((y, s), (x, r), (torch.randn_like(y), torch.randn_like(s)))
    assert gx.equal(gr)


def test_no_grad_path_equals_grad_path():
    x, r, w = _draw((2, 3, 50), False)
    with torch.no_grad():
        y0, s0 = ops.add_rms_norm(x, r, w, 1e-6)
    y1, s1 = ops.add_rms_norm(x, r, w.requires_grad_(True), 1e-6)
    assert y0.equal(y1) and s0.equal(s1)


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(InputError, match="residual must match"):
        ops.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float16), torch.randn(8), 1e-6)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_aten_variant_within_dao_rule(unit_offset):
    """F.rms_norm rounds once instead of HF's twice: within Dao's rule of the reference, forward and
    backward; Gemma's offset and mixed dtypes take the Triton kernel (exact semantics)."""
    x, r, w = _draw((3, 7, 130), unit_offset)
    dtype = torch.float16
    truth_in, low_in, got_in = (leaf(x, torch.float32), leaf(r, torch.float32), leaf(w, torch.float32)), \
        (leaf(x, dtype), leaf(r, dtype), leaf(w, dtype)), (leaf(x, dtype), leaf(r, dtype), leaf(w, dtype))
    truth = ops.add_rms_norm_ref(*truth_in, 1e-6, unit_offset)
    ref = ops.add_rms_norm_ref(*low_in, 1e-6, unit_offset)
    got = ops.add_rms_norm_aten(*got_in, 1e-6, unit_offset)
    judge(got, ref, tuple(t.to(dtype) for t in truth), dtype, "(y, new_residual)")
    gy, gs = torch.randn(x.shape), torch.randn(x.shape)
    judge(grads(got, got_in, [gy.to(dtype), gs.to(dtype)]), grads(ref, low_in, [gy.to(dtype), gs.to(dtype)]),
          grads(truth, truth_in, [gy, gs]), dtype, "grad", factor=3.0)
