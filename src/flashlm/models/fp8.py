"""FP8 training through torchao's ``torchao.float8`` (the ``fp8`` extra): the projections become
``Float8Linear`` (dynamic scaling, ``torch._scaled_mm``), everything else stays bf16.

- :func:`convert_to_fp8` swaps the projections of a flashlm model in place: the flash model's ``qkv_proj``,
  ``o_proj``, ``gate_up_proj``, ``down_proj``; the default model's ``q/k/v/o_proj`` and ``gate/up/down_proj``;
  ``lm_head`` only when asked (see there why it stays bf16 by default). Every bad input is refused before
  anything is converted.
- The flash model's SwiGLU + down projection stays one autograd node with a Float8Linear ``down_proj``
  (:func:`swiglu_float8_linear`): it saves ``gate_up`` and recomputes the (..., I) activation in the
  backward, as ``ops.swiglu_linear`` does in bf16, and calls torchao's own FP8 matmul forward and
  backward once each (no GEMM is repeated). ``FlashForCausalLM.explain`` names each layer's path
  (:func:`flashlm.models.kernels.mlp_down_path`).
- FSDP2: ``fsdp=True`` with "tensorwise" all-gathers the weights in float8 (torchao's
  ``enable_fsdp_float8_all_gather``); :func:`precompute_scales` then computes every weight's scale in one
  all-reduce after each optimizer step (``flashlm train`` calls it).

Float8Linear's weight is an ordinary parameter under the same name, so state dicts and checkpoints keep
the bf16 weights under HF names (with or without FP8). FP8 matmuls need a CUDA GPU of compute capability
8.9+ (Ada, Hopper, Blackwell); torchao's float8 casts are meant to run under ``torch.compile``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flashlm.errors import InputError
from flashlm.ops._dispatch import dispatch

__all__ = ["FP8_MIN_CAPABILITY", "RECIPES", "check_fp8_available", "check_fp8_device", "convert_to_fp8",
           "fp8_modules", "fuses_swiglu", "linear_name", "precompute_scales", "swiglu_float8_linear"]

RECIPES = ("tensorwise", "rowwise")
FP8_MIN_CAPABILITY = (8, 9)  # torch._scaled_mm's float8 GEMMs: Ada (8.9), Hopper (9.0) and later
# projections converted: the flash model's fused ones and the default model's separate ones
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
               "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_INSTALL = "pip install 'flashlm[fp8]'"


def check_fp8_available() -> None:
    """InputError naming the extra when torchao's float8 training is not importable."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise InputError(f"FP8 training needs torchao (torchao.float8): {_INSTALL} ({e})") from None


def check_fp8_device(device: torch.device | str, allow_cpu: bool = False) -> None:
    """Refuse a device FP8 matmuls cannot run on: a CUDA GPU before compute capability 8.9 (A100 is 8.0),
    or anything but CUDA unless ``allow_cpu`` (tests: torchao converts anywhere, and torch's CPU
    ``_scaled_mm`` runs, slowly)."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise InputError(
                f"FP8 training needs a GPU of compute capability {'.'.join(map(str, FP8_MIN_CAPABILITY))}+ "
                f"(Ada, Hopper: L40S, H100, H200); {device} ({name}) is {cap[0]}.{cap[1]}: train in bf16 instead")
    elif not allow_cpu:
        raise InputError(
            f"FP8 training needs a CUDA GPU of compute capability {'.'.join(map(str, FP8_MIN_CAPABILITY))}+; the "
            f"model is on {device}: move it first (model.to('cuda')); allow_cpu=True converts anyway (tests)")


def fp8_modules(model: nn.Module, lm_head: bool = False) -> dict[str, nn.Linear]:
    """{qualified name: module} of the projections :func:`convert_to_fp8` converts: the decoder layers'
    plain ``nn.Linear`` :data:`PROJECTIONS`, and ``lm_head`` when asked."""
    found = {}
    for name, mod in model.named_modules():
        leaf = name.rpartition(".")[2]
        in_layer = ".layers." in f".{name}"
        if type(mod) is nn.Linear and ((in_layer and leaf in PROJECTIONS) or (lm_head and name == "lm_head")):
            found[name] = mod
    return found


def _check_model(model: nn.Module, recipe: str, lm_head: bool, modules: dict[str, nn.Linear],
                 dtype: torch.dtype | None, allow_cpu: bool) -> None:
    """Every refusal of :func:`convert_to_fp8`, before anything is converted."""
    if recipe not in RECIPES:
        raise InputError(f"unknown FP8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    check_fp8_available()
    from torchao.float8.float8_linear import Float8Linear

    done = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    if done:
        raise InputError(f"the model is already converted to FP8 ({done[0]} is a Float8Linear); convert once")
    other = [(n, type(m).__name__) for n, m in model.named_modules() if n not in modules
             and ((".layers." in f".{n}" and n.rpartition(".")[2] in PROJECTIONS) or (lm_head and n == "lm_head"))]
    if other:  # an int8 (flashlm.models.quantize) or LoRA-wrapped projection: converting around it would mix
        raise InputError(f"{other[0][0]} is a {other[0][1]}, not a plain nn.Linear: FP8 training converts plain "
                         "Linear projections (of an unquantized model) only")
    if any(hasattr(p, "placements") for p in model.parameters()):
        raise InputError("convert_to_fp8 runs before FSDP2's fully_shard (the model's parameters are already "
                         "sharded DTensors): convert, then shard (flashlm train does so)")
    if not modules:
        raise InputError(f"found no projection to convert ({', '.join(PROJECTIONS)} as nn.Linear inside "
                         f"model.layers): convert_to_fp8 takes a flashlm model (flash or default)")
    weight = next(iter(modules.values())).weight
    check_fp8_device(weight.device, allow_cpu)
    dev = weight.device.type
    compute = dtype or (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype)
    if compute != torch.bfloat16:
        raise InputError(
            f"FP8 training computes in bf16 around its float8 matmuls; this model computes in {compute}: cast it "
            "(model.to(torch.bfloat16)), or pass dtype=torch.bfloat16 when it runs under bf16 autocast or "
            "FSDP2's bf16 MixedPrecisionPolicy (flashlm train --fp8 needs --dtype bf16, the CUDA default)")
    for name, mod in modules.items():
        out_f, in_f = mod.weight.shape
        if out_f % 16 or in_f % 16:
            raise InputError(
                f"{name}: weight (out_features, in_features) = {(out_f, in_f)}: FP8 matmuls need both dims "
                "divisible by 16 (torch._scaled_mm); pick a model shape whose sizes are")


def _config(recipe: str, fsdp: bool):
    """torchao's Float8LinearConfig of ``recipe``; "tensorwise" under FSDP2 all-gathers in float8."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":  # rowwise all-gathers bf16: torchao's float8 all-gather is tensorwise only
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", lm_head: bool = False, *, fsdp: bool = False,
                   dtype: torch.dtype | None = None, fuse_mlp: bool = True, allow_cpu: bool = False) -> nn.Module:
    """Swap ``model``'s projections (:func:`fp8_modules`) for torchao ``Float8Linear``s in place; returns it.

    ``recipe``: "tensorwise" (one scale per tensor, cuBLAS) or "rowwise" (a scale per row, CUTLASS; torchao's
    ``Float8LinearConfig.from_recipe_name``). ``lm_head``: also convert the LM head. It stays bf16 by
    default: the training loss (fused linear cross-entropy) reads ``lm_head.weight`` directly, so a
    Float8Linear head runs in FP8 only where logits come from the module (``return_logits=True``,
    generation); ``explain()`` says so. ``fsdp``: the model is sharded with FSDP2 after this (call
    :func:`precompute_scales` after each optimizer step). ``dtype``: the compute dtype (default: the
    autocast dtype if autocast is on, else the weights'); it must be bf16. ``fuse_mlp=False``: the flash
    model's MLP runs swiglu and then the Float8Linear module (the activation saved for the backward)
    instead of :func:`swiglu_float8_linear`. ``allow_cpu``: convert a model that is not on an FP8-capable
    GPU (tests).

    Refused (InputError, nothing converted): torchao missing, a device other than a CUDA GPU of compute
    capability 8.9+, a compute dtype other than bf16, an unknown recipe, a projection whose dims are not
    divisible by 16 or that is not a plain nn.Linear (int8, LoRA), a model already converted or sharded.
    Convert before ``fully_shard`` and ``torch.compile``; the converted model's state dict has the same keys
    and values. torchao's "rowwise"
    cannot run under ``torch.inference_mode`` (an inference tensor's reshape): use ``torch.no_grad``."""
    modules = fp8_modules(model, lm_head)
    _check_model(model, recipe, lm_head, modules, dtype, allow_cpu)
    from torchao.float8 import convert_to_float8_training

    config = _config(recipe, fsdp)
    tied = lm_head and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    # a tied head shares the embedding's weight, which the lookup needs in high precision: no float8 all-gather
    head_config = _config(recipe, fsdp=False) if tied else config
    body = set(modules) - {"lm_head"}
    convert_to_float8_training(model, module_filter_fn=lambda _m, fqn: fqn in body, config=config)
    if "lm_head" in modules:
        convert_to_float8_training(model, module_filter_fn=lambda _m, fqn: fqn == "lm_head", config=head_config)
    converted = dict(model.named_modules())
    for name, old in modules.items():
        new = converted[name]
        if hasattr(old, "split_sizes"):  # a fused projection's parts (init draws per part)
            new.split_sizes = old.split_sizes
        if not fuse_mlp and name.endswith("down_proj"):
            new.flashlm_fused_swiglu = False
    model.fp8_recipe = recipe
    return model


@torch.no_grad()
def precompute_scales(model: nn.Module) -> None:
    """After an optimizer step of an FSDP2-sharded model converted with ``fsdp=True`` ("tensorwise"): every
    float8 weight's scale in one all-reduce (torchao's ``precompute_float8_dynamic_scale_for_fsdp``),
    instead of one per weight at its all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def needs_scale_precompute(model: nn.Module) -> bool:
    """Whether :func:`precompute_scales` applies: some Float8Linear all-gathers its weight in float8."""
    mod = sys.modules.get("torchao.float8.float8_linear")
    return mod is not None and any(isinstance(m, mod.Float8Linear) and m.config.enable_fsdp_float8_all_gather
                                   for m in model.modules())


def linear_name(module: nn.Module) -> str:
    """A projection's class for ``explain()``: "Linear", "Float8Linear(tensorwise|rowwise)", or its class name."""
    mod = sys.modules.get("torchao.float8.float8_linear")
    if mod is not None and isinstance(module, mod.Float8Linear):
        granularity = module.config.cast_config_input.scaling_granularity.value
        return f"Float8Linear({'tensorwise' if granularity == 'tensorwise' else 'rowwise'})"
    return type(module).__name__


# --------------------------------------------------------------------------------------------
# SwiGLU + a Float8Linear down projection as one autograd node


def fuses_swiglu(down: nn.Module) -> bool:
    """Whether :func:`swiglu_float8_linear` serves ``down``: a torchao Float8Linear (not opted out by
    ``convert_to_fp8(fuse_mlp=False)``); torchao not imported means no Float8Linear exists."""
    mod = sys.modules.get("torchao.float8.float8_linear")
    return (mod is not None and type(down) is mod.Float8Linear
            and down.__dict__.get("flashlm_fused_swiglu", True))


class _Ctx:
    """What torchao's FP8 matmul Function reads from and writes to autograd's ctx, for calling its
    forward and backward from :class:`_SwiGLUFloat8Function` (which owns the real ctx)."""

    def __init__(self, saved: tuple = (), linear_mm_config=None, config=None) -> None:
        self.saved_tensors, self.linear_mm_config, self.config = saved, linear_mm_config, config

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


def _matmul():
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args


class _SwiGLUFloat8Function(torch.autograd.Function):
    """``down(swiglu(gate_up))`` with torchao's FP8 matmul, saving gate_up and the weight but not the
    activation (tokens x I per layer): the backward recomputes it with the op set's swiglu (elementwise),
    then runs torchao's backward (grad_input and grad_weight GEMMs, once each) and swiglu's backward."""

    @staticmethod
    def forward(ctx, gate_up: Tensor, weight: Tensor, down: nn.Module, swiglu: Callable) -> Tensor:
        ctx.save_for_backward(gate_up, weight)
        ctx.down, ctx.swiglu = down, swiglu
        act = swiglu(gate_up)  # grad mode is off here: nothing of it is kept
        return _matmul().forward(_Ctx(), act, weight.t(), down.linear_mm_config, down.config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        gate_up, weight = ctx.saved_tensors
        with torch.enable_grad():  # the recomputed activation, differentiable to gate_up
            gu = gate_up.detach().requires_grad_(True)
            act = ctx.swiglu(gu)
        inner = _Ctx((act.detach(), weight.t()), ctx.down.linear_mm_config, ctx.down.config)
        grad_act, grad_weight_t = _matmul().backward(inner, grad)[:2]
        (grad_gate_up,) = torch.autograd.grad(act, gu, grad_act)
        return grad_gate_up, grad_weight_t.t(), None, None


def _unfused(gate_up: Tensor, weight: Tensor, down: nn.Module, swiglu: Callable) -> Tensor:
    """swiglu, then the Float8Linear's own forward: without grad (nothing saved), and under torch.compile,
    where AOTAutograd's partitioner recomputes the cheap activation itself."""
    return down(swiglu(gate_up))


_swiglu_float8 = dispatch(_SwiGLUFloat8Function, _unfused, _unfused)


def swiglu_float8_linear(gate_up: Tensor, down: nn.Module, swiglu: Callable) -> Tensor:
    """``down(swiglu(gate_up))`` for a torchao Float8Linear ``down`` (:func:`fuses_swiglu`): gate_up (..., 2 * I)
    -> (..., out). With gradients (eager) one autograd node that does not save the (..., I) activation;
    ``swiglu`` is the plan's op (``ops.swiglu``). Casts as Float8Linear's forward does under autocast."""
    if torch.is_autocast_enabled("cuda"):  # Float8Linear casts its input to the autocast dtype (CUDA's)
        gate_up = gate_up.to(torch.get_autocast_dtype("cuda"))
    out = _swiglu_float8(gate_up, down.weight, down, swiglu)
    return out if down.bias is None else out + down.bias.to(out.dtype)
