"""FlashAttention-4 (``flash_attn.cute`` from pip ``flash-attn-4``; extra ``flashlm[fa4]``).

CuTe-DSL kernels, JIT-compiled on first use per shape family; the fastest kernels measured on our
H100 (measured 2026-12-01). Optional: when the package does not import, the registry says why and
moves on. Its own autograd.Functions give the backward. Keyword arguments are passed by name and
only when the installed version's signature has them (the package is young and its API moves).

KV cache: dense caches through ``flash_attn_varlen_func`` with unpacked q/k and ``seqused_k`` (valid
keys per row, no host sync); paged KV and cache_leftpad are not declared (not verified here).

Under torch.compile: Dynamo skips the package's Python entry points ("marked as skipped"), so dense and
varlen calls made while compiling go through two opaque custom ops, ``flashlm::fa4_fwd`` and
``flashlm::fa4_bwd``, with fake implementations and the backward registered on the forward. They call
the same forward/backward functions FA4's own autograd.Functions call (``interface._flash_attn_fwd``,
``_flash_attn_bwd``); a version without them is not traceable (:attr:`FA4Backend.traceable_kinds`).
Eager calls keep FA4's autograd.Functions (the custom ops' dispatch would only add host time).
"""

from __future__ import annotations

import inspect

import torch

from .base import AttnCall, Backend, Capabilities

_mod = None
_err: str | None = None
_params: dict[str, frozenset[str]] = {}
_OP_FNS = ("_flash_attn_fwd", "_flash_attn_bwd")  # what the compiled path's custom ops call


def _load():
    global _mod, _err
    if _mod is None and _err is None:
        try:
            import flash_attn.cute as mod

            _mod = mod
            for fn in ("flash_attn_func", "flash_attn_varlen_func"):
                _params[fn] = frozenset(inspect.signature(getattr(mod, fn)).parameters)
            for fn in _OP_FNS:
                if hasattr(mod.interface, fn):
                    _params[fn] = frozenset(inspect.signature(getattr(mod.interface, fn)).parameters)
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


# --------------------------------------------------------------------------------------------
# Compiled calls: opaque custom ops over FA4's forward and backward functions
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("flashlm::fa4_fwd", mutates_args=())
def fa4_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
               cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int | None, max_seqlen_k: int | None,
               softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's forward for compiled code. Dense: q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k,
    kv_heads, head_dim); varlen: (total, heads, head_dim) with cu_seqlens int32 (batch + 1,) and the
    max_seqlen bounds. window_left/right -1 = unbounded. Returns (out (q's shape, v's head_dim)
    contiguous, lse fp32: (batch, heads, seqlen_q) dense, (heads, total_q) varlen)."""
    kw = _kwargs("_flash_attn_fwd", cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                 causal=causal, window_size_left=None if window_left < 0 else window_left,
                 window_size_right=None if window_right < 0 else window_right,
                 softcap=softcap or None, return_lse=True)
    res = _mod.interface._flash_attn_fwd(q, k, v, **kw)
    return res[0].contiguous(), res[1].contiguous()


@fa4_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, deterministic):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    heads = q.shape[-2]
    lse_shape = (heads, q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], heads, q.shape[1])
    return out, q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("flashlm::fa4_bwd", mutates_args=())
def fa4_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
               cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int | None, max_seqlen_k: int | None,
               softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's backward for compiled code: (dq, dk, dv), contiguous, shaped like q, k, v."""
    kw = _kwargs("_flash_attn_bwd", window_size_left=None if window_left < 0 else window_left,
                 window_size_right=None if window_right < 0 else window_right, cu_seqlens_q=cu_seqlens_q,
                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 deterministic=deterministic, dlse=dlse)
    dq, dk, dv = _mod.interface._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, softmax_scale, causal,
                                                softcap, **kw)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@fa4_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, *args):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = scalars  # max_seqlen_q/k, softmax_scale, causal, window_left/right, softcap, deterministic
    ctx.set_materialize_grads(False)  # an unused lse gets None, not zeros (FA4 skips its dlse pass), as FA4 does


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = fa4_bwd_op(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, *ctx.scalars)
    return dq, dk, dv, *([None] * 10)


fa4_fwd_op.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def _compiled_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   window_size, softcap, deterministic):
    return fa4_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale),
                      bool(causal), int(window_size[0]), int(window_size[1]), float(softcap or 0.0),
                      bool(deterministic))


class FA4Backend(Backend):
    name = "fa4"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(64, 128), head_dim_multiple=32, min_compute_capability=(9, 0),
        max_compute_capability=(11, 9), varlen=True, kvcache=True, window=True, softcap=True,
        backward=True, notes=("flash_attn.cute (FA4); head_dim 64/96/128",))

    @property
    def traceable_kinds(self) -> frozenset[str]:
        """Dense and varlen calls trace (through the custom ops) when this FA4 has the functions they
        call; KV-cache calls stay eager (compiled code reaches them through one opaque op)."""
        if _load() is None or any(fn not in _params for fn in _OP_FNS):
            return frozenset()
        return frozenset({"dense", "varlen"})

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
        if torch.compiler.is_compiling():
            return _compiled_call(q, k, v, None, None, None, None, softmax_scale, causal, window_size, softcap,
                                  deterministic)
        kw = _kwargs("flash_attn_func", softmax_scale=softmax_scale, causal=causal, window_size=_window(window_size),
                     softcap=softcap, deterministic=deterministic, return_lse=True)
        return _split(_mod.flash_attn_func(q, k, v, **kw))

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_table=None):
        if torch.compiler.is_compiling():
            return _compiled_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  causal, window_size, softcap, deterministic)
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
