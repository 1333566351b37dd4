"""Fused ops for the flash model's layers, knowing nothing of models.

One file per op, each with a torch reference (``*_ref``), the Triton kernel(s) and launcher, the
autograd wiring (an ``autograd.Function`` for eager mode, a ``torch.library.custom_op`` with a fake
and an autograd formula for torch.compile; ``_dispatch.dispatch`` picks per call) and one public
function:

- :func:`rms_norm` / :func:`add_rms_norm` (``rms_norm.py``): RMSNorm, and the residual add fused in
  (plus ``*_aten``: torch's fused ``F.rms_norm``, one rounding);
- :func:`swiglu` (``swiglu.py``): ``silu(gate) * up`` on the fused ``[gate | up]`` projection;
  :func:`swiglu_linear`: it and the down projection as one node that does not save the activation;
- :func:`rotary_qkv` / :func:`rotary` (``rotary.py``): RoPE of q and k fused with the q/k/v split,
  and the single-tensor form; :func:`rotary_qkv_append`: a decode step's form, k/v written straight
  into the KV cache;
- ``int8_linear.py``: int8 weight-only linears and the weight-streaming GEMV / small-M kernels (int8 or
  bf16/fp16 weights; SwiGLU or RMSNorm prologues); ``decode_linear.py``: a decode step's fusions on them
  (:func:`~flashlm.ops.decode_linear.norm_linear`: add + RMSNorm in the next projection's kernel);
- ``cross_entropy.py``: every cross-entropy (the fp32 reference, HF's shifted ``causal_lm_loss``, the
  chunked / Liger fused ``linear_cross_entropy``, the Triton ``logits_cross_entropy``);
- ``adamw.py``: ``MasterWeightAdamW`` and its one-pass Triton kernel.

Models choose the implementations once with :func:`resolve` ("auto" | "liger" | "triton" | "torch").
"""

from .resolve import KERNELS, Ops, resolve
from .rms_norm import add_rms_norm, add_rms_norm_aten, add_rms_norm_ref, rms_norm, rms_norm_aten, rms_norm_ref
from .rotary import (
    rotary,
    rotary_qkv,
    rotary_qkv_append,
    rotary_qkv_append_ref,
    rotary_qkv_ref,
    rotary_qkv_sized,
    rotary_ref,
    rotary_sized,
)
from .swiglu import (
    swiglu,
    swiglu_linear,
    swiglu_linear_recompute,
    swiglu_linear_ref,
    swiglu_linear_sized,
    swiglu_ref,
    swiglu_sized,
)

__all__ = [
    "KERNELS",
    "Ops",
    "add_rms_norm",
    "add_rms_norm_aten",
    "add_rms_norm_ref",
    "resolve",
    "rms_norm",
    "rms_norm_aten",
    "rms_norm_ref",
    "rotary",
    "rotary_qkv",
    "rotary_qkv_append",
    "rotary_qkv_append_ref",
    "rotary_qkv_ref",
    "rotary_qkv_sized",
    "rotary_ref",
    "rotary_sized",
    "swiglu",
    "swiglu_linear",
    "swiglu_linear_recompute",
    "swiglu_linear_ref",
    "swiglu_linear_sized",
    "swiglu_ref",
    "swiglu_sized",
]
