"""One-pass AdamW update of an fp32 master weight from a low-precision grad (a Triton kernel).

``adamw_master_step(param, grad, master, exp_avg, exp_avg_sq, ...)`` does, per element and in one
read and one write of each tensor, what ``MasterWeightAdamW`` otherwise does in four passes (fp32
copy of the grad, torch's AdamW over the masters, copy back rounded):

    g = grad.float()
    master *= 1 - lr * weight_decay                      # decoupled weight decay
    exp_avg = lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    master += -lr / bias_correction1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
    param = master.to(param.dtype)                       # round to nearest even, as copy_ does

with the operations in the order of torch's single-tensor AdamW and IEEE-rounded sqrt and division
(Triton's default ``/`` and ``sqrt`` on CUDA are approximate), so it agrees with torch to an ulp or
so per step (fused multiply-adds may differ). 28 bytes per parameter instead of ~50 for the
torch path, and no fp32 grad copies (4 bytes per parameter of peak memory).

Runs for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). The kernel is jitted on
first use, so importing this module does not depend on how TRITON_INTERPRET is set at import time.
"""

from __future__ import annotations

import functools
import os

import torch

from flashlm.ops._dispatch import triton

if triton is not None:  # CPU-only installs: MasterWeightAdamW keeps torch's path
    import triton.language as tl

__all__ = ["LOW_PRECISION", "adamw_master_step"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
BLOCK = 2048  # elements per program: 8 per thread at 8 warps, a streaming kernel's usual size


def _adamw_kernel_fn(P, G, W, M, V, n, decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size,
                     bias_correction2_sqrt, eps, BLOCK: tl.constexpr, LERP_FROM_START: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2^31 elements
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    w = w * decay  # decay == 1.0 without weight decay: exact
    # torch's lerp: start + weight * (end - start) for weight < 0.5, else end - (end - start) * (1 - weight)
    if LERP_FROM_START:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + tl.div_rn(neg_step_size * m, denom)
    tl.store(W + offs, w, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(P + offs, w.to(P.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(interpret: bool):
    # one jitted function per mode: triton.jit returns an interpreted function under TRITON_INTERPRET=1,
    # so a test setting it must not leave the CUDA path interpreted (or the reverse)
    return triton.jit(_adamw_kernel_fn)


def adamw_master_step(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, *, step: float, lr: float, beta1: float, beta2: float,
                      weight_decay: float, eps: float, block: int = BLOCK) -> None:
    """Step ``master``, ``exp_avg``, ``exp_avg_sq`` (fp32) in place from ``grad`` (``param``'s
    dtype) and write ``master`` rounded into ``param``. ``step`` is the step count after this
    step's increment (1 on the first step), as torch's AdamW uses it. All five tensors contiguous
    and of one shape; the caller checks (``MasterWeightAdamW`` falls back to torch otherwise)."""
    n = master.numel()
    if n == 0:
        return
    # the step-derived factors in double on the host, as torch's non-capturable AdamW computes them;
    # the kernel receives them as fp32 scalars, as torch's elementwise ops cast them
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    one_minus_beta1 = 1 - beta1
    _kernel(os.environ.get("TRITON_INTERPRET") == "1")[(triton.cdiv(n, block),)](
        param, grad, master, exp_avg, exp_avg_sq, n, *map(float, (
            1 - lr * weight_decay, one_minus_beta1, beta2, 1 - beta2, -(lr / bias_correction1),
            bias_correction2 ** 0.5, eps)),
        BLOCK=block, LERP_FROM_START=abs(one_minus_beta1) < 0.5, num_warps=8)
