"""HF config.json interop for `ModelConfig`: the per-architecture table and the two conversions.

Table-driven: `HF_ARCHITECTURES` maps a ``model_type`` ("llama", "mistral", "qwen2", "qwen3",
"gemma2") to an `HFArchitecture` row that says which config.json keys map to which fields, the
defaults transformers uses when a key is absent, the keys whose values we must check (``hidden_act``
must be "silu"), the fields the HF class hard-codes (Qwen2's q/k/v bias, Gemma2's norms), which of
our fields the architecture can express, and (where an architecture has its own rule for which
layers slide) the functions that read and write that rule. Adding an architecture means adding a
row. The public entry points are `ModelConfig.from_hf_config` and `ModelConfig.to_hf_config`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flashlm.errors import InputError

# a flashlm.models.config.ModelConfig: not imported, not even for type checking (config.py imports this
# module; the reverse would be an import cycle)
_Config = Any

def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; ``InputError`` naming the file when it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{os.fspath(path)} is not valid JSON ({e}); the file is damaged or not a config") from None
    if not isinstance(obj, dict):
        raise InputError(f"{os.fspath(path)} holds a JSON {type(obj).__name__}, expected an object")
    return obj


# ---- HF mapping tables ------------------------------------------------------------------------

# config.json key -> ModelConfig field, shared by every architecture.
_HF_COMMON_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "max_position_embeddings": "max_position_embeddings",
    "attention_dropout": "attention_dropout",
    "initializer_range": "initializer_range",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Fields where null is meaningful (derived, or "off"); a null elsewhere means "use the default".
_NULLABLE_FIELDS = {"head_dim", "num_kv_heads", "sliding_window", "attn_logit_softcap", "final_logit_softcap"}
# Fields that only some architectures' HF classes implement (checked by to_hf_config).
_EXPRESSIBLE_FIELDS = (
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "attn_logit_softcap",
    "final_logit_softcap",
    "layer_types",
    "qkv_bias",
    "qk_norm",
    "hidden_act",
    "rms_norm_unit_offset",
    "post_norms",
    "embed_scale",
    "query_pre_attn_scalar",
)
LAYER_TYPES = ("full_attention", "sliding_attention")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Keys that do not change the forward math.
_HF_BENIGN_KEYS = {
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "pretraining_tp",
    "tokenizer_class",
    "auto_map",
    "quantization_config_ignored",
    "use_return_dict",
    "torchscript",
    "tie_encoder_decoder",
    "task_specific_params",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "finetuning_task",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "is_decoder",
    "pruned_heads",
}


@dataclass(frozen=True)
class HFArchitecture:
    """One row of the HF interop table.

    keys: architecture-specific config.json key -> field (on top of the common keys).
    hf_defaults: the value transformers' config class uses when a key is absent.
    required_values: key -> allowed values (first one is written on export); others raise.
    unsupported: key -> values that keep the math we implement; any other value raises.
    expressible: which of `_EXPRESSIBLE_FIELDS` the HF class implements (any value).
    fixed: field -> the value the HF class hard-codes (set on import, required on export).
    windows_from_hf(hf, num_layers) -> {"sliding_window", "layer_types"} and windows_to_hf(config)
    -> config.json keys: the family's rule for which layers slide (None: the plain key mapping);
    window_keys: the config.json keys that rule reads. ignored: keys the HF class does not read.
    """

    model_type: str
    hf_class: str
    keys: dict[str, str] = field(default_factory=dict)
    hf_defaults: dict[str, Any] = field(default_factory=dict)
    required_values: dict[str, tuple] = field(default_factory=dict)
    unsupported: dict[str, tuple] = field(default_factory=dict)
    expressible: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)
    windows_from_hf: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
    windows_to_hf: Callable[[_Config], dict[str, Any]] | None = None
    window_keys: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    def can_express(self, name: str, value: Any) -> bool:
        return name in self.expressible or (name in self.fixed and self.fixed[name] == value)


def _layer_types(config: _Config) -> list[str]:
    return [
        "sliding_attention" if config.sliding_window_for_layer(i) is not None else "full_attention"
        for i in range(config.num_layers)
    ]


def _hf_layer_types(hf: dict[str, Any]) -> list[str] | None:
    """config.json ``layer_types``, refused when it names a kind of layer we do not implement
    (even where no window makes it moot: the HF class might still treat such layers differently)."""
    types = hf.get("layer_types")
    if types is not None:
        bad = sorted({t for t in types if t not in LAYER_TYPES}, key=str)
        if bad:
            raise ValueError(f"HF config layer_types has {bad}; flashlm implements {list(LAYER_TYPES)}")
    return types


def _qwen_windows_from_hf(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Qwen2/Qwen3: a window only with ``use_sliding_window``; then the layers listed as
    "sliding_attention" in ``layer_types`` or, without it, layers i >= ``max_window_layers``."""
    types = _hf_layer_types(hf)
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    if types is None:
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return {"sliding_window": window, "layer_types": types}


def _qwen_windows_to_hf(config: _Config) -> dict[str, Any]:
    types = _layer_types(config)
    # max_window_layers for transformers < 4.53, which reads no layer_types (exact for a suffix).
    first = types.index("sliding_attention") if "sliding_attention" in types else config.num_layers
    return {
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
        "max_window_layers": first,
        "layer_types": types,
    }


def _gemma2_windows_from_hf(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Gemma2: ``layer_types`` or, without it, even layers (0, 2, ...) slide, odd layers are global."""
    types = _hf_layer_types(hf)
    window = hf.get("sliding_window", 4096)
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    return {"sliding_window": window, "layer_types": types}


def _gemma2_windows_to_hf(config: _Config) -> dict[str, Any]:
    return {"sliding_window": config.sliding_window, "layer_types": _layer_types(config)}


_COMMON_HF_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}
_COMMON_UNSUPPORTED = {"partial_rotary_factor": (1.0, None), "quantization_config": (None,)}
# Qwen2 and Qwen3 share their rule for which layers slide.
_QWEN_WINDOWS: dict[str, Any] = {
    "windows_from_hf": _qwen_windows_from_hf,
    "windows_to_hf": _qwen_windows_to_hf,
    "window_keys": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
}

HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "llama": HFArchitecture(
        model_type="llama",
        hf_class="LlamaForCausalLM",
        keys={"attention_bias": "attention_bias", "mlp_bias": "mlp_bias"},
        hf_defaults={
            **_COMMON_HF_DEFAULTS,
            "max_position_embeddings": 2048,
            "attention_bias": False,
            "mlp_bias": False,
        },
        required_values={"hidden_act": ("silu",)},
        unsupported=dict(_COMMON_UNSUPPORTED),
        expressible=("attention_bias", "mlp_bias"),
    ),
    "mistral": HFArchitecture(
        model_type="mistral",
        hf_class="MistralForCausalLM",
        keys={"sliding_window": "sliding_window"},
        # MistralConfig defaults: 8 kv heads, a 4096-token window, 4096 * 32 positions.
        hf_defaults={
            **_COMMON_HF_DEFAULTS,
            "max_position_embeddings": 4096 * 32,
            "num_key_value_heads": 8,
            "sliding_window": 4096,
        },
        required_values={"hidden_act": ("silu",)},
        unsupported=dict(_COMMON_UNSUPPORTED),
        expressible=("sliding_window",),
    ),
    "qwen2": HFArchitecture(
        model_type="qwen2",
        hf_class="Qwen2ForCausalLM",
        # Qwen2Config defaults; q/k/v always carry a bias, o_proj never.
        hf_defaults={
            **_COMMON_HF_DEFAULTS,
            "max_position_embeddings": 32768,
            "bos_token_id": None,
            "eos_token_id": None,
        },
        required_values={"hidden_act": ("silu",)},
        unsupported=dict(_COMMON_UNSUPPORTED),
        expressible=("sliding_window", "layer_types"),
        fixed={"qkv_bias": True},
        **_QWEN_WINDOWS,
    ),
    "qwen3": HFArchitecture(
        model_type="qwen3",
        hf_class="Qwen3ForCausalLM",
        keys={"attention_bias": "attention_bias"},
        # Qwen3Config defaults (head_dim 128 when absent); RMSNorm on q and k heads before RoPE.
        hf_defaults={
            **_COMMON_HF_DEFAULTS,
            "max_position_embeddings": 32768,
            "head_dim": 128,
            "attention_bias": False,
            "bos_token_id": None,
            "eos_token_id": None,
        },
        required_values={"hidden_act": ("silu",)},
        unsupported=dict(_COMMON_UNSUPPORTED),
        expressible=("attention_bias", "sliding_window", "layer_types"),
        fixed={"qk_norm": True},
        **_QWEN_WINDOWS,
    ),
    "gemma2": HFArchitecture(
        model_type="gemma2",
        hf_class="Gemma2ForCausalLM",
        keys={
            "attention_bias": "attention_bias",
            "query_pre_attn_scalar": "query_pre_attn_scalar",
            "attn_logit_softcapping": "attn_logit_softcap",
            "final_logit_softcapping": "final_logit_softcap",
        },
        # Gemma2Config defaults.
        hf_defaults={
            **_COMMON_HF_DEFAULTS,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "attention_bias": False,
            "query_pre_attn_scalar": 256,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
        required_values={"hidden_activation": ("gelu_pytorch_tanh",)},
        unsupported={**_COMMON_UNSUPPORTED, "use_bidirectional_attention": (None, False)},
        expressible=(
            "attention_bias",
            "sliding_window",
            "layer_types",
            "attn_logit_softcap",
            "final_logit_softcap",
            "query_pre_attn_scalar",
        ),
        fixed={
            "hidden_act": "gelu_pytorch_tanh",
            "rms_norm_unit_offset": True,
            "post_norms": True,
            "embed_scale": True,
        },
        windows_from_hf=_gemma2_windows_from_hf,
        windows_to_hf=_gemma2_windows_to_hf,
        window_keys=("sliding_window", "layer_types"),
        # Older Gemma2 exports also carry these; Gemma2ForCausalLM reads neither.
        ignored=("hidden_act", "sliding_window_size", "cache_implementation"),
    ),
}


def _rope_from_hf(hf: dict[str, Any], arch: HFArchitecture) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers 5's ``rope_parameters`` or the legacy
    ``rope_theta`` + ``rope_scaling`` keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", arch.hf_defaults.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
    return theta, scaling


def config_from_hf(cls: type, path_or_dict: str | os.PathLike | dict[str, Any]) -> _Config:
    """`ModelConfig.from_hf_config` (see there); ``cls`` is the class to build."""
    if isinstance(path_or_dict, dict):
        hf = dict(path_or_dict)
    else:
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HF config.json at {path!r}")
        hf = read_json(path)
    model_type = hf.get("model_type")
    if model_type is None:  # some exports only carry "architectures"
        names = hf.get("architectures") or []
        model_type = next((k for k, a in HF_ARCHITECTURES.items() if a.hf_class in names), None)
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"unsupported HF model_type {model_type!r} (architectures={hf.get('architectures')}); "
            f"supported: {sorted(HF_ARCHITECTURES)}"
        )
    arch = HF_ARCHITECTURES[model_type]
    missing = [k for k in _HF_REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"HF config for {model_type!r} lacks required keys {missing}")

    values: dict[str, Any] = {"architecture": model_type, **arch.fixed}
    mapping = {**_HF_COMMON_KEYS, **arch.keys}
    for hf_key, our_field in mapping.items():
        if hf_key in hf and (hf[hf_key] is not None or our_field in _NULLABLE_FIELDS):
            values[our_field] = hf[hf_key]  # an explicit null window means "no window"
        elif hf_key in arch.hf_defaults:
            values[our_field] = arch.hf_defaults[hf_key]
    # Token ids may legitimately be null; keep HF's "absent means default" rule for them.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if key in hf:
            values[key] = hf[key]
        elif key in arch.hf_defaults:
            values[key] = arch.hf_defaults[key]

    bad = []
    for hf_key, allowed in arch.required_values.items():
        value = hf.get(hf_key, allowed[0])
        if value not in allowed:
            bad.append(f"{hf_key}={value!r} (supported: {list(allowed)})")
    for hf_key, neutral in arch.unsupported.items():
        if hf_key in hf and hf[hf_key] not in neutral:
            bad.append(f"{hf_key}={hf[hf_key]!r} (only {list(neutral)} is supported)")
    if bad:
        raise ValueError(
            f"HF {model_type} config uses options flashlm does not implement: {', '.join(bad)}"
        )

    values["rope_theta"], values["rope_scaling"] = _rope_from_hf(hf, arch)
    if arch.windows_from_hf is not None:  # the family's own rule for which layers slide
        values.update(arch.windows_from_hf(hf, values["num_layers"]))
    known = set(mapping) | set(arch.required_values) | set(arch.unsupported) | _HF_BENIGN_KEYS
    known |= set(arch.window_keys) | set(arch.ignored)
    known |= {
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    }
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        warnings.warn(f"HF {model_type} config keys ignored by flashlm: {unknown}", stacklevel=3)  # the caller of ModelConfig.from_hf_config
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:  # name the file: the field names are ours, not config.json's
        where = "config" if isinstance(path_or_dict, dict) else repr(os.fspath(path_or_dict))
        raise InputError(f"HF {where}: {e}") from None


def config_to_hf(config: _Config) -> dict[str, Any]:
    """`ModelConfig.to_hf_config` (see there)."""
    arch = HF_ARCHITECTURES[config.architecture]
    wrong_fixed = [
        f"{name}={getattr(config, name)!r} (it hard-codes {value!r})"
        for name, value in arch.fixed.items()
        if getattr(config, name) != value
    ]
    if wrong_fixed:
        raise ValueError(
            f"{arch.hf_class} cannot express {', '.join(wrong_fixed)}; build the config with "
            f"get_preset(..., architecture={config.architecture!r}) or set those fields"
        )
    defaults = type(config)()  # the class's own defaults (config.py imports this module, not the reverse)
    inexpressible = [
        name
        for name in _EXPRESSIBLE_FIELDS
        if not arch.can_express(name, getattr(config, name))
        and getattr(config, name) != getattr(defaults, name)
    ]
    if inexpressible:
        options = [
            k
            for k, a in HF_ARCHITECTURES.items()
            if all(a.can_express(n, getattr(config, n)) for n in inexpressible)
        ]
        raise ValueError(
            f"{arch.hf_class} cannot express {inexpressible} (set on this config); "
            f"architectures that can: {options or 'none'}"
        )
    hf: dict[str, Any] = {"architectures": [arch.hf_class], "model_type": arch.model_type}
    for hf_key, our_field in {**_HF_COMMON_KEYS, **arch.keys}.items():
        hf[hf_key] = getattr(config, our_field)
    for hf_key, allowed in arch.required_values.items():
        hf[hf_key] = allowed[0]
    hf["rope_theta"] = config.rope_theta
    hf["rope_scaling"] = dict(config.rope_scaling) if config.rope_scaling else None
    hf["pad_token_id"] = config.pad_token_id
    hf["bos_token_id"] = config.bos_token_id
    hf["eos_token_id"] = config.eos_token_id
    if "query_pre_attn_scalar" in hf and hf["query_pre_attn_scalar"] is None:
        hf["query_pre_attn_scalar"] = config.head_dim  # ours: None = head_dim; HF's default is 256
    if arch.windows_to_hf is not None:
        hf.update(arch.windows_to_hf(config))
    return hf
