"""ModelConfig: validation, presets, HF config.json round trips."""

import json

import pytest

from flashlm.models.config import HF_ARCHITECTURES, PRESETS, ModelConfig, get_preset

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# meta-llama/Llama-3.2-1B config.json as published (transformers 4.45 export).
LLAMA_32_1B_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# mistralai/Mistral-7B-v0.1 config.json as published.
MISTRAL_7B_JSON = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_presets_shapes():
    tiny = get_preset("tiny")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim) == (
        64,
        2,
        4,
        2,
        16,
    )
    small = get_preset("small")
    assert (
        small.hidden_size,
        small.num_layers,
        small.num_heads,
        small.intermediate_size,
        small.vocab_size,
    ) == (768, 12, 12, 2048, 32000)
    one_b = get_preset("llama-1b")
    assert (one_b.hidden_size, one_b.num_layers, one_b.num_heads, one_b.num_kv_heads, one_b.head_dim) == (
        2048,
        16,
        32,
        8,
        64,
    )
    assert (one_b.intermediate_size, one_b.vocab_size, one_b.tie_word_embeddings) == (8192, 128256, True)
    assert one_b.rope_theta == 500000.0 and one_b.rope_scaling == LLAMA3
    assert one_b.max_position_embeddings == 131072 and one_b.rms_norm_eps == 1e-5
    # Llama-3.2-1B has 1.236B parameters (tied embeddings counted once).
    assert abs(one_b.num_parameters() - 1_235_814_400) < 1e3
    assert set(PRESETS) >= {"tiny", "small", "llama-1b"}


def test_llama_32_1b_config_json_matches_preset():
    cfg = ModelConfig.from_hf_config(LLAMA_32_1B_JSON)
    assert cfg == get_preset("llama-1b")


def test_mistral_config_json():
    cfg = ModelConfig.from_hf_config(MISTRAL_7B_JSON)
    assert cfg.architecture == "mistral" and cfg.sliding_window == 4096
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_scaling) == (32, 8, 128, None)
    # MistralConfig's defaults apply to absent keys: an absent sliding_window means 4096, null means none.
    absent = {k: v for k, v in MISTRAL_7B_JSON.items() if k not in ("sliding_window", "num_key_value_heads")}
    assert ModelConfig.from_hf_config(absent).sliding_window == 4096
    assert ModelConfig.from_hf_config(absent).num_kv_heads == 8
    assert ModelConfig.from_hf_config({**MISTRAL_7B_JSON, "sliding_window": None}).sliding_window is None


@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("tiny"),
        get_preset("llama-1b"),
        get_preset("tiny", attention_bias=True, mlp_bias=True, pad_token_id=0, eos_token_id=[2, 3]),
        get_preset("tiny", architecture="mistral", sliding_window=7),
        ModelConfig(
            vocab_size=100, hidden_size=48, num_layers=1, num_heads=3, head_dim=32, intermediate_size=64
        ),
    ],
    ids=["tiny", "llama-1b", "bias-tokens", "mistral", "head_dim-not-derived"],
)
def test_hf_round_trip(cfg, tmp_path):
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(hf) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_hf_config(tmp_path) == cfg  # a folder
    assert ModelConfig.from_hf_config(tmp_path / "config.json") == cfg  # a file


def test_round_trip_through_transformers():
    transformers = pytest.importorskip("transformers")
    for cfg in (get_preset("llama-1b"), get_preset("tiny", architecture="mistral", sliding_window=7)):
        hf_cls = getattr(transformers, HF_ARCHITECTURES[cfg.architecture].hf_class).config_class
        hf_cfg = hf_cls(**cfg.to_hf_config())
        assert hf_cfg.num_key_value_heads == cfg.num_kv_heads and hf_cfg.head_dim == cfg.head_dim
        # transformers 5 writes rope_parameters; 4.x wrote rope_theta/rope_scaling: both are read.
        assert ModelConfig.from_hf_config(hf_cfg.to_dict()) == cfg


def test_transformers5_rope_parameters_format():
    hf = {k: v for k, v in LLAMA_32_1B_JSON.items() if k not in ("rope_theta", "rope_scaling")}
    hf["rope_parameters"] = {**LLAMA3, "rope_theta": 500000.0}
    assert ModelConfig.from_hf_config(hf) == get_preset("llama-1b")
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0


def test_legacy_rope_scaling_type_key():
    hf = dict(
        LLAMA_32_1B_JSON,
        rope_scaling={**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"},
    )
    assert ModelConfig.from_hf_config(hf).rope_scaling == LLAMA3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, "unsupported HF model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
        ({"num_attention_heads": 31}, "divisible"),
    ],
)
def test_from_hf_config_rejects_unsupported(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**LLAMA_32_1B_JSON, **changes})


def test_from_hf_config_missing_required_and_unknown_keys(tmp_path):
    hf = {k: v for k, v in LLAMA_32_1B_JSON.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_config(hf)
    with pytest.warns(UserWarning, match="some_new_option"):
        ModelConfig.from_hf_config({**LLAMA_32_1B_JSON, "some_new_option": 3})
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf_config(tmp_path)


def test_model_type_from_architectures():
    hf = {k: v for k, v in MISTRAL_7B_JSON.items() if k != "model_type"}
    assert ModelConfig.from_hf_config(hf).architecture == "mistral"


def test_to_hf_config_refuses_what_the_hf_class_ignores():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM cannot express \['sliding_window'\].*mistral"):
        get_preset("tiny", sliding_window=8).to_hf_config()
    with pytest.raises(ValueError, match="MistralForCausalLM cannot express"):
        get_preset("tiny", architecture="mistral", attention_bias=True).to_hf_config()
    with pytest.raises(ValueError, match="attn_logit_softcap"):
        get_preset("tiny", attn_logit_softcap=30.0).to_hf_config()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, "divisible by num_kv_heads"),
        ({"hidden_size": 66, "num_heads": 4}, "hidden_size \\(66\\) must be divisible by num_heads"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"intermediate_size": 2.5}, "intermediate_size"),
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        ({"rope_scaling": {**LLAMA3, "factor": -2.0}}, "factor"),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 0.5}}, "must exceed"),
        ({"rope_scaling": {**LLAMA3, "beta": 1.0}}, "unsupported keys \\['beta'\\]"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"attn_logit_softcap": 0.0}, "attn_logit_softcap"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"architecture": "gpt2"}, "architecture must be one of"),
        ({"pad_token_id": 256}, "pad_token_id"),
        ({"eos_token_id": [2, 999]}, "eos_token_id"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ],
)
def test_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **changes)


def test_rope_scaling_type_error():
    with pytest.raises(TypeError, match="rope_scaling must be None or a dict, got str"):
        get_preset("tiny", rope_scaling="llama3")


def test_derived_fields_and_replace():
    cfg = ModelConfig(vocab_size=10, hidden_size=64, num_layers=1, num_heads=8, intermediate_size=32)
    assert cfg.head_dim == 8 and cfg.num_kv_heads == 8 and cfg.num_kv_groups == 1
    wider = cfg.replace(hidden_size=128)
    assert wider.head_dim == 16  # derived again
    explicit = ModelConfig(
        vocab_size=10, hidden_size=64, num_layers=1, num_heads=2, head_dim=48, intermediate_size=32
    )
    assert explicit.replace(num_layers=3).head_dim == 48
    assert get_preset("tiny", rope_scaling={"rope_type": "default"}).rope_scaling is None
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        get_preset("tiny", num_hidden_layers=3)
