"""gemv / linear: the batch-1 decode GEMV (Triton; the interpreter on CPU) against F.linear."""

import importlib

import pytest
import torch

from flashlm import ops
from flashlm.errors import InputError

gemv_mod = importlib.import_module("flashlm.ops.gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("out_features,in_features", [(1, 7), (37, 130), (64, 1100)])
@pytest.mark.parametrize("config", gemv_mod.CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}")
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(out_features, in_features, dtype, config, bias):
    gen = torch.Generator().manual_seed(out_features * in_features)
    x = torch.randn(1, 1, in_features, generator=gen).to(dtype)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    got = ops.gemv(x, w, b, config)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (1, 1, out_features) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), want, atol=tol * in_features ** 0.5, rtol=tol)


def test_gemv_takes_one_row_of_a_strided_weight_and_refuses_the_rest():
    w = torch.randn(40, 24)[:, :16]  # non-contiguous rows
    x = torch.randn(16)
    torch.testing.assert_close(ops.gemv(x, w), w @ x, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="one row"):
        ops.gemv(torch.randn(2, 16), w)
    with pytest.raises(InputError, match="share a dtype"):
        ops.gemv(x.half(), w)


def test_linear_is_f_linear_off_cuda_and_for_several_rows():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(ops.linear(x[:1], w, b), torch.nn.functional.linear(x[:1], w, b))
    assert not gemv_mod._CHOICE  # nothing measured on the CPU


@pytest.mark.cuda
def test_linear_on_cuda_measures_once_and_stays_close_to_cublas():
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 2048, device="cuda", dtype=torch.bfloat16) / 45
    with torch.inference_mode():
        got = ops.linear(x, w)
        key = ((3072, 2048), torch.bfloat16, x.device, False)
        assert key in gemv_mod._CHOICE
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=2e-2, rtol=2e-2)
        assert torch.equal(ops.linear(x, w), got)  # the same choice, the same numbers
