"""Fixed-shape decode steps for the flash model, run eagerly or replayed from a CUDA graph (issue 7).

``flashlm.generation.generate`` asks this module for its decode step once per call
(:func:`decode_step_for`: the graph kept for that batch size, a new capture, or an eager step), then
prefills through it (:meth:`DecodeStep.prefill`: a replayed prefill graph or the eager forward) and
calls it once per token. Everything that knows about graphs lives here.

One decode step is: embed the last token of every row, run the layers against the static BSHD cache
(``flash_attn_with_kvcache`` appends k/v at each row's ``cache_seqlens``, in place), take the logits,
sample (greedy ``argmax`` or the exponential race with a device generator), replace the token of
rows that already finished by padding, record it, and update the per-row "finished" flags. Every
tensor it touches has a fixed shape and address, and nothing is read back to the host, so:

- :class:`DecodeStep` runs that step eagerly (CPU, or ``cuda_graph=False``): the graph-free path;
- :class:`CUDAGraphDecodeStep` captures the very same step once (per batch size) in a
  ``torch.cuda.CUDAGraph`` with static input/output buffers and replays it per token: one launch per
  token instead of ~15 kernels x layers launched from Python;
- :class:`CUDAGraphDecodeStep` also captures the prefill (``FlashForCausalLM.prefill_logits``) of an
  unpadded prompt of a length it has seen :data:`PREFILL_GRAPH_AFTER_USES` times (up to
  :data:`PREFILL_GRAPH_MAX_TOKENS` tokens, the last few lengths kept): the first token of a repeated
  prompt shape then costs a replay, not ~15 kernels x layers of host work;
- either one with ``compile=True`` (or an inductor mode, see :data:`COMPILE_MODES`) runs the step body
  through ``torch.compile(fullgraph=True, dynamic=False)`` first: inductor fuses the norms, residual
  adds, SwiGLU, RoPE, cache append and sampling into a few Triton kernels (C++ on the CPU), and the
  graph captures those instead of the ~400 small eager kernels. The CUDA graph stays ours (no
  ``mode="reduce-overhead"``): it also holds the sampling generator and the bookkeeping buffers.

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

Capturability of the decode path: the step runs ``FlashForCausalLM.decode_logits``, the decode body
of the model's forward with no host check and no host bookkeeping (the cache's room check and its
host-side length bound are done around the step by :meth:`DecodeStep.__call__`), and
``flash_attn_with_kvcache`` reads no device value on CUDA unless ``FLASHLM_ATTN_CHECKS=1`` (then
``cache_seqlens.min()/max()`` are read back: that is refused here with a clear error).

What keeps the compiled body one graph, compiled once: it is a function of tensors only (tokens,
cache, parameters, buffers) with no data-dependent branch and no Python value that changes between
tokens (Dynamo would guard on it and recompile every token); the sampling noise is drawn eagerly from
the step's generator into a buffer before the body runs (Dynamo cannot trace an explicit generator);
the attention backend is chosen by an opaque op at run time (``flashlm::kvcache_attention``), the cache
append and RoPE stay torch ops the compiler sees. Each step compiles its own copy of the body (Dynamo
caches per code object, so steps of other shapes are neither recompiles of it nor share its cache
limit), and every call after the first runs under ``torch.compiler.set_stance("fail_on_recompile")``:
an accidental recompile raises, with Dynamo's guard failure, instead of silently slowing down.

Where captured graphs live, and for how long: in ``_KEPT``, a ``weakref.WeakKeyDictionary`` keyed by
the model (model -> {batch size: CUDAGraphDecodeStep}), not in the model's ``__dict__`` (which
``deepcopy`` and pickling would carry). A step holds its model weakly, so the table never keeps a model
alive: its graphs and caches go when the model is collected, at :func:`release_graphs`, or when a
capture for another shape replaces that batch size's (:func:`graphed_decode_step`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import types
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flashlm.errors import InputError
from flashlm.generation.sampling import SamplingKey, sample_next_token

if TYPE_CHECKING:  # keep `import flashlm.generation` light: the models package loads on first use
    from flashlm.models.kv_cache import StaticKVCache

__all__ = ["CAPACITY_MULTIPLE", "COMPILE_MODES", "PREFILL_GRAPH_AFTER_USES", "PREFILL_GRAPH_MAX_TOKENS",
           "CUDAGraphDecodeStep", "DecodeStep", "SamplingKey", "cache_capacity", "compile_mode",
           "decode_step_for", "graph_unavailable_reason", "graphed_decode_step", "kept_cache_bytes",
           "kept_decode_steps", "release_graphs", "resolve_cuda_graph"]

# Cache capacities are rounded up to this many tokens so that one captured graph serves prompts of
# similar lengths (a graph is tied to its cache's shape and addresses).
CAPACITY_MULTIPLE = 256

# model -> {batch size: its captured step}; see the module doc for the lifetime
_KEPT: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, CUDAGraphDecodeStep]] = weakref.WeakKeyDictionary()


_log = logging.getLogger(__name__)


# torch.compile modes for the decode step. No mode that makes CUDA graphs ("reduce-overhead",
# "max-autotune"): the step's graph is captured here, with the sampling generator registered in it.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str | None) -> str | None:
    """The torch.compile mode asked for by a ``compile`` argument: None (False/None: no compile),
    ``"default"`` (True) or one of :data:`COMPILE_MODES`; ValueError otherwise."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    if compile in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"compile={compile!r} makes torch.compile capture its own CUDA graphs; the decode step "
                         "is captured by flashlm (cuda_graph=True): use compile=True or "
                         f"{' / '.join(map(repr, COMPILE_MODES))}")
    raise ValueError(f"compile must be False, True or one of {', '.join(map(repr, COMPILE_MODES))}; "
                     f"got {compile!r}")


def cache_capacity(needed: int, max_cache_len: int | None = None) -> int:
    """Slots per row of the static cache: ``max_cache_len`` if given (must be >= ``needed``), else
    ``needed`` rounded up to a multiple of :data:`CAPACITY_MULTIPLE`."""
    if max_cache_len is not None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < needed:
            raise ValueError(f"max_cache_len must be an int >= prompt length + max_new_tokens ({needed}), "
                             f"got {max_cache_len!r}")
        return max_cache_len
    return -(-needed // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE



_logged_fallbacks: set[str] = set()


def resolve_cuda_graph(cuda_graph: bool | str, model: torch.nn.Module, device: torch.device,
                       key: SamplingKey) -> str | None:
    """Why ``generate(cuda_graph=...)`` decodes eagerly here, or None when it replays a CUDA graph.

    "auto": the graph wherever :func:`graph_unavailable_reason` finds nothing against it (the flash
    model on a CUDA device, ...), else eager with that reason (logged at INFO once per reason).
    True: the graph, or :class:`~flashlm.errors.InputError` naming the reason. False: eager."""
    if cuda_graph not in (True, False, "auto"):
        raise InputError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
    if cuda_graph is False:
        return "cuda_graph=False"
    reason = graph_unavailable_reason(model, device, key)
    if reason is not None and cuda_graph is True:
        raise InputError(f"cuda_graph=True: {reason} (cuda_graph='auto', the default, falls back to eager "
                         "decoding)")
    if reason is not None and reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        _log.info("generate: eager decode steps, no CUDA graph: %s", reason)
    return reason


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


def decode_step_for(model: torch.nn.Module, input_ids: Tensor, padded: bool, needed: int, key: SamplingKey,
                    generator: torch.Generator | None, *, use_graph: bool, max_cache_len: int | None,
                    compile: str | None) -> tuple[DecodeStep, float]:
    """The decode step ``generate`` runs for prompts ``input_ids`` ``(batch, prompt_len)`` (``padded``:
    some row is left-padded) and ``needed`` slots per row, with an empty cache, and the seconds spent
    preparing it during this call (compiling and/or capturing; 0 when a kept graph is reused).

    ``use_graph``: the step kept for this batch size (:func:`graphed_decode_step`), whose prefill
    graph of an unpadded prompt's length is captured when due; else a new eager :class:`DecodeStep`
    on a new cache, compiled now (before the prefill) when ``compile`` names a mode."""
    batch, prompt_len = input_ids.shape
    if use_graph:
        step, captured = graphed_decode_step(model, batch, needed, key, device=input_ids.device,
                                             max_cache_len=max_cache_len, compile=compile)
        prepare_s = step.capture_s if captured else 0.0
        step.cache.reset()
        if not padded:  # an unpadded prompt: its prefill graph, once its length is seen again
            prepare_s += step.prefills.ready(prompt_len)
        return step, prepare_s
    cache = model.allocate_cache(batch, cache_capacity(needed, max_cache_len), device=input_ids.device)
    step = DecodeStep(model, cache, batch, key, generator, compile=compile)
    step.warm_up()  # compile now, on the empty cache, before the prefill (no-op uncompiled)
    return step, step.compile_s

class DecodeStep:
    """One fixed-shape decode step of ``batch_size`` rows on a :class:`StaticKVCache`, run eagerly.

    Buffers (fixed shape and address, updated in place):
        tokens: int64 ``(batch,)``: the last token of each row (the next step's input).
        finished: bool ``(batch,)``: the row has produced one of ``key.eos_ids``.
        all_done: bool ``()``: every row has finished.
        history: int64 ``(batch, capacity)``: column ``i`` holds the ``i``-th new token.
        step_idx: int64 ``(1,)``: how many new tokens were recorded.
        race: fp32 ``(batch, vocab)`` when sampling: the Exp(1) noise of the step, drawn from
            ``generator`` before the body runs (None for greedy).

    ``compile``: False, True (``torch.compile`` mode "default") or a mode of :data:`COMPILE_MODES`: the
    step body (model, sampling, recording) runs compiled; the first call compiles it (or call
    :meth:`warm_up` on the empty cache first), a later recompile raises. ``compile_s``: seconds the
    compiling call took.

    Usage: prefill the cache with the model, then :meth:`begin` with the prefill's last logits
    ``(batch, vocab)``, then call the object once per further token.
    """

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, cache: StaticKVCache, batch_size: int, key: SamplingKey,
                 generator: torch.Generator | None = None, *, compile: bool | str = False) -> None:
        if not hasattr(model, "decode_logits"):
            raise ValueError(f"DecodeStep needs the flash model (FlashForCausalLM, static cache); got "
                             f"{type(model).__name__}")
        self._sample_fn = sample_next_token
        self._model = weakref.ref(model)  # weakly: a kept step must not keep its model alive (module doc)
        self.cache, self.batch_size, self.key = cache, batch_size, key
        self.generator = generator
        self.compile_mode = compile_mode(compile)
        dev = cache.device
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        self.all_done = torch.zeros((), dtype=torch.bool, device=dev)
        self.history = torch.zeros(batch_size, cache.max_seqlen, dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.eos = torch.tensor(key.eos_ids, dtype=torch.long, device=dev) if key.eos_ids else None
        self.race = (torch.ones(batch_size, model.config.vocab_size, dtype=torch.float32, device=dev)
                     if key.do_sample else None)
        self.compile_s = 0.0
        self._compiled = False  # whether the compiled body has run once (later compiles are errors)
        self._compiled_body = None
        if self.compile_mode is not None:
            # Dynamo keeps compiled graphs, and counts recompiles, per code object: a copy of the body's
            # code per step means another step's shapes are neither a recompile of this one nor share
            # its cache limit (one body per batch size and capacity, several models, a benchmark sweep).
            # An unbound function called with self: no reference cycle keeps a dropped step's cache alive.
            fn = type(self)._step_body
            own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
            self._compiled_body = torch.compile(own, fullgraph=True, dynamic=False, mode=self.compile_mode)

    @property
    def model(self) -> torch.nn.Module:
        """The model this step runs (held weakly; RuntimeError once it was deleted)."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decode step was deleted; build a new step for the model in use")
        return model

    def _pick(self, logits: Tensor) -> Tensor:
        k = self.key
        return self._sample_fn(logits, do_sample=k.do_sample, temperature=k.temperature, top_k=k.top_k,
                               top_p=k.top_p, race=self.race)

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

    def _draw(self) -> None:
        # eager, before the body: Dynamo cannot trace a draw from an explicit generator. Same shape,
        # dtype and generator as sample_next_token's own draw, so the same numbers.
        if self.race is not None:
            self.race.exponential_(1.0, generator=self.generator)

    def _step_body(self, model: torch.nn.Module) -> None:
        """What gets compiled and captured: one token per row through ``model`` (the cache append and
        the device-side length bump included), sampled and recorded in place. Tensors only: no host
        check, no host bookkeeping, no data-dependent branch."""
        # compiled: the body runs only through _compiled_body, so the model plans for the compiler
        logits = model.decode_logits(self.tokens[:, None], self.cache, compiled=self._compiled_body is not None)
        self._record(self._pick(logits))

    def prefill(self, input_ids: Tensor, mask: Tensor | None) -> tuple[Tensor, bool]:
        """Run the prompts int64 ``(batch, prompt_len)`` (left-padded where ``mask`` ``(batch, prompt_len)``
        is 0; None: no padding) through the model into the step's (empty) cache. Returns the last
        position's logits ``(batch, vocab)`` and whether they came from a replayed graph (never, here)."""
        # left padding puts every row's last real token at the last position
        out = self.model(input_ids, attention_mask=mask, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1, :], False

    @contextlib.contextmanager
    def drawing_from(self, generator: torch.Generator | None) -> Iterator[None]:
        """The decode loop's sampling draws from ``generator``: the eager step draws from the
        generator it was built with, so nothing to do (see :class:`CUDAGraphDecodeStep`)."""
        yield

    @torch.no_grad()
    def begin(self, logits: Tensor) -> None:
        """Sample and record the first new token from the prefill's last logits ``(batch, vocab)``."""
        self.finished.zero_()
        self.all_done.zero_()
        self.step_idx.zero_()
        self._draw()
        self._record(self._pick(logits))

    @torch.no_grad()
    def forward_step(self, draw: bool = True) -> None:
        """The device work of one step: draw the sampling noise (unless ``draw=False``), run the
        (compiled) body."""
        if draw:
            self._draw()
        model = self.model
        if self._compiled_body is None:
            self._step_body(model)
        elif self._compiled:
            with torch.compiler.set_stance("fail_on_recompile"):
                self._compiled_body(self, model)
        else:
            t0 = time.perf_counter()
            self._compiled_body(self, model)
            self.compile_s = time.perf_counter() - t0
            self._compiled = True

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the body now, on the cache before its prefill: runs one step on rows that pretend to
        be empty (its k/v land in slots the prefill overwrites), draws no noise (the generator's stream
        stays the caller's), then resets the cache. Nothing to do without ``compile`` or once compiled."""
        if self.compile_mode is None or self._compiled:
            return
        self.cache.prepare_for_capture(self.batch_size)
        self.forward_step(draw=False)
        self.cache.reset()

    def __call__(self) -> None:
        self.cache.check_room(self.batch_size, 1)  # host-only: refuse an overflow before any kernel
        self.forward_step()
        self.cache.note_appended(self.batch_size, 1)  # the device half (cache_seqlens += 1) ran inside

    def new_tokens(self, steps: int) -> Tensor:
        """int64 ``(batch, steps)``: the tokens recorded so far (a copy: the buffer is reused)."""
        return self.history[:, :steps].clone()


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per card on which every warm-up and capture of this module runs. cuBLAS keeps a
    32 MiB workspace per stream it has run on (for the process's life: captured graphs point into it), so
    a new stream per capture would pile up workspaces (H200, seed config: +100 MB still allocated after
    generate, in the next train step's peak; flashlm bench memory --residue)."""
    device = _with_index(torch.device(device))
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def _warm_up_on_side_stream(device: torch.device, fn, times: int) -> None:
    """Run ``fn()`` ``times`` times on the capture stream, as torch.cuda.graphs asks before a capture
    (torch.compile and inductor's autotuning, Triton JIT, cuBLAS handles, the allocator)."""
    side = capture_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


# Prefill graphs (first token): captured for a prompt shape on its second use, at most this many tokens
# (batch x prompt length: beyond, the prefill is GPU-bound and a graph saves little), kept per decode
# step for the last few prompt lengths, all in one memory pool.
PREFILL_GRAPH_MAX_TOKENS = 4096
PREFILL_GRAPH_AFTER_USES = 2
PREFILL_GRAPHS_KEPT = 4


class _PrefillGraphs:
    """The captured prefills of one :class:`CUDAGraphDecodeStep` (its model, batch size and cache), one
    per prompt length: ``FlashForCausalLM.prefill_logits`` on a static ``input_ids`` buffer, replayed
    with the prompt copied in. Why: an eager llama-1b prefill of 128 tokens is ~8 ms of host time for
    ~1.5 ms of GPU work (H200, flashlm bench decode-probe)."""

    def __init__(self, step: CUDAGraphDecodeStep) -> None:
        self.step = step
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}  # length -> graph, ids, logits
        self.uses: dict[int, int] = {}
        self.pool = None
        self.refused: dict[int, str] = {}  # length -> why capturing failed (then eager for good)

    def ready(self, prompt_len: int) -> float:
        """Count a use of ``prompt_len``; capture its graph when due. Returns the seconds spent capturing."""
        if len(self.uses) > 4096:  # a server of many prompt lengths: forget the counts, not the graphs
            self.uses.clear()
        self.uses[prompt_len] = self.uses.get(prompt_len, 0) + 1
        if (prompt_len in self.graphs or prompt_len in self.refused
                or self.uses[prompt_len] < PREFILL_GRAPH_AFTER_USES
                or self.step.batch_size * prompt_len > PREFILL_GRAPH_MAX_TOKENS):
            return 0.0
        t0 = time.perf_counter()
        try:
            with torch.cuda.device(self.step.device):  # as the decode step's capture: the cache's card
                self._capture(prompt_len)
        except RuntimeError as exc:  # a backend that cannot be captured: stay eager, say why once
            self.step.cache.reset()
            self.refused[prompt_len] = f"{type(exc).__name__}: {exc}"
            _log.warning("prefill of %d tokens not captured in a CUDA graph (eager instead): %s", prompt_len, exc)
        return time.perf_counter() - t0

    def _capture(self, prompt_len: int) -> None:
        step = self.step
        model, cache = step.model, step.cache
        ids = torch.zeros(step.batch_size, prompt_len, dtype=torch.long, device=step.device)
        _warm_up_on_side_stream(step.device, lambda: model.prefill_logits(ids, cache.reset()), 1)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream(step.device)):
            logits = model.prefill_logits(ids, cache.reset())
        torch.cuda.synchronize(step.device)
        cache.reset()
        if len(self.graphs) >= PREFILL_GRAPHS_KEPT:  # forget the oldest length
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[prompt_len] = (graph, ids, logits)

    def run(self, input_ids: Tensor) -> Tensor | None:
        """Replay the prefill of ``input_ids`` into the (reset) cache; None when no graph is captured
        for its length. Returns the last position's logits (batch, vocab), a static buffer."""
        found = self.graphs.get(input_ids.shape[1])
        if found is None:
            return None
        graph, ids, logits = found
        cache = self.step.cache
        cache.check_room(*input_ids.shape)
        ids.copy_(input_ids)
        graph.replay()
        cache.note_appended(*input_ids.shape)  # the device half (cache_seqlens += prompt_len) ran inside
        return logits


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

    Owns its cache (``model.allocate_cache(batch_size, capacity)``): :meth:`prefill` after
    ``self.cache.reset()``, then :meth:`begin`, then call the object per token. With sampling it owns a
    device generator registered with the graph (:meth:`drawing_from` copies a caller's state in and
    back out). ``compile``: capture the torch.compile'd body (see
    :class:`DecodeStep`); it compiles in the first warm-up step. ``capture_s``: seconds spent warming
    up (compiling included, ``compile_s`` of them) and capturing.
    """

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, batch_size: int, capacity: int, key: SamplingKey, *,
                 device: torch.device, dtype: torch.dtype | None = None, warmup_steps: int = 2,
                 compile: bool | str = False) -> None:
        device = torch.device(device)
        reason = graph_unavailable_reason(model, device, key)
        if reason is not None:
            raise ValueError(reason)
        if compile_mode(compile) is not None and warmup_steps < 1:
            raise ValueError("a compiled step needs warmup_steps >= 1: compiling (and inductor's autotuning) "
                             "cannot happen while a CUDA graph captures")
        device = _with_index(device)
        cache = model.allocate_cache(batch_size, capacity, dtype=dtype, device=device)
        generator = torch.Generator(device=device) if key.do_sample else None
        super().__init__(model, cache, batch_size, key, generator, compile=compile)
        self.device = device
        self.capacity = capacity
        self.signature = _signature(model)
        self.graph = torch.cuda.CUDAGraph()
        self.prefills = _PrefillGraphs(self)
        t0 = time.perf_counter()
        with torch.cuda.device(device):
            self._capture(warmup_steps)
        self.capture_s = time.perf_counter() - t0

    def _capture(self, warmup_steps: int) -> None:
        # Warm up on a cache whose rows pretend to be empty.
        self.cache.prepare_for_capture(self.batch_size)
        _warm_up_on_side_stream(self.device, self.forward_step, warmup_steps)
        self.cache.prepare_for_capture(self.batch_size)
        if self.generator is not None:
            self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph, stream=capture_stream(self.device)):
            self.forward_step()
        torch.cuda.synchronize(self.device)
        # capture ran no kernel, the warm-up did: forget its k/v and lengths (prefill overwrites slots)
        self.cache.reset()

    def matches(self, model: torch.nn.Module, batch_size: int, needed: int, key: SamplingKey,
                device: torch.device, dtype: torch.dtype | None, compile: bool | str = False) -> bool:
        """Whether this graph can serve a call (same model weights, batch, sampling, dtype, device,
        compile mode and enough capacity)."""
        return (self.model is model and self.batch_size == batch_size and self.capacity >= needed
                and self.key == key and self.device == device and self.compile_mode == compile_mode(compile)
                and (dtype is None or self.cache.dtype == dtype) and self.signature == _signature(model))

    def prefill(self, input_ids: Tensor, mask: Tensor | None) -> tuple[Tensor, bool]:
        """:meth:`DecodeStep.prefill`, replayed from the prefill graph of an unpadded prompt's length
        when one was captured (then the logits are a static buffer)."""
        logits = self.prefills.run(input_ids) if mask is None else None
        if logits is None:
            return super().prefill(input_ids, mask)
        return logits, True

    @contextlib.contextmanager
    def drawing_from(self, generator: torch.Generator | None) -> Iterator[None]:
        """Sampling: the graph draws from its own registered generator; copy the state of
        ``generator`` (default: the card's default generator) in, and back out at the end, so eager
        and graph runs draw the same numbers from the caller's stream. Greedy: nothing to do."""
        if self.generator is None:
            yield
            return
        source = generator if generator is not None else torch.cuda.default_generators[self.device.index]
        self.generator.set_state(source.get_state())
        try:
            yield
        finally:
            source.set_state(self.generator.get_state())

    def __call__(self) -> None:
        self.cache.check_room(self.batch_size, 1)  # host-only: refuse an overflow before replaying
        self.graph.replay()
        self.cache.note_appended(self.batch_size, 1)  # the device half (cache_seqlens += 1) ran inside


def graphed_decode_step(model: torch.nn.Module, batch_size: int, needed: int, key: SamplingKey, *,
                        device: torch.device | str, dtype: torch.dtype | None = None,
                        max_cache_len: int | None = None,
                        compile: bool | str = False) -> tuple[CUDAGraphDecodeStep, bool]:
    """The captured decode step of ``model`` for ``batch_size`` rows and at least ``needed`` cache slots,
    reused across calls (one per batch size, kept for the model: see the module doc) or captured now; ``compile`` as in
    :class:`DecodeStep` (graph + torch.compile; a graph of another compile mode is replaced).

    Returns (step, captured_now). A new capture replaces the previous graph of that batch size (and
    frees its cache); :func:`release_graphs` frees them all.
    """
    device = _with_index(torch.device(device))
    compile_mode(compile)  # refuse a bad mode before anything is freed
    graphs = _KEPT.setdefault(model, {})
    step = graphs.get(batch_size)
    if step is not None and step.matches(model, batch_size, needed, key, device, dtype, compile) and (
            max_cache_len is None or step.capacity == max_cache_len):
        return step, False
    graphs.pop(batch_size, None)
    if step is not None:
        del step  # free the old cache and graph pool before allocating the new ones
        gc.collect()  # compiled code may hold references in cycles
    capacity = cache_capacity(needed, max_cache_len)
    step = CUDAGraphDecodeStep(model, batch_size, capacity, key, device=device, dtype=dtype, compile=compile)
    graphs[batch_size] = step
    return step, True


def kept_decode_steps(model: torch.nn.Module) -> dict[int, CUDAGraphDecodeStep]:
    """The captured decode steps kept for ``model``, by batch size (a copy of the table's entry)."""
    return dict(_KEPT.get(model, {}))


def kept_cache_bytes(model: torch.nn.Module, batch_size: int) -> int:
    """Bytes of the cache of the step kept for ``model`` at ``batch_size`` (0: none). A call of that
    batch size reuses or frees it before allocating, so a memory check counts it as available."""
    step = _KEPT.get(model, {}).get(batch_size)
    return 0 if step is None else sum(t.numel() * t.element_size() for t in step.cache.k + step.cache.v)


def release_graphs(model: torch.nn.Module) -> int:
    """Drop the captured decode graphs (and their caches) kept for ``model``; returns how many."""
    graphs = _KEPT.pop(model, {})
    n = len(graphs)
    graphs.clear()
    if n:
        gc.collect()  # compiled code may hold references in cycles: free the caches and pools now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return n
