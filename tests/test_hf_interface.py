"""flashlm.hf.register(): transformers models running flashlm's attention equal attn_implementation="eager"."""

import pytest
import torch
from helpers import HF_FAMILIES, HF_TINY, jitter_vectors, left_padded_mask

import flashlm.hf as flashlm_hf

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
VOCAB = HF_TINY["vocab_size"]
COMMON = {
    **HF_TINY,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# plain Llama (no biases) and the families whose attention differs: windows, softcaps, scalings
FAMILIES = {"llama": ("LlamaConfig", {}), **{f: HF_FAMILIES[f] for f in ("qwen2", "mistral", "gemma2")}}
NAME = flashlm_hf.register()


def twins(family):
    """(eager model, flashlm model) of one tiny random config with the same weights, eval mode."""
    config_name, extra = FAMILIES[family]
    cfg = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    ours = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME)
    assert ours.config._attn_implementation == NAME
    jitter_vectors(eager)
    ours.load_state_dict(eager.state_dict())
    return eager.eval(), ours.eval()


def left_padded(batch, seqlen, gen):
    ids = torch.randint(3, VOCAB, (batch, seqlen), generator=gen)
    mask = left_padded_mask(batch, seqlen)
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_eager(family):
    eager, ours = twins(family)
    gen = torch.Generator().manual_seed(1)
    diffs = {}
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 14), generator=gen)
        diffs["plain"] = (ours(ids).logits - eager(ids).logits).abs().max().item()

        ids, mask = left_padded(3, 16, gen)
        real = mask.bool()
        a, b = ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
        diffs["left-padded"] = (a[real] - b[real]).abs().max().item()

        # packed: three sequences in one row, positions restarting at 0; no attention across them
        lengths = [7, 4, 9]
        seqs = [torch.randint(3, VOCAB, (1, n), generator=gen) for n in lengths]
        packed = torch.cat(seqs, 1)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        alone = torch.cat([eager(s).logits for s in seqs], 1)
        diffs["packed vs separate"] = (ours(packed, position_ids=positions).logits - alone).abs().max().item()
        cu = torch.tensor([0, 7, 11, 20], dtype=torch.int32)  # DataCollatorWithFlattening's kwargs
        out = ours(
            packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
        )
        diffs["packed (cu_seq_lens)"] = (out.logits - alone).abs().max().item()

        ids, mask = left_padded(3, 10, gen)
        kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        same_tokens = torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    print(
        f"\n{family:<8}"
        + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        + f"  generate equal {same_tokens}"
    )
    assert all(d < TOL for d in diffs.values()), diffs
    assert same_tokens


def test_gradients_match_eager():
    eager, ours = twins("gemma2")  # softcap + window + GQA in the backward too
    ids, mask = left_padded(2, 12, torch.Generator().manual_seed(2))
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (eager, ours):
        model.train()
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[1]) == len(list(ours.parameters()))
    for name, g in grads[1].items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, name
        assert (g - grads[0][name]).abs().max() < TOL, name


def test_static_cache_generation():
    eager, ours = twins("llama")
    ids, mask = left_padded(2, 10, torch.Generator().manual_seed(3))
    for m in (mask, torch.ones_like(mask)):  # padded, and unpadded (generate then drops the mask)
        kwargs = {
            "attention_mask": m,
            "max_new_tokens": 6,
            "do_sample": False,
            "pad_token_id": 0,
            "cache_implementation": "static",
        }
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_unpadding_is_computed_once_per_forward(monkeypatch):
    from flashlm.models import plan

    _, ours = twins("llama")
    calls = []
    fn = plan.get_unpad_data
    monkeypatch.setattr(plan, "get_unpad_data", lambda mask: calls.append(1) or fn(mask))
    ids, mask = left_padded(3, 12, torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours(ids, attention_mask=mask)
        assert len(calls) == 1  # 3 layers, one mask tensor
        ours(ids, attention_mask=mask)
        assert len(calls) == 2  # a new forward builds a new mask tensor


def test_packing_detection_runs_once_per_forward_for_shared_position_ids(monkeypatch):
    """transformers hands every layer the same (1, seqlen) position ids: the packing test (a host read) ran
    once per layer before (the memo was keyed by the id() of a fresh (batch, seqlen) view per layer)."""
    from flashlm.models import plan

    _, ours = twins("llama")
    calls = []
    fn = plan.prepare_from_position_ids
    monkeypatch.setattr(plan, "prepare_from_position_ids", lambda pos: calls.append(1) or fn(pos))
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours(ids, position_ids=torch.arange(12)[None])
    assert len(calls) == 1  # 3 layers


def test_register_refuses_flash_names_and_bad_masks():
    with pytest.raises(ValueError, match="contains 'flash'.*'FlashLM'"):
        flashlm_hf.register("flashlm")
    assert flashlm_hf.register() == "FlashLM" == NAME
    _, ours = twins("llama")
    q = torch.randn(1, 4, 5, 12)
    k = v = torch.randn(1, 2, 5, 12)
    with pytest.raises(ValueError, match="2-D padding mask"):
        flashlm_hf.attention_forward(ours.model.layers[0].self_attn, q, k, v, torch.zeros(1, 1, 5, 5))


def test_inference_mode_padded_batches_change_between_forwards():
    """Under torch.inference_mode (no version counters) a new mask in each forward is honoured."""
    eager, ours = twins("llama")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    for lengths in ([12, 7, 3], [5, 12, 9]):
        mask = torch.zeros(3, 12, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, 12 - n :] = 1
        with torch.inference_mode():
            want = eager(ids, attention_mask=mask).logits
            got = ours(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (got - want)[real].abs().max() < TOL
