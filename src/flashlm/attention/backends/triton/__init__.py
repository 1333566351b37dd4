"""flashlm's own Triton attention backend: dense, varlen and KV-cache attention with every feature.

Kernels (one op per module, each a ``torch.library.custom_op`` so torch.compile traces it):
  fwd.py     forward, dense + varlen (``flashlm_triton::fwd``)
  bwd.py     backward dk/dv + dq, deterministic, GQA group sums (``flashlm_triton::bwd`` + autograd)
  decode.py  split-KV decode over a (paged) KV cache + combine (``flashlm_triton::decode``)

Eager calls skip the custom ops' dispatch, which costs 100-300 us of host time per call and per
generated backward (small shapes are host-bound): without gradients they call the launchers
directly, with gradients a plain ``torch.autograd.Function`` (``bwd.AttnFunction``) around the
same launchers. Only torch.compile tracing sees the ops. RoPE is not here: :mod:`flashlm.ops.rotary`.

The kernel modules are imported on first use, not here: Triton decides at decoration time whether a
kernel runs compiled or in its CPU interpreter (TRITON_INTERPRET=1), and the registry imports this
package early. On CPU the entry points work under the interpreter (tests call them directly); the
declared capabilities say "cuda" so the registry never routes real CPU work to the interpreter.
"""

from __future__ import annotations

import importlib.util

import torch

from ....errors import InputError
from ..base import AttnCall, Backend, Capabilities

try:
    from torch.compiler import is_compiling
except ImportError:  # torch < 2.3
    def is_compiling() -> bool:
        import torch._dynamo

        return torch._dynamo.is_compiling()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fwd(q, k, v):
    """The forward entry point: the custom op under torch.compile; in eager mode the launcher itself
    when no gradient is needed, else an autograd.Function around the same launchers (the custom op's
    dispatch and generated backward cost 100-300 us of host time per call, which small steps feel)."""
    from . import bwd  # bwd registers the autograd formula of flashlm_triton::fwd

    if is_compiling():
        return bwd.fwd_op
    if _needs_grad(q, k, v):
        return bwd.AttnFunction.apply
    return bwd.attn_fwd


def _decode():
    from . import decode

    return decode.decode_op if is_compiling() else decode.attn_decode


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dims=(1, 256),  # padded to the next power of two (>= 16) inside, masked
        head_dim_multiple=1,
        min_compute_capability=(8, 0),  # bf16 tl.dot
        dense=True,
        varlen=True,
        kvcache=True,
        paged_kv=True,
        causal=True,
        window=True,
        softcap=True,
        alibi=True,
        dropout=False,
        gqa=True,
        backward=True,
        deterministic=True,  # no atomics anywhere: every backward is deterministic
        head_dim_v_differs=False,
        seqlen_q_gt_k=True,
        empty_kv=True,
        leftpad=True,  # the decode kernel's HAS_LEFTPAD (tests/test_triton.py::test_decode)
        notes=(
            "fp32 runs tl.dot in IEEE fp32 (exact, several times slower than bf16/fp16)",
            "paged KV only through flash_attn_with_kvcache (block_table), any page size",
            "lse is not differentiable (its gradient is ignored, as in flash-attn)",
        ),
    )

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available():
            return "no CUDA device (the Triton CPU interpreter is only for tests)"
        return None

    def refuse(self, call: AttnCall) -> str | None:
        reason = super().refuse(call)
        if reason is not None:
            return reason
        if call.kind == "varlen" and call.paged:
            return "paged KV only in the kvcache entry point"
        if call.return_attn_probs:
            return "does not return attention probabilities"
        return None

    def dense(self, q, k, v, *, dropout_p: float, softmax_scale: float, causal: bool,
              window_size: tuple[int, int], softcap: float, alibi_slopes, deterministic: bool):
        """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq) fp32."""
        _no_dropout(dropout_p)
        fwd = _fwd(q, k, v)
        return fwd(q, k, v, None, None, q.shape[1], k.shape[1], float(softmax_scale), bool(causal),
                   int(window_size[0]), int(window_size[1]), float(softcap or 0.0), alibi_slopes)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
               dropout_p: float, softmax_scale: float, causal: bool, window_size: tuple[int, int],
               softcap: float, alibi_slopes, deterministic: bool, block_table=None):
        """q (Tq, H, D), k/v (Tk, Hk, D), cu_seqlens int32 (B + 1,) -> out (Tq, H, D), lse (H, Tq)."""
        _no_dropout(dropout_p)
        if block_table is not None:
            raise InputError("triton backend: block_table is only supported by flash_attn_with_kvcache")
        fwd = _fwd(q, k, v)
        return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                   float(softmax_scale), bool(causal), int(window_size[0]), int(window_size[1]),
                   float(softcap or 0.0), alibi_slopes)

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad,
                block_table, softmax_scale: float, causal: bool, window_size: tuple[int, int],
                softcap: float, alibi_slopes, num_splits: int):
        """q (B, Sq, H, D); cache (B_c, S_c, Hk, D) or paged (blocks, page, Hk, D) + block_table
        -> out (B, Sq, H, D), lse (B, H, Sq). cache_seqlens counts keys after the append."""
        decode = _decode()
        return decode(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                      float(softmax_scale), bool(causal), int(window_size[0]), int(window_size[1]),
                      float(softcap or 0.0), alibi_slopes, int(num_splits or 0))


def _no_dropout(dropout_p: float) -> None:
    if dropout_p:
        raise InputError(f"triton backend: dropout_p must be 0 (got {dropout_p}); it has no dropout")


BACKEND = TritonBackend()

__all__ = ["BACKEND", "TritonBackend"]
