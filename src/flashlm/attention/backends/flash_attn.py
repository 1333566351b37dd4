"""Dao-AILab flash-attn: FA3 (``flash_attn_interface``, Hopper) when importable, else FA2 (``flash_attn``).

Both packages carry their own autograd.Functions. FA2 covers every feature of our API (dropout,
ALiBi, softcap, window, paged KV with page_block_size % 256 == 0, leftpad, deterministic backward);
FA3 is used for dense/varlen calls on compute capability 9.x without dropout or ALiBi, and FA2 (if
present too) serves the rest. Keyword arguments are passed only when the installed signature has them.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .base import AttnCall, Backend, Capabilities

_fa2 = _fa3 = None
_err: str | None = None
_loaded = False


def _load():
    global _fa2, _fa3, _err, _loaded
    if not _loaded:
        _loaded = True
        errs = []
        try:
            import flash_attn_interface as fa3

            _fa3 = fa3
        except Exception as exc:  # noqa: BLE001
            errs.append(f"flash_attn_interface (FA3): {type(exc).__name__}: {exc}")
        try:
            import flash_attn.flash_attn_interface as fa2

            if not hasattr(fa2, "flash_attn_with_kvcache"):
                raise ImportError("no flash_attn_with_kvcache")
            _fa2 = fa2
        except Exception as exc:  # noqa: BLE001
            errs.append(f"flash_attn (FA2): {type(exc).__name__}: {exc}")
        if _fa2 is None and _fa3 is None:
            _err = "; ".join(errs) + "; pip install flash-attn"
    return _fa2, _fa3


@functools.cache  # inspect.signature costs tens of microseconds, and _call runs on every attention call
def _params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _call(fn, *args, **kw):
    names = _params(fn)
    return fn(*args, **{k: v for k, v in kw.items() if k in names})


def _out_lse(res):
    if isinstance(res, tuple):
        return res[0], res[1]
    raise RuntimeError("flash-attn returned no softmax_lse")


class FlashAttnBackend(Backend):
    name = "flash_attn"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256), head_dim_multiple=8, min_compute_capability=(8, 0), varlen=True, kvcache=True,
        paged_kv=True, window=True, softcap=True, alibi=True, dropout=True, backward=True, deterministic=True,
        leftpad=True, notes=("Dao flash-attn: FA3 on Hopper for plain dense/varlen, else FA2",))

    def unavailable_reason(self) -> str | None:
        _load()
        if _err:
            return _err
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def _use_fa3(self, q, dropout_p, alibi_slopes, block_table=None) -> bool:
        return (_fa3 is not None and torch.cuda.get_device_capability(q.device)[0] == 9 and dropout_p == 0
                and alibi_slopes is None and block_table is None)

    def refuse(self, call: AttnCall) -> str | None:
        why = super().refuse(call)
        if why:
            return why
        if _fa2 is None:  # FA3 alone: Hopper, no dropout/ALiBi/paged/kvcache through this backend
            if call.compute_capability is None or call.compute_capability[0] != 9:
                return "only FA3 is installed and it needs compute capability 9.x"
            for flag in ("dropout", "alibi", "paged"):
                if getattr(call, flag):
                    return f"only FA3 is installed and this backend routes {flag} to FA2"
            if call.kind == "kvcache":
                return "only FA3 is installed; kvcache goes through FA2 here"
        if call.paged and (call.page_block_size or 0) % 256:
            return f"FA2 paged KV needs page_block_size % 256 == 0, got {call.page_block_size}"
        return None

    def dense(self, q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic):
        if self._use_fa3(q, dropout_p, alibi_slopes):
            return _out_lse(_call(_fa3.flash_attn_func, q, k, v, softmax_scale=softmax_scale, causal=causal,
                                  window_size=window_size, softcap=softcap, deterministic=deterministic,
                                  return_attn_probs=True))
        return _out_lse(_fa2.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                             alibi_slopes, deterministic, True))

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None):
        if self._use_fa3(q, dropout_p, alibi_slopes, block_table):
            return _out_lse(_call(_fa3.flash_attn_varlen_func, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                                  window_size=window_size, softcap=softcap, deterministic=deterministic,
                                  return_attn_probs=True))
        return _out_lse(_fa2.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, True, block_table))

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad, block_table,
                softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
        # the interface already appended k/v and rotated q: FA2 only attends here
        return _out_lse(_fa2.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits,
            return_softmax_lse=True))


BACKEND = FlashAttnBackend()
