"""Shared helpers of the Triton kernels: launch configurations, small host utilities and the
``@triton.jit`` device functions that several kernels inline (tanh, varlen offsets, key ranges, masks).

Configurations are a table, not ``triton.autotune``: autotuning benchmarks every config on the first
call of each new key, which in training (a new ``max_seqlen`` every packed batch) or decoding
(a new cache length every step) means stalls of seconds. The table below was tuned on an H100 with
``benchmarks/triton_gpu.py --sweep`` (results in benchmarks/results/triton_h100.json); elsewhere
a small config that fits any GPU's shared memory is used, and a tiny one under the interpreter.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashlm._util import next_pow2

BIG = 1 << 30  # "unbounded" window side; keeps i + off +- BIG inside int32


class Cfg(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, read when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_d(head_dim: int) -> int:
    # tl.dot needs K >= 16; non-power-of-two head dims are padded and masked.
    return max(16, next_pow2(head_dim))


@functools.cache
def _device_props(index: int) -> tuple[tuple[int, int], int]:
    p = torch.cuda.get_device_properties(index)
    return (p.major, p.minor), p.multi_processor_count


def device_info(t: torch.Tensor) -> tuple[tuple[int, int] | None, int]:
    """(compute capability or None, number of SMs) of the tensor's device (1 SM off CUDA)."""
    if t.device.type != "cuda" or interpreting():
        return None, 1
    return _device_props(t.device.index if t.device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32: the backend declares fp32 as exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _hopper(t: torch.Tensor) -> bool:
    cc, _ = device_info(t)
    return cc is not None and cc[0] == 9


def fwd_config(q: torch.Tensor, head_dim: int, seqlen_q: int) -> Cfg:
    """Forward tile (BLOCK_M queries x BLOCK_N keys) for this call."""
    if interpreting() or q.device.type != "cuda":
        return Cfg(16, 16, 4, 1)
    bd = block_d(head_dim)
    if q.dtype == torch.float32:
        return Cfg(64, 32, 4, 2) if bd <= 128 else Cfg(32, 32, 4, 1)
    if _hopper(q):  # H100 sweep, D=128 bf16: 128x64/8 warps/3 stages 410 TFLOP/s at 4k causal (128x128: 382)
        if bd <= 64:  # D=64 4k causal: 128x128/8/3 308 TFLOP/s, 128x64/8/3 293
            return Cfg(128, 128, 8, 3) if seqlen_q >= 1024 else Cfg(64, 64, 4, 3)
        if bd <= 128:
            return Cfg(128, 64, 8, 3) if seqlen_q >= 1024 else Cfg(64, 64, 4, 3)
        return Cfg(128, 64, 8, 2)  # D=256 4k causal: 396 TFLOP/s
    if bd <= 64:
        return Cfg(128, 64, 4, 3)
    if bd <= 128:
        return Cfg(128, 32, 4, 2)
    return Cfg(64, 32, 4, 1)


class BwdCfg(NamedTuple):
    kv: Cfg  # dk/dv kernel: block_m queries per step, block_n keys per program
    q: Cfg  # dq kernel: block_m queries per program, block_n keys per step


def bwd_config(q: torch.Tensor, head_dim: int) -> BwdCfg:
    if interpreting() or q.device.type != "cuda":
        return BwdCfg(Cfg(16, 16, 4, 1), Cfg(16, 16, 4, 1))
    bd = block_d(head_dim)
    if q.dtype == torch.float32:
        return BwdCfg(Cfg(32, 32, 4, 1), Cfg(32, 32, 4, 1))
    if _hopper(q):  # H100 sweep, D=128 bf16 4k causal fwd+bwd: 335 TFLOP/s (stages 2: 309)
        if bd <= 128:
            return BwdCfg(Cfg(64, 128, 8, 3), Cfg(128, 64, 8, 3))
        return BwdCfg(Cfg(32, 64, 8, 1), Cfg(64, 32, 8, 1))
    if bd <= 64:
        return BwdCfg(Cfg(32, 64, 4, 2), Cfg(64, 32, 4, 2))
    if bd <= 128:
        return BwdCfg(Cfg(32, 64, 4, 1), Cfg(64, 32, 4, 1))
    return BwdCfg(Cfg(16, 32, 4, 1), Cfg(32, 16, 4, 1))


# The decode kernel's smallest row block (tl.dot needs 16); the launcher sizes its row blocks from it
# before choosing the rest of the tile (the tile depends on how many row blocks there are).
DECODE_BLOCK_M = 16


def decode_config(q: torch.Tensor, head_dim: int, kv_programs: int = 1) -> Cfg:
    """block_m is :data:`DECODE_BLOCK_M`, a minimum (rows are seqlen_q x heads-per-kv-head, padded to a
    power of two); ``kv_programs``: batch x kv heads x row blocks, the programs before splitting the keys."""
    if interpreting() or q.device.type != "cuda":
        return Cfg(DECODE_BLOCK_M, 16, 4, 1)
    bd = block_d(head_dim)
    if q.dtype == torch.float32:
        return Cfg(DECODE_BLOCK_M, 32, 4, 1)
    if bd <= 64 and _hopper(q):
        # H200 sweep (`flashlm bench decode-probe --parts kernel`, 32/8 heads, D=64, batch 1-32, context 128-8k, graph
        # replays): 64-key tiles with 2 waves of split programs beat 128-key tiles at every point
        # (b1 ctx2048 6.3 vs 9.7 us, b8 ctx8192 39 vs 53 us); 4 warps while the programs fit in one
        # wave, 2 beyond (b32 ctx8192 128 vs 137 us)
        return Cfg(DECODE_BLOCK_M, 64, 4 if kv_programs <= device_info(q)[1] else 2, 3)
    if bd <= 128:
        return Cfg(DECODE_BLOCK_M, 128 if _hopper(q) else 64, 4, 3 if _hopper(q) else 2)
    return Cfg(DECODE_BLOCK_M, 64, 4, 2)


def window_bounds(causal: bool, window_size: tuple[int, int]) -> tuple[bool, int, int]:
    """flash-attn's (causal, window) as (banded, left, right) with BIG for an unbounded side.

    Causal is the window (left, 0); keys allowed for query i are [i + off - left, i + off + right]
    with off = seqlen_k - seqlen_q (bottom-right alignment).
    """
    left, right = window_size
    if causal:
        right = 0
    left = BIG if left < 0 else int(left)
    right = BIG if right < 0 else int(right)
    return (left != BIG or right != BIG), left, right


def bshd_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a BSHD tensor; a varlen THD tensor has batch stride 0."""
    return (0, t.stride(0), t.stride(1)) if varlen else t.stride()[:3]


def alibi_batch_stride(alibi_slopes: torch.Tensor | None) -> int:
    """Batch stride of alibi_slopes (batch, nheads); 0 for (nheads,) slopes shared by every row, or none."""
    return alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0


# ----------------------------------------------------------------------------------------------------
# device functions (inlined into the kernels that call them)


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def varlen_bounds(CuQ, CuK, b):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence b from cu_seqlens_q/k."""
    q_start = tl.load(CuQ + b)
    seqlen_q = tl.load(CuQ + b + 1) - q_start
    k_start = tl.load(CuK + b)
    seqlen_k = tl.load(CuK + b + 1) - k_start
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def banded_key_range(m0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys that query rows [m0, m0 + BLOCK_M) may see under a band, in BLOCK_N steps:
    [lo, full_lo) masked, [full_lo, full_hi) unmasked (every row sees every key), [full_hi, hi) masked."""
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = tl.maximum(m0 + off - wl, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_last + off + wr + 1, seqlen_k)
    full_lo = (tl.maximum(m_last + off - wl, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(m0 + off + wr + 1, seqlen_k), 0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def mask_scores(s, rows, cols, seqlen_k, off, wl, wr, BANDED: tl.constexpr):
    """s (rows, cols) with -inf where key cols[j] >= seqlen_k or, when BANDED, lies outside
    [rows[i] + off - wl, rows[i] + off + wr]."""
    valid = cols[None, :] < seqlen_k
    if BANDED:
        valid = valid & (cols[None, :] >= rows[:, None] + off - wl)
        valid = valid & (cols[None, :] <= rows[:, None] + off + wr)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def pv_dot(acc, p, v, seen, DOT_PREC: tl.constexpr):
    """acc + p @ v where row i reads only the v rows it sees (``seen[i, j]``).

    p (M, N) fp32 (probabilities, or dS in the backward), v (N, D), seen (M, N) bool. A plain dot
    gives 0 * inf = NaN in a row that does not see a non-finite v value (a causally masked row of the
    same tile, a slot no query may read). When the tile holds one (rare, so one cheap test first),
    the non-finite values are taken out of the product and put back by selection into the rows that
    see them: +inf, -inf, or NaN (a NaN, or both signs).
    """
    bad = ~(tl.abs(v) < float("inf"))  # inf or NaN (every comparison with NaN is false)
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        acc = tl.dot(p.to(v.dtype), tl.where(bad, 0.0, v).to(v.dtype), acc, input_precision=DOT_PREC)
        seen_f = seen.to(v.dtype)
        pos = tl.dot(seen_f, (v == float("inf")).to(v.dtype), input_precision=DOT_PREC) > 0
        neg = tl.dot(seen_f, (v == float("-inf")).to(v.dtype), input_precision=DOT_PREC) > 0
        nan = tl.dot(seen_f, (bad & (tl.abs(v) != float("inf"))).to(v.dtype), input_precision=DOT_PREC) > 0
        acc = tl.where(pos, float("inf"), acc)
        acc = tl.where(neg, float("-inf"), acc)
        acc = tl.where(nan | (pos & neg), float("nan"), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc
