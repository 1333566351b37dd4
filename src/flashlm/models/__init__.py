"""flashlm models: config (config.py, hf_config.py), the default (eager) model (reference.py), the flash
model (flash.py) with its planner (plan.py), kernel choice (kernels.py) and static cache (kv_cache.py),
and the weights: fused projections + HF-format checkpoint IO (weights.py).

from flashlm.models import build_model, from_pretrained, save_pretrained, get_preset
model = build_model(get_preset("tiny"), attn="default")
save_pretrained(model, "ckpt/")
model = from_pretrained("ckpt/", attn="flash", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from .config import PRESETS, ModelConfig, get_preset
from .reference import CausalLMOutput, DefaultForCausalLM, DynamicCache
from .weights import LoadReport, load_state_dict_from_folder, save_pretrained

__all__ = [
    "MODEL_CLASSES",
    "PRESETS",
    "CausalLMOutput",
    "DefaultForCausalLM",
    "DynamicCache",
    "LoadReport",
    "ModelConfig",
    "build_model",
    "from_pretrained",
    "get_preset",
    "save_pretrained",
]


class _ModelClasses(Mapping):
    """``attn`` name -> causal LM class. "flash" is imported on first use (it pulls in the attention
    kernels), so ``import flashlm.models`` stays light."""

    _lazy: ClassVar[dict[str, tuple[str, str]]] = {"flash": ("flashlm.models.flash", "FlashForCausalLM")}

    def __init__(self) -> None:
        self._loaded: dict[str, type[nn.Module]] = {"default": DefaultForCausalLM}

    def __getitem__(self, name: str) -> type[nn.Module]:
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._lazy:
            raise KeyError(name)
        module_name, attr = self._lazy[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            raise ImportError(
                f"attn={name!r} needs {module_name}, which is not available in this install"
            ) from e
        self._loaded[name] = getattr(module, attr)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._loaded, *(k for k in self._lazy if k not in self._loaded)])

    def __len__(self) -> int:
        return len(set(self._loaded) | set(self._lazy))

    def register(self, name: str, cls: type[nn.Module]) -> None:
        """Add (or replace) a model class under ``name``."""
        self._loaded[name] = cls


MODEL_CLASSES = _ModelClasses()


def _model_class(attn: str) -> type[nn.Module]:
    if attn not in MODEL_CLASSES:
        raise ValueError(f"attn must be one of {list(MODEL_CLASSES)}, got {attn!r}")
    return MODEL_CLASSES[attn]


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")


def build_model(
    config: ModelConfig | str,
    attn: str = "default",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A freshly initialized causal LM (train mode) for ``config`` (a `ModelConfig` or a preset
    name), with ``attn`` "default" (eager) or "flash", built directly on ``device`` in ``dtype``."""
    if isinstance(config, str):
        config = get_preset(config)
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"config must be a ModelConfig or a preset name {sorted(PRESETS)}, got {type(config).__name__}"
        )
    _check_dtype(dtype)
    cls = _model_class(attn)
    with torch.device(device if device is not None else "cpu"):
        model = cls(config)
    return model.to(dtype=dtype) if dtype is not None else model


def from_pretrained(
    path: str | os.PathLike,
    attn: str = "default",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    allow_missing: bool = False,
    quantize: str | None = None,
) -> nn.Module:
    """Load an HF-format checkpoint folder (config.json + safetensors, sharded or not) into a
    flashlm model (eval mode). ``dtype=None`` keeps the checkpoint's dtype. Missing tensors raise
    ``ValueError`` unless ``allow_missing`` (they are then initialized as in a fresh model);
    unexpected ones are warned about. The report is in ``model.load_report`` (`LoadReport`).
    ``quantize="int8"``: the loaded model's projections and lm_head as int8 weight-only ones
    (:func:`flashlm.models.quantize.quantize_model`; a bf16/fp16 ``dtype`` is required, inference only)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"checkpoint folder {path!r} does not exist (only local folders are supported)"
        )
    _check_dtype(dtype)
    from .weights import checkpoint_dtype

    config = ModelConfig.from_hf_config(path)
    cls = _model_class(attn)
    dtype = dtype or checkpoint_dtype(path) or torch.float32
    if quantize is not None:  # before any weight is read
        from .quantize import check_quantize_args

        check_quantize_args(quantize, dtype, "from_pretrained: quantize")
    device = torch.device(device if device is not None else "cpu")
    # Build on the meta device and allocate uninitialized storage: no time spent on random init
    # of weights that the checkpoint overwrites.
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty re-creates parameters, which unties them
    if allow_missing and hasattr(model, "init_weights"):
        model.init_weights()
    report = load_state_dict_from_folder(model, path, allow_missing=allow_missing)
    if report.unexpected_keys:
        warnings.warn(
            f"checkpoint {path!r} has tensors the model does not use: {report.unexpected_keys[:20]}",
            stacklevel=2,
        )
    model.load_report = report
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize)
    return model.eval()
