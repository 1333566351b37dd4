"""FlashAttention-4 (``flash_attn.cute`` from pip ``flash-attn-4``; extra ``flashlm[fa4]``).

CuTe-DSL kernels, JIT-compiled on first use per shape family; the fastest kernels measured on our
H100 (../shared/DESIGN.md). Optional: when the package does not import, the registry says why and
moves on. Its own autograd.Functions give the backward. Keyword arguments are passed by name and
only when the installed version's signature has them (the package is young and its API moves).

KV cache: dense caches through ``flash_attn_varlen_func`` with unpacked q/k and ``seqused_k`` (valid
keys per row, no host sync); paged KV and cache_leftpad are not declared (not verified here).
"""

from __future__ import annotations

import inspect

import torch

from .base import AttnCall, Backend, Capabilities

_mod = None
_err: str | None = None
_params: dict[str, frozenset[str]] = {}


def _load():
    global _mod, _err
    if _mod is None and _err is None:
        try:
            import flash_attn.cute as mod

            _mod = mod
            for fn in ("flash_attn_func", "flash_attn_varlen_func"):
                _params[fn] = frozenset(inspect.signature(getattr(mod, fn)).parameters)
            if "return_lse" not in _params["flash_attn_func"]:
                _mod, _err = None, "flash-attn-4 too old: flash_attn_func has no return_lse"
        except Exception as exc:  # noqa: BLE001
            _err = f"flash_attn.cute not importable ({type(exc).__name__}: {exc}); pip install 'flashlm[fa4]'"
    return _mod


def _window(window_size):
    left, right = window_size
    return (None if left < 0 else left, None if right < 0 else right)


def _kwargs(fn: str, **kw):
    names = _params[fn]
    return {k: v for k, v in kw.items() if k in names}


def _split(res):
    """(out, lse) of a ``return_lse=True`` result."""
    return res[0], res[1]


class FA4Backend(Backend):
    name = "fa4"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(64, 128), head_dim_multiple=32, min_compute_capability=(9, 0),
        max_compute_capability=(11, 9), varlen=True, kvcache=True, window=True, softcap=True,
        backward=True, notes=("flash_attn.cute (FA4); head_dim 64/96/128",))

    def unavailable_reason(self) -> str | None:
        if _load() is None:
            return _err
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def refuse(self, call: AttnCall) -> str | None:
        why = super().refuse(call)
        if why:
            return why
        if call.kind == "varlen" and call.softcap and call.needs_grad:
            return "varlen backward has no softcap in flash_attn.cute"
        if call.needs_grad and call.deterministic and "deterministic" not in _params.get("flash_attn_func", ()):
            return "this flash-attn-4 has no deterministic backward"
        return None

    def dense(self, q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic):
        kw = _kwargs("flash_attn_func", softmax_scale=softmax_scale, causal=causal, window_size=_window(window_size),
                     softcap=softcap, deterministic=deterministic, return_lse=True)
        return _split(_mod.flash_attn_func(q, k, v, **kw))

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None):
        kw = _kwargs("flash_attn_varlen_func", cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                     causal=causal, window_size=_window(window_size), softcap=softcap,
                     deterministic=deterministic, return_lse=True)
        return _split(_mod.flash_attn_varlen_func(q, k, v, **kw))

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad, block_table,
                softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
        if cache_batch_idx is not None:
            k_cache, v_cache = k_cache[cache_batch_idx.long()], v_cache[cache_batch_idx.long()]
        kw = _kwargs("flash_attn_varlen_func", seqused_k=cache_seqlens, max_seqlen_q=q.shape[1],
                     max_seqlen_k=k_cache.shape[1], softmax_scale=softmax_scale, causal=causal,
                     window_size=_window(window_size), softcap=softcap, return_lse=True)
        if num_splits:
            kw.update(_kwargs("flash_attn_varlen_func", num_splits=num_splits))
        return _split(_mod.flash_attn_varlen_func(q, k_cache, v_cache, **kw))


BACKEND = FA4Backend()
