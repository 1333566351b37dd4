"""Liger-Kernel's versions of our ops, where Liger has the exact op, wrapped to our signatures.

Imported lazily (Liger is optional). Liger runs in eager mode; under torch.compile the wrappers
run our custom ops instead (Liger's autograd Functions crashed compiled training on the H200 with
an illegal memory access, issue 16). Liger's RMSNorm returns x's dtype, ours
``promote(x, weight)``: a weight in another dtype than x takes ours, so results never depend on
which implementation ran.
"""

from __future__ import annotations

from collections.abc import Callable

from ._dispatch import is_compiling
from .rms_norm import add_rms_norm as _ours_add_rms_norm
from .rms_norm import rms_norm as _ours_rms_norm


def functions() -> dict[str, Callable]:
    """{op name: Liger-backed callable} for the ops Liger has, or {} when Liger is not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return {}
    found = {"rms_norm": _wrap_rms_norm(LigerRMSNormFunction.apply)}
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except ImportError:  # older Liger: no fused add
        return found
    found["add_rms_norm"] = _wrap_add_rms_norm(LigerFusedAddRMSNormFunction.apply)
    return found


# casting_mode "llama": normalized x cast to x's dtype, then times the weight (our unit_offset=False);
# "gemma": everything in fp32 with (1 + weight), one cast (our unit_offset=True).
def _wrap_rms_norm(apply: Callable) -> Callable:
    ours = _ours_rms_norm

    def rms_norm(x, weight, eps, unit_offset=False):
        if is_compiling() or weight.dtype != x.dtype:
            return ours(x, weight, eps, unit_offset)
        if unit_offset:
            return apply(x, weight, eps, 1.0, "gemma", False)
        return apply(x, weight, eps, 0.0, "llama", False)

    return rms_norm


def _wrap_add_rms_norm(apply: Callable) -> Callable:
    ours = _ours_add_rms_norm

    def add_rms_norm(x, residual, weight, eps, unit_offset=False):
        if is_compiling() or weight.dtype != x.dtype:
            return ours(x, residual, weight, eps, unit_offset)
        if unit_offset:
            return apply(x, residual, weight, eps, 1.0, "gemma", False)
        return apply(x, residual, weight, eps, 0.0, "llama", False)

    return add_rms_norm
