"""Int8 weight-only linear: ``y = (x @ w_int8.T) * scale (+ bias)``, for decode (inference only).

Weights are quantized per output channel, symmetric: ``scale[n] = absmax(w[n, :]) / 127`` and
``w_int8 = clamp(round(w / scale), -127, 127)`` (:func:`quantize_int8`). A decode step reads every weight
once per token, so reading one byte per weight instead of two is the ceiling this op raises (gpt-fast's
int8 weight-only decode). Activations stay in x's dtype (bf16/fp16; fp32 for tests).

- :func:`int8_linear_ref`: the torch reference, dequantize to x's dtype then ``F.linear``;
- the Triton kernels, for ``M = batch * tokens <= KERNEL_MAX_M`` (decode and short prefills): each
  program reads its int8 weight tile once, converts it in registers and accumulates in fp32, then
  applies the row scale and bias: a GEMV (no ``tl.dot``) for M == 1, ``tl.dot`` with M padded to 16
  otherwise; optionally split over K (fp32 partials + a reduce kernel). Tiles come from :data:`TUNED`
  (measured per shape) or :data:`CONFIGS` (per M bucket, adapted to the GPU's SM count): no autotuning
  at call time, since a CUDA-graph capture must not autotune mid-capture. Larger M (a long prefill,
  compute-bound) dequantizes per call and runs torch's matmul;
- :func:`int8_linear`: the public op (``ops._dispatch.dispatch``: the reference where Triton cannot run,
  a custom op under torch.compile); no backward: it refuses inputs that require grad;
- :class:`Int8Linear`: the module (``from_linear``) that :mod:`flashlm.models.quantize` puts in place of
  a model's ``nn.Linear`` projections. CUDA-graph capturable: no host sync, no data-dependent allocation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashlm.errors import InputError

from ._dispatch import dispatch, triton
from .rms_norm import rms_norm_ref
from .swiglu import swiglu_ref

if triton is not None:
    import triton.language as tl

__all__ = [
    "CONFIGS",
    "KERNEL_MAX_M",
    "TUNED",
    "TUNED_HALF",
    "Int8Config",
    "Int8Linear",
    "dequantize_int8",
    "int8_linear",
    "int8_linear_ref",
    "int8_swiglu_linear",
    "int8_swiglu_linear_ref",
    "launch_kernels",
    "launch_norm_linear",
    "load_tuned",
    "m_bucket",
    "pick_config",
    "quantize_int8",
]

QMAX = 127  # symmetric range [-127, 127]: -128 unused, so negating a weight never overflows


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (N, K) float -> (w_int8 (N, K) int8, scale (N,) fp32): symmetric per output row,
    ``scale = absmax / 127`` (1 for an all-zero row, which then quantizes to zeros), round to nearest
    (ties to even), clamped to [-127, 127]. Computed in fp32 from the weight as stored."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"quantize_int8: weight must be a 2-D float tensor (out_features, in_features), got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(w_int8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, K) int8 and (N,) scale -> the weight in ``dtype`` (scaled in fp32, one rounding)."""
    return (w_int8.float() * scale.float()[:, None]).to(dtype)


def int8_linear_ref(x: Tensor, w_int8: Tensor, scale: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """Torch reference: ``F.linear(x, dequantize_int8(w_int8, scale, x.dtype), bias)``. x (..., K),
    w_int8 (N, K) int8, scale (N,), bias (N,) or None -> (..., N) in x's dtype. ``scale`` None: a float
    weight, cast to x's dtype (the kernels' bf16/fp16-weight form)."""
    w = w_int8.to(x.dtype) if scale is None else dequantize_int8(w_int8, scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------------
# Kernels and their block sizes

@dataclass(frozen=True)
class Int8Config:
    """Tile of one program: BLOCK_M rows of x (1: the GEMV kernel; >= 16: tl.dot), BLOCK_N output
    channels, BLOCK_K inputs per loop step; ``split_k`` programs share one output tile, each summing a
    1/split_k slice of K into an fp32 partial that a second kernel reduces (scale, bias, cast): more
    programs for a small N over a long K (the down projection at decode)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages, self.split_k]


# M bucket (the largest M it serves) -> the tile for shapes :data:`TUNED` does not list; :func:`pick_config`
# shrinks BLOCK_N and raises split_k from it until the grid fills the GPU. Above KERNEL_MAX_M (a long
# prefill: compute-bound) the weight is dequantized and torch's matmul (cuBLAS) runs.
CONFIGS: dict[int, Int8Config] = {
    1: Int8Config(1, 16, 512, num_warps=4, num_stages=3),
    16: Int8Config(16, 64, 128, num_warps=4, num_stages=4),
    32: Int8Config(32, 64, 128, num_warps=4, num_stages=4),
    64: Int8Config(64, 64, 128, num_warps=4, num_stages=3),
    512: Int8Config(64, 128, 64, num_warps=4, num_stages=3),
    4096: Int8Config(128, 128, 64, num_warps=8, num_stages=3),
}
KERNEL_MAX_M = max(CONFIGS)
MIN_BLOCK_N = {1: 4}  # block_m -> the smallest BLOCK_N pick_config goes to (16 for tl.dot tiles)
MAX_SPLIT_K = 8
WAVES = 4  # pick_config's goal: at least WAVES programs per SM (one program per SM cannot hide HBM latency)

# (M bucket, N, K) -> tile, measured: `flashlm bench decode --int8-linears --tune` (bench/int8_linears.py)
# times every candidate tile at the preset's shapes; its JSON's "tuned" is this table's format and
# :func:`load_tuned` reads it. TUNED: int8 weights; TUNED_HALF: the same kernels on bf16/fp16 weights (the
# sweep's "bf16-triton" rows, an entry's "bf16_triton_tile"). Empty until a measurement fills them.
TUNED: dict[tuple[int, int, int], Int8Config] = {}
TUNED_HALF: dict[tuple[int, int, int], Int8Config] = {}

_SMS: dict = {}
_PICKED: dict = {}


def _sm_count(device: torch.device) -> int:
    n = _SMS.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _SMS[device] = n
    return n


def m_bucket(m: int) -> int:
    """The smallest M bucket of :data:`CONFIGS` holding ``m`` (m <= KERNEL_MAX_M)."""
    return min(b for b in CONFIGS if b >= m)


def pick_config(m: int, n: int, k: int, device: torch.device, weight_bytes: int = 1) -> Int8Config:
    """The tile for an (m, n) output over k inputs on ``device``: :data:`TUNED`'s entry for (bucket, n, k)
    (:data:`TUNED_HALF`'s for float weights), else the bucket's tile (BLOCK_K divided by the weight's bytes
    per element: the same bytes per step) with BLOCK_N halved (down to MIN_BLOCK_N), then split_k doubled
    (while each slice keeps >= 2 BLOCK_K steps, up to MAX_SPLIT_K), until the grid has WAVES programs per
    SM. Cached."""
    key = (m, n, k, device, weight_bytes)
    cfg = _PICKED.get(key)
    if cfg is None:
        bucket = m_bucket(m)
        cfg = (TUNED if weight_bytes == 1 else TUNED_HALF).get((bucket, n, k))
        if cfg is None:
            base = CONFIGS[bucket]
            if weight_bytes > 1 and base.block_k > 64:
                base = replace(base, block_k=base.block_k // weight_bytes)
            goal = WAVES * _sm_count(device)
            tiles_m = -(-m // base.block_m)
            block_n, split_k = base.block_n, 1
            while block_n > MIN_BLOCK_N.get(base.block_m, 16) and -(-n // block_n) * tiles_m < goal:
                block_n //= 2
            while (split_k < MAX_SPLIT_K and -(-n // block_n) * tiles_m * split_k < goal
                   and k >= 4 * split_k * base.block_k):
                split_k *= 2
            cfg = replace(base, block_n=block_n, split_k=split_k)
        _PICKED[key] = cfg
    return cfg


def load_tuned(path_or_table, clear: bool = False) -> int:
    """Put measured tiles into :data:`TUNED`: a ``--tune`` JSON file (its "tuned" list) or such a list of
    ``{"m_bucket", "n", "k", "tile": [block_m, block_n, block_k, num_warps, num_stages, split_k]}``; an
    entry's optional "bf16_triton_tile" (same form) goes to :data:`TUNED_HALF`. Returns how many entries
    were loaded; ``clear`` empties both tables first. Clears pick_config's cache."""
    import json
    import os

    rows = path_or_table
    if isinstance(path_or_table, (str, os.PathLike)):
        with open(path_or_table, encoding="utf-8") as f:
            rows = json.load(f)["tuned"]
    if clear:
        TUNED.clear()
        TUNED_HALF.clear()
    for r in rows:
        tiles = [(TUNED, r["tile"])] + ([(TUNED_HALF, r["bf16_triton_tile"])] if r.get("bf16_triton_tile") else [])
        for table, tile in tiles:
            if r["m_bucket"] not in CONFIGS or len(tile) != 6 or (tile[0] == 1) != (r["m_bucket"] == 1):
                raise InputError(f"load_tuned: bad entry {r} (m_bucket among {sorted(CONFIGS)}, tiles of 6 ints "
                                 "whose block_m is 1 exactly for bucket 1)")
            table[(r["m_bucket"], r["n"], r["k"])] = Int8Config(*tile)
    _PICKED.clear()
    return len(rows)


if triton is not None:

    @triton.jit
    def _load_x(ptrs, K, mask, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr):
        # an x tile; SWIGLU: x is gate_up (.., 2K) and the tile is silu(gate) * up, rounded as ops.swiglu
        # rounds (silu to the dtype, then the product), so the fused path equals swiglu then the linear
        if EVEN_K:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
        if SWIGLU:
            if EVEN_K:
                up = tl.load(ptrs + K)
            else:
                up = tl.load(ptrs + K, mask=mask, other=0.0)
            g = x.to(tl.float32)
            act = (g * tl.sigmoid(g)).to(x.dtype)
            x = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _norm_x(x, R, G, H, k_mask, first_n, EVEN_K: tl.constexpr, HAS_RES: tl.constexpr, OFFSET: tl.constexpr):
        # NORM prologue: h = x (+ residual, rounded to x's dtype as the eager add is; the first column of
        # programs stores it: the block's new residual stream) -> (h * norm weight in fp32, h^2). The rstd
        # of the row multiplies the output at the end (sum_k w * g * h * rstd = rstd * sum_k w * g * h), so
        # each program needs only its own K range, and a split's sums of squares meet in the reduce kernel
        if HAS_RES:
            if EVEN_K:
                r = tl.load(R)
            else:
                r = tl.load(R, mask=k_mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(H, x, mask=k_mask & first_n)
        if EVEN_K:
            g = tl.load(G).to(tl.float32)
        else:
            g = tl.load(G, mask=k_mask, other=0.0).to(tl.float32)
        if OFFSET:  # Gemma: scale 1 + weight
            g += 1.0
        h = x.to(tl.float32)
        return h * g, h * h

    @triton.jit
    def _gemv_kernel(X, W, S, B, Y, R, G, H, SS, N, K, K_SPLIT, stride_wn, eps, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                     SWIGLU: tl.constexpr, HAS_SCALE: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                     OFFSET: tl.constexpr):
        # one row of x: y[n] = scale[n] * sum_k w[n, k] * x[k]; the products summed elementwise over the
        # K loop in fp32 and reduced once at the end. SPLIT: this program sums K slice program_id(1) (of
        # K_SPLIT inputs) into the fp32 partial Y[slice, n]; the reduce kernel applies scale and bias.
        # NORM: x is RMSNorm(x (+ R)) with weight G (_norm_x); the sums of squares go to SS[slice] when split
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = rn % N  # rows past N read row (rn mod N) instead of masking; their results are not stored
        first_n = tl.zeros((BLOCK_K,), dtype=tl.int32) == tl.program_id(0)  # a tensor mask (interpreter)
        k0 = tl.program_id(1) * K_SPLIT
        rk = k0 + tl.arange(0, BLOCK_K)
        w_ptrs = W + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for _ in range(tl.cdiv(tl.minimum(K_SPLIT, K - k0), BLOCK_K)):
            in_k = (rk < K) & (rk < k0 + K_SPLIT)
            x = _load_x(X + rk, K, in_k, EVEN_K, SWIGLU)
            if NORM:
                x, sq = _norm_x(x, R + rk, G + rk, H + rk, in_k, first_n, EVEN_K, HAS_RES, OFFSET)
                ss += sq
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=in_k[None, :], other=0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            rk += BLOCK_K
        y = tl.sum(acc, axis=1)
        if SPLIT:
            tl.store(Y + tl.program_id(1) * N + rn, y, mask=rn < N)
            if NORM:  # noqa: SIM102 (a constexpr test apart from the run-time one)
                if tl.program_id(0) == 0:
                    tl.store(SS + tl.program_id(1), tl.sum(ss, axis=0))
        else:
            if NORM:
                y = y / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
            if HAS_SCALE:
                y = y * tl.load(S + rn_in).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + rn_in).to(tl.float32)
            tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _mm_kernel(X, W, S, B, Y, R, G, H, SS, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_ym, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EVEN_K: tl.constexpr, SPLIT: tl.constexpr, SWIGLU: tl.constexpr, HAS_SCALE: tl.constexpr,
                   NORM: tl.constexpr, HAS_RES: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr):
        # (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) per step on tensor cores, the int8 tile converted to x's
        # dtype in registers (exact: |w| <= 127); rows past M / N read in-range rows, never stored.
        # SPLIT: K slice program_id(2) into the fp32 partial Y[slice] (M, N), as in _gemv_kernel; NORM too
        # (R, H with x's row stride; SS (split_k, M))
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_in, rn_in = rm % M, rn % N
        first_n = (tl.zeros((BLOCK_M, 1), dtype=tl.int32) == tl.program_id(0)) & (rm[:, None] < M)
        k0 = tl.program_id(2) * K_SPLIT
        rk = k0 + tl.arange(0, BLOCK_K)
        x_offs = rm_in[:, None].to(tl.int64) * stride_xm + rk[None, :]
        w_ptrs = W + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per row (a (BLOCK_M, BLOCK_K) sum would cost registers)
        for _ in range(tl.cdiv(tl.minimum(K_SPLIT, K - k0), BLOCK_K)):
            in_k = (rk < K) & (rk < k0 + K_SPLIT)
            x = _load_x(X + x_offs, K, in_k[None, :], EVEN_K, SWIGLU)
            if NORM:
                xg, sq = _norm_x(x, R + x_offs, G + rk[None, :], H + x_offs, in_k[None, :], first_n, EVEN_K,
                                 HAS_RES, OFFSET)
                x = xg.to(x.dtype)
                ss += tl.sum(sq, axis=1)
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=in_k[None, :], other=0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
            x_offs += BLOCK_K
            w_ptrs += BLOCK_K
            rk += BLOCK_K
        out_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT:
            p_ptrs = Y + tl.program_id(2).to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
            tl.store(p_ptrs, acc, mask=out_mask)
            if NORM:  # noqa: SIM102 (a constexpr test apart from the run-time one)
                if tl.program_id(0) == 0:
                    tl.store(SS + tl.program_id(2) * M + rm, ss, mask=rm < M)
        else:
            if NORM:
                acc = acc / tl.sqrt(ss / K + eps)[:, None]
            if HAS_SCALE:
                acc = acc * tl.load(S + rn_in).to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += tl.load(B + rn_in).to(tl.float32)[None, :]
            y_ptrs = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _split_reduce_kernel(P, S, B, Y, SS, MN, M, N, K, eps, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                             HAS_SCALE: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
        # y[i] = scale[n] * sum_s P[s, i] (+ bias[n]) over the (SPLIT_K, M*N) fp32 partials, in a fixed
        # order (deterministic, unlike atomics); NORM: times row m's rstd from the (SPLIT_K, M) sums of squares
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < MN
        n = i % N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):  # int64: SPLIT_K * M * N may pass 2**31 for a wide loaded tile
            acc += tl.load(P + tl.full((), s, tl.int64) * MN + i, mask=mask, other=0.0)
            if NORM:
                ss += tl.load(SS + s * M + i // N, mask=mask, other=0.0)
        if NORM:
            acc = acc / tl.sqrt(ss / K + eps)
        if HAS_SCALE:
            acc = acc * tl.load(S + n, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(B + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + i, acc.to(Y.dtype.element_ty), mask=mask)


def launch_kernels(x: Tensor, w_int8: Tensor, scale: Tensor | None, bias: Tensor | None,
                   cfg: Int8Config | None = None, swiglu: bool = False) -> Tensor:
    """The Triton kernels for M <= KERNEL_MAX_M rows (tile ``cfg``, default :func:`pick_config`'s), else
    dequantize + torch's matmul. ``swiglu``: x is gate_up (..., 2 * K) and the input is swiglu(x), made in
    the kernel's prologue. ``scale`` None: a bf16/fp16 weight, used as it is (the same kernels reading two
    bytes a weight: the decode GEMVs of :mod:`flashlm.ops.decode_linear`, the tile sweep's "bf16-triton").
    No input checks (:func:`int8_linear` makes them)."""
    n, k = w_int8.shape
    x2 = x.reshape(-1, 2 * k if swiglu else k)
    if x2.shape[0] > KERNEL_MAX_M:
        return int8_linear_ref(swiglu_ref(x) if swiglu else x, w_int8, scale, bias)
    return _launch(x2, w_int8, scale, bias, cfg, swiglu).reshape(*x.shape[:-1], n)


def launch_norm_linear(x: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, unit_offset: bool,
                       weight: Tensor, scale: Tensor | None, bias: Tensor | None, cfg: Int8Config | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``(linear(rms_norm(h)), h)`` with ``h = x + residual`` (x itself when ``residual`` is None) as one
    launch (two with a split over K): the norm made in the kernels' prologue, its rstd applied to the
    output. x, residual (..., K); weight (N, K) int8 with ``scale`` (N,) or bf16/fp16 with ``scale`` None
    -> ((..., N), h (..., K)). Above KERNEL_MAX_M rows: the norm, then the linear. No input checks."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] > KERNEL_MAX_M or x2.shape[0] == 0 or n == 0:  # (no program would write h)
        h = x if residual is None else x + residual
        return int8_linear_ref(rms_norm_ref(h, norm_weight, eps, unit_offset), weight, scale, bias), h
    x2 = x2.contiguous()
    r2 = None if residual is None else residual.reshape(-1, k).contiguous()
    h = x if r2 is None else torch.empty_like(x2)
    y = _launch(x2, weight, scale, bias, cfg, norm=(r2, norm_weight.contiguous(), h, eps, unit_offset))
    return y.reshape(*x.shape[:-1], n), h.reshape(x.shape)


def _launch(x2: Tensor, w: Tensor, scale: Tensor | None, bias: Tensor | None, cfg: Int8Config | None,
            swiglu: bool = False, norm: tuple | None = None) -> Tensor:
    """y (M, N) of x2 (M, K or 2K) and the (N, K) weight: GEMV (one row) or tl.dot tiles, split over K or
    not. ``norm``: (residual (M, K) or None, norm weight (K,), h out (M, K), eps, unit_offset)."""
    n, k = w.shape
    m = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    if k == 0:  # (a norm over no inputs is not defined: decode_linear refuses K == 0)
        return y.zero_().add_(bias.to(x2.dtype) if bias is not None else 0)
    cfg = cfg or pick_config(m, n, k, x2.device, w.element_size())
    has_scale = scale is not None
    scale = scale.contiguous() if has_scale else w  # the kernels index scale, bias as dense (N,) vectors
    b = bias.contiguous() if bias is not None else scale  # any pointer; unread without HAS_BIAS
    residual, g, h, eps, unit_offset = norm if norm is not None else (None, scale, scale, 1e-6, False)
    r = residual if residual is not None else x2
    # K per split, a whole number of BLOCK_K steps; the last slice may be shorter (masked)
    k_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    split = cfg.split_k > 1
    even_k = k % k_split == 0 and k_split % cfg.block_k == 0
    out = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x2.device) if split else y
    ss = torch.empty((cfg.split_k, m), dtype=torch.float32, device=x2.device) if split and norm else out
    meta = {"BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "HAS_BIAS": bias is not None, "EVEN_K": even_k,
            "SPLIT": split, "SWIGLU": swiglu, "HAS_SCALE": has_scale, "NORM": norm is not None,
            "HAS_RES": residual is not None, "OFFSET": bool(unit_offset), "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages}
    if cfg.block_m == 1 and m == 1:
        _gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
            x2, w, scale, b, out, r, g, h, ss, n, k, k_split, w.stride(0), eps, **meta)
    else:
        block_m = max(cfg.block_m, 16)  # a GEMV tile asked for M > 1 runs as the smallest tl.dot tile
        _mm_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(m, block_m), cfg.split_k)](
            x2, w, scale, b, out, r, g, h, ss, m, n, k, k_split, x2.stride(0), w.stride(0), y.stride(0), eps,
            BLOCK_M=block_m, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", **meta)
    if split:
        block = 1024
        _split_reduce_kernel[(triton.cdiv(m * n, block),)](
            out, scale, b, y, ss, m * n, m, n, k, eps, SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None,
            HAS_SCALE=has_scale, NORM=norm is not None, BLOCK=block)
    return y


# torch.compile path: opaque custom ops with fakes (no autograd: inference only)
@torch.library.custom_op("flashlm_ops::int8_linear", mutates_args=())
def _int8_linear_op(x: Tensor, w_int8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return launch_kernels(x, w_int8, scale, bias)


@_int8_linear_op.register_fake
def _(x, w_int8, scale, bias):
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@torch.library.custom_op("flashlm_ops::int8_swiglu_linear", mutates_args=())
def _int8_swiglu_linear_op(gate_up: Tensor, w_int8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return launch_kernels(gate_up, w_int8, scale, bias, swiglu=True)


@_int8_swiglu_linear_op.register_fake
def _(gate_up, w_int8, scale, bias):
    return gate_up.new_empty((*gate_up.shape[:-1], w_int8.shape[0]))


def int8_swiglu_linear_ref(gate_up: Tensor, w_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Torch reference of :func:`int8_swiglu_linear`: ``int8_linear_ref(swiglu_ref(gate_up), ...)``."""
    return int8_linear_ref(swiglu_ref(gate_up), w_int8, scale, bias)


_int8_linear = dispatch(None, launch_kernels, _int8_linear_op, int8_linear_ref)
_int8_swiglu_linear = dispatch(None, lambda gu, w, s, b: launch_kernels(gu, w, s, b, swiglu=True),
                               _int8_swiglu_linear_op, int8_swiglu_linear_ref)


def _check(x: Tensor, w_int8: Tensor, scale: Tensor, bias: Tensor | None, op: str = "int8_linear",
           in_features: int | None = None) -> None:
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise InputError(f"{op}: weight must be a 2-D int8 tensor (N, K) from quantize_int8, got "
                         f"{tuple(w_int8.shape)} {w_int8.dtype}")
    n, k = w_int8.shape
    x_k = in_features or k
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1:] != (x_k,):
        raise InputError(f"{op}: {'x' if op == 'int8_linear' else 'gate_up'} must be bf16/fp16/fp32 (..., "
                         f"{'K' if x_k == k else '2 * K'}={x_k}), got {tuple(x.shape)} {x.dtype}")
    if scale.shape != (n,) or not scale.is_floating_point():
        raise InputError(f"{op}: scale must be a float (N={n},) tensor, got {tuple(scale.shape)} {scale.dtype}")
    if bias is not None and bias.shape != (n,):
        raise InputError(f"{op}: bias must be (N={n},) or None, got {tuple(bias.shape)}")
    dev = w_int8.device
    if x.device != dev or scale.device != dev or (bias is not None and bias.device != dev):
        raise InputError(f"{op}: x, weight, scale and bias must be on the same device, got x on {x.device}, "
                         f"weight on {w_int8.device}, scale on {scale.device}"
                         f"{'' if bias is None else f', bias on {bias.device}'}: move the module (.to(x.device))")
    if w_int8.stride(-1) != 1:
        raise InputError(f"{op}: the weight's last dim must be contiguous (row-major (N, K))")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise InputError(f"{op} is inference-only (int8 weight-only quantization has no backward): call it "
                         "under torch.no_grad() / torch.inference_mode(), or on inputs that do not require grad; "
                         "train the unquantized model instead")


def int8_linear(x: Tensor, w_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ w_int8.T) * scale + bias`` in x's dtype (fp32 accumulation). x (..., K) bf16/fp16/fp32,
    w_int8 (N, K) int8 row-major, scale (N,) float, bias (N,) or None -> (..., N). Inference only: an
    InputError where x or bias requires grad with grad enabled."""
    _check(x, w_int8, scale, bias)
    return _int8_linear(x, w_int8, scale, bias)


def int8_swiglu_linear(gate_up: Tensor, w_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``int8_linear(swiglu(gate_up), w_int8, scale, bias)`` as one kernel for decode shapes (the SwiGLU
    computed in the prologue from gate_up's two halves, never written out): gate_up (..., 2 * K) with K =
    w_int8's in_features -> (..., N). The gated MLP's down projection of an int8 model
    (``FlashMLP``, ``kernels.mlp_down_path`` "swiglu_int8_linear")."""
    _check(gate_up, w_int8, scale, bias, "int8_swiglu_linear", 2 * w_int8.shape[-1] if w_int8.dim() == 2 else None)
    return _int8_swiglu_linear(gate_up, w_int8, scale, bias)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` replacement holding int8 weights: ``weight`` (out, in) int8 (an ``nn.Parameter``
    with ``requires_grad=False``, as torchao's and bitsandbytes' quantized weights are, so code that
    finds a module's device from ``next(module.parameters())`` or keys a CUDA graph on the parameters'
    addresses keeps working), the ``scale`` buffer (out,) fp32 and an optional frozen ``bias``.
    ``compute_dtype``: the float dtype of the model it sits in (the replaced Linear's; it follows
    ``model.to(dtype)``), which code asking "what does this projection compute in" reads instead of the
    int8 weight's dtype. ``forward`` is :func:`int8_linear`. Its state dict holds ``weight`` (int8),
    ``scale`` (and ``bias``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.weight = nn.Parameter(torch.zeros((out_features, in_features), dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 copy of ``linear`` (:func:`quantize_int8` of its weight; its bias kept in its dtype),
        on its device. ``linear`` is left unchanged (a tied weight stays the embedding's)."""
        w = linear.weight
        if w.device.type == "meta":
            raise InputError("Int8Linear.from_linear: the weight is on the meta device (no values to quantize); "
                             "load the weights first")
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                  dtype=w.dtype)
        q, scale = quantize_int8(w)
        mod.weight.copy_(q)
        mod.scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias)
        if hasattr(linear, "split_sizes"):  # a fused projection's parts (flashlm.models.weights)
            mod.split_sizes = linear.split_sizes
        return mod

    def _apply(self, fn, *args, **kwargs):
        # model.to(dtype) / .half() cast floating buffers: keep the scales fp32 (a bf16 scale would put a
        # systematic error of up to 0.4% on a whole output channel); the int8 weight is never cast.
        # compute_dtype follows the cast: an empty float probe, cast (and moved) as fn casts floats
        scale = self.scale
        out = super()._apply(fn, *args, **kwargs)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=scale.device)).dtype
        if self.scale.dtype != torch.float32:  # the fp32 values, moved where fn put the rest
            self.scale = scale.to(self.scale.device)
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight (out, in) this module multiplies by, in ``dtype`` (default: ``compute_dtype``)."""
        return dequantize_int8(self.weight, self.scale, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
