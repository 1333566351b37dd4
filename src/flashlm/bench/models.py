"""Model benchmark: the same weights run as flashlm's default and flash models and as transformers'
LlamaForCausalLM (eager / sdpa / Liger-Kernel / flashlm attention), on the same inputs.

Every model is loaded from one checkpoint folder (a preset is built once with a fixed seed and saved to
a temporary folder; an HF folder is used as is), so all rows see identical weights. Models are measured
one at a time and freed before the next, so peak memory is the model's own.

Cases (each ``warmup`` untimed steps, then ``steps`` timed steps; CUDA is synchronized around each):

- ``train``: forward + backward + AdamW step on (batch, seqlen) tokens with labels. The flash model
  computes the loss with ``return_logits=False`` (fused linear cross-entropy, no (tokens x vocab) logits).
- ``forward``: inference forward (``torch.inference_mode``, no cache), full logits.
- ``generate``: greedy generation of ``new_tokens`` after a prompt of ``seqlen`` tokens (no EOS stop);
  flashlm's models through :func:`flashlm.generation.generate` (which times its first token and
  its decode steps), HF models through ``model.generate`` with a timestamping streamer. First-token
  latency: call -> first new token on the host (prefill + one step); per-token: mean later step.
- ``decode``: the same measurement over a grid of batch sizes and prompt lengths (fast-decode issue),
  with achieved GB/s = (weight bytes + KV-cache bytes read per step) / per-token time.

Peak memory is ``torch.cuda.max_memory_allocated`` after a reset at the start of each case (weights
included); on CPU it is reported as n/a (tracemalloc does not see torch's allocator).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MODEL_NAMES = ("default", "flash", "hf-eager", "hf-sdpa", "hf-liger", "hf-flashlm", "hf-static")
# Rows that only measure generation (train/forward would repeat another row).
GENERATION_ONLY = {"hf-static": "HF sdpa with a static cache in generate (transformers compiles its decode step on CUDA)"}
CASE_NAMES = ("train", "forward", "generate", "decode")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_ATTN = {"hf-eager": "eager", "hf-sdpa": "sdpa", "hf-liger": "sdpa", "hf-flashlm": None, "hf-static": "sdpa"}


@dataclass
class BenchConfig:
    """What one benchmark run measures (the CLI flags, validated by ``flashlm.bench.cli``)."""

    model: str = "small"  # preset name or HF checkpoint folder
    batch_size: int = 2
    seq_length: int = 256
    warmup_steps: int = 10
    benchmark_steps: int = 20
    dtype: str = "bf16"
    device: str = "cuda"
    attn_backend: str | None = None
    padding_ratio: float = 0.0
    packed: bool = False
    compile: bool = False
    cuda_graph: str = "auto"  # flashlm's generate: "auto" (its default: CUDA graph where it works) or "off"
    compare: tuple[str, ...] = ("default", "flash", "hf-sdpa")
    cases: tuple[str, ...] = ("train", "forward", "generate")
    new_tokens: int = 32
    decode_batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_contexts: tuple[int, ...] = (128, 2048, 8192)
    seed: int = 0
    progress: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Batch:
    """One benchmark batch, shared by every model.

    input_ids (batch, seqlen) int64; attention_mask (batch, seqlen) int64 with left padding or None;
    position_ids (batch, seqlen) int64 restarting at 0 per document when packed, else None;
    labels (batch, seqlen) HF-style (shifted inside the model), -100 at pads, at each row's first real
    token and at document starts (no context to predict them from).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor
    real_tokens: int
    row_lengths: list[int]
    doc_lengths: list[list[int]] = field(default_factory=list)
    cu_seqlens: torch.Tensor | None = None  # packed: int32 (num_docs + 1,) over the flattened batch

    @property
    def max_doc_length(self) -> int:
        return max(map(max, self.doc_lengths))

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real_tokens / self.input_ids.numel()

    def model_inputs(self, name: str) -> dict[str, Any]:
        """Keyword inputs of model ``name`` for a forward. flashlm's models derive positions from the
        left-padded mask themselves; HF's forward does not (only its generate does), so HF also gets the
        same position ids explicitly (cumsum(mask) - 1, clamped at 0). Packed, the flash model also gets
        cu_seqlens/max_seqlen, as a packing data loader would give it (no detection, no host read)."""
        hf = name.startswith("hf-")
        kw: dict[str, Any] = {"input_ids": self.input_ids}
        if name == "flash" and self.cu_seqlens is not None:
            kw.update(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_doc_length)
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask
            if hf:
                kw["position_ids"] = (self.attention_mask.cumsum(-1) - 1).clamp_(min=0)
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        return kw


def _split_total(total: int, parts: int, lo: int, hi: int, gen: torch.Generator) -> list[int]:
    """Random integers in [lo, hi] summing to ``total`` (requires parts*lo <= total <= parts*hi)."""
    weights = torch.rand(parts, generator=gen) + 0.5
    sizes = [min(hi, max(lo, int(w))) for w in (weights / weights.sum() * total).tolist()]
    i = 0
    while sum(sizes) != total:  # walk the rows, moving one token at a time toward the exact total
        step = 1 if sum(sizes) < total else -1
        if lo <= sizes[i % parts] + step <= hi:
            sizes[i % parts] += step
        i += 1
    return sizes


def make_batch(batch_size: int, seq_length: int, vocab_size: int, *, padding_ratio: float = 0.0,
               packed: bool = False, pad_token_id: int = 0, device: str | torch.device = "cpu",
               seed: int = 0) -> Batch:
    """Random tokens; left padding with random row lengths whose pad fraction is ~``padding_ratio``
    (exact up to rounding; every row keeps >= 1 real token), or rows packed with several documents of
    random lengths in [seqlen/8, seqlen/2] (the last one fills the row) with restarting positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_length), generator=gen)
    mask = position_ids = None
    labels = ids.clone()
    row_lengths = [seq_length] * batch_size
    docs: list[list[int]] = []
    if padding_ratio > 0:
        real = max(batch_size, round(batch_size * seq_length * (1.0 - padding_ratio)))
        row_lengths = _split_total(real, batch_size, 1, seq_length, gen)
        mask = torch.zeros(batch_size, seq_length, dtype=torch.long)
        for r, n in enumerate(row_lengths):
            mask[r, seq_length - n:] = 1
        ids = ids.masked_fill(mask == 0, pad_token_id)
        # No loss on pads, nor on a row's first real token: it would be predicted from a pad slot,
        # whose output each implementation leaves different (a fully masked attention row).
        labels = ids.masked_fill(mask == 0, -100)
        for r, n in enumerate(row_lengths):
            labels[r, seq_length - n] = -100
    elif packed:
        lo, hi = max(1, seq_length // 8), max(1, seq_length // 2)
        position_ids = torch.empty(batch_size, seq_length, dtype=torch.long)
        for r in range(batch_size):
            lens, left = [], seq_length
            while left > 0:
                n = left if left <= hi else int(torch.randint(lo, hi + 1, (1,), generator=gen))
                lens.append(n)
                left -= n
            docs.append(lens)
            start = 0
            for n in lens:
                position_ids[r, start:start + n] = torch.arange(n)
                labels[r, start] = -100  # no loss for predicting a document's first token from the previous one
                start += n
    real_tokens = sum(row_lengths)
    cu = None
    if docs:
        cu = torch.tensor([0, *[n for row in docs for n in row]], dtype=torch.int64).cumsum(0).to(torch.int32)

    def to(t):
        return None if t is None else t.to(device)

    return Batch(to(ids), to(mask), to(position_ids), to(labels), real_tokens, row_lengths, docs, to(cu))


# ----------------------------------------------------------------------------------------------------
# Timing helpers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    """Return freed CUDA blocks so the next case's peak starts from live tensors only. (On CPU there is
    no peak to protect, and gc.collect costs ~0.5 s once transformers is imported.)"""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_s: list[float]) -> dict[str, float]:
    """Median and p10/p90 spread of per-step times, in milliseconds."""
    return {"median_ms": statistics.median(times_s) * 1e3, "p10_ms": _quantile(times_s, 0.1) * 1e3,
            "p90_ms": _quantile(times_s, 0.9) * 1e3, "steps": len(times_s)}


class _Memory:
    """Peak CUDA memory of one case: reset at entry, read at exit (None on CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak: int | None = None
        self.before: int | None = None

    def __enter__(self):
        if self.cuda:
            _free("cuda")
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        return False

    def record(self) -> dict[str, Any]:
        if not self.cuda:
            return {"peak_memory_bytes": None, "peak_memory_gb": None, "memory_note": "n/a on CPU"}
        return {"peak_memory_bytes": self.peak, "peak_memory_gb": self.peak / 1e9,
                "memory_before_bytes": self.before}


def _error_record(exc: BaseException) -> dict[str, Any]:
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return {"status": "oom" if oom else "error", "error": msg[:500],
            "traceback": "".join(traceback.format_exception(exc))[-3000:]}


# ----------------------------------------------------------------------------------------------------
# Model loading


def _accepts_named(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _restoring_llama_module():
    """Liger-Kernel's ``apply_liger_kernel_to_llama`` patches transformers' llama module globals (RoPE,
    RMSNorm, MLP classes, the causal-LM forward); restore them so later HF rows run unpatched."""
    from transformers.models.llama import modeling_llama as ml

    saved_module = dict(vars(ml))
    saved_forward = ml.LlamaForCausalLM.__dict__.get("forward")
    try:
        yield
    finally:
        for k in [k for k in vars(ml) if k not in saved_module]:
            delattr(ml, k)
        for k, v in saved_module.items():
            if vars(ml).get(k) is not v:
                setattr(ml, k, v)
        if saved_forward is not None:
            ml.LlamaForCausalLM.forward = saved_forward


def model_unavailable(name: str) -> str | None:
    """Why a compared model cannot run in this environment (a skip note), or None."""
    if name.startswith("hf-"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install 'flashlm[hf]')"
    if name == "hf-liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed (pip install 'flashlm[liger]')"
    if name == "hf-flashlm":
        try:
            from flashlm import hf
        except ImportError as e:
            return f"flashlm.hf is not available yet ({e})"
        if not hasattr(hf, "register"):
            return "flashlm.hf.register() does not exist yet"
    if name == "flash":
        from flashlm.models import MODEL_CLASSES

        try:
            MODEL_CLASSES["flash"]
        except (KeyError, ImportError) as e:
            return f"the flash model is not available ({e})"
    return None


def load_model(name: str, path: str, cfg: BenchConfig) -> torch.nn.Module:
    """Load compared model ``name`` from checkpoint folder ``path`` on cfg.device in cfg.dtype."""
    dtype = cfg.torch_dtype
    if name in ("default", "flash"):
        from flashlm.models import from_pretrained

        return from_pretrained(path, attn=name, device=cfg.device, dtype=dtype).eval()
    from transformers import AutoModelForCausalLM

    attn_implementation = HF_ATTN.get(name)
    if name == "hf-flashlm":
        from flashlm import hf

        attn_implementation = hf.register()  # the name transformers accepts ("FlashLM")
    try:  # transformers' "Loading weights" bar would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    if name == "hf-liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    gen_cfg = model.generation_config  # random weights: never stop early, never warn about pads
    gen_cfg.eos_token_id = None
    gen_cfg.pad_token_id = 0 if gen_cfg.pad_token_id is None else gen_cfg.pad_token_id
    return model.to(cfg.device).eval()


# ----------------------------------------------------------------------------------------------------
# Cases


def _timed_steps(step: Callable[[], Any], cfg: BenchConfig, tick: Callable[[], None]) -> list[float]:
    times = []
    for i in range(cfg.warmup_steps + cfg.benchmark_steps):
        _sync(cfg.device)
        t0 = time.perf_counter()
        step()
        _sync(cfg.device)
        if i >= cfg.warmup_steps:
            times.append(time.perf_counter() - t0)
        tick()
    return times


def _compiled(name: str, model):
    """--compile: the flash model as ONE graph (fullgraph: a graph break is an error, not a silent
    slowdown; its planner takes sync-free plans under compile), the others as torch.compile makes them."""
    return torch.compile(model, fullgraph=name == "flash")


def run_train(name: str, model, batch: Batch, cfg: BenchConfig, tick) -> dict[str, Any]:
    inputs = batch.model_inputs(name)
    extra = {}
    if name == "flash" and _accepts_named(model.forward, "return_logits"):
        extra["return_logits"] = False  # fused linear cross-entropy: no (tokens x vocab) logits
    model.train()
    fwd = _compiled(name, model) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cfg.device.startswith("cuda"))
    first_loss: list[torch.Tensor] = []

    def step():
        # use_cache=False: no KV cache in training (HF builds one by default, and with one it also
        # skips its packed-sequence mask, letting packed documents attend to each other)
        out = fwd(**inputs, labels=batch.labels, use_cache=False, **extra)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not first_loss:
            first_loss.append(out.loss.detach().float())

    try:
        with _Memory(cfg.device) as mem:
            times = _timed_steps(step, cfg, tick)
    finally:
        model.zero_grad(set_to_none=True)
        opt.state.clear()  # AdamW moments go now, not when the caller's frame lets go
        model.eval()
    res = {"status": "ok", **summarize(times), **mem.record(), "compiled": cfg.compile,
           "fused_linear_cross_entropy": bool(extra) or name == "hf-liger",
           "first_step_loss": float(first_loss[0])}
    res["tokens_per_s"] = batch.real_tokens / (res["median_ms"] / 1e3)
    return res


def run_forward(name: str, model, batch: Batch, cfg: BenchConfig, tick) -> dict[str, Any]:
    inputs = batch.model_inputs(name)
    fwd = _compiled(name, model) if cfg.compile else model
    with torch.inference_mode(), _Memory(cfg.device) as mem:
        times = _timed_steps(lambda: fwd(**inputs, use_cache=False), cfg, tick)
        last_logits = fwd(**inputs, use_cache=False).logits[:, -1, :].float().cpu()
    res = {"status": "ok", **summarize(times), **mem.record(), "compiled": cfg.compile}
    res["tokens_per_s"] = batch.real_tokens / (res["median_ms"] / 1e3)
    res["_last_logits"] = last_logits  # compared across models, dropped before writing JSON
    return res


class _TokenClock:
    """A transformers streamer that only timestamps: ``put`` is called with the prompt, then once per new
    token (after ``tokens.cpu()``, a sync that HF's stop check makes every step anyway)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


GenerateFn = Callable[[torch.Tensor, "torch.Tensor | None", int], tuple[torch.Tensor, float, float, dict]]


def _flashlm_generate_kw(name: str, model, cfg: BenchConfig) -> dict[str, Any]:
    """generate()'s decode options in the benchmark: its own default (cuda_graph="auto": the CUDA
    graph where it works, so the first figure shown is the fast path) unless ``--cuda-graph off``;
    ``--compile`` adds torch.compile to the flash model's graphed step (CUDA only: on the CPU the step
    would recompile per call)."""
    from flashlm.decode_graph import graph_unavailable_reason
    from flashlm.sampling import SamplingKey

    kw: dict[str, Any] = {"cuda_graph": "auto" if cfg.cuda_graph == "auto" else False}
    if (cfg.compile and name == "flash" and cfg.cuda_graph == "auto"
            and graph_unavailable_reason(model, torch.device(cfg.device), SamplingKey()) is None):
        kw["compile"] = True
    return kw


def _generate_fn(name: str, model, cfg: BenchConfig) -> tuple[GenerateFn, bool]:
    """A function (input_ids, attention_mask, n) -> (new tokens (batch, n), first-token s, per-token s,
    {"decode_path": ..., ...}), and whether its decode is compiled. First token: from the call to the
    first new token on the host (prefill + one sampling step); per token: mean time of each later step.
    decode_path: flashlm's "cuda_graph" / "eager" (+ "graph_fallback": why not the graph, and
    "prefill_path": whether that call's prefill was a graph replay), or HF's "hf-dynamic" / "hf-static"
    / "hf-static+compile"."""
    if not name.startswith("hf-"):
        from flashlm.generation import generate

        kw = _flashlm_generate_kw(name, model, cfg)

        def ours(ids, mask, n):
            # eos_token_id=[]: no EOS at all (None would mean the config's), so every row makes n tokens.
            # generate times itself: synchronized at the first token and at the end, nowhere else.
            out = generate(model, ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           eos_token_id=[], **kw)
            path = {"decode_path": out.decode_path, "graph_fallback": out.graph_fallback,
                    "prefill_path": "cuda_graph" if out.prefill_graph else "eager"}
            return out.sequences[:, -n:], out.first_token_s, out.per_token_s, path

        return ours, "compile" in kw

    kw = {"cache_implementation": "static"} if name == "hf-static" else {}
    compiled = name == "hf-static" and cfg.device.startswith("cuda")
    path = {"decode_path": "hf-static+compile" if compiled else "hf-static" if kw else "hf-dynamic"}

    def theirs(ids, mask, n):
        mask = torch.ones_like(ids) if mask is None else mask
        clock = _TokenClock()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, streamer=clock, **kw)
        stamps = clock.times[1:]  # [0] is the prompt
        if len(stamps) != n:
            raise RuntimeError(f"HF generate streamed {len(stamps)} tokens, expected {n}")
        return out[:, -n:], stamps[0] - t0, (stamps[-1] - stamps[0]) / (n - 1), path

    return theirs, compiled


def _measure_generation(fn: GenerateFn, ids, mask, n: int, cfg: BenchConfig, tick) -> tuple[dict, torch.Tensor]:
    first, per, total = [], [], []
    tokens, path = None, {}
    for i in range(cfg.warmup_steps + cfg.benchmark_steps):
        _sync(cfg.device)
        t0 = time.perf_counter()
        tokens, first_s, per_s, path = fn(ids, mask, n)
        _sync(cfg.device)
        if i >= cfg.warmup_steps:
            total.append(time.perf_counter() - t0)
            first.append(first_s)
            per.append(per_s)
        tick()
    if tokens.shape[1] != n:
        raise RuntimeError(f"generation returned {tokens.shape[1]} new tokens, expected {n}")
    f, p = summarize(first), summarize(per)
    res = {"first_token_ms": f["median_ms"], "first_token_p10_ms": f["p10_ms"], "first_token_p90_ms": f["p90_ms"],
           "per_token_ms": p["median_ms"], "per_token_p10_ms": p["p10_ms"], "per_token_p90_ms": p["p90_ms"],
           "total_ms": summarize(total)["median_ms"], "steps": len(total), "new_tokens": n}
    res["decode_tokens_per_s"] = ids.shape[0] / (res["per_token_ms"] / 1e3)
    res.update(path)  # which decode path ran (the last call's: every call takes the same one)
    return res, tokens


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the unique parameters (tied embeddings counted once): what one decode step reads."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """KV-cache bytes per cached token per row: 2 (k and v) x layers x kv_heads x head_dim x elem."""
    c = model_config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()


def _release_graphs(model) -> None:
    """Free the CUDA graphs (and their caches) generate() kept on a flashlm model, so that later cases and
    grid points neither hold nor count that memory."""
    from flashlm.decode_graph import release_graphs

    release_graphs(model)


def run_generate(name: str, model, batch: Batch, cfg: BenchConfig, tick, model_config=None) -> dict[str, Any]:
    fn, compiled = _generate_fn(name, model, cfg)
    n = cfg.new_tokens
    with torch.inference_mode(), _Memory(cfg.device) as mem:
        res, tokens = _measure_generation(fn, batch.input_ids, batch.attention_mask, n, cfg, tick)
    res.update(status="ok", compiled=compiled, **mem.record())
    _release_graphs(model)
    if model_config is not None and res["per_token_ms"] > 0:
        avg_ctx = max(batch.row_lengths) + n / 2  # mean cache length over the decode steps
        read = weight_bytes(model) + kv_bytes_per_token(model_config, cfg.torch_dtype) * batch.input_ids.shape[0] * avg_ctx
        res["decode_gb_per_s"] = read / (res["per_token_ms"] / 1e3) / 1e9
    res["_tokens"] = tokens.cpu()
    return res


def run_decode(name: str, model, cfg: BenchConfig, tick, model_config) -> dict[str, Any]:
    """Per-token latency, tokens/s and GB/s over the batch x context grid (no padding)."""
    fn, compiled = _generate_fn(name, model, cfg)
    grid = []
    for b in cfg.decode_batch_sizes:
        for ctx in cfg.decode_contexts:
            point: dict[str, Any] = {"batch_size": b, "context": ctx}
            try:
                ids = make_batch(b, ctx, model_config.vocab_size, seed=cfg.seed + 1, device=cfg.device).input_ids
                with torch.inference_mode(), _Memory(cfg.device) as mem:
                    res, _ = _measure_generation(fn, ids, None, cfg.new_tokens, cfg, tick)
                point.update(status="ok", **res, **mem.record())
                read = (weight_bytes(model)
                        + kv_bytes_per_token(model_config, cfg.torch_dtype) * b * (ctx + cfg.new_tokens / 2))
                point["decode_gb_per_s"] = read / (res["per_token_ms"] / 1e3) / 1e9 if res["per_token_ms"] > 0 else None
            except Exception as e:  # noqa: BLE001 one grid point failing (OOM at batch 32 x 8k) must not end the sweep
                point.update(_error_record(e))
                _free(cfg.device)
            _release_graphs(model)
            grid.append(point)
    return {"status": "ok", "compiled": compiled, "grid": grid}


def packed_isolation(name: str, model, batch: Batch) -> dict[str, Any] | None:
    """Whether documents in a packed row are isolated: the logits of row 0's last document with the
    earlier documents' tokens replaced by others; isolated rows give the same logits (diff ~0)."""
    if batch.position_ids is None or len(batch.doc_lengths[0]) < 2:
        return None
    last = batch.doc_lengths[0][-1]
    ids = batch.input_ids[:1].clone()
    pos = batch.position_ids[:1]
    with torch.inference_mode():
        a = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, -last:].float()
        ids[0, :-last] = (ids[0, :-last] + 1) % model_vocab(model)
        b = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, -last:].float()
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    # Isolation leaves the last document's computation unchanged (masked keys contribute exact zeros),
    # so any difference beyond rounding means the row's documents attend to each other.
    return {"max_abs_diff": diff, "logit_abs_max": scale, "isolated": diff <= 1e-3 * max(scale, 1e-6)}


def model_vocab(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "vocab_size", None) or model.get_input_embeddings().num_embeddings)


# ----------------------------------------------------------------------------------------------------
# Attention backend record


def attention_record(model_config, batch: Batch, cfg: BenchConfig) -> dict[str, Any]:
    """Which flashlm.attention backend serves each kind of call the flash model makes in this run
    (dense or varlen for train/forward, kvcache for decode), from ``flashlm.attention.explain`` on
    tensors of the run's shapes. Call inside the run's ``use_backend`` scope so a forced backend shows."""
    try:
        from flashlm.attention import explain
    except ImportError as e:
        return {"error": f"flashlm.attention.explain not importable: {e}"}
    c = model_config
    dev, dt = cfg.device, cfg.torch_dtype
    B, S = batch.input_ids.shape
    H, Hk, D = c.num_heads, c.num_kv_heads or c.num_heads, c.head_dim or c.hidden_size // c.num_heads
    common = {"causal": True, "softcap": c.attn_logit_softcap or 0.0,
              "window_size": (c.sliding_window - 1, 0) if c.sliding_window else (-1, -1)}
    calls: dict[str, Callable[[], Any]] = {}
    varlen = batch.attention_mask is not None or batch.position_ids is not None
    for case, grad in (("train", True), ("forward", False)):
        if case not in cfg.cases:
            continue
        if varlen:  # padded (unpadded before the kernel) or packed: one varlen call per layer
            n_docs = len(batch.row_lengths) if batch.position_ids is None else sum(map(len, batch.doc_lengths))
            longest = max(batch.row_lengths) if batch.position_ids is None else max(map(max, batch.doc_lengths))
            q = torch.empty(batch.real_tokens, H, D, device=dev, dtype=dt)
            k = torch.empty(batch.real_tokens, Hk, D, device=dev, dtype=dt)
            cu = torch.zeros(n_docs + 1, device=dev, dtype=torch.int32)  # only its length and dtype matter
            calls[case] = (lambda q=q, k=k, cu=cu, n=longest, g=grad: explain(
                q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n, requires_grad=g,
                **common))
        else:
            q = torch.empty(B, S, H, D, device=dev, dtype=dt)
            k = torch.empty(B, S, Hk, D, device=dev, dtype=dt)
            calls[case] = lambda q=q, k=k, g=grad: explain(q, k, k, requires_grad=g, **common)
    if "generate" in cfg.cases or "decode" in cfg.cases:
        q = torch.empty(B, 1, H, D, device=dev, dtype=dt)
        kc = torch.empty(B, S + cfg.new_tokens, Hk, D, device=dev, dtype=dt)
        calls["decode"] = lambda: explain(q, kc, kc, kvcache=True, **common)
    out: dict[str, Any] = {}
    for case, call in calls.items():
        try:
            exp = call()
            out[case] = {"chosen": getattr(exp, "chosen", None), "forced_by": getattr(exp, "forced_by", None),
                         "explain": str(exp)}
        except Exception as e:  # noqa: BLE001 explain's own error says why the call is malformed
            out[case] = {"chosen": None, "error": f"{type(e).__name__}: {e}"}
    return out


# ----------------------------------------------------------------------------------------------------
# The run


def _prepare_weights(cfg: BenchConfig, stack: contextlib.ExitStack):
    """(checkpoint folder, ModelConfig): the HF folder itself, or the preset built with cfg.seed and
    saved to a temporary folder that lives as long as ``stack``."""
    from flashlm.models import build_model, save_pretrained
    from flashlm.models.config import ModelConfig, get_preset

    if os.path.isdir(cfg.model):
        return cfg.model, ModelConfig.from_hf_config(cfg.model)
    config = get_preset(cfg.model)
    path = stack.enter_context(tempfile.TemporaryDirectory(prefix="flashlm-bench-"))
    torch.manual_seed(cfg.seed)
    model = build_model(config, attn="default", device=cfg.device, dtype=cfg.torch_dtype)
    save_pretrained(model, path)
    del model
    _free(cfg.device)
    return path, config


def _backend_scope(cfg: BenchConfig):
    if cfg.attn_backend is None:
        return contextlib.nullcontext()
    from flashlm.attention import use_backend

    return use_backend(cfg.attn_backend)


def _build_inputs(cfg: BenchConfig, results: dict[str, Any], model_config) -> tuple[Batch, list[str]]:
    """The benchmark batch and the cases to run; fills ``results``' "inputs" and "attention" records and
    the notes that --packed implies."""
    notes = results["notes"]
    batch = make_batch(cfg.batch_size, cfg.seq_length, model_config.vocab_size,
                       padding_ratio=cfg.padding_ratio, packed=cfg.packed,
                       pad_token_id=getattr(model_config, "pad_token_id", None) or 0,
                       device=cfg.device, seed=cfg.seed)
    results["inputs"] = {"real_tokens": batch.real_tokens, "total_tokens": batch.input_ids.numel(),
                         "padding_ratio": batch.padding_ratio, "row_lengths": batch.row_lengths,
                         "docs_per_row": [len(d) for d in batch.doc_lengths] or None,
                         "doc_lengths": batch.doc_lengths or None}
    cases = [c for c in cfg.cases if not (c == "generate" and cfg.packed)]
    if cfg.packed and "generate" in cfg.cases:
        notes.append("generate skipped with --packed: packing is a training/prefill layout.")
    if cfg.packed:
        notes.append("packed: flash runs each document separately (varlen via position_ids); whether "
                     "the others isolate documents is measured per model (packed_isolation).")
    with _backend_scope(cfg):
        results["attention"] = attention_record(model_config, batch, cfg)
    return batch, cases


class _Progress:
    """The tqdm bar over all (model, case) steps, and how many steps each case counts (decode: one
    warmup + benchmark run per grid point)."""

    def __init__(self, cfg: BenchConfig, cases: list[str], tqdm):
        self.steps = cfg.warmup_steps + cfg.benchmark_steps
        self.per_step = {"decode": len(cfg.decode_batch_sizes) * len(cfg.decode_contexts)}
        self.per_model = sum(self.per_step.get(c, 1) for c in cases) * self.steps
        self.bar = tqdm(total=len(cfg.compare) * self.per_model, desc="bench", unit="step",
                        disable=not cfg.progress, mininterval=0.5, dynamic_ncols=True)

    def case_total(self, case: str) -> int:
        return self.per_step.get(case, 1) * self.steps


def _load_row(name: str, path: str, cfg: BenchConfig, rec: dict[str, Any], notes: list[str]):
    """Load model ``name`` into its row ``rec`` (status, load time, sizes); None when it cannot load (the
    row then holds the error and a note says why)."""
    try:
        t0 = time.perf_counter()
        model = load_model(name, path, cfg)
        rec.update(status="ok", load_s=time.perf_counter() - t0,
                   parameters=sum(p.numel() for p in model.parameters()),
                   weight_bytes=weight_bytes(model))
        return model
    except Exception as e:  # noqa: BLE001 a model that cannot load is a row, not a crash
        rec.update(_error_record(e))
        notes.append(f"{name} failed to load: {rec['error']}")
        return None


def _record_isolation(name: str, model, batch: Batch, rec: dict[str, Any], notes: list[str]) -> None:
    """--packed: whether ``name`` keeps the documents of a packed row apart, into ``rec`` and a note."""
    try:
        rec["packed_isolation"] = packed_isolation(name, model, batch)
    except Exception as e:  # noqa: BLE001 recorded in the JSON
        rec["packed_isolation"] = _error_record(e)
    iso = rec["packed_isolation"] or {}
    if "isolated" in iso:
        notes.append(f"packed: {name} " + ("isolates documents" if iso["isolated"] else
                     "lets documents attend to each other (the row is one causal sequence)")
                     + f" (last document's max |logit diff| when earlier ones change: "
                       f"{iso['max_abs_diff']:.2e})")


def _run_case(case: str, name: str, model, batch: Batch, cfg: BenchConfig, progress: _Progress,
              model_config) -> dict[str, Any]:
    """One case of one model: its record, or the error record (the bar then skips the case's rest)."""
    bar = progress.bar
    done = bar.n
    try:
        if case == "train":
            r = run_train(name, model, batch, cfg, bar.update)
        elif case == "forward":
            r = run_forward(name, model, batch, cfg, bar.update)
        elif case == "generate":
            r = run_generate(name, model, batch, cfg, bar.update, model_config)
        else:
            r = run_decode(name, model, cfg, bar.update, model_config)
    except Exception as e:  # noqa: BLE001 OOM/unsupported: recorded, the run goes on
        r = _error_record(e)
        bar.update(progress.case_total(case) - (bar.n - done))
    _free(cfg.device)
    return r


def _compare_to_reference(name: str, r: dict[str, Any], refs: dict[str, Any]) -> None:
    """Replace a case's raw outputs in ``r`` by their agreement with the first model that produced them
    (``refs`` holds that model's (name, tensor) under "logits" and "tokens")."""
    if "_last_logits" in r:
        logits = r.pop("_last_logits")
        if refs["logits"] is None:
            refs["logits"] = (name, logits)
        else:
            r[f"last_logits_max_abs_diff_vs_{refs['logits'][0]}"] = (logits - refs["logits"][1]).abs().max().item()
    if "_tokens" in r:
        tokens = r.pop("_tokens")
        if refs["tokens"] is None:
            refs["tokens"] = (name, tokens)
        elif tokens.shape == refs["tokens"][1].shape:
            r[f"greedy_tokens_equal_vs_{refs['tokens'][0]}"] = (tokens == refs["tokens"][1]).float().mean().item()


def _run_model(name: str, path: str, batch: Batch, cases: list[str], cfg: BenchConfig, model_config,
               results: dict[str, Any], progress: _Progress, refs: dict[str, Any],
               log: Callable[[str], None]) -> None:
    """Load model ``name`` and run its cases into ``results["models"][name]``; failures are recorded."""
    notes = results["notes"]
    rec: dict[str, Any] = {"cases": {}}
    results["models"][name] = rec
    bar = progress.bar
    skip = model_unavailable(name)
    if skip:
        rec.update(status="skipped", note=skip)
        notes.append(f"{name} skipped: {skip}")
        bar.update(progress.per_model)
        return
    bar.set_description(f"bench {name}")
    if name in GENERATION_ONLY and {"train", "forward"} & set(cases):
        notes.append(f"{name} measures generation only: {GENERATION_ONLY[name]}.")
    # Liger patches transformers' llama module while hf-liger runs; undone before the next row.
    with contextlib.ExitStack() as model_scope:
        if name == "hf-liger":
            model_scope.enter_context(_restoring_llama_module())
        model = _load_row(name, path, cfg, rec, notes)
        if model is None:
            bar.update(progress.per_model)
        else:
            with _backend_scope(cfg):
                if cfg.packed:
                    _record_isolation(name, model, batch, rec, notes)
                # Train last: it updates the weights, and forward/generate should see the saved ones.
                for case in sorted(cases, key=("forward", "generate", "decode", "train").index):
                    if name in GENERATION_ONLY and case in ("train", "forward"):
                        rec["cases"][case] = {"status": "skipped",
                                              "error": f"generation-only row: {GENERATION_ONLY[name]}"}
                        bar.update(progress.steps)
                        continue
                    r = _run_case(case, name, model, batch, cfg, progress, model_config)
                    _compare_to_reference(name, r, refs)
                    rec["cases"][case] = r
                    if r["status"] != "ok":
                        log(f"[bench] {name} {case}: {r['error']}")
            del model
    _free(cfg.device)


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (model, case) of ``cfg``; a failing case or model is recorded, never raised."""
    from tqdm.auto import tqdm

    results: dict[str, Any] = {"config": asdict(cfg), "models": {}, "notes": []}
    with contextlib.ExitStack() as stack:
        path, model_config = _prepare_weights(cfg, stack)
        results["model_config"] = {k: v for k, v in asdict(model_config).items()}
        batch, cases = _build_inputs(cfg, results, model_config)
        progress = _Progress(cfg, cases, tqdm)
        refs: dict[str, Any] = {"logits": None, "tokens": None}
        for name in cfg.compare:
            _run_model(name, path, batch, cases, cfg, model_config, results, progress, refs, log)
        progress.bar.close()
    return results
