"""The contract every attention backend fulfils.

A backend is one module in ``flashlm.attention.backends`` that exposes ``BACKEND``, an instance of a
``Backend`` subclass. It declares what it can do (``Capabilities``); the registry describes each call
as an ``AttnCall`` and asks every backend, fastest first, whether it can serve it. A backend never
validates user input (the interface does that once, before any kernel runs); it only says what it
cannot do and computes.

Layouts (flash-attn's):
  dense:  q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim[_v])
  varlen: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim[_v]),
          cu_seqlens_q/k int32 (batch + 1,)
  kvcache: q (batch, seqlen_q, nheads, headdim), k_cache/v_cache (batch_cache, seqlen_cache,
          nheads_k, headdim) or paged (num_blocks, page_block_size, nheads_k, headdim) with
          block_table int32 (batch, max_blocks_per_seq); cache_seqlens int32 (batch,) holds the
          number of valid keys per row *after* the new k/v were appended by the interface.
Every entry point returns (out, softmax_lse): out in q's dtype and layout; softmax_lse fp32,
(batch, nheads, seqlen_q) for dense/kvcache and (nheads, total_q) for varlen. Dense and varlen are
differentiable (autograd through the returned out) when ``capabilities.backward`` is true.

Arguments as the interface passes them (already normalized the way flash-attn 2.8 does):
  softmax_scale is a float; window_size is a tuple of two ints where -1 means unbounded, a side
  >= seqlen_k was turned into -1, and with causal=True it is (left, 0) or (-1, -1) for plain causal;
  softcap is 0.0 when off; alibi_slopes is None or fp32 (nheads,) / (batch, nheads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset[str]  # torch device types: {"cpu", "cuda"}
    dtypes: frozenset[torch.dtype]
    head_dims: tuple[int, int] = (1, 256)  # inclusive range for q/k head_dim (and v's)
    head_dim_multiple: int = 1  # e.g. 8 for FA kernels
    min_compute_capability: tuple[int, int] | None = None  # CUDA only, e.g. (8, 0)
    max_compute_capability: tuple[int, int] | None = None  # e.g. FA3 only on (9, x)
    dense: bool = True
    varlen: bool = False
    kvcache: bool = False
    paged_kv: bool = False
    causal: bool = True
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    dropout: bool = False
    gqa: bool = True  # nheads_k < nheads without repeating k/v in memory
    backward: bool = False
    deterministic: bool = False  # a deterministic backward is available on request
    head_dim_v_differs: bool = False  # v's head_dim may differ from q/k's
    seqlen_q_gt_k: bool = True  # seqlen_q > seqlen_k (bottom-right causal leaves rows empty)
    leftpad: bool = False  # kvcache with cache_leftpad (keys start at a per-row offset)
    attn_probs: bool = False  # can return the attention probabilities (return_attn_probs with dropout)
    empty_kv: bool = False  # seqlen_k == 0 (no key at all: out 0, lse +inf); many kernels fault on it
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class AttnCall:
    """What one attention call needs, in terms a backend can refuse."""

    kind: str  # "dense" | "varlen" | "kvcache"
    device_type: str
    compute_capability: tuple[int, int] | None
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    nheads: int
    nheads_k: int
    seqlen_q: int | None  # max_seqlen_q for varlen
    seqlen_k: int | None
    causal: bool
    window: bool  # any side of window_size != -1
    softcap: bool
    alibi: bool
    dropout: bool
    needs_grad: bool
    deterministic: bool
    paged: bool = False
    return_attn_probs: bool = False  # the probabilities themselves are needed (dropout_p > 0)
    page_block_size: int | None = None  # paged KV only
    leftpad: bool = False  # kvcache with cache_leftpad
    # every sequence has seqlen_q == seqlen_k (dense: equal shapes; varlen: cu_seqlens_q is cu_seqlens_k),
    # so top-left and bottom-right causal coincide
    seqlens_equal: bool = False

    def describe(self) -> str:
        flags = [f for f in ("causal", "window", "softcap", "alibi", "dropout", "paged", "deterministic")
                 if getattr(self, f)]
        if self.needs_grad:
            flags.append("backward")
        return (f"{self.kind} {self.device_type} {str(self.dtype).replace('torch.', '')} "
                f"head_dim={self.head_dim}{'' if self.head_dim_v == self.head_dim else f'/{self.head_dim_v}'} "
                f"heads={self.nheads}/{self.nheads_k} seqlen_q={self.seqlen_q} seqlen_k={self.seqlen_k}"
                + (f" [{', '.join(flags)}]" if flags else ""))


class Backend:
    """Base class: subclasses set ``name`` and ``capabilities`` and implement the entry points."""

    name: str = "?"
    capabilities: Capabilities
    # call kinds whose entry points torch.compile can trace (Dynamo, fake tensors, no host reads);
    # compiled plans skip a backend for the other kinds (flashlm.models.flash_backends)
    traceable_kinds: frozenset[str] = frozenset({"dense", "varlen", "kvcache"})

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all here (package not importable, no GPU), or None."""
        return None

    def refuse(self, call: AttnCall) -> str | None:
        """Why this backend cannot serve ``call``, or None if it can. Checks the declared
        capabilities; backends with finer limits override and call ``super().refuse``."""
        caps = self.capabilities
        if call.device_type not in caps.devices:
            return f"device {call.device_type} not in {sorted(caps.devices)}"
        if call.dtype not in caps.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in caps.dtypes)
            return f"dtype {str(call.dtype).replace('torch.', '')} not in {names}"
        if call.device_type == "cuda" and call.compute_capability is not None:
            if caps.min_compute_capability and call.compute_capability < caps.min_compute_capability:
                return f"needs compute capability >= {caps.min_compute_capability}"
            if caps.max_compute_capability and call.compute_capability > caps.max_compute_capability:
                return f"needs compute capability <= {caps.max_compute_capability}"
        lo, hi = caps.head_dims
        for hd in {call.head_dim, call.head_dim_v}:
            if not lo <= hd <= hi or hd % caps.head_dim_multiple:
                return f"head_dim {hd} not in [{lo}, {hi}] (multiple of {caps.head_dim_multiple})"
        if call.head_dim_v != call.head_dim and not caps.head_dim_v_differs:
            return "v head_dim must equal q/k head_dim"
        if not getattr(caps, call.kind):
            return f"no {call.kind} entry point"
        if call.nheads_k != call.nheads and not caps.gqa:
            return "no GQA/MQA (nheads_k != nheads)"
        checks = [("causal", caps.causal), ("window", caps.window), ("softcap", caps.softcap),
                  ("alibi", caps.alibi), ("dropout", caps.dropout), ("paged", caps.paged_kv),
                  ("leftpad", caps.leftpad)]
        for flag, ok in checks:
            if getattr(call, flag) and not ok:
                return f"no {flag} support"
        if call.return_attn_probs and not caps.attn_probs:
            return "cannot return attention probabilities"
        if call.needs_grad and not caps.backward:
            return "no backward"
        if call.needs_grad and call.deterministic and not caps.deterministic:
            return "cannot make the backward deterministic"
        if call.seqlen_k == 0 and not caps.empty_kv:
            return "seqlen_k == 0 (no keys) not supported"
        if (call.seqlen_q is not None and call.seqlen_k is not None and call.seqlen_q > call.seqlen_k
                and not caps.seqlen_q_gt_k):
            return "seqlen_q > seqlen_k not supported"
        return None

    # Entry points. Inputs are already validated and contiguous in the last dim.
    def dense(self, q, k, v, *, dropout_p: float, softmax_scale: float, causal: bool,
              window_size: tuple[int, int], softcap: float, alibi_slopes, deterministic: bool):
        raise NotImplementedError

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
               dropout_p: float, softmax_scale: float, causal: bool, window_size: tuple[int, int],
               softcap: float, alibi_slopes, deterministic: bool, block_table=None):
        raise NotImplementedError

    def kvcache(self, q, k_cache, v_cache, cache_seqlens, *, cache_batch_idx, cache_leftpad,
                block_table, softmax_scale: float, causal: bool, window_size: tuple[int, int],
                softcap: float, alibi_slopes, num_splits: int):
        raise NotImplementedError
