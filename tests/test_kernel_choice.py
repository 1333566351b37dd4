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


def test_explain_names_what_the_recorded_calls_run():
    """FlashForCausalLM.explain answers from the functions the forward calls: plan kind, op-set mode, each
    layer's attention kernel and the loss, as recorded above for the same calls (tiny, fp32, CPU)."""
    from flashlm.models import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"), attn="flash").train()
    ids = torch.randint(1, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    dense = model.explain(ids, labels=ids)
    assert (dense["plan"], dense["mode"], dense["loss"]) == ("dense", "eager", "logits_cross_entropy")
    assert dense["attention"] == ["dense:sdpa_cpu"] * 2 and dense["ops"]["rotary_qkv"] == "torch"
    assert model.eval().explain(ids, attention_mask=mask)["attention"] == ["varlen:sdpa_cpu"] * 2
    cache = model.allocate_cache(2, 32)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    step = model.explain(ids[:, :1], past_key_values=cache)
    assert (step["plan"], step["mode"]) == ("append", "decode")
    assert step["attention"] == ["fused rotary_qkv_append + kvcache:sdpa_cpu"] * 2
    compiled = model.explain(ids[:, :1], past_key_values=cache, compiled=True)
    assert (compiled["mode"], compiled["attention"]) == ("compiled", ["kvcache:api"] * 2)
    whole = model.train().prepare_compile(whole_model=True).explain(ids, attention_mask=mask, labels=ids)
    assert (whole["plan"], whole["mode"], whole["loss"]) == ("varlen", "compiled", "cross_entropy")
    assert whole["attention"] == ["varlen:reference"] * 2  # the registry's traceable choice (sdpa_cpu: dense only)
