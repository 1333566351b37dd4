"""Weight-only quantization of a flashlm causal LM for inference: ``quantize_model(model, "int8")``.

Every projection ``nn.Linear`` is replaced, in place, by :class:`flashlm.ops.int8_linear.Int8Linear`
(int8 weights, one fp32 scale per output channel): in the flash model ``qkv_proj``, ``o_proj``,
``gate_up_proj``, ``down_proj`` and ``lm_head``; in the default (eager) model, which is supported too,
``q_proj`` ... ``down_proj`` and ``lm_head``. ``lm_head`` is about a fifth of llama-1b's decode bytes, so
it is quantized as well; with tied embeddings it gets its own int8 copy and the embedding (a lookup of
``batch`` rows per step) stays in the model's dtype. Norms, embeddings and the KV cache keep it too.

A quantized model is for inference: its parameters are frozen (``requires_grad=False``), the int8 op has
no backward and refuses inputs that require grad, the flash model's loss calls the int8 ``lm_head``
module on materialized logits (its fused losses read a float ``lm_head.weight``). ``save_pretrained``
refuses it (an int8 tensor under an HF name would load as garbage into an unquantized model): save the
unquantized model and quantize on load, ``from_pretrained(path, quantize="int8")``. Its ``state_dict()``
(int8 ``weight`` + ``scale`` per projection) loads back into a model quantized the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from flashlm.errors import InputError
from flashlm.ops.int8_linear import Int8Linear

__all__ = ["METHODS", "PROJECTIONS", "check_quantize_args", "is_quantized", "projection_kinds", "quantize_model"]

METHODS = ("int8",)
# projection names per model class: the flash model's fused layout, the default model's HF layout
PROJECTIONS = {
    "flash": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"),
    "default": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
}
_HALF = (torch.bfloat16, torch.float16)


def check_quantize_args(method: str, dtype: torch.dtype | None = None, where: str = "quantize") -> None:
    """InputError unless ``method`` is a supported method ("int8") and ``dtype`` (when given) bf16/fp16."""
    if method == "int4":
        raise InputError(f"{where}: 'int4' is not supported; the only method is 'int8' (weight-only, one scale per "
                         "output channel)")
    if method not in METHODS:
        raise InputError(f"{where}: unknown method {method!r}; choose among {list(METHODS)}")
    if dtype is not None and dtype not in _HALF:
        raise InputError(f"{where}={method!r} needs a bf16 or fp16 model (int8 weights are dequantized into "
                         f"the activations' dtype), got {dtype}; pass dtype=torch.bfloat16 (--dtype bf16)")


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def _family(model: nn.Module) -> str:
    from .reference import DefaultForCausalLM

    if not isinstance(model, DefaultForCausalLM):
        raise InputError(f"quantize_model takes a flashlm causal LM (build_model / from_pretrained), got "
                         f"{type(model).__name__}")
    # the flash model's fused layout, found by its names (importing flash.py here would be a circle)
    return "flash" if any(name.endswith("qkv_proj") for name, _ in model.named_modules()) else "default"


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every projection named in ``names``; InputError where one is not a
    plain nn.Linear (a Float8Linear, a LoRA wrapper: quantizing it would drop what it adds)."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if attr not in names:
                continue
            full = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is not nn.Linear:
                raise InputError(f"quantize_model: {full} is a {type(child).__name__}, not a plain nn.Linear; "
                                 "int8 quantization replaces plain Linear projections only")
            found.append((parent, attr, child))
    return found


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise InputError(f"quantize_model: the model's parameters mix dtypes {sorted(map(str, dtypes))}; cast it "
                         "to one of bf16/fp16 first (model.to(torch.bfloat16))")
    return next(iter(dtypes))


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "int8", modules: tuple[str, ...] | list[str] | None = None
                   ) -> nn.Module:
    """Replace ``model``'s projections by int8 weight-only ones, in place; returns ``model`` (frozen, eval
    mode, ``model.quantization == method``). ``modules``: projection names to quantize (default: all of
    :data:`PROJECTIONS` for the model's class, ``lm_head`` included). Refused, before anything changes: a
    method other than "int8" ("int4" included), a model already quantized, a dtype other than bf16/fp16,
    an unknown projection name, a projection that is not a plain nn.Linear, weights on the meta device."""
    family = _family(model)
    check_quantize_args(method, _model_dtype(model), "quantize_model: quantize")
    if is_quantized(model) or getattr(model, "quantization", None):
        raise InputError("quantize_model: the model is already quantized; quantize the unquantized model once")
    known = PROJECTIONS[family]
    names = known if modules is None else tuple(modules)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise InputError(f"quantize_model: unknown projection names {bad or 'none given'} for the {family} model; "
                         f"choose among {list(known)}")
    targets = _targets(model, names)
    if any(child.weight.device.type == "meta" for _, _, child in targets):
        raise InputError("quantize_model: the weights are on the meta device; load them first")
    for parent, attr, child in targets:
        setattr(parent, attr, Int8Linear.from_linear(child))
    model.requires_grad_(False)
    model.quantization = method
    return model.eval()


def projection_kinds(model: nn.Module, describe=lambda module: type(module).__name__) -> dict[str, str]:
    """{projection name: ``describe(module)``, by default its class} over the model's layers and lm_head
    (joined by "/" where layers differ), e.g. {"qkv_proj": "Int8Linear", ..., "lm_head": "Linear"}: what
    ``FlashForCausalLM.explain`` reports as "projections"."""
    names = dict.fromkeys(PROJECTIONS["flash"] + PROJECTIONS["default"])  # ordered, unique
    kinds: dict[str, list[str]] = {}
    for _, parent in model.named_modules():
        for attr, child in parent.named_children():
            if attr in names:
                seen = kinds.setdefault(attr, [])
                if describe(child) not in seen:
                    seen.append(describe(child))
    return {k: "/".join(kinds[k]) for k in names if k in kinds}
