"""swiglu: the Triton kernels (interpreter on CPU) against the torch reference, forward and backward."""

import pytest
import torch
from _judge import grads, judge, leaf

from flashlm import ops
from flashlm.errors import InputError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 75), (2, 37, 2 * 75), (3, 1300)])
def test_swiglu_matches_reference(shape, dtype):
    gu = torch.randn(shape) * 3
    truth_in, low_in, got_in = leaf(gu, torch.float32), leaf(gu, dtype), leaf(gu, dtype)
    truth, ref, got = ops.swiglu_ref(truth_in), ops.swiglu_ref(low_in), ops.swiglu(got_in)
    judge(got, ref, truth.to(dtype), dtype, "out")
    g = torch.randn(truth.shape)
    judge(grads(got, [got_in], [g.to(dtype)]), grads(ref, [low_in], [g.to(dtype)]),
          grads(truth, [truth_in], [g]), dtype, "grad", factor=3.0)


def test_swiglu_non_contiguous_grad_and_rows():
    """A gate_up slice with a row stride wider than 2 * I, and a transposed upstream gradient."""
    base = torch.randn(6, 2 * 40 + 8)
    gu = base[:, :80]
    assert gu.stride(0) == 88
    got_in, ref_in = leaf(gu, torch.float32), leaf(gu, torch.float32)
    g = torch.randn(40, 6).t()
    torch.testing.assert_close(ops.swiglu(base[:, :80]), ops.swiglu_ref(base[:, :80]))
    (a,) = grads(ops.swiglu(got_in), [got_in], [g])
    (b,) = grads(ops.swiglu_ref(ref_in), [ref_in], [g])
    torch.testing.assert_close(a, b)


def test_odd_width_is_refused():
    with pytest.raises(InputError, match="2 \\* intermediate"):
        ops.swiglu(torch.randn(2, 7))


def test_swiglu_sized_switches_at_the_threshold(monkeypatch):
    import sys

    module = sys.modules["flashlm.ops.swiglu"]
    gu = torch.randn(3, 4, 2 * 30, dtype=torch.float16)
    monkeypatch.setattr(module, "SIZED_MIN_NUMEL", gu.numel() + 1)
    assert ops.swiglu_sized(gu).equal(ops.swiglu_ref(gu))
    monkeypatch.setattr(module, "SIZED_MIN_NUMEL", gu.numel())
    assert ops.swiglu_sized(gu).equal(ops.swiglu(gu))
