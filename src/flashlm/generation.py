"""Token generation for flashlm models: prefill + decode loop, sampling without host syncs.

``generate(model, input_ids, ...)`` works with both models:

- the **flash** model (it has ``allocate_cache``): a static BSHD cache is allocated once for
  ``prompt_len + max_new_tokens`` tokens per row (rounded up to a multiple of 256); prefill writes each
  row's real tokens left-aligned (padding removed), every decode step feeds one token per row and
  appends its key/value in place through ``flash_attn_with_kvcache`` at the row's own
  ``cache_seqlens``. The decode step (``flashlm.decode_graph.DecodeStep``) has fixed shapes and reads
  nothing back to the host; on CUDA it is captured once per batch size in a CUDA graph and replayed
  per token (``cuda_graph="auto"``, the default; the prefill of an unpadded prompt is replayed from a
  graph of its shape from the shape's second use, ``GenerationOutput.prefill_graph``), elsewhere it
  runs eagerly and the result says why (``GenerationOutput.graph_fallback``); with ``compile=True`` its body runs
  through ``torch.compile`` (inductor fuses its small kernels), captured in that graph on CUDA;
- the **default** model: its dynamic cache, with the attention mask grown by one column per step and
  position ids taken from the mask.

Prompts are batched **left-padded** (``attention_mask`` 0 on the left of each row, as tokenizers do
with ``padding_side="left"``). Right-padded prompts are refused: a decoder would append new tokens
after the padding.

Sampling (greedy, temperature, top-k, top-p; `flashlm.sampling`) draws with the exponential race
``argmax(p / E)``, ``E ~ Exp(1)``, which samples from ``p`` like ``torch.multinomial`` but without a
device-to-host synchronization. Early stopping on EOS is checked *asynchronously* on CUDA: the
"all rows finished" flag of step t is copied to pinned memory without blocking and read once its
event has completed, so the loop may run a step or two past the last EOS (those tokens are
replaced by padding) but never stalls the GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import operator
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from flashlm.decode_graph import (
    _GRAPHS_ATTR,
    DecodeStep,
    cache_capacity,
    compile_mode,
    graph_unavailable_reason,
    graphed_decode_step,
    release_graphs,
)
from flashlm.errors import InputError
from flashlm.sampling import SamplingKey, sample_next_token, top_k_filter, top_p_filter

__all__ = ["GenerationOutput", "generate", "main", "release_graphs", "sample_next_token", "top_k_filter",
           "top_p_filter"]

_log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: int64 ``(batch, prompt_len + steps)``: the (left-padded) prompts followed by the new
            tokens; after a row's EOS its remaining positions hold ``pad_token_id``.
        num_new_tokens: int64 ``(batch,)``: new tokens per row, EOS included.
        first_token_s: seconds from the call to the first new token (prefill + sampling), measured
            with a device synchronize on CUDA.
        per_token_s: mean seconds per decode step after the first token (``nan`` if fewer than two
            tokens were generated).
        cuda_graph: whether the decode steps were replayed from a CUDA graph.
        prefill_graph: whether the prefill was replayed from a CUDA graph (the CUDA-graph path, an
            unpadded prompt whose length this batch size has seen before: see
            ``flashlm.decode_graph.PREFILL_GRAPH_AFTER_USES``).
        graph_fallback: why they were not (the model, the device, ``cuda_graph=False``, ...); None when
            they were.
        capture_s: seconds spent preparing the decode step (and the prefill graph) during this call:
            compiling and/or capturing (0 when captured graphs were reused); not included in
            ``first_token_s``.
        compile_mode: the torch.compile mode the decode step ran with (None: not compiled).
    """

    sequences: Tensor
    num_new_tokens: Tensor
    first_token_s: float
    per_token_s: float
    cuda_graph: bool = False
    capture_s: float = 0.0
    compile_mode: str | None = None
    graph_fallback: str | None = None
    prefill_graph: bool = False

    @property
    def decode_path(self) -> str:
        """``"cuda_graph"`` or ``"eager"``, with ``"+compile"`` when the step ran through torch.compile."""
        return ("cuda_graph" if self.cuda_graph else "eager") + ("+compile" if self.compile_mode else "")

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput over the whole batch (rows x steps / time), ``nan`` if undefined."""
        if not math.isfinite(self.per_token_s) or self.per_token_s <= 0:
            return float("nan")
        return self.sequences.shape[0] / self.per_token_s


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _check_args(input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, do_sample: bool,
                temperature: float, top_k: int, top_p: float, vocab_size: int | None) -> Tensor | None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor (batch, prompt_len), got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids must be in [0, {vocab_size}), got values in [{lo}, {hi}]")
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"attention_mask must be bool or integer (1 = token, 0 = padding), got "
                        f"{attention_mask.dtype}")
    mask = attention_mask.to(torch.int64)
    # One host read per call (not per token): the shape of the padding decides the whole loop.
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("attention_mask has a row with no tokens (all padding)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("right-padded prompts are not supported: a decoder appends new tokens after the "
                         "last position, so padding must be on the left (attention_mask rows of the form "
                         "0..0 1..1; tokenizer padding_side='left')")
    # no padding at all: the unpadded path (same plan; the flash model can replay its prefill graph)
    return None if bool(mask.all()) else mask


def _check_ids_and_length(config: Any, eos_ids: list[int], pad_token_id: Any, prompt_len: int,
                          max_new_tokens: int) -> None:
    """EOS and pad ids must be token ids of the model (a pad id past the vocab would fail mid-run,
    when the first row finishes); the prompt and the new tokens must fit the model's positions
    (positions past them were never trained, and a huge max_new_tokens would run until memory is
    gone)."""
    vocab = getattr(config, "vocab_size", None)
    for name, ids in (("eos_token_id", eos_ids), ("pad_token_id", [pad_token_id])):
        for i in ids:
            try:
                value = None if isinstance(i, bool) else operator.index(i)
            except TypeError:
                value = None
            if value is None or value < 0 or (vocab is not None and value >= vocab):
                raise InputError(f"{name} must be an int in [0, vocab_size={vocab}), got {i!r}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and prompt_len > max_pos:
        raise InputError(
            f"the prompt ({prompt_len} tokens) exceeds the model's max_position_embeddings {max_pos}: "
            "positions past it were never trained (flashlm train refuses such rows too); shorten the prompt"
        )
    if max_pos is not None and prompt_len + max_new_tokens > max_pos:
        room = max_pos - prompt_len
        raise InputError(
            f"the prompt ({prompt_len} tokens) + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"positions exceed the model's max_position_embeddings {max_pos}: positions past it were never "
            "trained; " + (f"pass max_new_tokens at most {room}" if room > 0 else "shorten the prompt")
        )


def _available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can take: CUDA's free memory plus what the caching
    allocator holds unused; on CPU the kernel's MemAvailable (else physical memory); None elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.2f} GiB"


def _check_memory(model: torch.nn.Module, config: Any, batch: int, prompt_len: int, max_new_tokens: int,
                  max_cache_len: int | None, device: torch.device) -> None:
    """Refuse a KV cache (the flash model's static one, or the default model's once grown) that cannot
    fit the memory left on ``device``: it would fail mid-run, or fill the host until the OOM killer."""
    shape = [getattr(config, f, None) for f in ("num_layers", "num_kv_heads", "head_dim")]
    weight = next(model.parameters(), None)
    available = _available_bytes(device)
    if None in shape or weight is None or available is None:
        return
    needed = prompt_len + max_new_tokens
    flash = _is_flash(model)
    slots = cache_capacity(needed, max_cache_len) if flash else needed  # refuses a bad max_cache_len too
    per_slot = 2 * shape[0] * shape[1] * shape[2] * weight.dtype.itemsize  # k and v, every layer
    # plus the int64 token buffers: the flash step's history (batch, slots); the default loop's new
    # tokens and mask (batch, needed)
    total = batch * slots * (per_slot + 8 * (1 if flash else 2))
    if flash and device.type == "cuda":  # a kept graph of this batch size is reused or freed first
        kept = getattr(model.__dict__.get(_GRAPHS_ATTR, {}).get(batch), "cache", None)
        available += 0 if kept is None else sum(t.numel() * t.element_size() for t in kept.k + kept.v)
    if total <= available:
        return
    rounded = f", rounded up to {slots}" if slots != needed else ""
    raise InputError(
        f"the KV cache for {batch} rows x {slots} positions (prompt {prompt_len} + max_new_tokens "
        f"{max_new_tokens}{rounded}) needs {_gib(total)} ({shape[0]} layers x 2 x {shape[1]} kv heads x "
        f"{shape[2]} x {weight.dtype.itemsize} bytes per position and row, plus the token ids), more than the {_gib(available)} "
        f"available on {device}: lower max_new_tokens or the batch size"
        + (" (or max_cache_len)" if flash and max_cache_len is not None else "")
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _AsyncAllDone:
    """Tells whether every row has finished, without stalling the device.

    On CPU the flag is read at every step (free). On CUDA, every ``every`` steps the device flag is
    copied into a pinned host slot with ``non_blocking=True`` and an event is recorded; :meth:`check`
    reads only flags whose event has completed, so the loop may run a few steps past the last EOS
    (those tokens are padding) but never stalls the GPU. To bound how far the host runs ahead of the
    device (and so how many wasted steps get queued), it waits for the oldest pending event once more
    than ``max_pending`` are outstanding: the device still has ``every * max_pending`` steps queued.
    """

    def __init__(self, device: torch.device, steps: int, every: int = 8, max_pending: int = 2) -> None:
        self.cuda = device.type == "cuda"
        self.every = every if self.cuda else 1
        self.max_pending = max_pending
        self.pending: list[tuple[int, Any]] = []
        if self.cuda:
            self.host = torch.zeros(steps // self.every + 2, dtype=torch.bool, pin_memory=True)
        self.finished = False

    def check(self, step: int, all_done: Tensor) -> bool:
        """Called after ``step`` tokens were recorded, with the device flag ``all_done`` (bool ``()``)."""
        if not self.cuda:
            self.finished = bool(all_done)
            return self.finished
        if step % self.every == 0:
            slot = step // self.every
            self.host[slot].copy_(all_done, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((slot, event))
            if len(self.pending) > self.max_pending:
                self.pending[0][1].synchronize()  # a host wait on an old step, not a device stall
        while self.pending and self.pending[0][1].query():
            slot, _ = self.pending.pop(0)
            self.finished = self.finished or bool(self.host[slot])
        return self.finished


def _is_flash(model: torch.nn.Module) -> bool:
    return hasattr(model, "allocate_cache")


def _emit(streamer: Any, tokens: Tensor) -> None:
    if streamer is None:
        return
    # streaming needs the tokens on the host: one sync per step; a copy, since `tokens` may be a buffer
    # that the next step overwrites
    host = tokens.detach().to("cpu", copy=True)
    if hasattr(streamer, "put"):
        streamer.put(host)
    else:
        streamer(host)


_logged_fallbacks: set[str] = set()


def _resolve_cuda_graph(cuda_graph: bool | str, model: torch.nn.Module, device: torch.device,
                        key: SamplingKey) -> str | None:
    """Why ``generate(cuda_graph=...)`` decodes eagerly here, or None when it replays a CUDA graph.

    "auto": the graph wherever :func:`flashlm.decode_graph.graph_unavailable_reason` finds nothing
    against it (the flash model on a CUDA device, ...), else eager with that reason (logged at INFO
    once per reason). True: the graph, or :class:`~flashlm.errors.InputError` naming the reason.
    False: eager."""
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


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             streamer: Callable[[Tensor], Any] | Any | None = None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None,
             cuda_graph: bool | str = "auto", max_cache_len: int | None = None,
             compile: bool | str = False) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens per row after left-padded prompts.

    Args:
        model: a ``FlashForCausalLM`` (static BSHD cache, ``flash_attn_with_kvcache`` decode) or a
            ``DefaultForCausalLM`` (dynamic cache).
        input_ids: int64 ``(batch, prompt_len)``, left-padded when rows differ in length.
        attention_mask: ``(batch, prompt_len)`` 1 for tokens, 0 for (left) padding; None = no padding.
        max_new_tokens: decode steps at most.
        do_sample, temperature, top_k, top_p, generator: see :func:`sample_next_token`.
        eos_token_id: an id or a list of ids ending a row (default: ``model.config.eos_token_id``).
            A row stops at its EOS; the loop stops when every row has (or at ``max_new_tokens``).
        streamer: called once per step with the new tokens, int64 ``(batch,)`` on the CPU (finished
            rows get ``pad_token_id``); an object with ``put``/``end`` (transformers' streamers) gets
            ``put(tokens)`` and, at the end, ``end()``. Streaming reads tokens back every step.
        pad_token_id: fills finished rows (default: the config's pad, else its EOS, else 0).
        cuda_graph: "auto" (default): replay the decode step from a CUDA graph where that works (the
            flash model on CUDA), else run it eagerly and say why in ``graph_fallback``. True: the
            graph, or :class:`~flashlm.errors.InputError` where it cannot work (CPU, default model,
            ...). False: eager. Greedy tokens are the same either way (same kernels, same cache
            capacity). A graph is captured once per batch size and kept on the model with its cache
            (``capture_s`` > 0 on the call that captured it); ``release_graphs(model)`` frees them.
        max_cache_len: flash model: slots per row of the static cache (default: prompt_len +
            max_new_tokens rounded up to a multiple of 256, so a graph serves similar lengths).
        compile: flash model only. True (mode "default") or a mode of
            ``flashlm.decode_graph.COMPILE_MODES``: the decode step's body runs through
            ``torch.compile`` (fullgraph, static shapes), inductor fusing its elementwise work; with
            the CUDA graph, the graph captures the compiled step (compiled once per captured graph);
            without one (CPU, ``cuda_graph=False``), each call compiles before its prefill (inductor
            caches on disk). Fused kernels round differently: low-precision tokens may differ from
            the uncompiled path's where two logits nearly tie. False: not compiled.

    Returns:
        :class:`GenerationOutput`. Its ``sequences`` end at the last step where some row was still
        running (steps after every row's EOS are dropped).
    """
    config = getattr(model, "config", None)
    mask = _check_args(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                       getattr(config, "vocab_size", None))
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id])
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0
    _check_ids_and_length(config, eos_ids, pad_token_id, input_ids.shape[1], max_new_tokens)
    device = input_ids.device
    _check_memory(model, config, input_ids.shape[0], input_ids.shape[1], max_new_tokens, max_cache_len, device)
    input_ids = input_ids.long()
    key = SamplingKey(bool(do_sample), float(temperature), int(top_k), float(top_p), tuple(eos_ids),
                      int(pad_token_id))
    fallback = _resolve_cuda_graph(cuda_graph, model, device, key)
    use_graph = fallback is None
    mode = compile_mode(compile)
    if mode is not None and not _is_flash(model):
        raise ValueError(f"compile={compile!r} needs the flash model (FlashForCausalLM): its decode step has "
                         f"fixed shapes; got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        if _is_flash(model):
            run = _generate_flash(model, input_ids, mask, max_new_tokens, key, streamer, generator, use_graph,
                                  max_cache_len, mode)
        else:
            run = _generate_default(model, input_ids, mask, max_new_tokens, key, streamer, generator)
    finally:
        model.train(was_training)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return _finish(input_ids, key, run, fallback)


class _Decoded(NamedTuple):
    """What a generation loop hands to :func:`_finish`: the new tokens (batch, steps) and how they came."""

    new_tokens: Tensor
    t_start: float
    t_first: float
    t_end: float
    steps: int
    used_graph: bool = False
    capture_s: float = 0.0
    mode: str | None = None
    prefill_graph: bool = False


def _generate_flash(model, input_ids: Tensor, mask: Tensor | None, max_new_tokens: int, key: SamplingKey,
                    streamer, generator: torch.Generator | None, use_graph: bool, max_cache_len: int | None,
                    mode: str | None):
    """Prefill (eager, or a graph replay) + fixed-shape decode steps (compiled or not), launched or
    replayed from a CUDA graph."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    needed = prompt_len + max_new_tokens
    source_gen = None
    capture_s = 0.0
    if use_graph:
        step, captured = graphed_decode_step(model, batch, needed, key, device=device, max_cache_len=max_cache_len,
                                             compile=mode)
        capture_s = step.capture_s if captured else 0.0
        cache = step.cache.reset()
        if mask is None:  # an unpadded prompt: its prefill graph, once its length is seen again
            capture_s += step.prefills.ready(prompt_len)
        if key.do_sample:  # draw from the caller's stream: copy its state in (and back out below)
            source_gen = generator if generator is not None else torch.cuda.default_generators[step.device.index]
            step.generator.set_state(source_gen.get_state())
    else:
        cache = model.allocate_cache(batch, cache_capacity(needed, max_cache_len), device=device)
        step = DecodeStep(model, cache, batch, key, generator, compile=mode)
        step.warm_up()  # compile now, on the empty cache, outside the timed loop (no-op uncompiled)
        capture_s = step.compile_s
    stopper = _AsyncAllDone(device, max_new_tokens) if key.eos_ids else None
    try:
        _sync(device)
        t_start = time.perf_counter()
        logits = step.prefills.run(input_ids) if use_graph and mask is None else None
        prefill_graph = logits is not None
        if logits is None:
            # left padding puts every row's last real token at the last position
            logits = model(input_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1, :]
        step.begin(logits)
        steps = 1
        _sync(device)
        t_first = time.perf_counter()
        _emit(streamer, step.tokens)
        while steps < max_new_tokens:
            if stopper is not None and stopper.check(steps, step.all_done):
                break
            step()
            steps += 1
            _emit(streamer, step.tokens)
        _sync(device)
        t_end = time.perf_counter()
    finally:
        if source_gen is not None:
            source_gen.set_state(step.generator.get_state())
    return _Decoded(step.new_tokens(steps), t_start, t_first, t_end, steps, use_graph, capture_s, mode, prefill_graph)


def _generate_default(model, input_ids: Tensor, mask: Tensor | None, max_new_tokens: int, key: SamplingKey,
                      streamer, generator: torch.Generator | None):
    """The default model: its dynamic cache, the mask grown by one column per step."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos_tensor = torch.tensor(key.eos_ids, dtype=torch.long, device=device) if key.eos_ids else None
    sample = {"do_sample": key.do_sample, "temperature": key.temperature, "top_k": key.top_k,
              "top_p": key.top_p, "generator": generator}
    _sync(device)
    t_start = time.perf_counter()
    # position ids from the left-padded mask (first real token at 0)
    prompt_mask = mask if mask is not None else torch.ones_like(input_ids)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    # the mask of every step, allocated once: step t passes the first prompt_len + t columns (a view)
    full_mask = torch.ones((batch, prompt_len + max_new_tokens), dtype=prompt_mask.dtype, device=device)
    full_mask[:, :prompt_len] = prompt_mask
    real_tokens = prompt_mask.sum(-1, keepdim=True)  # (batch, 1) int64: tokens in each prompt
    cache = out.past_key_values
    next_tokens = sample_next_token(out.logits[:, -1, :], **sample)
    new_tokens = torch.full((batch, max_new_tokens), key.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stopper = _AsyncAllDone(device, max_new_tokens)
    steps = 0
    t_first = t_start
    while True:
        next_tokens = next_tokens.masked_fill(finished, key.pad_token_id)
        new_tokens[:, steps] = next_tokens
        if eos_tensor is not None:
            finished = finished | (next_tokens[:, None] == eos_tensor).any(-1)
        steps += 1
        if steps == 1:
            _sync(device)
            t_first = time.perf_counter()
        _emit(streamer, next_tokens)
        if steps == max_new_tokens:
            break
        if eos_tensor is not None and stopper.check(steps, finished.all()):
            break
        # the new token is the steps-th after the prompt: position = real tokens before it
        out = model(next_tokens[:, None], attention_mask=full_mask[:, : prompt_len + steps],
                    position_ids=real_tokens + (steps - 1), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_tokens = sample_next_token(out.logits[:, -1, :], **sample)
    _sync(device)
    t_end = time.perf_counter()
    return _Decoded(new_tokens[:, :steps], t_start, t_first, t_end, steps)


def _finish(input_ids: Tensor, key: SamplingKey, run: _Decoded, fallback: str | None) -> GenerationOutput:
    batch, new_tokens, steps = input_ids.shape[0], run.new_tokens, run.steps
    if key.eos_ids:
        eos = torch.tensor(key.eos_ids, dtype=torch.long, device=new_tokens.device)
        # tokens up to and including the first EOS of each row count; later slots hold padding
        is_eos = (new_tokens[..., None] == eos).any(-1)
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        new_tokens = new_tokens.masked_fill(after_eos, key.pad_token_id)
        num_new = (~after_eos).sum(-1)
        # steps run after every row had stopped (the asynchronous stop check lags): drop them, so the
        # result does not depend on how far the host ran ahead
        new_tokens = new_tokens[:, : int(num_new.max())]
    else:
        num_new = torch.full((batch,), steps, dtype=torch.long, device=new_tokens.device)
    per_token = (run.t_end - run.t_first) / (steps - 1) if steps > 1 else float("nan")
    return GenerationOutput(sequences=torch.cat([input_ids, new_tokens], dim=-1), num_new_tokens=num_new,
                            first_token_s=run.t_first - run.t_start, per_token_s=per_token,
                            cuda_graph=run.used_graph, capture_s=run.capture_s, compile_mode=run.mode,
                            graph_fallback=fallback, prefill_graph=run.prefill_graph)


# --------------------------------------------------------------------------------------------
# CLI: flashlm generate
# --------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# --compile VALUE -> generate(compile=...) with cuda_graph=True
_COMPILE_CHOICES = {"inductor": True, "max-autotune": "max-autotune-no-cudagraphs", "graph": False}
_CUDA_GRAPH_CHOICES = {"auto": "auto", "on": True, "off": False}


def _parse_ids(text: str) -> list[int]:
    parts = text.replace(",", " ").split()
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--prompt-ids takes integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashlm generate",
                                description="Generate tokens with a flashlm model (preset with random "
                                            "weights, or a saved/HF model folder).")
    p.add_argument("--model", required=True, help="preset name (tiny, small, llama-1b) or a model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", action="append", metavar="IDS",
                     help="token ids of one prompt ('1,2,3'); repeat for a batch (left-padded)")
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text (needs a tokenizer.json); repeat for a batch")
    p.add_argument("--tokenizer", help="tokenizer.json (default: <model folder>/tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--attn", choices=("flash", "default"), default="flash")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds random preset weights and sampling")
    p.add_argument("--eos-token-id", type=int, action="append",
                   help="end-of-sequence id (repeatable; default: the config's)")
    p.add_argument("--no-eos", action="store_true", help="no end-of-sequence id: every row runs --max-new-tokens")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--cuda-graph", choices=tuple(_CUDA_GRAPH_CHOICES), default="auto",
                   help="replay the decode step from a CUDA graph: 'auto' (default) where it works (the flash "
                        "model on CUDA; otherwise eager, and the output says why), 'on' (an error where it "
                        "cannot), 'off' (eager)")
    p.add_argument("--compile", nargs="?", const="inductor", choices=sorted(_COMPILE_CHOICES), default=None,
                   help="flash model on CUDA (elsewhere a note is printed and the eager loop runs): the CUDA "
                        "graph captures the decode step compiled by torch.compile; 'inductor' (the default), "
                        "'max-autotune' the same with inductor's autotuning (slower to compile), 'graph' the "
                        "uncompiled step (= no --compile)")
    p.add_argument("--max-cache-len", type=int, default=None,
                   help="slots per row of the flash model's static cache (default: prompt + new tokens, "
                        "rounded up to 256)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (row 0)")
    p.add_argument("--json", action="store_true", help="print only one JSON object")
    return p


def _load_tokenizer(path: str | None, model_arg: str):
    if path is None:
        candidate = os.path.join(model_arg, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise ValueError("--prompt needs a tokenizer.json: pass --tokenizer PATH, use a model folder "
                             "that contains tokenizer.json, or give --prompt-ids")
        path = candidate
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path!r} is not a file")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("--prompt needs the 'tokenizers' package: pip install 'flashlm[train]'") from e
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception)
        raise InputError(f"--tokenizer {path!r} is not a valid tokenizer.json ({e})") from None


def _load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    """The --model folder or preset (a preset's weights drawn from ``--seed``); None (after printing
    why) when it is neither."""
    from flashlm.models import build_model, from_pretrained
    from flashlm.models.config import PRESETS, get_preset

    torch.manual_seed(args.seed)
    if os.path.isdir(args.model):
        return from_pretrained(args.model, attn=args.attn, device=device, dtype=dtype)
    if args.model in PRESETS:
        return build_model(get_preset(args.model), attn=args.attn, device=device, dtype=dtype)
    print(f"flashlm generate: --model {args.model!r} is neither a folder nor a preset "
          f"({', '.join(PRESETS)})", file=sys.stderr)
    return None


def _prompt_rows(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """(token ids per prompt, tokenizer or None) from --prompt (encoded) or --prompt-ids; ValueError
    on a bad prompt or tokenizer."""
    if args.prompt is None:
        return [_parse_ids(t) for t in args.prompt_ids], None
    tokenizer = _load_tokenizer(args.tokenizer, args.model)
    rows = [tokenizer.encode(t).ids for t in args.prompt]
    if any(not r for r in rows):
        raise ValueError("a --prompt encodes to no tokens")
    return rows, tokenizer


def _check_tokenizer_vocab(tokenizer: Any, rows: list[list[int]], model_vocab: int) -> str | None:
    """InputError when a prompt encodes to an id the model does not have (naming both vocab sizes);
    the warning to print when the model can generate ids the tokenizer cannot decode; else None."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    top = max(max(r) for r in rows)
    if top >= model_vocab:
        raise InputError(f"the tokenizer's vocab ({n} tokens) does not match the model's vocab_size {model_vocab}: "
                         f"the prompt encodes to id {top}, which the model does not have; pass the tokenizer the "
                         "model was trained with (--tokenizer)")
    if model_vocab > n:
        return (f"warning: the model's vocab_size {model_vocab} is larger than the tokenizer's vocab ({n} tokens): "
                f"generated ids >= {n} cannot be decoded and print as nothing (see new_token_ids in the JSON)")
    return None


def _make_streamer(args: argparse.Namespace, tokenizer: Any):
    """--stream (and not --json): a streamer printing row 0's tokens (decoded if there is a tokenizer)."""
    if not args.stream or args.json:
        return None

    def streamer(tokens: Tensor) -> None:
        tok = int(tokens[0])
        piece = tokenizer.decode([tok]) if tokenizer is not None else f" {tok}"
        print(piece, end="", flush=True)

    return streamer


def _compile_choice(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                    cuda_graph: bool | str) -> bool | str:
    """generate()'s ``compile`` for --compile: False (with a note) where the CUDA graph cannot run."""
    if args.compile is None:
        return False
    why = "--cuda-graph off" if cuda_graph is False else graph_unavailable_reason(
        model, device, SamplingKey(do_sample=args.do_sample))
    if why is None:
        return _COMPILE_CHOICES[args.compile]
    print(f"flashlm generate: --compile: {why}; running the eager decode loop", file=sys.stderr)
    return False


def _result_record(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, n_rows: int,
                   width: int, out: GenerationOutput, tokenizer: Any) -> dict:
    """The JSON object `main` prints: settings, latencies, decode path and the new tokens per row."""
    result = {"model": args.model, "attn": args.attn, "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "batch": n_rows,
              "prompt_len": width, "num_new_tokens": out.num_new_tokens.tolist(),
              "first_token_ms": round(out.first_token_s * 1e3, 3),
              "per_token_ms": round(out.per_token_s * 1e3, 3) if math.isfinite(out.per_token_s) else None,
              "tokens_per_s": round(out.tokens_per_s, 1) if math.isfinite(out.tokens_per_s) else None,
              "cuda_graph": out.cuda_graph, "decode_path": out.decode_path, "graph_fallback": out.graph_fallback,
              "compile_mode": out.compile_mode,
              "capture_ms": round(out.capture_s * 1e3, 3),
              "new_token_ids": [out.sequences[i, width:width + int(n)].tolist()
                                for i, n in enumerate(out.num_new_tokens)]}
    if tokenizer is not None:
        result["text"] = [tokenizer.decode(ids) for ids in result["new_token_ids"]]
    return result


def _print_text(args: argparse.Namespace, result: dict, out: GenerationOutput, device: torch.device,
                tokenizer: Any) -> None:
    """The human-readable lines: each row's new text (or ids), then the latency line."""
    for i, ids in enumerate(result["new_token_ids"]):
        shown = result["text"][i] if tokenizer is not None else " ".join(map(str, ids))
        print(f"[{i}] {shown}")
    per = "n/a" if result["per_token_ms"] is None else f"{result['per_token_ms']:.2f} ms"
    if out.cuda_graph:
        what = f"torch.compile ({out.compile_mode}) + CUDA graph" if out.compile_mode else "CUDA graph"
        graph = f", {what} prepared in {result['capture_ms']:.0f} ms"
    else:
        graph = f", eager decode: {out.graph_fallback}"
    print(f"first token {result['first_token_ms']:.2f} ms, per token {per} "
          f"({args.attn}, {result['dtype']}, {device}{graph})")


def main(argv: list[str] | None = None) -> int:
    """``flashlm generate``: build or load a model, generate, print tokens/text and latencies."""
    args = _build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = _load_model(args, device, dtype)
    if model is None:
        return 2
    config = model.config
    try:
        rows, tokenizer = _prompt_rows(args)
        warning = None if tokenizer is None else _check_tokenizer_vocab(tokenizer, rows, config.vocab_size)
    except ValueError as e:
        print(f"flashlm generate: {e}", file=sys.stderr)
        return 2
    if warning is not None:  # once per run, before any output
        print(f"flashlm generate: {warning}", file=sys.stderr)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids, mask = _left_pad(rows, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.do_sample else None
    streamer = _make_streamer(args, tokenizer)
    eos = [] if args.no_eos else (args.eos_token_id or None)
    cuda_graph = _CUDA_GRAPH_CHOICES[args.cuda_graph]
    compile_step = _compile_choice(args, model, device, cuda_graph)
    try:
        out = generate(model, input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                       do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token_id=eos, streamer=streamer, generator=generator,
                       cuda_graph=cuda_graph, max_cache_len=args.max_cache_len, compile=compile_step)
    except (ValueError, TypeError) as e:
        print(f"flashlm generate: {e}", file=sys.stderr)
        return 2
    if streamer is not None:
        print()
    result = _result_record(args, device, dtype, len(rows), input_ids.shape[1], out, tokenizer)
    if not args.json:
        _print_text(args, result, out, device, tokenizer)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
