"""Fixed-shape decode steps for the flash model, run eagerly or replayed from a CUDA graph (issue 7).

One decode step is: embed the last token of every row, run the layers against the static BSHD cache
(``flash_attn_with_kvcache`` appends k/v at each row's ``cache_seqlens``, in place), take the logits,
sample (greedy ``argmax`` or the exponential race with a device generator), replace the token of
rows that already finished by padding, record it, and update the per-row "finished" flags. Every
tensor it touches has a fixed shape and address, and nothing is read back to the host, so:

- :class:`DecodeStep` runs that step eagerly (CPU, or ``cuda_graph=False``): the graph-free path;
- :class:`CUDAGraphDecodeStep` captures the very same step once (per batch size) in a
  ``torch.cuda.CUDAGraph`` with static input/output buffers and replays it per token: one launch per
  token instead of ~15 kernels x layers launched from Python.

What keeps the replay correct without Python running in between:

- the graph is sized for the cache's full capacity: the attention kernels get the whole
  ``(batch, capacity, kv_heads, head_dim)`` cache and mask each row by ``cache_seqlens`` (a device
  tensor bumped inside the graph), so no host-side length changes between replays;
- the cache's host-side bookkeeping (``max_len_bound``, used to refuse an overflow before any kernel
  runs) is updated by :meth:`CUDAGraphDecodeStep.__call__` around each replay;
- sampling draws from a generator registered with the graph (``register_generator_state``), whose
  Philox offset advances at each replay exactly as an eager call's would; ``generate`` copies the
  caller's generator state in and out, so eager and graph runs draw the same numbers;
- the step index, the token history ``(batch, capacity)`` and the "all rows finished" flag live in
  device buffers; the host copies the flag without blocking every few steps.

Capturability of the decode path: the flash model's decode forward runs no data-dependent check
(``FlashForCausalLM.forward`` skips the token-range check for one token per row on a non-empty cache)
and ``flash_attn_with_kvcache`` reads no device value on CUDA unless ``FLASHLM_ATTN_CHECKS=1``
(then ``cache_seqlens.min()/max()`` are read back: that is refused here with a clear error).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # keep `import flashlm.generation` light: the models package loads on first use
    from flashlm.models.flash_cache import StaticKVCache

__all__ = ["CAPACITY_MULTIPLE", "CUDAGraphDecodeStep", "DecodeStep", "SamplingKey", "cache_capacity",
           "graph_unavailable_reason", "graphed_decode_step", "release_graphs"]

# Cache capacities are rounded up to this many tokens so that one captured graph serves prompts of
# similar lengths (a graph is tied to its cache's shape and addresses).
CAPACITY_MULTIPLE = 256
_GRAPHS_ATTR = "_flashlm_decode_graphs"


@dataclass(frozen=True)
class SamplingKey:
    """Everything a captured step bakes in besides shapes: the sampling rule, EOS ids and padding."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def cache_capacity(needed: int, max_cache_len: int | None = None) -> int:
    """Slots per row of the static cache: ``max_cache_len`` if given (must be >= ``needed``), else
    ``needed`` rounded up to a multiple of :data:`CAPACITY_MULTIPLE`."""
    if max_cache_len is not None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < needed:
            raise ValueError(f"max_cache_len must be an int >= prompt length + max_new_tokens ({needed}), "
                             f"got {max_cache_len!r}")
        return max_cache_len
    return -(-needed // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


class DecodeStep:
    """One fixed-shape decode step of ``batch_size`` rows on a :class:`StaticKVCache`, run eagerly.

    Buffers (fixed shape and address, updated in place):
        tokens: int64 ``(batch,)``: the last token of each row (the next step's input).
        finished: bool ``(batch,)``: the row has produced one of ``key.eos_ids``.
        all_done: bool ``()``: every row has finished.
        history: int64 ``(batch, capacity)``: column ``i`` holds the ``i``-th new token.
        step_idx: int64 ``(1,)``: how many new tokens were recorded.

    Usage: prefill the cache with the model, then :meth:`begin` with the prefill's last logits
    ``(batch, vocab)``, then call the object once per further token.
    """

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, batch_size: int, key: SamplingKey,
                 generator: torch.Generator | None = None) -> None:
        from flashlm.generation import sample_next_token  # generation imports this module

        self._sample_fn = sample_next_token
        self.model, self.cache, self.batch_size, self.key = model, cache, batch_size, key
        self.generator = generator
        dev = cache.device
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        self.all_done = torch.zeros((), dtype=torch.bool, device=dev)
        self.history = torch.zeros(batch_size, cache.max_seqlen, dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.eos = torch.tensor(key.eos_ids, dtype=torch.long, device=dev) if key.eos_ids else None

    def _sample(self, logits: Tensor) -> Tensor:
        k = self.key
        return self._sample_fn(logits, do_sample=k.do_sample, temperature=k.temperature, top_k=k.top_k,
                               top_p=k.top_p, generator=self.generator)

    def _record(self, next_tokens: Tensor) -> None:
        # a finished row keeps producing padding: fixed shapes, no row removal, no host read
        next_tokens = next_tokens.masked_fill(self.finished, self.key.pad_token_id)
        self.tokens.copy_(next_tokens)
        self.history.index_copy_(1, self.step_idx, next_tokens[:, None])
        self.step_idx += 1
        if self.eos is not None:
            # a broadcast compare, not torch.isin (which may sort and sync for longer id lists)
            self.finished |= (next_tokens[:, None] == self.eos).any(-1)
            self.all_done.copy_(self.finished.all())

    @torch.no_grad()
    def begin(self, logits: Tensor) -> None:
        """Sample and record the first new token from the prefill's last logits ``(batch, vocab)``."""
        self.finished.zero_()
        self.all_done.zero_()
        self.step_idx.zero_()
        self._record(self._sample(logits))

    @torch.no_grad()
    def forward_step(self) -> None:
        """The captured body: one token per row through the model, sampled and recorded in place."""
        out = self.model(self.tokens[:, None], past_key_values=self.cache)
        self._record(self._sample(out.logits[:, -1, :]))

    def __call__(self) -> None:
        # eager: the model's forward checks the cache's room and does its host bookkeeping itself
        self.forward_step()

    def new_tokens(self, steps: int) -> Tensor:
        """int64 ``(batch, steps)``: the tokens recorded so far (a copy: the buffer is reused)."""
        return self.history[:, :steps].clone()


def graph_unavailable_reason(model: torch.nn.Module, device: torch.device, key: SamplingKey) -> str | None:
    """Why the decode step of ``model`` on ``device`` cannot be captured in a CUDA graph, or None."""
    if not hasattr(model, "allocate_cache"):
        return (f"CUDA-graph decoding needs the flash model (FlashForCausalLM, static cache); got "
                f"{type(model).__name__}, whose dynamic cache changes shape every step")
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"CUDA graphs need a CUDA device; the inputs are on {device}"
    if os.environ.get("FLASHLM_ATTN_CHECKS") == "1":
        return ("FLASHLM_ATTN_CHECKS=1 makes flash_attn_with_kvcache read cache_seqlens back to the host "
                "(a sync), which a CUDA graph cannot capture; unset it")
    if key.do_sample and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return ("sampling inside a CUDA graph needs torch.cuda.CUDAGraph.register_generator_state "
                f"(torch >= 2.5); this is torch {torch.__version__}")
    return None


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: graphs and their caches are tied to one card."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _signature(model: torch.nn.Module) -> tuple[Any, ...]:
    # a captured graph reads the parameters at their addresses: replaced or moved weights need a new one
    return tuple(p.data_ptr() for p in model.parameters())


class CUDAGraphDecodeStep(DecodeStep):
    """A :class:`DecodeStep` captured once in a CUDA graph and replayed per token.

    Owns its cache (``model.allocate_cache(batch_size, capacity)``): prefill into ``self.cache`` after
    ``self.cache.reset()``, then :meth:`begin`, then call the object per token. With sampling it owns a
    device generator registered with the graph (copy a caller's state in with
    ``self.generator.set_state(...)``). ``capture_s``: seconds spent warming up and capturing.
    """

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, batch_size: int, capacity: int, key: SamplingKey, *,
                 device: torch.device, dtype: torch.dtype | None = None, warmup_steps: int = 2) -> None:
        device = torch.device(device)
        reason = graph_unavailable_reason(model, device, key)
        if reason is not None:
            raise ValueError(reason)
        device = _with_index(device)
        cache = model.allocate_cache(batch_size, capacity, dtype=dtype, device=device)
        generator = torch.Generator(device=device) if key.do_sample else None
        super().__init__(model, cache, batch_size, key, generator)
        self.device = device
        self.capacity = capacity
        self.signature = _signature(model)
        self.graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.device(device):
            self._capture(warmup_steps)
        self.capture_s = time.perf_counter() - t0

    def _capture(self, warmup_steps: int) -> None:
        # Warm up on a side stream (Triton JIT, cuBLAS handles, allocator), as torch.cuda.graphs asks,
        # on a cache that pretends to hold empty rows so the model takes its decode path.
        self.cache.prepare_for_capture(self.batch_size)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.forward_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.cache.prepare_for_capture(self.batch_size)
        if self.generator is not None:
            self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph):
            self.forward_step()
        torch.cuda.synchronize(self.device)
        # capture ran no kernel, the warm-up did: forget its k/v and lengths (prefill overwrites slots)
        self.cache.reset()

    def matches(self, model: torch.nn.Module, batch_size: int, needed: int, key: SamplingKey,
                device: torch.device, dtype: torch.dtype | None) -> bool:
        """Whether this graph can serve a call (same model weights, batch, sampling, dtype, device and
        enough capacity)."""
        return (self.model is model and self.batch_size == batch_size and self.capacity >= needed
                and self.key == key and self.device == device
                and (dtype is None or self.cache.dtype == dtype) and self.signature == _signature(model))

    def __call__(self) -> None:
        self.cache.check_room(self.batch_size, 1)  # host-only: refuse an overflow before replaying
        self.graph.replay()
        self.cache.note_appended(self.batch_size, 1)  # the device half (cache_seqlens += 1) ran inside


def graphed_decode_step(model: torch.nn.Module, batch_size: int, needed: int, key: SamplingKey, *,
                        device: torch.device | str, dtype: torch.dtype | None = None,
                        max_cache_len: int | None = None) -> tuple[CUDAGraphDecodeStep, bool]:
    """The captured decode step of ``model`` for ``batch_size`` rows and at least ``needed`` cache slots,
    reused across calls (one per batch size, kept on the model) or captured now.

    Returns (step, captured_now). A new capture replaces the previous graph of that batch size (and
    frees its cache); :func:`release_graphs` frees them all.
    """
    device = _with_index(torch.device(device))
    graphs: dict[int, CUDAGraphDecodeStep] = model.__dict__.setdefault(_GRAPHS_ATTR, {})
    step = graphs.get(batch_size)
    if step is not None and step.matches(model, batch_size, needed, key, device, dtype) and (
            max_cache_len is None or step.capacity == max_cache_len):
        return step, False
    graphs.pop(batch_size, None)
    del step  # free the old cache and graph pool before allocating the new ones
    capacity = cache_capacity(needed, max_cache_len)
    step = CUDAGraphDecodeStep(model, batch_size, capacity, key, device=device, dtype=dtype)
    graphs[batch_size] = step
    return step, True


def release_graphs(model: torch.nn.Module) -> int:
    """Drop the captured decode graphs (and their caches) kept on ``model``; returns how many."""
    graphs = model.__dict__.pop(_GRAPHS_ATTR, {})
    n = len(graphs)
    graphs.clear()
    if n and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n
