"""The one dispatch helper every op shares: which of its entry points runs a call.

- under torch.compile: the ``torch.library.custom_op`` (opaque to inductor, with a fake and an
  autograd formula, so ``fullgraph=True`` traces it without graph breaks);
- eager with gradients: the ``torch.autograd.Function`` calling the Triton launcher directly (the
  custom op's dispatcher and generated backward cost 100-300 us of host time per call);
- eager without gradients: the launcher itself;
- wherever Triton cannot run on the first argument's device (a CPU tensor without TRITON_INTERPRET=1,
  or no Triton installed): the op's torch reference, so a public op runs on every device (an op
  whose eager entry points pick their kernel themselves passes no reference: no device check).

The choice is made per call (the same model runs eager and compiled), but it costs three cheap checks
(on CUDA one ``is_cuda`` attribute read more), not a lookup.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

try:
    from torch.compiler import is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling

try:
    import triton
except ImportError:  # CPU-only installs: only the torch references work
    triton = None


# "sized" ops (flashlm.ops.resolve): the torch reference below this many elements of the op's main input,
# where a step is host-bound and one aten op (or inductor's fusion) costs less host time than a Triton
# launch; our Triton kernel from here on, where GPU time decides (H200, `flashlm bench ops`, the run behind
# commit 1659dfa: SwiGLU at llama-1b 523 vs 1932 us, RoPE of q/k 490 vs 1331 us fwd+bwd).
SIZED_MIN_NUMEL = 32 * 1024 * 1024


def dispatch(function: type[torch.autograd.Function] | None, launch: Callable, compiled: Callable,
             reference: Callable | None = None) -> Callable:
    """A callable taking the op's positional arguments and running ``reference`` where Triton cannot
    run on the first argument's device (:func:`triton_usable`), else ``compiled`` under torch.compile,
    ``function.apply`` in eager mode with grad enabled (``launch`` where ``function`` is None: an
    inference-only op), else ``launch``. All four take the same arguments and return the same outputs.
    ``reference`` None: an op whose eager entry points run on every device (torch code, or picking
    their kernel themselves), so there is no device check."""
    if reference is not None and triton is None:  # no kernel can run anywhere: the reference is the op
        return reference
    apply = launch if function is None else function.apply
    grad_enabled = torch.is_grad_enabled
    check_device = reference is not None

    def call(*args):
        x = args[0]
        # CUDA (the hot path) pays one attribute read; other devices read TRITON_INTERPRET per call,
        # since tests set and unset it. Before the compile check: a compiled CPU model traces the reference.
        if check_device and not x.is_cuda and not triton_usable(x.device):
            return reference(*args)
        if is_compiling():
            return compiled(*args)
        if grad_enabled():
            return apply(*args)
        return launch(*args)

    return call


def triton_usable(device: torch.device) -> bool:
    """Whether our Triton kernels can run on ``device``: Triton importable and a CUDA device, or
    TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def autocast_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """(x, weight, bias) cast as autocast casts ``F.linear``'s inputs, for an autograd.Function that
    wraps a linear layer (Functions are not autocast-aware). The casts are differentiable, so fp32
    parameters still get their gradients. Unchanged outside autocast or for a non-float x."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or not x.is_floating_point():
        return x, weight, bias
    dtype = torch.get_autocast_dtype(dev)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def row_warps(block: int) -> int:
    """Warps for a program owning one row of ``block`` elements (Liger's table)."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


_NUM_SMS: dict = {}


def num_programs(device: torch.device) -> int:
    """The number of persistent programs a row-looping kernel launches: 4 per SM on CUDA (one
    8-warp program per SM left the H200 latency-bound: the llama-1b add_rms_norm backward ran at half
    the speed of aten's, the `flashlm bench ops` run behind commit 1659dfa); a few under the CPU interpreter. Cached per device."""
    n = _NUM_SMS.get(device)
    if n is None:
        n = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _NUM_SMS[device] = n
    return n
