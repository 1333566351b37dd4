"""One configuration dataclass for the LLaMA model family, named presets, and HF config.json interop.

`ModelConfig` holds every hyper-parameter the default and flash models read. It validates itself in
``__post_init__`` (clear ``ValueError``s naming the bad field) and derives ``head_dim`` and
``num_kv_heads`` when they are left as ``None``.

HF interop (`ModelConfig.from_hf_config` / `.to_hf_config`) is table-driven: the table,
`HF_ARCHITECTURES`, and the conversions live in `flashlm.models.hf_config` (re-exported here).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from flashlm.errors import InputError
from flashlm.ops.resolve import KERNELS

from .hf_config import (
    HF_ARCHITECTURES,
    LAYER_TYPES,
    SUPPORTED_ACTIVATIONS,
    HFArchitecture,
    config_from_hf,
    config_to_hf,
)

SUPPORTED_ROPE_TYPES = ("llama3",)  # plus None / "default" (no scaling)
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
__all__ = ["HF_ARCHITECTURES", "LAYER_TYPES", "PRESETS", "SUPPORTED_ACTIVATIONS", "SUPPORTED_ROPE_TYPES",
           "HFArchitecture", "ModelConfig", "get_preset"]


@dataclass
class ModelConfig:
    """Hyper-parameters of a LLaMA-family decoder.

    Shapes: ``hidden_size`` is the residual width; attention has ``num_heads`` query heads and
    ``num_kv_heads`` key/value heads (GQA when fewer) of ``head_dim`` each, so q_proj maps
    hidden_size -> num_heads * head_dim. ``head_dim=None`` derives hidden_size // num_heads (and then
    hidden_size must equal num_heads * head_dim); ``num_kv_heads=None`` means num_heads (MHA).

    ``rope_scaling`` is None (plain RoPE) or a dict ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1+).
    ``sliding_window`` W lets query i see keys j with i - W < j <= i (W tokens, itself included).
    ``attn_logit_softcap`` / ``final_logit_softcap`` apply ``cap * tanh(x / cap)`` to the scaled
    attention scores / the output logits (None: off). ``layer_types`` (None, or one of
    "full_attention" / "sliding_attention" per layer) says which layers use the window; None means
    every layer does (Mistral).

    Family flags (all off for Llama): ``qkv_bias`` biases on q/k/v only (Qwen2; ``attention_bias``
    puts them on q/k/v/o); ``qk_norm`` an RMSNorm over head_dim on each q and k head before RoPE
    (Qwen3); ``hidden_act`` "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma2);
    ``rms_norm_unit_offset`` norms scale by ``1 + weight`` in fp32 before the cast (Gemma);
    ``post_norms`` extra norms on the attention and MLP outputs before the residual add, with
    ``pre_feedforward_layernorm`` before the MLP (Gemma2); ``embed_scale`` multiplies the embeddings
    by sqrt(hidden_size) (Gemma); ``query_pre_attn_scalar`` S scales scores by S**-0.5 instead of
    head_dim**-0.5 (Gemma2).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    architecture: str = "llama"
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    layer_types: list[str] | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    rms_norm_unit_offset: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    # flash model only: which implementation of its fused ops (RMSNorm, SwiGLU, RoPE) it binds when
    # built ("auto" | "liger" | "triton" | "torch", see flashlm.ops.resolve); not part of HF config.json
    kernels: str = "auto"

    def __post_init__(self) -> None:
        # Groups run in this order, each raising on its first bad field (and normalizing the fields
        # it owns), so a config with several bad fields always names the same one.
        _check_types(self)
        _check_sizes(self)
        _check_architecture_and_rope(self)
        _check_numbers(self)
        _check_token_ids(self)
        _check_family(self)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def sliding_window_for_layer(self, layer_idx: int) -> int | None:
        """Window (in tokens, itself included) of layer ``layer_idx``; None means full attention.

        Without ``layer_types`` every layer shares one window (Mistral); with it only the
        "sliding_attention" layers do (Qwen2's top layers from max_window_layers on, Gemma2's
        even layers).
        """
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k before the softmax: query_pre_attn_scalar**-0.5 (Gemma2) or
        head_dim**-0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_parameters(self) -> int:
        """Parameter count of the causal LM (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias or self.qkv_bias:
            attn += d * (2 * self.num_kv_heads + self.num_heads)
        if self.attention_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        per_layer = attn + mlp + (4 if self.post_norms else 2) * h
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + h

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (derived fields recomputed unless given)."""
        values = dataclasses.asdict(self)
        # A head_dim that was derived is derived again from the new hidden_size / num_heads.
        reshaped = "hidden_size" in changes or "num_heads" in changes
        if reshaped and "head_dim" not in changes and self.head_dim * self.num_heads == self.hidden_size:
            values["head_dim"] = None
        values.update(changes)
        return ModelConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- HF config.json -----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """Build a config from a transformers config.json (a dict, a file, or a folder holding one).

        Supported ``model_type``s: see `HF_ARCHITECTURES`. Keys that would change the math in a way
        this library does not implement (another ``hidden_act``, an unsupported ``rope_type``,
        partial rotary, ...) raise ``ValueError`` naming them; keys we do not know are ignored with
        a warning.
        """
        return config_from_hf(cls, path_or_dict)

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers config.json dict for this config (legacy ``rope_theta``/``rope_scaling``
        keys, which transformers 4.x and 5.x both read).

        Raises ``ValueError`` when a field is set that the architecture's HF class cannot express
        (e.g. a sliding window on "llama"), since transformers would silently ignore it.
        """
        return config_to_hf(self)


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be None or a dict, got {type(scaling).__name__}")
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        extra = sorted(set(scaling) - {"rope_type", "type"})
        if extra:
            raise InputError(f"rope_scaling of type 'default' takes no parameters, got {extra}")
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InputError(
            f"rope_scaling rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)} or None"
        )
    missing = [k for k in _LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise InputError(f"rope_scaling of type 'llama3' lacks {missing}")
    extra = sorted(set(scaling) - set(_LLAMA3_ROPE_KEYS) - {"rope_type", "type"})
    if extra:
        raise InputError(f"rope_scaling of type 'llama3' has unsupported keys {extra}")
    out = {"rope_type": "llama3"}
    for key in _LLAMA3_ROPE_KEYS:
        value = scaling[key]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise InputError(f"rope_scaling[{key!r}] must be a positive number, got {value!r}")
        out[key] = value
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise InputError(
            f"rope_scaling high_freq_factor ({out['high_freq_factor']}) must exceed "
            f"low_freq_factor ({out['low_freq_factor']})"
        )
    out["factor"] = float(out["factor"])
    out["low_freq_factor"] = float(out["low_freq_factor"])
    out["high_freq_factor"] = float(out["high_freq_factor"])
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


# Fields of a JSON-ish type that __post_init__ would otherwise accept in a wrong type ("false" is a
# true string, True an int): checked first, so a config.json typo is refused instead of changing the math.
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "qk_norm",
                "rms_norm_unit_offset", "post_norms", "embed_scale")
_NUMBER_FIELDS = ("rope_theta", "rms_norm_eps", "attention_dropout", "initializer_range",
                  "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar")
_STR_FIELDS = ("architecture", "hidden_act")


def _check_types(config: ModelConfig) -> None:
    """InputError for a bool field that is not a bool, a number that is not a finite int/float (or is
    a bool), a name that is not a str."""
    for name in _BOOL_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise InputError(f"{name} must be true or false (a bool), got {value!r} ({type(value).__name__})")
    for name in _NUMBER_FIELDS:
        value = getattr(config, name)
        if value is None and name not in ("rope_theta", "rms_norm_eps", "attention_dropout", "initializer_range"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    for name in _STR_FIELDS:
        if not isinstance(getattr(config, name), str):
            raise InputError(f"{name} must be a string, got {getattr(config, name)!r}")


def _check_sizes(config: ModelConfig) -> None:
    """Positive sizes; derives num_kv_heads (= num_heads) and head_dim (= hidden_size // num_heads)
    when None; GQA divisibility; an even head_dim for RoPE."""
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        _check_positive_int(name, getattr(config, name))
    if config.num_kv_heads is None:
        config.num_kv_heads = config.num_heads
    _check_positive_int("num_kv_heads", config.num_kv_heads)
    if config.num_heads % config.num_kv_heads:
        raise InputError(
            f"num_heads ({config.num_heads}) must be divisible by num_kv_heads ({config.num_kv_heads}) "
            "for grouped-query attention"
        )
    if config.head_dim is None:
        if config.hidden_size % config.num_heads:
            raise InputError(
                f"hidden_size ({config.hidden_size}) must be divisible by num_heads ({config.num_heads}) "
                "when head_dim is not given (head_dim = hidden_size // num_heads)"
            )
        config.head_dim = config.hidden_size // config.num_heads
    _check_positive_int("head_dim", config.head_dim)
    if config.head_dim % 2:
        raise InputError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")


def _check_architecture_and_rope(config: ModelConfig) -> None:
    """architecture, rope_theta (made a float), kernels and rope_scaling (normalized)."""
    if config.architecture not in HF_ARCHITECTURES:
        raise InputError(
            f"architecture must be one of {sorted(HF_ARCHITECTURES)}, got {config.architecture!r}"
        )
    if not (isinstance(config.rope_theta, (int, float)) and config.rope_theta > 0):
        raise InputError(f"rope_theta must be a positive number, got {config.rope_theta!r}")
    config.rope_theta = float(config.rope_theta)
    if config.kernels not in KERNELS:
        raise ValueError(f"kernels must be 'auto', 'liger', 'triton' or 'torch', got {config.kernels!r}")
    config.rope_scaling = _normalize_rope_scaling(config.rope_scaling)


def _check_numbers(config: ModelConfig) -> None:
    """rms_norm_eps, sliding_window, the softcaps, attention_dropout and initializer_range ranges."""
    if not (isinstance(config.rms_norm_eps, (int, float)) and config.rms_norm_eps > 0):
        raise InputError(f"rms_norm_eps must be a positive number, got {config.rms_norm_eps!r}")
    if config.sliding_window is not None:
        _check_positive_int("sliding_window", config.sliding_window)
    for name in ("attn_logit_softcap", "final_logit_softcap"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise InputError(f"{name} must be None or a positive number, got {value!r}")
    if not (isinstance(config.attention_dropout, (int, float)) and 0.0 <= config.attention_dropout < 1.0):
        raise InputError(f"attention_dropout must be in [0, 1), got {config.attention_dropout!r}")
    if not (isinstance(config.initializer_range, (int, float)) and config.initializer_range > 0):
        raise InputError(f"initializer_range must be a positive number, got {config.initializer_range!r}")


def _check_token_ids(config: ModelConfig) -> None:
    """pad/bos/eos ids inside the vocabulary; a tuple of eos ids becomes a list."""
    for name in ("pad_token_id", "bos_token_id"):
        _check_token_id(name, getattr(config, name), config.vocab_size)
    eos = config.eos_token_id
    for token in eos if isinstance(eos, (list, tuple)) else [eos]:
        _check_token_id("eos_token_id", token, config.vocab_size)
    if isinstance(eos, tuple):
        config.eos_token_id = list(eos)


def _check_family(config: ModelConfig) -> None:
    """layer_types (made a list), hidden_act, the family flags and query_pre_attn_scalar (None when it
    equals head_dim)."""
    if config.layer_types is not None:
        config.layer_types = list(config.layer_types)
        bad = sorted({t for t in config.layer_types if t not in LAYER_TYPES}, key=str)
        if len(config.layer_types) != config.num_layers or bad:
            raise InputError(
                f"layer_types must be None or a list of num_layers={config.num_layers} entries from "
                f"{list(LAYER_TYPES)}, got {len(config.layer_types)} entries"
                + (f" with unknown values {bad}" if bad else "")
            )
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise InputError(
            f"hidden_act must be one of {list(SUPPORTED_ACTIVATIONS)}, got {config.hidden_act!r}"
        )
    for name in ("qkv_bias", "qk_norm", "rms_norm_unit_offset", "post_norms", "embed_scale"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(config, name)!r}")
    scalar = config.query_pre_attn_scalar
    if scalar is not None and (
        isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0
    ):
        raise InputError(f"query_pre_attn_scalar must be None or a positive number, got {scalar!r}")
    if scalar is not None and scalar == config.head_dim:
        config.query_pre_attn_scalar = None  # the same scale; one spelling so configs compare equal


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _check_token_id(name: str, value: Any, vocab_size: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise InputError(f"{name} must be None or an int in [0, vocab_size={vocab_size}), got {value!r}")


# ---- presets ----------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: GQA (4 q / 2 kv heads), head_dim 16.
    "tiny": {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 512,  # the CPU benchmark: 256-token prompts + 32 new tokens
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # ~110M parameters, GPT-2-small-like shape with a LLaMA block.
    "small": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "num_kv_heads": 12,
        "intermediate_size": 2048,
        "max_position_embeddings": 2048,
    },
    # The shape of meta-llama/Llama-3.2-1B.
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}
# The shape of meta-llama/Llama-3.2-3B (~3.21B parameters): llama-1b's RoPE, vocab, special ids and tied
# embeddings, hidden 3072, 28 layers, 24 query / 8 kv heads of 128.
PRESETS["llama-3b"] = {**copy.deepcopy(PRESETS["llama-1b"]), "hidden_size": 3072, "num_layers": 28, "num_heads": 24,
                       "head_dim": 128}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset (see `PRESETS`) as a validated `ModelConfig`, with optional field overrides.

    ``architecture="gemma2"`` (or "qwen2", "qwen3") also sets the flags that family's HF class
    hard-codes (`HFArchitecture.fixed`), unless overridden."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise InputError(f"unknown ModelConfig fields {bad}")
    # An architecture brings the fields its HF class hard-codes (Gemma2's norms, Qwen2's q/k/v bias).
    arch = HF_ARCHITECTURES.get(overrides.get("architecture", PRESETS[name].get("architecture", "llama")))
    values = {**PRESETS[name], **(arch.fixed if arch else {}), **overrides}
    return ModelConfig(**values)
