"""PyTorch's built-in FlashAttention-2: ``torch.ops.aten._flash_attention_forward`` / ``_backward``.

Takes BSHD (dense) or THD + cum_seq (varlen) directly, GQA natively (fewer k/v heads, no copy),
bottom-right causal. Optional arguments differ across torch versions, so they are detected from the
op schema, never from the version string: window_size_left/right (fwd and bwd), seqused_k (KV cache
lengths), alibi_slopes (forward only), block_table (paged KV), num_splits.

The KV-cache entry point goes through the varlen kernel: q flattened to (batch * seqlen_q, ...), the
cache rows as fixed-size sequences, ``seqused_k`` = valid keys per row (no host sync).
"""

from __future__ import annotations

import torch

from .base import AttnCall, Backend, Capabilities

_FWD = getattr(torch.ops.aten, "_flash_attention_forward", None)
_BWD = getattr(torch.ops.aten, "_flash_attention_backward", None)


def _arg_names(op) -> frozenset[str]:
    try:
        return frozenset(a.name for a in op.default._schema.arguments)
    except Exception:  # noqa: BLE001
        return frozenset()


FWD_ARGS = _arg_names(_FWD) if _FWD is not None else frozenset()
BWD_ARGS = _arg_names(_BWD) if _BWD is not None else frozenset()
HAS_WINDOW = {"window_size_left", "window_size_right"} <= FWD_ARGS and {"window_size_left",
                                                                         "window_size_right"} <= BWD_ARGS
HAS_SEQUSED_K = "seqused_k" in FWD_ARGS
HAS_ALIBI = "alibi_slopes" in FWD_ARGS
HAS_BLOCK_TABLE = "block_table" in FWD_ARGS and HAS_SEQUSED_K
HAS_NUM_SPLITS = "num_splits" in FWD_ARGS
PAGE_MULTIPLE = 256  # FA2's paged-KV kernels need page_block_size % 256 == 0


def _window_kwargs(window_size, causal):
    if not HAS_WINDOW:
        return {}
    left, right = window_size
    if causal:  # FA2 wants right = 0 spelled out with causal
        right = 0
    return {"window_size_left": left, "window_size_right": right}


def _forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size, alibi_slopes=None,
             seqused_k=None, block_table=None, num_splits=0):
    kwargs = {"scale": scale, **_window_kwargs(window_size, causal)}
    if alibi_slopes is not None:
        kwargs["alibi_slopes"] = alibi_slopes
    if seqused_k is not None:
        kwargs["seqused_k"] = seqused_k
    if block_table is not None:
        kwargs["block_table"] = block_table
    if num_splits and HAS_NUM_SPLITS:
        kwargs["num_splits"] = num_splits
    out, lse, rng_state, unused, _ = _FWD(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, **kwargs)
    return out, lse, rng_state, unused


class _FlashFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size, alibi_slopes):
        out, lse, rng_state, unused = _forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size,
                                               alibi_slopes)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.args = (max_q, max_k, scale, causal, window_size)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        max_q, max_k, scale, causal, window_size = ctx.args
        dq, dk, dv = _BWD(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
                          rng_state, unused, scale=scale, **_window_kwargs(window_size, causal))
        return dq, dk, dv, None, None, None, None, None, None, None, None


class TorchFlashBackend(Backend):
    name = "torch_flash"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256), head_dim_multiple=8, min_compute_capability=(8, 0),
        varlen=True, kvcache=HAS_SEQUSED_K, paged_kv=HAS_BLOCK_TABLE, window=HAS_WINDOW, alibi=HAS_ALIBI,
        backward=True,
        notes=("aten._flash_attention_forward/backward (FA2 inside PyTorch); optional args by schema",))

    def unavailable_reason(self) -> str | None:
        if _FWD is None or _BWD is None:
            return "torch has no aten._flash_attention_forward/_backward"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def refuse(self, call: AttnCall) -> str | None:
        why = super().refuse(call)
        if why:
            return why
        if call.alibi and call.needs_grad:
            return "alibi has no backward in aten._flash_attention_backward"
        if call.paged and (call.page_block_size or 0) % PAGE_MULTIPLE:
            return f"paged KV needs page_block_size % {PAGE_MULTIPLE} == 0, got {call.page_block_size}"
        if call.paged and call.needs_grad:
            return "paged KV is inference-only"
        return None

    def dense(self, q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic):
        return _FlashFn.apply(q, k, v, None, None, q.shape[1], k.shape[1], softmax_scale, causal, window_size,
                              alibi_slopes)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None):
        if block_table is not None:  # inference only (refused with grad); lengths from cu_seqlens_k
            seqused = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
            out, lse, _, _ = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale, causal, window_size, alibi_slopes, seqused, block_table)
            return out, lse
        return _FlashFn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                              causal, window_size, alibi_slopes)

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad, block_table,
                softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
        B, Sq, H, D = q.shape
        dev = q.device
        cu_q = torch.arange(0, (B + 1) * Sq, Sq, device=dev, dtype=torch.int32)
        if block_table is not None:
            cap = block_table.shape[1] * k_cache.shape[1]
            k_in, v_in = k_cache, v_cache
        else:
            if cache_batch_idx is not None:  # a gathered copy of the rows in use
                k_cache, v_cache = k_cache[cache_batch_idx.long()], v_cache[cache_batch_idx.long()]
            cap = k_cache.shape[1]
            k_in = k_cache.reshape(B * cap, *k_cache.shape[2:])
            v_in = v_cache.reshape(B * cap, *v_cache.shape[2:])
        cu_k = torch.arange(0, (B + 1) * cap, cap, device=dev, dtype=torch.int32)
        out, lse, _, _ = _forward(q.reshape(B * Sq, H, D), k_in, v_in, cu_q, cu_k, Sq, cap, softmax_scale,
                                  causal, window_size, alibi_slopes, cache_seqlens, block_table, num_splits)
        return out.view(B, Sq, H, -1), lse.view(H, B, Sq).permute(1, 0, 2)


BACKEND = TorchFlashBackend()
