"""The generation loop: prefill + decode for flashlm models, sampling without host syncs.

``generate(model, input_ids, ...)`` works with both models:

- the **flash** model (it has ``allocate_cache``): a static BSHD cache is allocated once for
  ``prompt_len + max_new_tokens`` tokens per row (rounded up to a multiple of 256); prefill writes each
  row's real tokens left-aligned (padding removed), every decode step feeds one token per row and
  appends its key/value in place through ``flash_attn_with_kvcache`` at the row's own
  ``cache_seqlens``. The decode step (``flashlm.generation.cuda_graph.DecodeStep``) has fixed shapes
  and reads nothing back to the host; on CUDA it is captured once per batch size in a CUDA graph and
  replayed per token (``cuda_graph="auto"``, the default; the prefill of an unpadded prompt is
  replayed from a graph of its shape from the shape's second use, ``GenerationOutput.prefill_graph``),
  elsewhere it runs eagerly and the result says why (``GenerationOutput.graph_fallback``); with
  ``compile=True`` its body runs through ``torch.compile`` (inductor fuses its small kernels),
  captured in that graph on CUDA;
- the **default** model: its dynamic cache, with the attention mask grown by one column per step and
  position ids taken from the mask.

Prompts are batched **left-padded** (``attention_mask`` 0 on the left of each row, as tokenizers do
with ``padding_side="left"``). Right-padded prompts are refused: a decoder would append new tokens
after the padding.

Sampling (greedy, temperature, top-k, top-p; ``flashlm.generation.sampling``) draws with the
exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, which samples from ``p`` like ``torch.multinomial``
but without a device-to-host synchronization. Early stopping on EOS is checked *asynchronously* on
CUDA: the "all rows finished" flag of step t is copied to pinned memory without blocking and read once
its event has completed, so the loop may run a step or two past the last EOS (those tokens are
replaced by padding) but never stalls the GPU.

The loop does not time itself (nor synchronize for it): a caller that wants latencies passes
``on_step`` (called with the number of tokens so far, 0 before the prefill) and times around it, as
``flashlm generate`` and ``flashlm bench`` do with ``flashlm.bench.timing.time_steps``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from flashlm.errors import InputError
from flashlm.generation.cuda_graph import (
    cache_capacity,
    compile_mode,
    decode_step_for,
    kept_cache_bytes,
    resolve_cuda_graph,
)
from flashlm.generation.sampling import SamplingKey, sample_next_token

__all__ = ["GenerationOutput", "generate"]

# GenerationOutput's timing fields before the loop stopped timing itself -> what to use instead
_TIMING_MOVED = {
    "first_token_s": "time_steps(...).first_s",
    "per_token_s": "time_steps(...).per_step_s",
    "tokens_per_s": "batch / time_steps(...).per_step_s",
}


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: int64 ``(batch, prompt_len + steps)``: the (left-padded) prompts followed by the new
            tokens; after a row's EOS its remaining positions hold ``pad_token_id``.
        num_new_tokens: int64 ``(batch,)``: new tokens per row, EOS included.
        cuda_graph: whether the decode steps were replayed from a CUDA graph.
        capture_s: seconds spent preparing the decode step (and the prefill graph) during this call:
            compiling and/or capturing (0 when captured graphs were reused), as the step objects
            recorded it; all of it before ``on_step(0)``.
        compile_mode: the torch.compile mode the decode step ran with (None: not compiled).
        graph_fallback: why the steps were not replayed from a graph (the model, the device,
            ``cuda_graph=False``, ...); None when they were.
        prefill_graph: whether the prefill was replayed from a CUDA graph (the CUDA-graph path, an
            unpadded prompt whose length this batch size has seen before: see
            ``flashlm.generation.cuda_graph.PREFILL_GRAPH_AFTER_USES``).

    The latency fields ``first_token_s`` / ``per_token_s`` / ``tokens_per_s`` are gone (docs/decode.md,
    "Timing"): reading one raises an AttributeError saying what replaces it.
    """

    sequences: Tensor
    num_new_tokens: Tensor
    cuda_graph: bool = False
    capture_s: float = 0.0
    compile_mode: str | None = None
    graph_fallback: str | None = None
    prefill_graph: bool = False

    @property
    def decode_path(self) -> str:
        """``"cuda_graph"`` or ``"eager"``, with ``"+compile"`` when the step ran through torch.compile."""
        return ("cuda_graph" if self.cuda_graph else "eager") + ("+compile" if self.compile_mode else "")

    def __getattr__(self, name: str) -> Any:  # only for names the instance lacks
        if name in _TIMING_MOVED:
            raise AttributeError(
                f"GenerationOutput.{name} is gone: generate() no longer times itself. Time the call with "
                f"flashlm.bench.timing.time_steps(lambda on_step: generate(..., on_step=on_step), device) "
                f"and read {_TIMING_MOVED[name]} (docs/decode.md, 'Timing')")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             streamer: Callable[[Tensor], Any] | Any | None = None,
             generator: torch.Generator | None = None, pad_token_id: int | None = None,
             cuda_graph: bool | str = "auto", max_cache_len: int | None = None,
             compile: bool | str = False, on_step: Callable[[int], Any] | None = None) -> GenerationOutput:
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
            capacity). A graph is captured once per batch size and kept for the model with its cache
            (``capture_s`` > 0 on the call that captured it); ``release_graphs(model)`` frees them.
        max_cache_len: flash model: slots per row of the static cache (default: prompt_len +
            max_new_tokens rounded up to a multiple of 256, so a graph serves similar lengths).
        compile: flash model only. True (mode "default") or a mode of
            ``flashlm.generation.cuda_graph.COMPILE_MODES``: the decode step's body runs through
            ``torch.compile`` (fullgraph, static shapes), inductor fusing its elementwise work; with
            the CUDA graph, the graph captures the compiled step (compiled once per captured graph);
            without one (CPU, ``cuda_graph=False``), each call compiles before its prefill (inductor
            caches on disk). Fused kernels round differently: low-precision tokens may differ from
            the uncompiled path's where two logits nearly tie. False: not compiled.
        on_step: called with the number of new tokens recorded so far: ``0`` once every check,
            allocation, capture and compile is done, just before the prefill, then ``1``, ``2``, ...
            right after each token is recorded (before the streamer sees it). For timing by the
            caller (``flashlm.bench.timing.time_steps``); None: nothing is called.

    Returns:
        :class:`GenerationOutput`. Its ``sequences`` end at the last step where some row was still
        running (steps after every row's EOS are dropped).
    """
    req = _resolve_request(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                           top_p, eos_token_id, pad_token_id, cuda_graph, max_cache_len, compile)
    on_step = on_step if on_step is not None else _no_step_hook
    input_ids = input_ids.long()
    was_training = model.training
    model.eval()
    try:
        if _is_flash(model):
            run = _generate_flash(model, input_ids, req, max_new_tokens, streamer, generator, max_cache_len,
                                  on_step)
        else:
            run = _generate_default(model, input_ids, req.mask, max_new_tokens, req.key, streamer, generator,
                                    on_step)
    finally:
        model.train(was_training)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return _finish(input_ids, req, run)


class _Request(NamedTuple):
    """A checked :func:`generate` call: the padding, the sampling rule, how the steps run."""

    mask: Tensor | None  # int64 (batch, prompt_len) when some row is padded, else None
    key: SamplingKey
    graph_fallback: str | None  # why no CUDA graph; None: the graph
    mode: str | None  # torch.compile mode of the decode step


def _resolve_request(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                     eos_token_id, pad_token_id, cuda_graph, max_cache_len, compile) -> _Request:
    """Every check of a call, before anything is allocated; the sampling rule with its defaults."""
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
    key = SamplingKey(bool(do_sample), float(temperature), int(top_k), float(top_p), tuple(eos_ids),
                      int(pad_token_id))
    fallback = resolve_cuda_graph(cuda_graph, model, device, key)
    mode = compile_mode(compile)
    if mode is not None and not _is_flash(model):
        raise ValueError(f"compile={compile!r} needs the flash model (FlashForCausalLM): its decode step has "
                         f"fixed shapes; got {type(model).__name__}")
    return _Request(mask, key, fallback, mode)


def _no_step_hook(step: int) -> None:
    pass


class _Decoded(NamedTuple):
    """What a generation loop hands to :func:`_finish`: the new tokens (batch, steps) and how they came."""

    new_tokens: Tensor
    steps: int
    used_graph: bool = False
    capture_s: float = 0.0
    prefill_graph: bool = False


def _generate_flash(model, input_ids: Tensor, req: _Request, max_new_tokens: int, streamer,
                    generator: torch.Generator | None, max_cache_len: int | None, on_step) -> _Decoded:
    """Prefill (eager, or a graph replay) + fixed-shape decode steps (compiled or not), launched or
    replayed from a CUDA graph: the step object (``cuda_graph.py``) knows which."""
    use_graph = req.graph_fallback is None
    step, capture_s = decode_step_for(model, input_ids, req.mask is not None, input_ids.shape[1] + max_new_tokens,
                                      req.key, generator, use_graph=use_graph, max_cache_len=max_cache_len,
                                      compile=req.mode)
    stopper = _AsyncAllDone(input_ids.device, max_new_tokens) if req.key.eos_ids else None
    with step.drawing_from(generator):
        on_step(0)
        logits, prefill_graph = step.prefill(input_ids, req.mask)
        step.begin(logits)
        steps = 1
        on_step(steps)
        _emit(streamer, step.tokens)
        while steps < max_new_tokens:
            if stopper is not None and stopper.check(steps, step.all_done):
                break
            step()
            steps += 1
            on_step(steps)
            _emit(streamer, step.tokens)
    return _Decoded(step.new_tokens(steps), steps, use_graph, capture_s, prefill_graph)


def _generate_default(model, input_ids: Tensor, mask: Tensor | None, max_new_tokens: int, key: SamplingKey,
                      streamer, generator: torch.Generator | None, on_step) -> _Decoded:
    """The default model: its dynamic cache, the mask grown by one column per step."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos_tensor = torch.tensor(key.eos_ids, dtype=torch.long, device=device) if key.eos_ids else None
    sample = {"do_sample": key.do_sample, "temperature": key.temperature, "top_k": key.top_k,
              "top_p": key.top_p, "generator": generator}
    on_step(0)
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
    while True:
        next_tokens = next_tokens.masked_fill(finished, key.pad_token_id)
        new_tokens[:, steps] = next_tokens
        if eos_tensor is not None:
            finished = finished | (next_tokens[:, None] == eos_tensor).any(-1)
        steps += 1
        on_step(steps)
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
    return _Decoded(new_tokens[:, :steps], steps)


def _finish(input_ids: Tensor, req: _Request, run: _Decoded) -> GenerationOutput:
    key, batch, new_tokens, steps = req.key, input_ids.shape[0], run.new_tokens, run.steps
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
    return GenerationOutput(sequences=torch.cat([input_ids, new_tokens], dim=-1), num_new_tokens=num_new,
                            cuda_graph=run.used_graph, capture_s=run.capture_s,
                            compile_mode=req.mode,
                            graph_fallback=req.graph_fallback, prefill_graph=run.prefill_graph)


# --------------------------------------------------------------------------------------------
# Input checks (all before anything is allocated)
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
        available += kept_cache_bytes(model, batch)
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
# Loop helpers
# --------------------------------------------------------------------------------------------
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
