"""Greedy picks: the two-pass argmax that CUDA decode steps use over a wide vocab equals torch's."""

import pytest
import torch

from flashlm.generation.sampling import _argmax_two_pass, argmax_rows, sample_next_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_two_pass_argmax_equals_torch_with_ties_and_nan(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1024, generator=gen).to(dtype)
    x[1] = 0.0  # all tied: the first index
    x[2, 700] = x[2, 300] = 50.0  # a tie across groups: the first one
    x[3, 260] = x[3, 259] = 50.0  # a tie inside a group
    x[4, 900] = float("nan")  # NaN is the maximum, as in torch
    x[5] = x[5].round()  # many ties
    assert torch.equal(_argmax_two_pass(x), x.argmax(-1))
    assert _argmax_two_pass(x).tolist()[:5] == [int(x[0].float().argmax()), 0, 300, 259, 900]


def test_argmax_rows_and_greedy_sampling_keep_torch_on_cpu_and_narrow_vocabs():
    x = torch.randn(3, 1000)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert torch.equal(sample_next_token(x), x.argmax(-1))


@pytest.mark.cuda
def test_argmax_rows_on_cuda_equals_torch():
    x = torch.randn(32, 128256, device="cuda", dtype=torch.bfloat16).round()
    assert torch.equal(argmax_rows(x), x.argmax(-1))
