"""The default model against transformers (fp32, eager attention) and against itself (cache, padding)."""

import pytest
import torch
from helpers import left_padded_mask

from flashlm.models.config import HF_ARCHITECTURES, get_preset
from flashlm.models.reference import (
    DefaultForCausalLM,
    DynamicCache,
    MultiHeadAttention,
    RotaryEmbedding,
    attention_mask_bhsd,
    rope_inv_freq,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LLAMA3_SHORT = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # short original context: scaling acts at these lengths


def hf_twin(model):
    """The transformers model of the same architecture holding the same weights (eager, fp32)."""
    cls = getattr(transformers, HF_ARCHITECTURES[model.config.architecture].hf_class)
    hf_config = cls.config_class(**model.config.to_hf_config())
    hf_config._attn_implementation = "eager"
    hf = cls(hf_config)
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and not result.missing_keys, result
    return hf.eval()


def hf_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def make(**changes):
    return DefaultForCausalLM(get_preset("tiny", **changes)).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SHORT], ids=["rope", "llama3-rope"])
def test_matches_transformers_llama(kv_heads, tied, rope_scaling):
    model = make(
        num_kv_heads=kv_heads, tie_word_embeddings=tied, rope_scaling=rope_scaling, rope_theta=50000.0
    )
    hf = hf_twin(model)
    ids = torch.randint(0, 256, (2, 40))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        ours, theirs = model(ids, labels=labels), hf(ids, labels=labels)
    assert (ours.logits - theirs.logits).abs().max() < TOL
    assert abs(ours.loss - theirs.loss) < TOL
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_matches_transformers_with_biases():
    model = make(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()  # biases and norms away from their 0/1 init, so a dropped bias shows
    hf = hf_twin(model)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < TOL


def test_left_padded_batch_matches_transformers_and_unpadded_rows():
    model = make(rope_scaling=LLAMA3_SHORT)
    hf = hf_twin(model)
    ids = torch.randint(3, 256, (3, 24))
    mask = left_padded_mask(3, 24)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        real = mask.bool()
        assert (ours - theirs)[real].abs().max() < TOL
        for r in range(3):  # each row as if alone: positions restart at its first real token
            alone = model(ids[r : r + 1, 3 * r :]).logits[0]
            assert (ours[r, 3 * r :] - alone).abs().max() < TOL
        # a bool mask means the same as an int one
        assert torch.equal(model(ids, attention_mask=mask.bool()).logits, ours)


@pytest.mark.parametrize("window", [4, 11])
def test_mistral_sliding_window_matches_transformers(window):
    model = make(architecture="mistral", sliding_window=window)
    hf = hf_twin(model)
    assert hf.config.sliding_window == window
    ids = torch.randint(3, 256, (2, 30))
    mask = left_padded_mask(2, 30)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < TOL
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        assert (ours - theirs)[mask.bool()].abs().max() < TOL
        # the window changes the answer (else this test proves nothing)
        full = make(architecture="mistral")
        full.load_state_dict(model.state_dict())
        assert (full(ids).logits - model(ids).logits).abs().max() > 1e-2


def _decode(model, ids, prompt_len, mask=None):
    """Prefill prompt_len tokens, then one token at a time through the cache; logits of all steps."""
    out = model(
        ids[:, :prompt_len], attention_mask=None if mask is None else mask[:, :prompt_len], use_cache=True
    )
    assert isinstance(out.past_key_values, DynamicCache)
    steps = [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        m = None if mask is None else mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=m, past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    assert len(out.past_key_values) == model.config.num_layers
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_kv_heads": 1, "rope_scaling": LLAMA3_SHORT},
        {"architecture": "mistral", "sliding_window": 5},
    ],
    ids=["gqa", "mqa-llama3", "mistral-window"],
)
def test_cache_decode_equals_full_forward(changes):
    model = make(**changes)
    hf = hf_twin(model)
    ids = torch.randint(3, 256, (2, 20))
    with torch.no_grad():
        decoded = _decode(model, ids, prompt_len=12)
        assert (decoded - model(ids).logits).abs().max() < TOL
        assert (decoded - hf(ids).logits).abs().max() < TOL
        # left-padded rows through the cache
        mask = left_padded_mask(2, 20)
        decoded = _decode(model, ids, prompt_len=12, mask=mask)
        full = model(ids, attention_mask=mask).logits
        assert (decoded - full)[mask.bool()].abs().max() < TOL


def test_multi_token_step_with_cache_is_bottom_right_causal():
    model = make()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        out = model(ids[:, :10], use_cache=True)
        chunk = model(ids[:, 10:], past_key_values=out.past_key_values).logits  # q_len 6, kv_len 16
        assert (chunk - model(ids).logits[:, 10:]).abs().max() < TOL


def test_attention_mask_matches_brute_force():
    for q_len, kv_len, window in [(5, 5, None), (3, 9, None), (1, 7, None), (4, 9, 3), (9, 9, 1)]:
        pad = torch.ones(2, kv_len, dtype=torch.bool)
        pad[1, :2] = False
        got = attention_mask_bhsd(q_len, kv_len, pad, window)
        for b in range(2):
            for i in range(q_len):
                for j in range(kv_len):
                    pos = i + kv_len - q_len
                    want = j <= pos and (window is None or j > pos - window) and bool(pad[b, j])
                    assert bool(got[b, 0, i, j]) == want, (q_len, kv_len, window, b, i, j)


def test_attention_softcap_and_window_math():
    """`_attend` against the textbook formula with a per-entry loop mask."""
    cfg = get_preset("tiny", attn_logit_softcap=2.0, sliding_window=3)
    attn = MultiHeadAttention(cfg, 0)
    q, k, v = torch.randn(1, 4, 6, 16) * 3, torch.randn(1, 2, 6, 16) * 3, torch.randn(1, 2, 6, 16)
    out = attn._attend(q, k, v)  # (1, 6, 4, 16) BSHD
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = 2.0 * torch.tanh((q @ kr.transpose(-1, -2)) / 16**0.5 / 2.0)
    for i in range(6):
        for j in range(6):
            if not (i - 3 < j <= i):
                scores[..., i, j] = float("-inf")
    want = (scores.softmax(-1) @ vr).transpose(1, 2)
    assert (out - want).abs().max() < 1e-5


def test_final_logit_softcap():
    model = make()
    capped = make(final_logit_softcap=0.05)
    capped.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        raw, got = model(ids).logits, capped(ids).logits
    assert got.abs().max() <= 0.05 and raw.abs().max() > 0.1
    assert (got - 0.05 * torch.tanh(raw / 0.05)).abs().max() < 1e-6


def test_dropout_only_in_training():
    model = make(attention_dropout=0.5)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_init_and_rope_buffer_stay_fp32():
    cfg = get_preset("tiny", vocab_size=4096, initializer_range=0.05, pad_token_id=0)
    model = DefaultForCausalLM(cfg)
    assert abs(model.lm_head.weight.std().item() - 0.05) < 5e-3
    assert abs(model.model.layers[0].self_attn.q_proj.weight.std().item() - 0.05) < 5e-3
    assert torch.all(model.model.embed_tokens.weight[0] == 0)
    assert torch.all(model.model.norm.weight == 1)
    model.to(torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, rope_inv_freq(cfg))
    cos, _sin = rotary(torch.arange(5))
    assert cos.shape == (1, 5, 16) and cos.dtype == torch.float32 and torch.equal(cos[..., :8], cos[..., 8:])
    with torch.no_grad():
        assert model(torch.randint(0, 4096, (1, 6))).logits.dtype == torch.bfloat16


def test_rope_matches_transformers_llama3_long_context():
    cfg = get_preset("llama-1b")
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**cfg.to_hf_config())
    )
    pos = torch.tensor([[0, 1, 1000, 8191, 70000, 131071]])
    cos, sin = RotaryEmbedding(cfg)(pos)
    hcos, hsin = hf_rotary(torch.zeros(1, dtype=torch.float32), pos)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)


def test_rope_half_width_tables_are_the_full_tables_first_half():
    # the flash model's half-width tables and the default model's full ones come from one builder
    cfg = get_preset("llama-1b")
    rotary = RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 1000, 8191, 70000, 131071], [5, 4, 3, 2, 1, 0]])
    cos, sin = rotary(pos)
    hcos, hsin = rotary.tables(pos, half_width=True)
    half = cfg.head_dim // 2
    assert hcos.shape == (2, 6, half) and hcos.dtype == torch.float32
    assert torch.equal(hcos, cos[..., :half]) and torch.equal(hsin, sin[..., :half])


def test_bad_inputs_give_clear_errors():
    model = make()
    ids = torch.randint(0, 256, (2, 6))
    with pytest.raises(
        ValueError, match=r"input_ids out of range: values in \[\d+, 256\].*vocab_size is 256"
    ):
        model(torch.cat([ids, torch.full((2, 1), 256)], 1))
    with pytest.raises(ValueError, match="out of range"):
        model(ids - 300)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"\(batch, seqlen\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* \(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be bool or an integer dtype"):
        model(ids, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(ids, position_ids=torch.arange(5)[None])
    # with a cache the mask must cover cached + new tokens
    out = model(ids, use_cache=True)
    with pytest.raises(ValueError, match=r"past_len=6"):
        model(
            ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=out.past_key_values
        )
    assert out.past_key_values.get_seq_length() == 6  # the refused call left the cache untouched
