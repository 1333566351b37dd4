"""The measured cases of ``flashlm bench``, one model row at a time: ``train`` (forward + backward + AdamW),
``forward`` (inference, full logits), ``generate`` (first-token and per-token latency) and ``decode`` (the
same over a batch x context grid, with GB/s), plus the packed-isolation check. Each returns its record
(times from :mod:`flashlm.bench.timing`, peak memory, riders compared across rows)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from flashlm.bench.batch import Batch, make_batch
from flashlm.bench.config import BenchConfig, base_name, fp8_recipe
from flashlm.bench.records import PeakMemory, error_record, free_cuda, kv_bytes_per_token, weight_bytes
from flashlm.bench.timing import Timing, summarize, time_calls, time_steps


def _accepts_named(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _timed_steps(step: Callable[[], Any], cfg: BenchConfig, tick: Callable[[], None]) -> Timing:
    """``cfg.warmup_steps`` untimed then ``cfg.benchmark_steps`` timed calls of ``step``, each fenced by
    device syncs; ``tick()`` after every call (the progress bar)."""
    return time_calls(step, warmup=cfg.warmup_steps, iters=cfg.benchmark_steps, device=cfg.device, after=tick)


def _compiled(name: str, model):
    """--compile: the flash model as ONE graph (fullgraph: a graph break is an error, not a silent
    slowdown; its planner takes sync-free plans under compile), the others as torch.compile makes them
    (an FP8 row as its base model: torchao's float8 casts are meant to run compiled)."""
    if base_name(name) == "flash":  # planned as compiled inside the graph only: its eager calls (generate) stay eager
        return model.compile_forward(fullgraph=True)
    return torch.compile(model)


def run_train(name: str, model, batch: Batch, cfg: BenchConfig, tick) -> dict[str, Any]:
    inputs = batch.model_inputs(base_name(name))
    extra = {}
    if base_name(name) == "flash" and _accepts_named(model.forward, "return_logits"):
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
        with PeakMemory(cfg.device) as mem:
            times = _timed_steps(step, cfg, tick)
    finally:
        model.zero_grad(set_to_none=True)
        opt.state.clear()  # AdamW moments go now, not when the caller's frame lets go
        model.eval()
    res = {"status": "ok", **times.summary(), **mem.record(), "compiled": cfg.compile,
           "fused_linear_cross_entropy": bool(extra) or name == "hf-liger",
           "first_step_loss": float(first_loss[0])}
    res["tokens_per_s"] = batch.real_tokens / (res["median_ms"] / 1e3)
    return res


def run_forward(name: str, model, batch: Batch, cfg: BenchConfig, tick) -> dict[str, Any]:
    inputs = batch.model_inputs(base_name(name))
    fwd = _compiled(name, model) if cfg.compile else model
    # FP8 rows under no_grad: torchao's rowwise cast cannot reshape an inference tensor (torchao 0.18)
    no_grad = torch.no_grad if fp8_recipe(name) else torch.inference_mode
    with no_grad(), PeakMemory(cfg.device) as mem:
        times = _timed_steps(lambda: fwd(**inputs, use_cache=False), cfg, tick)
        last_logits = fwd(**inputs, use_cache=False).logits[:, -1, :].float().cpu()
    res = {"status": "ok", **times.summary(), **mem.record(), "compiled": cfg.compile}
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
    from flashlm.generation.cuda_graph import graph_unavailable_reason
    from flashlm.generation.sampling import SamplingKey

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
            # timed through on_step: synchronized before the prefill, at the first token and at the end,
            # nowhere else (what generate's own timing measured before it stopped timing itself)
            timing, out = time_steps(lambda on_step: generate(
                model, ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=[],
                on_step=on_step, **kw), cfg.device)
            path = {"decode_path": out.decode_path, "graph_fallback": out.graph_fallback,
                    "prefill_path": "cuda_graph" if out.prefill_graph else "eager"}
            return out.sequences[:, -n:], timing.first_s, timing.per_step_s, path

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
    calls: list[tuple] = []  # (tokens, first-token s, per-token s, path) of every call, warm-up included
    timing = time_calls(lambda: calls.append(fn(ids, mask, n)), warmup=cfg.warmup_steps,
                        iters=cfg.benchmark_steps, device=cfg.device, after=tick)
    timed = calls[cfg.warmup_steps:]
    tokens, _, _, path = calls[-1]
    first, per, total = [c[1] for c in timed], [c[2] for c in timed], timing.times_s
    if tokens.shape[1] != n:
        raise RuntimeError(f"generation returned {tokens.shape[1]} new tokens, expected {n}")
    f, p = summarize(first), summarize(per)
    res = {"first_token_ms": f["median_ms"], "first_token_p10_ms": f["p10_ms"], "first_token_p90_ms": f["p90_ms"],
           "per_token_ms": p["median_ms"], "per_token_p10_ms": p["p10_ms"], "per_token_p90_ms": p["p90_ms"],
           "total_ms": summarize(total)["median_ms"], "steps": len(total), "new_tokens": n}
    res["decode_tokens_per_s"] = ids.shape[0] / (res["per_token_ms"] / 1e3)
    res.update(path)  # which decode path ran (the last call's: every call takes the same one)
    return res, tokens


def _release_graphs(model) -> None:
    """Free the CUDA graphs (and their caches) generate() kept on a flashlm model, so that later cases and
    grid points neither hold nor count that memory."""
    from flashlm.generation.cuda_graph import release_graphs

    release_graphs(model)


def run_generate(name: str, model, batch: Batch, cfg: BenchConfig, tick, model_config=None) -> dict[str, Any]:
    fn, compiled = _generate_fn(name, model, cfg)
    n = cfg.new_tokens
    with torch.inference_mode(), PeakMemory(cfg.device) as mem:
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
                with torch.inference_mode(), PeakMemory(cfg.device) as mem:
                    res, _ = _measure_generation(fn, ids, None, cfg.new_tokens, cfg, tick)
                point.update(status="ok", **res, **mem.record())
                read = (weight_bytes(model)
                        + kv_bytes_per_token(model_config, cfg.torch_dtype) * b * (ctx + cfg.new_tokens / 2))
                point["decode_gb_per_s"] = read / (res["per_token_ms"] / 1e3) / 1e9 if res["per_token_ms"] > 0 else None
            except Exception as e:  # noqa: BLE001 one grid point failing (OOM at batch 32 x 8k) must not end the sweep
                point.update(error_record(e))
                free_cuda(cfg.device)
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

