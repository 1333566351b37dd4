"""Padding utils: unpad/pad round trips, cheap-backward gathers, packing from position ids."""

from __future__ import annotations

import pytest
import torch

from flashlm.attention import flash_attn_func, flash_attn_varlen_func
from flashlm.attention.padding import (
    get_unpad_data,
    index_first_axis,
    pad_input,
    position_ids_are_packed,
    prepare_from_position_ids,
    unpad_input,
)
from flashlm.errors import InputError


def test_get_unpad_data_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    indices, cu, max_len = get_unpad_data(mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 9, 9]
    assert indices.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert max_len == 5


def test_unpad_pad_round_trip_and_grads():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    h = torch.randn(2, 3, 4, requires_grad=True)
    hu, idx, _, max_len, used = unpad_input(h, mask)
    assert hu.shape == (4, 4) and used.tolist() == [2, 2] and used.dtype == torch.int32 and max_len == 2
    back = pad_input(hu, idx, 2, 3)
    torch.testing.assert_close(back, h * mask[..., None])
    (back * torch.arange(24.0).view(2, 3, 4)).sum().backward()
    torch.testing.assert_close(h.grad, torch.arange(24.0).view(2, 3, 4) * mask[..., None])


def test_index_first_axis_backward_is_scatter():
    x = torch.randn(6, 2, 3, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    y = index_first_axis(x, idx)
    torch.testing.assert_close(y, x[idx])
    y.sum().backward()
    assert x.grad[[1, 3, 5]].abs().sum() == 0 and (x.grad[[0, 2, 4]] == 1).all()
    with pytest.raises(InputError, match="indices"):
        index_first_axis(x, idx.float())


def test_unpad_then_varlen_equals_dense_with_left_padding():
    B, S, H, D = 3, 7, 4, 16
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, :6] = False
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, 2, D), torch.randn(B, S, 2, D)
    qu, idx, cu, max_len, _ = unpad_input(q, mask)
    ku, vu = unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    out = pad_input(flash_attn_varlen_func(qu, ku, vu, cu, cu, max_len, max_len, causal=True), idx, B, S)
    for b in range(B):
        n = int(mask[b].sum())
        exp = flash_attn_func(q[b:b + 1, S - n:], k[b:b + 1, S - n:], v[b:b + 1, S - n:], causal=True)
        torch.testing.assert_close(out[b, S - n:], exp[0])
        assert out[b, :S - n].abs().sum() == 0


def test_prepare_from_position_ids_packed_and_continuations():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    cu, max_len = prepare_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 7, 14] and max_len == 7
    cu1, m1 = prepare_from_position_ids(torch.tensor([0, 1, 0, 1, 2]))
    assert cu1.tolist() == [0, 2, 5] and m1 == 3


def test_prepare_from_position_ids_refusals():
    with pytest.raises(InputError, match="decode step"):
        prepare_from_position_ids(torch.tensor([[5], [9]]))
    with pytest.raises(InputError, match="multi-dimensional"):
        prepare_from_position_ids(torch.zeros(3, 2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="integers"):
        prepare_from_position_ids(torch.zeros(2, 4))


def test_position_ids_are_packed():
    assert position_ids_are_packed(torch.tensor([[0, 1, 2, 0, 1]]))
    assert not position_ids_are_packed(torch.tensor([[4, 5, 6], [0, 1, 2]]))
    assert not position_ids_are_packed(torch.tensor([[7], [3]]))
