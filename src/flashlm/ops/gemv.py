"""The linear layers of a batch-1 decode step: one token, so each ``F.linear`` is a matrix-vector product
that only streams the weight (inference only, no autograd).

``linear(x, weight, bias=None)``: ``F.linear`` except when ``x`` holds one row (``x.numel() ==
in_features``) on CUDA: then the faster, measured once per (out, in, dtype, device) shape, of cuBLAS
(``F.linear``) and our Triton GEMV in a few tile configs. Why: on the H200 cuBLAS streams the
llama-1b q/k/v and o weights (12.6 and 8.4 MB) at ~1.8 TB/s and the down projection at ~2.5 TB/s
(benchmarks/results/h200/profile_decode_llama-1b_s3.json), while the copy bandwidth is ~4.3 TB/s.
The measurement runs the first time a shape is seen outside a CUDA-graph capture (a decode step's
warm-up); a captured call of an unmeasured shape takes ``F.linear``. Both paths accumulate in fp32 in a
different order: results agree to the dtype's rounding, not bit for bit, so an eager step and a
captured one use the same table (the same choice) and give the same tokens.

``swiglu_linear_decode(gate_up, weight, bias)``: SwiGLU, then ``linear`` (a decode step's MLP tail).

``gemv(x, weight, bias=None, config=None)``: the Triton kernel itself (any device Triton runs on, the
interpreter included, for tests); ``gemv_ref``: ``F.linear``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flashlm.errors import InputError

from ._dispatch import triton, triton_usable
from .swiglu import swiglu

if triton is not None:
    import triton.language as tl


class GemvConfig(NamedTuple):
    block_n: int  # weight rows per program
    block_k: int  # columns per loop step
    num_warps: int


# Tried against cuBLAS per shape (the compile of each is a one-time cost, hence few).
CONFIGS = (GemvConfig(8, 512, 4), GemvConfig(4, 1024, 4), GemvConfig(16, 256, 4))
_CHOICE: dict[tuple, GemvConfig | None] = {}  # shape -> the fastest config, None = cuBLAS


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: ``F.linear``."""
    return F.linear(x, weight, bias)


if triton is not None:

    @triton.jit
    def _gemv_kernel(X, W, B, Y, n_rows, n_cols, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        # y[n] = sum_k w[n, k] x[k] (+ b[n]) for BLOCK_N rows; fp32 accumulation, one rounding
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        w_ptr = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
        for k0 in range(0, n_cols, BLOCK_K):
            col_ok = k0 + cols < n_cols
            x = tl.load(X + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + k0, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or x.numel() != weight.shape[1] or x.shape[-1] != weight.shape[1]:
        raise InputError(f"gemv: x must hold one row of {weight.shape[-1]} features for a (out, in) weight, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and (bias.dtype != weight.dtype or bias.shape != weight.shape[:1])):
        raise InputError(f"gemv: x, weight and bias must share a dtype (bias (out,)), got {x.dtype}, "
                         f"{weight.dtype}, {None if bias is None else (bias.dtype, tuple(bias.shape))}")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """``F.linear`` of ONE row: x (..., in) with ``x.numel() == in``, weight (out, in), bias (out,) ->
    (..., out) in x's dtype, by the Triton GEMV (``config``: the tile, default ``CONFIGS[0]``). No
    autograd."""
    _check(x, weight, bias)
    config = config or CONFIGS[0]
    out_features, in_features = weight.shape
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    lead = x.shape[:-1]
    x = x.reshape(in_features).contiguous()
    y = torch.empty(out_features, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(out_features, config.block_n),)](
        x, weight, bias if bias is not None else y, y, out_features, in_features, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
        BLOCK_K=min(config.block_k, triton.next_power_of_2(in_features)), num_warps=config.num_warps)
    return y.view(*lead, out_features)


def _time_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def _measure(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> GemvConfig | None:
    """The fastest of cuBLAS (None) and each of CONFIGS on these tensors (CUDA events, warm)."""
    best, best_us = None, _time_us(lambda: F.linear(x, weight, bias))
    for config in CONFIGS:
        us = _time_us(lambda config=config: gemv(x, weight, bias, config))
        if us < best_us:
            best, best_us = config, us
    return best


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one row on CUDA: the measured-faster of cuBLAS and our GEMV (see
    the module docstring). Inference only (no autograd through the GEMV)."""
    if x.numel() != x.shape[-1] or not x.is_cuda or x.dtype != weight.dtype or torch.is_grad_enabled() \
            or torch.is_autocast_enabled("cuda") or not triton_usable(x.device):
        return F.linear(x, weight, bias)
    key = (tuple(weight.shape), weight.dtype, x.device, bias is not None)
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return F.linear(x, weight, bias)
        _CHOICE[key] = _measure(x, weight, bias)
    config = _CHOICE[key]
    if config is None:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, config)


def swiglu_linear_decode(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's SwiGLU + down projection: our SwiGLU kernel, then :func:`linear` (the GEMV when
    one row is measured faster). Inference only."""
    return linear(swiglu(gate_up), weight, bias)
