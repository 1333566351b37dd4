"""Which kernels the flash model runs: every choice made once, when the model is built or moved.

- **Op sets** (:func:`op_sets`): ``flashlm.ops.resolve(config.kernels, device)`` three times, once per
  *mode* a call can be planned in: "eager" (host time counts), "compiled" (ops inductor can fuse; the
  caller that compiles says so: ``FlashForCausalLM.prepare_compile`` or ``decode_logits(compiled=True)``)
  and "decode" (tokens appended to the cache eagerly, as in a captured CUDA graph: least GPU time). The
  planner (:mod:`flashlm.models.plan`) puts the op set of a call's mode in its plan
  (:func:`mode_of`); the layers use ``plan.ops`` and choose nothing.
- **Attention backends** (:class:`AttentionKernels`): a flash attention layer has a fixed call shape
  (heads, head_dim, causal, window, softcap), so the registry's choice depends only on (kind, dtype,
  needs_grad, dropout) and whether the plan is compiled: the layer binds that table once, and
  :meth:`AttentionKernels.select` is the one function that answers which kernel a planned call runs
  (the forward calls it, and so does ``FlashForCausalLM.explain``); fp32 q/k/v in a half-precision
  model take the half kernels (:func:`half_precision_inputs`).
- **Which linear** (:func:`mlp_down_path`): a projection may be a plain ``nn.Linear``, a torchao
  ``Float8Linear`` (:mod:`flashlm.models.fp8`) or another module (int8, PEFT/LoRA); the MLP's SwiGLU and
  down projection run as one node for the first two and as swiglu + the module otherwise, and
  ``explain()`` names each layer's path (never a silent fallback).
- **Decode fusions** (:func:`fuses_norm`): whether a decode step makes a block's add + RMSNorm in the
  kernel of the projection after it (``ops.norm_linear``), per projection and call; ``explain()``'s
  "norm_fused_into".
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from flashlm import ops as fused_ops
from flashlm.ops.decode_linear import norm_linear_rows
from flashlm.ops.int8_linear import Int8Linear

from .fp8 import fuses_swiglu, linear_name

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ATEN_DENSE_MAX_TOKENS", "MODES", "AttentionKernels", "aten_dense_eligible", "compute_dtype",
           "explain_plan", "fuses_norm", "fuses_norm_at", "half_precision_inputs", "loss_kind", "mlp_down_path",
           "mode_of", "op_sets"]

MODES = ("eager", "compiled", "decode")
_HALF = (torch.float16, torch.bfloat16)
# Dense causal calls of at most this many tokens (batch * seqlen) go to aten's FA2 op: measured on the
# H200 (512 tokens, (2, 256, 12, 64) bf16) it costs 380 us of host time per fwd+bwd against 830 through
# the registry's choice (cuDNN), and small steps are host-bound. Larger calls are GPU-bound, where cuDNN /
# FA4 run faster kernels (the project design notes: 4k causal fwd+bwd FA4 522, cuDNN 475, FA2 283 TFLOP/s). PROVISIONAL
# bound between the two measured regimes (the seed's 512 tokens and llama-1b's 16384).
ATEN_DENSE_MAX_TOKENS = 4096


def op_sets(kernels: str, device: torch.device) -> dict[str, fused_ops.Ops]:
    """{mode: Ops} for ``config.kernels`` on ``device`` (meta counts as CPU), one per :data:`MODES`."""
    device = torch.device("cpu") if device.type == "meta" else device
    return {mode: fused_ops.resolve(kernels, device, compiled=mode == "compiled", decode=mode == "decode")
            for mode in MODES}


def mode_of(kind: str, compiled: bool) -> str:
    """The op-set mode of a plan: compiled plans take the compiled set; eager appends to the cache (decode
    steps, eager or captured alike, so both give the same tokens) the decode set; anything else the eager."""
    return "compiled" if compiled else "decode" if kind == "append" else "eager"


# One warning per process; tests reset it here (flashlm.hf's hook uses this function too).
_WARNED_FP32 = False


def compute_dtype(proj: nn.Module) -> torch.dtype | None:
    """The float dtype a projection computes in: its weight's (nn.Linear, Float8Linear: bf16 master
    weights), or for a weight-only quantized one (an int8 weight) the dtype it dequantizes into
    (``Int8Linear.compute_dtype``); None for a foreign quantized module that does not say. Never int8."""
    weight = proj.weight
    return weight.dtype if weight.is_floating_point() else getattr(proj, "compute_dtype", None)


def half_precision_inputs(q: Tensor, k: Tensor, v: Tensor, weight_dtype: torch.dtype | None
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 q/k/v (batch, seqlen, heads, head_dim) in a half-precision model (PEFT/LoRA upcasts
    activations) -> the autocast dtype, else ``weight_dtype`` (the projections' :func:`compute_dtype`),
    with a one-time warning, as transformers' ``_flash_attention_forward`` does, instead of running a slow
    fp32 kernel. Anything else unchanged (``weight_dtype`` None: not known, no cast)."""
    if q.dtype != torch.float32:
        return q, k, v
    dev = q.device.type
    target = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight_dtype
    if target in (None, torch.float32):
        return q, k, v
    global _WARNED_FP32
    if not _WARNED_FP32:
        _WARNED_FP32 = True
        warnings.warn(f"attention inputs are float32 in a {target} model (upcast activations, e.g. PEFT); "
                      f"casting q/k/v to {target} for the flash kernels", stacklevel=3)
    return q.to(target), k.to(target), v.to(target)


def _aten_flash_dense(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, scale: float) -> Tensor:
    """Causal attention of BSHD q (B, S, H, D), k/v (B, S, KV, D) through ``aten._scaled_dot_product_
    flash_attention`` on BHSD views (no copies; GQA read natively; seqlen_q == seqlen_k, so its
    top-left causal mask is the bottom-right one). Returns (B, S, H, D) BSHD (a view)."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, True, False, scale=scale)[0]
    return out.transpose(1, 2)


def aten_dense_eligible(attn: nn.Module, device: torch.device) -> bool:
    """Whether ``attn``'s plain causal dense calls on ``device`` may use aten's FA2 op: PyTorch's own FA2
    serves them on CUDA (no window/softcap, head_dim a multiple of 8 up to 256) with the least host time;
    a forced backend (``use_backend``, ``FLASHLM_ATTN_BACKEND``) turns it off. :meth:`AttentionKernels.
    select` still checks each call's dtype (fp16/bf16) and size (``ATEN_DENSE_MAX_TOKENS``)."""
    from flashlm.attention import registry

    return (device.type == "cuda" and attn.window_size == (-1, -1) and not attn.softcap_value
            and attn.head_dim % 8 == 0 and attn.head_dim <= 256
            and registry.forced_backend()[0] is None)


def _select_backends(attn: nn.Module, device: torch.device) -> dict:
    """{(kind, dtype, needs_grad, dropout[, "compiled"]): Backend} for ``attn``'s calls on ``device``.

    Choosing once saves the per-call registry work (building and hashing an AttnCall, the forced-backend
    lookups) and keeps the registry, which reads a context variable, out of torch.compile's graph. A forced
    backend applies when the model is built or moved (``.to``), or at ``FlashForCausalLM.bind_attention``.
    Calls no backend serves stay unbound and go through the public API, which raises its error naming
    every refusal. The "compiled" keys hold the backend a compiled plan takes (:func:`_traceable_backend`)."""
    from flashlm.attention import registry
    from flashlm.attention.backends.base import AttnCall

    table: dict = {}
    if device.type == "meta":
        return table
    capability = registry.compute_capability(device)

    def call(kind, dtype, grad, dropout):
        return AttnCall(kind=kind, device_type=device.type, compute_capability=capability, dtype=dtype,
                        head_dim=attn.head_dim, head_dim_v=attn.head_dim, nheads=attn.num_heads,
                        nheads_k=attn.num_kv_heads, seqlen_q=None, seqlen_k=None, causal=True,
                        window=attn.window_size != (-1, -1), softcap=attn.softcap_value > 0, alibi=False,
                        dropout=dropout, needs_grad=grad, deterministic=False,
                        seqlens_equal=kind != "kvcache")

    dtypes = {compute_dtype(attn.qkv_proj), torch.bfloat16, torch.float16, torch.float32} - {None}
    dropouts = (False, True) if attn.attention_dropout > 0 else (False,)
    keys = [("kvcache", dtype, False, False) for dtype in dtypes]
    keys += [(kind, dtype, grad, dropout) for kind in ("dense", "varlen") for dtype in dtypes
             for grad in (False, True) for dropout in dropouts]
    for key in keys:
        c = call(*key)
        try:
            table[key] = registry.select(c)
        except (ValueError, TypeError):
            pass
        traced = _traceable_backend(c) if key[0] != "kvcache" else None
        if traced is not None:
            table[key + ("compiled",)] = traced
    return table


def _traceable_backend(call):
    """The registry's choice for ``call`` among the backends torch.compile can trace (each backend's
    ``traceable_kinds``: FA4 through its custom ops, sdpa_cpu dense only), or None. Compiled plans take
    it; a backend that cannot be traced would end the graph (fullgraph: an error)."""
    from flashlm.attention import registry

    if registry.forced_backend()[0] is not None:
        return None  # a forced backend is used as is (an untraceable one then fails to compile, loudly)
    exp = registry.explain_call(call)
    name = next((n for n, why in exp.reasons.items()
                 if why is None and call.kind in registry.get_backend(n).traceable_kinds), None)
    return None if name is None or name == "reference" and call.device_type != "cpu" else registry.get_backend(name)


class Choice(NamedTuple):
    """The attention kernel of one planned call: ``name`` (a backend's name, "aten_flash" or "api": the
    public ``flashlm.attention`` function, whose registry chooses per call) and the bound backend (None
    for "aten_flash" and "api")."""

    name: str
    backend: object | None


class AttentionKernels:
    """One flash attention layer's kernels, bound when it is built or moved: the registry's choice per
    (kind, dtype, needs_grad, dropout[, "compiled"]) in ``backends``, and whether its small plain causal
    dense calls on CUDA take aten's FA2 op (``aten_dense``)."""

    def __init__(self, attn: nn.Module, device: torch.device) -> None:
        self.backends = _select_backends(attn, device)
        self.aten_dense = aten_dense_eligible(attn, device)

    def select(self, kind: str, dtype: torch.dtype, needs_grad: bool, dropout: bool, compiled: bool,
               tokens: int) -> Choice:
        """The kernel of a planned call: ``kind`` "dense" | "varlen" (the plan's attention) or "kvcache"
        (an eager append: the bound kvcache kernel, else the public API); ``tokens`` = batch * seqlen."""
        if kind == "kvcache":
            be = None if compiled else self.backends.get(("kvcache", dtype, False, False))
            return Choice("api", None) if be is None else Choice(be.name, be)
        key = (kind, dtype, needs_grad, dropout)
        be = (self.backends.get(key + ("compiled",)) or self.backends.get(key)) if compiled else self.backends.get(key)
        if be is None:
            return Choice("api", None)
        if kind == "dense" and self.aten_dense and dtype in _HALF and tokens <= ATEN_DENSE_MAX_TOKENS:
            return Choice("aten_flash", None)
        return Choice(be.name, be)



def _hooked(module: nn.Module) -> bool:
    # forward hooks (FSDP2's fully_shard registers pre-hooks), a forward replaced on the instance
    # (accelerate's hooks) or its own compiled call: a fusion that bypasses the module's __call__ skips them
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or getattr(module, "_compiled_call_impl", None) is not None)


def fuses_norm(ops: fused_ops.Ops, proj: nn.Module, owner: nn.Module, rows: int, dtype: torch.dtype,
               needs_grad: bool = False) -> bool:
    """Whether the add + RMSNorm before ``proj`` (qkv_proj of the attention ``owner``, gate_up_proj of the
    MLP) runs in proj's own kernel (``ops.norm_linear``, :mod:`flashlm.ops.decode_linear`) for ``rows``
    rows of ``dtype``: a decode op set that has it (kernels="triton": names["norm_linear"] "all"; "auto"
    once measured), ``proj`` an ``Int8Linear`` or, for "all", a plain ``nn.Linear`` (never another module:
    Float8Linear, PEFT/LoRA run their own forward), rows the kernel serves (``norm_linear_rows``), no
    gradient wanted (:func:`fuses_norm_at`: grad disabled), not under torch.compile, and neither module
    hooked nor given its own forward (the fusion calls neither)."""
    if ops.norm_linear is None or needs_grad or torch.compiler.is_compiling():
        return False
    if not (type(proj) is Int8Linear or (ops.names.get("norm_linear") == "all" and type(proj) is torch.nn.Linear)):
        return False
    global_hooks = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
    return norm_linear_rows(rows, dtype) and not (global_hooks or _hooked(proj) or _hooked(owner))


def fuses_norm_at(ops: fused_ops.Ops, x: Tensor, proj: nn.Module, owner: nn.Module) -> bool:
    """:func:`fuses_norm` for a call on x (..., K): its rows and dtype; fused only with grad disabled (the
    kernels have no backward; generate() and the CUDA-graph steps decode under no_grad / inference_mode),
    as explain() counts it. What ``FlashDecoderLayer`` asks before each projection."""
    if ops.norm_linear is None:  # every op set but a fusing decode set: nothing else to ask (host time)
        return False
    return fuses_norm(ops, proj, owner, x.numel() // x.shape[-1], x.dtype, torch.is_grad_enabled())


def mlp_down_path(mlp: nn.Module) -> str:
    """How a flash MLP's activation meets its ``down_proj`` (``FlashMLP.forward`` and ``explain()`` both ask
    here): "swiglu_linear" (a plain nn.Linear: ``ops.swiglu_linear``, one node that never saves the
    (..., I) activation), "swiglu_float8_linear" (a torchao Float8Linear:
    :func:`~flashlm.models.fp8.swiglu_float8_linear`, the same saving around torchao's FP8 matmul),
    "swiglu_int8_linear" (an int8 ``Int8Linear``: :func:`~flashlm.ops.int8_linear.int8_swiglu_linear`,
    the activation made in the int8 kernel's prologue: one launch fewer per layer at decode),
    "swiglu+module" (any other module, or ``convert_to_fp8(fuse_mlp=False)``: ``ops.swiglu`` then the
    module, autograd keeping the activation), "act+module" (GeGLU: the activation in torch, then the module)."""
    down = mlp.down_proj
    if not mlp.fused_act:
        return "act+module"
    if type(down) is torch.nn.Linear:
        return "swiglu_linear"
    if type(down) is Int8Linear:
        return "swiglu_int8_linear"
    return "swiglu_float8_linear" if fuses_swiglu(down) else "swiglu+module"


_MLP_TEXT = {"swiglu_linear": "swiglu_linear (down_proj {down})",
             "swiglu_float8_linear": "swiglu_float8_linear (down_proj {down}; the activation recomputed in backward)",
             "swiglu_int8_linear": "swiglu_int8_linear (down_proj {down}; the activation made in the kernel)",
             "swiglu+module": "swiglu + {down} (unfused: the (..., I) activation saved for backward)",
             "act+module": "activation + {down}"}


def _mlp_record(lm: nn.Module, loss: str | None) -> dict:
    """explain()'s "mlp" (per layer: :func:`mlp_down_path` and down_proj's class) and "lm_head" (its class;
    a converted head that the loss bypasses, reading ``lm_head.weight`` itself, says so)."""
    mlp = [_MLP_TEXT[mlp_down_path(layer.mlp)].format(down=linear_name(layer.mlp.down_proj))
           for layer in lm.model.layers]
    head = linear_name(lm.lm_head)
    if head.startswith("Float8Linear") and loss not in (None, "cross_entropy"):
        head += f"; the loss ({loss}) reads lm_head.weight directly: its matmul is not FP8"
    return {"mlp": mlp, "lm_head": head}


def loss_kind(logits_wanted: bool, compiled: bool, softcapped: bool, tokens: int, vocab: int) -> str:
    """Which cross-entropy a forward with labels runs: "logits_cross_entropy" (eager, no softcap: one
    lm_head matmul + a row kernel writing the logits' gradient in place, over token chunks of at most
    1 GiB of logits; faster than Liger's fused loss at every size measured,
    benchmarks/results/h200/loss_crossover.json), "cross_entropy" on materialized logits (asked for, or
    small and compiled (inductor fuses it) or softcapped), else "linear_cross_entropy" (fused, never
    materializes tokens x vocab; compiled: its chunked torch path, "linear_cross_entropy[torch]", which
    Dynamo traces: Liger's autograd Function crashed compiled steps, issue 16)."""
    from flashlm.ops.cross_entropy import materialize_logits_for_loss

    if not logits_wanted and not compiled and not softcapped:
        return "logits_cross_entropy"
    if logits_wanted or materialize_logits_for_loss(tokens, vocab):
        return "cross_entropy"
    return "linear_cross_entropy[torch]" if compiled else "linear_cross_entropy"


def explain_plan(lm: nn.Module, plan, labels: Tensor | None = None) -> dict:
    """What a flash causal LM runs under ``plan`` (a :class:`~flashlm.models.plan.BatchPlan`), from the
    same functions its forward calls: {"plan": kind, "compiled", "mode", "ops": {op: implementation},
    "attention": [per layer: the kernel's name, "fused rotary_qkv_append + " first for a fused append],
    "loss": :func:`loss_kind` or None, "projections": {name: module class}, e.g. "Int8Linear" once
    quantized, "norm_fused_into": [per layer: the projections whose kernel makes the norm before them
    (:func:`fuses_norm`)], "mlp": [per layer: how SwiGLU meets down_proj (:func:`mlp_down_path`)],
    "lm_head": its class}. Gradients and dropout as the forward would see them now."""
    params = next(lm.parameters())
    dev = params.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else params.dtype
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in lm.parameters())
    tokens = plan.token_ids.numel()
    attention = []
    for layer in lm.model.layers:
        attn = layer.self_attn
        if plan.kind in ("append", "chunk"):
            choice = attn.kernels.select("kvcache", dtype, False, False, plan.compiled, 0)
            name = "api" if plan.kind == "chunk" else choice.name
            fused = plan.kind == "append" and choice.backend is not None and not lm.config.qk_norm
            attention.append(("fused rotary_qkv_append + " if fused else "") + f"kvcache:{name}")
        else:
            dropout = attn.training and attn.attention_dropout > 0
            choice = attn.kernels.select(plan.kind, dtype, needs_grad, dropout, plan.compiled, tokens)
            attention.append(f"{plan.kind}:{choice.name}")
    loss = None
    if labels is not None:  # an int8 lm_head is called as a module on materialized logits (FlashForCausalLM._loss)
        loss = loss_kind(not lm.lm_head.weight.is_floating_point(), plan.compiled,
                         lm.config.final_logit_softcap is not None, tokens, lm.config.vocab_size)
    from .quantize import projection_kinds

    norm_fused = [[name for name, proj, owner in (("qkv_proj", layer.self_attn.qkv_proj, layer.self_attn),
                                                  ("gate_up_proj", layer.mlp.gate_up_proj, layer.mlp))
                   if fuses_norm(plan.ops, proj, owner, tokens, dtype, torch.is_grad_enabled())]
                  for layer in lm.model.layers]
    return {"plan": plan.kind, "compiled": plan.compiled, "mode": plan.mode, "ops": dict(plan.ops.names),
            "attention": attention, "loss": loss, "projections": projection_kinds(lm),
            "norm_fused_into": norm_fused, **_mlp_record(lm, loss)}
