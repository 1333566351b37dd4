"""The restructuring guard (issue 26): every representative call of the flash model and of flashlm.hf runs
the op implementations and attention paths recorded in tests/kernel_choice.json (see kernel_choice.py for
how they are recorded), and "auto" resolves to the same implementations on CUDA."""

import json
import pathlib

import pytest
import torch
from kernel_choice import record

EXPECTED = json.loads((pathlib.Path(__file__).parent / "kernel_choice.json").read_text())


@pytest.fixture(scope="module")
def recorded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return record()
    finally:
        torch.set_num_threads(threads)


def test_auto_resolves_to_the_same_cuda_implementations(recorded):
    assert recorded["cuda_names"] == EXPECTED["cuda_names"]


@pytest.mark.parametrize("key", sorted(k for k in EXPECTED if k != "cuda_names"))
def test_each_call_runs_the_recorded_ops_and_attention(recorded, key):
    got, want = recorded[key], EXPECTED[key]
    assert got.get("ops") == want.get("ops"), key
    assert got["calls"] == want["calls"], key
