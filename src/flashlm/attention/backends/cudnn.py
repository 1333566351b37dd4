"""PyTorch's cuDNN attention: ``torch.ops.aten._cudnn_attention_forward`` / ``_backward``.

Dense calls pass BHSD as transposed views of our BSHD tensors (no copies); varlen passes THD with
cum_seq offsets. Declared features are only those that matched the reference on the H100
(benchmarks/results/cudnn_probe_h100.json, `pytest -m cuda tests/test_attention_gpu.py`):
see the flags below. cuDNN aligns causal masks top-left, so causal calls are served only when every
sequence has seqlen_q == seqlen_k (where top-left and bottom-right coincide).
"""

from __future__ import annotations

import torch

from .base import AttnCall, Backend, Capabilities

_FWD = getattr(torch.ops.aten, "_cudnn_attention_forward", None)
_BWD = getattr(torch.ops.aten, "_cudnn_attention_backward", None)

# Measured on H100 / torch 2.11 / cuDNN 9.19 (probe JSON above). Flip only with a passing GPU test.
DENSE_GQA = True
VARLEN = True
VARLEN_FAST = False  # torch 2.11 profile: aten::_cudnn_attention_forward on THD ~49 ms CPU per call
VARLEN_BACKWARD = False  # dq/dk off vs the reference for causal varlen [100, 1, 37, 256] (probe)
LSE_VARLEN_TOKEN_MAJOR = True
MAX_HEAD_DIM = 256  # fwd + bwd matched the reference at 96, 128, 256
# H200 / torch 2.11 / cuDNN 9.19 (issue 15; the run behind commit 74504d0): the backward raises "cuDNN Frontend error:
# s_q = s_kv = 1 is not supported"; seqlen 2 and 3 passed.
BACKWARD_SEQLEN_1 = False
# H200: the forward at batch 60, seqlen_q 1, seqlen_k 239, 4 heads, d32/160 fp16 gave 147-188 bitwise
# mismatches in 100 repeats (out and lse): short query blocks are not run-to-run deterministic. Calls
# with fewer queries than this go to the next backend (the default choice must repeat bit for bit).
MIN_SEQLEN_Q = 128


def _lse_bhs(lse, batch_heads_seq):
    """cuDNN returns lse as (B, H, S, 1) dense; normalize to (B, H, S)."""
    return lse.reshape(batch_heads_seq)


def _lse_varlen(lse, total, nheads):
    """cuDNN's THD lse is (total, H[, 1]) (token-major, like its output); ours is (H, total)."""
    if LSE_VARLEN_TOKEN_MAJOR:
        return lse.reshape(total, nheads).t()
    return lse.reshape(nheads, total)


class _CudnnDenseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHSD views
        res = _FWD(qt, kt, vt, None, None, None, q.shape[1], k.shape[1], True, 0.0, causal, False, scale=scale)
        out_t, lse = res[0], res[1]
        ctx.save_for_backward(qt, kt, vt, out_t, lse, res[6], res[7])
        ctx.args = (q.shape[1], k.shape[1], scale, causal)
        lse_out = _lse_bhs(lse, (q.shape[0], q.shape[2], q.shape[1]))
        ctx.mark_non_differentiable(lse_out)
        return out_t.transpose(1, 2), lse_out

    @staticmethod
    def backward(ctx, dout, _dlse):
        qt, kt, vt, out_t, lse, seed, offset = ctx.saved_tensors
        max_q, max_k, scale, causal = ctx.args
        dout_t = dout.contiguous().transpose(1, 2)
        dq, dk, dv = _BWD(dout_t, qt, kt, vt, out_t, lse, seed, offset, None, None, None, max_q, max_k, 0.0,
                          causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


class _CudnnVarlenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        res = _FWD(q, k, v, None, cu_q, cu_k, max_q, max_k, True, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, res[6], res[7])
        ctx.args = (max_q, max_k, scale, causal)
        lse_out = _lse_varlen(lse, q.shape[0], q.shape[1])
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
        max_q, max_k, scale, causal = ctx.args
        dq, dk, dv = _BWD(dout.contiguous(), q, k, v, out, lse, seed, offset, None, cu_q, cu_k, max_q, max_k,
                          0.0, causal, scale=scale)
        return dq, dk, dv, None, None, None, None, None, None


class CudnnBackend(Backend):
    name = "cudnn"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, MAX_HEAD_DIM), head_dim_multiple=8, min_compute_capability=(8, 0),
        varlen=VARLEN, gqa=DENSE_GQA, backward=True,
        notes=("aten._cudnn_attention_forward/backward; causal only where seqlen_q == seqlen_k",))

    def unavailable_reason(self) -> str | None:
        if _FWD is None or _BWD is None:
            return "torch has no aten._cudnn_attention_forward/_backward (torch < 2.7?)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not torch.backends.cudnn.is_available():
            return "cuDNN not available"
        return None

    def refuse(self, call: AttnCall) -> str | None:
        why = super().refuse(call)
        if why:
            return why
        if call.seqlen_q is not None and call.seqlen_q < MIN_SEQLEN_Q:
            return (f"seqlen_q {call.seqlen_q} < {MIN_SEQLEN_Q}: cuDNN's forward for short queries is not "
                    "deterministic (repeated calls differ bitwise, H200)")
        if call.needs_grad and call.seqlen_q == 1 and call.seqlen_k == 1 and not BACKWARD_SEQLEN_1:
            return "backward with seqlen_q = seqlen_k = 1 is not supported by cuDNN"
        if call.causal and not call.seqlens_equal:
            return "cuDNN aligns causal top-left: needs seqlen_q == seqlen_k for every sequence"
        if call.kind == "varlen" and call.needs_grad and not VARLEN_BACKWARD:
            return "varlen backward did not match the reference"
        if call.kind == "varlen" and not VARLEN_FAST:
            return "varlen forward costs ~49 ms of host time per call (a new cuDNN plan each call; H100 profile)"
        return None

    def dense(self, q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic):
        return _CudnnDenseFn.apply(q, k, v, softmax_scale, causal)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None):
        return _CudnnVarlenFn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale, causal)


BACKEND = CudnnBackend()
