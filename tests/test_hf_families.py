"""HF checkpoint families (Llama, Mistral, Qwen2, Qwen3, Gemma2) against transformers' own classes.

Each test builds a tiny random model with transformers (config -> model -> save_pretrained, sharded,
no hub, eager attention, fp32), loads the folder into flashlm (default and flash models), compares
logits on a plain batch, a left-padded batch and a left-padded prefill + decode steps, then saves
with flashlm and loads that folder back into transformers.
"""

import json
import time

import pytest
import torch
from helpers import HF_FAMILIES, HF_TINY, jitter_vectors, left_padded_mask

from flashlm.models import MODEL_CLASSES, from_pretrained, save_pretrained
from flashlm.models.config import HF_ARCHITECTURES, ModelConfig

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
VOCAB = HF_TINY["vocab_size"]
DECODE_STEPS = 4
COMMON = HF_TINY


def _flash_available() -> bool:
    try:
        MODEL_CLASSES["flash"]
    except ImportError:
        return False
    return True


ATTNS = [
    "default",
    pytest.param("flash", marks=pytest.mark.skipif(not _flash_available(), reason="no flash")),
]


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """family -> (folder, transformers model): tiny random models saved sharded by transformers."""
    out = {}
    for family, (config_name, extra) in HF_FAMILIES.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(**COMMON, **extra)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        jitter_vectors(model)
        folder = tmp_path_factory.mktemp(family) / "hf"
        model.save_pretrained(folder, max_shard_size="50KB")
        assert (folder / "model.safetensors.index.json").is_file()  # the sharded layout
        out[family] = (folder, model)
    return out


def hf_positions(mask):
    """Position ids as transformers' generate derives them from a left-padded mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def compare(ours, theirs, attn, gen):
    """Max abs logit differences: plain batch, left-padded batch, left-padded prefill + decode."""
    diffs = {}
    ids = torch.randint(0, VOCAB, (2, 14), generator=gen)
    diffs["plain"] = (ours(ids).logits - theirs(ids).logits).abs().max().item()

    batch, seqlen = 3, 16
    ids = torch.randint(0, VOCAB, (batch, seqlen), generator=gen)
    mask = left_padded_mask(batch, seqlen)
    a = ours(ids, attention_mask=mask).logits
    b = theirs(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    diffs["left-padded"] = (a[real] - b[real]).abs().max().item()

    # prefill 10 tokens (left-padded), then DECODE_STEPS cached steps, vs one transformers forward
    prompt = 10
    total_mask = torch.cat([mask[:, :prompt], torch.ones(batch, DECODE_STEPS, dtype=torch.long)], 1)
    total = ids[:, : prompt + DECODE_STEPS]
    full = theirs(total, attention_mask=total_mask, position_ids=hf_positions(total_mask)).logits
    if attn == "flash":
        cache = ours.allocate_cache(batch, prompt + DECODE_STEPS)
        out = ours(
            total[:, :prompt], attention_mask=total_mask[:, :prompt], past_key_values=cache, use_cache=True
        )
    else:
        out = ours(total[:, :prompt], attention_mask=total_mask[:, :prompt], use_cache=True)
    steps = [out.logits[:, -1:]]
    for t in range(prompt, prompt + DECODE_STEPS - 1):
        step_mask = None if attn == "flash" else total_mask[:, : t + 1]  # flash: the cache keeps lengths
        out = ours(
            total[:, t : t + 1], attention_mask=step_mask, past_key_values=out.past_key_values, use_cache=True
        )
        steps.append(out.logits)
    diffs["prefill + decode"] = (torch.cat(steps, 1) - full[:, prompt - 1 : -1]).abs().max().item()
    return diffs


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_family_matches_transformers(family, attn, hf_checkpoints, tmp_path):
    start = time.perf_counter()
    folder, theirs = hf_checkpoints[family]
    ours = from_pretrained(folder, attn=attn, dtype=torch.float32)
    assert ours.config.architecture == family and not ours.load_report.missing_keys
    diffs = compare(ours, theirs, attn, torch.Generator().manual_seed(1))
    print(
        f"\n{family:<7} {attn:<7} "
        + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        + f"  ({time.perf_counter() - start:.1f} s)"
    )
    assert all(d < TOL for d in diffs.values()), diffs

    # flashlm's save loads back into transformers as the same class with the same logits
    saved = save_pretrained(ours, tmp_path / "ours")
    with open(f"{saved}/config.json") as f:
        hf_json = json.load(f)
    assert hf_json["model_type"] == family
    assert hf_json["architectures"] == [HF_ARCHITECTURES[family].hf_class]
    assert ModelConfig.from_hf_config(saved) == ours.config
    back = transformers.AutoModelForCausalLM.from_pretrained(
        saved, attn_implementation="eager", dtype=torch.float32
    )
    assert type(back).__name__ == HF_ARCHITECTURES[family].hf_class
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        assert (back.eval()(ids).logits - theirs(ids).logits).abs().max() < TOL


def test_family_features_are_exercised(hf_checkpoints):
    """The tiny models really use what sets each family apart (else the equality above is cheap)."""
    configs = {f: from_pretrained(folder).config for f, (folder, _) in hf_checkpoints.items()}
    qwen2, qwen3, gemma2 = configs["qwen2"], configs["qwen3"], configs["gemma2"]
    assert [qwen2.sliding_window_for_layer(i) for i in range(3)] == [None, 5, 5]
    assert qwen2.qkv_bias and not qwen2.attention_bias
    assert qwen3.qk_norm and qwen3.head_dim == 16 and qwen3.attention_bias
    assert [gemma2.sliding_window_for_layer(i) for i in range(3)] == [5, None, 5]
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.query_pre_attn_scalar) == (
        2.0,
        3.0,
        10,
    )
    assert gemma2.hidden_act == "gelu_pytorch_tanh" and gemma2.tie_word_embeddings
    assert gemma2.rms_norm_unit_offset and gemma2.post_norms and gemma2.embed_scale
    assert configs["mistral"].sliding_window_for_layer(2) == 5
    # each switch changes the logits of its model: flip it and the transformers twin disagrees
    folder, theirs = hf_checkpoints["gemma2"]
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        reference = theirs(ids).logits
        for change in (
            {"attn_logit_softcap": None},
            {"final_logit_softcap": None},
            {"layer_types": None},
            {"query_pre_attn_scalar": None},
        ):
            model = MODEL_CLASSES["default"](gemma2.replace(**change)).eval()
            model.load_state_dict(from_pretrained(folder).state_dict())
            assert (model(ids).logits - reference).abs().max() > 1e-3, change


def _hf_json(family, **changes):
    config_name, extra = HF_FAMILIES[family]
    hf = getattr(transformers, config_name)(**COMMON, **extra).to_dict()
    hf.update(changes)
    return hf


@pytest.mark.parametrize(
    "family, changes, message",
    [
        (
            "llama",
            {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]},
            "unsupported HF model_type 'phi3'",
        ),
        ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "'yarn'"),
        ("qwen3", {"hidden_act": "relu"}, "hidden_act='relu'"),
        (
            "qwen3",
            {
                "layer_types": ["full_attention", "chunked_attention", "full_attention"],
                "use_sliding_window": True,
            },
            "chunked_attention",
        ),
    ],
)
def test_unsupported_configs_are_named(family, changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(_hf_json(family, **changes))


def test_to_hf_config_refuses_family_mismatches():
    from flashlm.models.config import get_preset

    cfg = get_preset("tiny", architecture="gemma2")
    assert cfg.post_norms and cfg.embed_scale and cfg.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM cannot express post_norms=False"):
        cfg.replace(post_norms=False).to_hf_config()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM cannot express \['qk_norm'\].*qwen3"):
        get_preset("tiny", qk_norm=True).to_hf_config()
    with pytest.raises(ValueError, match=r"MistralForCausalLM cannot express \['layer_types'\]"):
        get_preset(
            "tiny",
            architecture="mistral",
            sliding_window=4,
            layer_types=["full_attention", "sliding_attention"],
        ).to_hf_config()
    with pytest.raises(ValueError, match="layer_types must be None or a list of num_layers=2"):
        get_preset("tiny", layer_types=["full_attention"])
