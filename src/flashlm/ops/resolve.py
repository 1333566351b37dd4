"""Choose each op's implementation once, when a model is built: ``resolve(kernels, device) -> Ops``.

``kernels``:
  "torch":  the torch references (the CPU default: the Triton interpreter is slow). Under
            torch.compile inductor fuses them with their neighbours.
  "triton": our fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1 for tests).
  "liger":  Liger-Kernel where it has the exact op (rms_norm, add_rms_norm; imported lazily), ours
            for the rest (Liger's SwiGLU takes separate gate/up tensors and its RoPE BHSD q/k:
            neither fits the fused layouts). Under torch.compile the Liger entries run our custom
            ops (Liger's autograd Functions crashed compiled training on the H200, issue 16).
  "auto":   on CUDA with Triton installed, eager, per op the implementation measured cheapest
            (``_AUTO``: torch's fused ``F.rms_norm`` for the norms, SwiGLU (and SwiGLU + down
            projection) by size, our Triton RoPE;
            Liger only for ops in ``_LIGER_FASTER``); compiled (``compiled=True``) ``_AUTO_COMPILED``
            (inductor's norms, SwiGLU and RoPE by size); on CPU "torch".

The model keeps the returned :class:`Ops` and calls its fields in ``forward``: no lookups per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flashlm.errors import InputError

from ._dispatch import triton, triton_usable
from .decode_linear import norm_linear, swiglu_gemv_linear

# import the functions, not the submodules: the package's names rms_norm, swiglu and rotary are the
# public functions, which shadow their submodules once flashlm.ops is imported
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
from .swiglu import swiglu, swiglu_linear, swiglu_linear_ref, swiglu_linear_sized, swiglu_ref, swiglu_sized

KERNELS = ("auto", "liger", "triton", "torch")

# "auto" on CUDA, per op. H200 facts (the run behind commit 2458bb7): a Triton launch costs ~24 us of
# host time, a trivial aten op ~14 us, F.rms_norm fwd+bwd 159 us (one fused kernel forward, C++
# autograd), so one aten op beats one Triton kernel, while fusing 2+ aten ops into one kernel pays.
# Re-measure with `flashlm bench ops` and edit here.
# `flashlm bench ops` on the H200 (the run behind commit 1659dfa): (add_)rms_norm aten beats ours in host and GPU time; swiglu: torch
# below ~32M elements (host), ours above (GPU: 523 vs 1932 us at llama-1b); rotary_qkv: ours (107/490
# us host fwd/fwd+bwd vs 284/1331 for torch).
# swiglu_linear as swiglu: below the size its torch recompute Function (the memory saving without our
# kernel's host cost), above it ours.
# rotary_qkv_append (decode steps): one launch where the torch path takes the rotation and two index_put_
# (H200 graph replay: the two index_put_ alone 6.7 us per layer at batch 1).
_AUTO = {"rms_norm": "aten", "add_rms_norm": "aten", "swiglu": "sized", "swiglu_linear": "sized",
         "rotary_qkv": "triton", "rotary": "triton", "rotary_qkv_append": "triton"}
# Ops for which Liger's kernel measured faster than ours; "auto" takes Liger only for these. Empty:
# Liger's Python wrappers cost more host time than plain torch at small shapes (the run behind commit 2458bb7).
_LIGER_FASTER: frozenset = frozenset()
# "auto"'s decode set and the decode fusions (flashlm.ops.decode_linear: the add + RMSNorm in the next
# projection's kernel; SwiGLU in a bf16 down projection's GEMV). For int8 weights they only remove
# launches; for bf16 ones our GEMV also replaces cuBLAS's. PROVISIONAL None (no fusion) until a GPU A/B
# (`flashlm bench decode --kernels auto` vs `--kernels triton`) says "int8" or "all". kernels="triton" takes
# them for every weight.
_AUTO_NORM_LINEAR: str | None = None


@dataclass(frozen=True)
class Ops:
    """The callables a model uses (signatures as the public functions of ``flashlm.ops``) and, in
    ``names``, which implementation each one is ("torch", "aten", "triton", "sized" (torch below a
    size, Triton above), "liger")."""

    rms_norm: Callable
    add_rms_norm: Callable
    swiglu: Callable
    swiglu_linear: Callable
    rotary_qkv: Callable
    rotary: Callable
    rotary_qkv_append: Callable
    # decode sets only (else None): a pre-norm block's add + RMSNorm fused into the projection after it
    # (flashlm.ops.decode_linear); names["norm_linear"] says for which weights: "int8" or "all"
    norm_linear: Callable | None = None
    names: dict = field(default_factory=dict)


# "torch" keeps the plain swiglu_linear_ref: on CPU recomputing would only add host time, and under
# torch.compile AOTAutograd's min-cut partitioner already recomputes the cheap activation.
_TORCH = {"rms_norm": rms_norm_ref, "add_rms_norm": add_rms_norm_ref, "swiglu": swiglu_ref,
          "swiglu_linear": swiglu_linear_ref, "rotary_qkv": rotary_qkv_ref, "rotary": rotary_ref,
          "rotary_qkv_append": rotary_qkv_append_ref}
_ATEN = {"rms_norm": rms_norm_aten, "add_rms_norm": add_rms_norm_aten}
_SIZED = {"swiglu": swiglu_sized, "swiglu_linear": swiglu_linear_sized, "rotary_qkv": rotary_qkv_sized,
          "rotary": rotary_sized}
# "auto" under torch.compile on CUDA: inductor's fusions for the norms (H200, llama-1b bs8 x 2048 step:
# its RMSNorm kernels 4.2 ms vs aten's fused ones 6.0), and by size our Triton SwiGLU and RoPE as opaque
# custom ops, whose kernels beat inductor's at large shapes (same profile: SwiGLU backward 11.2 vs 6.4 ms,
# RoPE ~8 vs ~5 ms; benchmarks/results/h200/profile_llama-1b_b8x2048_s4.txt) while small shapes keep
# the references inductor fuses (the seed config's compiled step is host-bound).
_AUTO_COMPILED = {"rms_norm": "torch", "add_rms_norm": "torch", "swiglu": "sized", "swiglu_linear": "sized",
                  "rotary_qkv": "sized", "rotary": "sized", "rotary_qkv_append": "torch"}
_TRITON = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "swiglu": swiglu, "swiglu_linear": swiglu_linear,
           "rotary_qkv": rotary_qkv, "rotary": rotary, "rotary_qkv_append": rotary_qkv_append}



def resolve(kernels: str = "auto", device: torch.device | str | None = None, compiled: bool = False,
            decode: bool = False) -> Ops:
    """The :class:`Ops` for ``kernels`` ("auto" | "liger" | "triton" | "torch") on ``device``
    (default: CPU). ``compiled=True`` says the caller will run under torch.compile: "auto" then
    takes the torch references, which inductor fuses with their neighbours and launches from
    generated code (the H200 run behind commit 1659dfa), except SwiGLU and RoPE at large shapes, where our Triton kernels
    (opaque custom ops there) measured faster than inductor's (``_AUTO_COMPILED``).
    ``decode=True`` asks for the ops of a decode step, mostly replayed from a CUDA graph, where host
    time is gone and only GPU time counts: "auto" on CUDA then takes our Triton kernel for every op
    (H200, decode shapes as graph replays, `flashlm bench decode-probe`,
    benchmarks/results/h200/probe_decode_ops_prefill.json: add + RMSNorm 1.8 us vs aten's
    4.3, SwiGLU 1.4 vs torch's 3.0); an eager step runs the same set, so it gives the graph's tokens
    (H200, seed config, eager steps: flash 1.52x the default model's, 1.55x before this set). Decode sets
    under "triton" also carry ``norm_linear`` (the add + RMSNorm in the next projection's kernel, names
    "all": every weight) and the SwiGLU in the bf16 down projection's GEMV (``swiglu_linear`` "gemv");
    "auto" takes them once measured (``_AUTO_NORM_LINEAR``: "int8" or "all"; None today). Raises InputError
    for an unknown name, "triton" where Triton cannot run, and "liger" where Liger-Kernel is not installed."""
    if kernels not in KERNELS:
        raise InputError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    device = torch.device(device if device is not None else "cpu")
    if kernels == "torch" or (kernels == "auto" and (device.type != "cuda" or triton is None)):
        return Ops(**_TORCH, names=dict.fromkeys(_TORCH, "torch"))
    if kernels == "auto" and compiled:
        chosen = {n: (_SIZED if impl == "sized" else _TORCH)[n] for n, impl in _AUTO_COMPILED.items()}
        return Ops(**chosen, names=dict(_AUTO_COMPILED))
    if not triton_usable(device):
        raise InputError(f"kernels={kernels!r} needs Triton on a CUDA device (or TRITON_INTERPRET=1 on "
                         f"CPU, for tests); got device {device}, triton "
                         f"{'installed' if triton is not None else 'not installed'}; use kernels='torch'")
    chosen, names = dict(_TRITON), dict.fromkeys(_TRITON, "triton")
    fused = "all" if kernels == "triton" else _AUTO_NORM_LINEAR if kernels == "auto" else None
    if decode and fused is not None:
        chosen["norm_linear"], names["norm_linear"] = norm_linear, fused
        if fused == "all":
            chosen["swiglu_linear"], names["swiglu_linear"] = swiglu_gemv_linear, "gemv"
    if kernels == "triton":
        return Ops(**chosen, names=names)
    if kernels == "auto" and not decode:
        for name, impl in _AUTO.items():
            if impl != "triton":
                chosen[name], names[name] = (_ATEN if impl == "aten" else _SIZED)[name], impl
    if kernels == "auto" and not _LIGER_FASTER:  # do not even import Liger
        return Ops(**chosen, names=names)
    from . import liger

    found = liger.functions()
    if kernels == "liger" and not found:
        raise InputError("kernels='liger' needs Liger-Kernel (pip install liger-kernel); use 'auto' to "
                         "fall back to flashlm's Triton kernels")
    for name, fn in found.items():
        if kernels == "liger" or name in _LIGER_FASTER:
            chosen[name], names[name] = fn, "liger"
    return Ops(**chosen, names=names)
