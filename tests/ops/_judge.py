"""Dao's rule for the ops tests: a kernel's error against the fp32 truth may be at most 2x the error
of the torch reference run in the same low-precision dtype, plus a small atol."""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def judge(got, ref_lowp, truth, dtype, what: str, factor: float = 2.0) -> None:
    """got / ref_lowp / truth: tensors or tuples of tensors (None entries skipped)."""
    if isinstance(got, torch.Tensor):
        got, ref_lowp, truth = (got,), (ref_lowp,), (truth,)
    for i, (g, r, t) in enumerate(zip(got, ref_lowp, truth, strict=True)):
        if g is None and r is None:
            continue
        assert g.shape == r.shape and g.dtype == r.dtype, f"{what}[{i}]: {g.shape} {g.dtype} vs {r.shape} {r.dtype}"
        err, ref_err = max_err(g, t), max_err(r, t)
        assert err <= factor * ref_err + ATOL[dtype], f"{what}[{i}]: error {err:.3g} > {factor} x {ref_err:.3g} + atol"


def grads(outputs, inputs, upstream):
    """Gradients of ``outputs`` w.r.t. ``inputs`` for the shared upstream gradients (None where unused)."""
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    return torch.autograd.grad(outputs, inputs, tuple(upstream), allow_unused=True)


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_(True)
