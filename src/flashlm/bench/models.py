"""Model benchmark: the same weights run as flashlm's default and flash models and as transformers'
LlamaForCausalLM (eager / sdpa / Liger-Kernel / flashlm attention), on the same inputs.

This module runs the benchmark: the rows one after another, their cases in a fixed order, failures
recorded instead of raised. The parts live beside it: :mod:`~flashlm.bench.config` (names,
:class:`BenchConfig`), :mod:`~flashlm.bench.batch` (inputs), :mod:`~flashlm.bench.rows` (loading),
:mod:`~flashlm.bench.cases` (the measurements), :mod:`~flashlm.bench.timing` (the clock).

Every model is loaded from one checkpoint folder (a preset is built once with a fixed seed and saved to
a temporary folder; an HF folder is used as is), so all rows see identical weights. Models are measured
one at a time and freed before the next, so peak memory is the model's own.

Cases (each ``warmup`` untimed steps, then ``steps`` timed steps; CUDA is synchronized around each):

- ``train``: forward + backward + AdamW step on (batch, seqlen) tokens with labels. The flash model
  computes the loss with ``return_logits=False`` (fused linear cross-entropy, no (tokens x vocab) logits).
- ``forward``: inference forward (``torch.inference_mode``, no cache), full logits.
- ``generate``: greedy generation of ``new_tokens`` after a prompt of ``seqlen`` tokens (no EOS stop);
  flashlm's models through :func:`flashlm.generation.generate`, timed through its ``on_step`` hook
  (``flashlm.bench.timing.time_steps``: first token and later steps), HF models through ``model.generate`` with a timestamping streamer. First-token
  latency: call -> first new token on the host (prefill + one step); per-token: mean later step.
- ``decode``: the same measurement over a grid of batch sizes and prompt lengths (fast-decode issue),
  with achieved GB/s = (weight bytes + KV-cache bytes read per step) / per-token time.

Peak memory is ``torch.cuda.max_memory_allocated`` after a reset at the start of each case (weights
included); on CPU it is reported as n/a (tracemalloc does not see torch's allocator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from flashlm.bench.batch import Batch, make_batch
from flashlm.bench.cases import packed_isolation, run_decode, run_forward, run_generate, run_train
from flashlm.bench.config import FP8_CASES, GENERATION_ONLY, BenchConfig, base_name, fp8_recipe
from flashlm.bench.records import error_record, free_cuda, weight_bytes
from flashlm.bench.rows import load_model, model_unavailable, prepare_weights, restoring_llama_module
from flashlm.bench.timing import time_once

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
        self.bar = tqdm(total=len(cfg.row_names()) * self.per_model, desc="bench", unit="step",
                        disable=not cfg.progress, mininterval=0.5, dynamic_ncols=True)

    def case_total(self, case: str) -> int:
        return self.per_step.get(case, 1) * self.steps


def _load_row(name: str, path: str, cfg: BenchConfig, rec: dict[str, Any], notes: list[str]):
    """Load model ``name`` into its row ``rec`` (status, load time, sizes); None when it cannot load (the
    row then holds the error and a note says why)."""
    try:
        load_s, model = time_once(lambda: load_model(name, path, cfg), cfg.device)
        rec.update(status="ok", load_s=load_s,
                   parameters=sum(p.numel() for p in model.parameters()),
                   weight_bytes=weight_bytes(model))
        if fp8_recipe(name) is not None:
            rec["fp8"] = _fp8_record(name, model)
        return model
    except Exception as e:  # noqa: BLE001 a model that cannot load is a row, not a crash
        rec.update(error_record(e))
        notes.append(f"{name} failed to load: {rec['error']}")
        return None


def _fp8_record(name: str, model) -> dict[str, Any]:
    """An FP8 row's conversion: its recipe, each projection's class, and (flash) how each MLP's SwiGLU meets
    its Float8Linear down_proj (``flashlm.models.kernels.mlp_down_path``)."""
    from flashlm.models.fp8 import linear_name
    from flashlm.models.kernels import mlp_down_path
    from flashlm.models.quantize import projection_kinds

    rec = {"recipe": fp8_recipe(name), "projections": projection_kinds(model, linear_name)}
    if base_name(name) == "flash":
        rec["mlp"] = sorted({mlp_down_path(layer.mlp) for layer in model.model.layers})
    return rec


def _record_isolation(name: str, model, batch: Batch, rec: dict[str, Any], notes: list[str]) -> None:
    """--packed: whether ``name`` keeps the documents of a packed row apart, into ``rec`` and a note."""
    try:
        rec["packed_isolation"] = packed_isolation(name, model, batch)
    except Exception as e:  # noqa: BLE001 recorded in the JSON
        rec["packed_isolation"] = error_record(e)
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
        r = error_record(e)
        bar.update(progress.case_total(case) - (bar.n - done))
    free_cuda(cfg.device)
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
            model_scope.enter_context(restoring_llama_module())
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
                    if fp8_recipe(name) is not None and case not in FP8_CASES:
                        rec["cases"][case] = {"status": "skipped", "error": "FP8 rows time training and the "
                                              "forward (torchao float8 training); generation stays bf16"}
                        bar.update(progress.case_total(case))
                        continue
                    r = _run_case(case, name, model, batch, cfg, progress, model_config)
                    _compare_to_reference(name, r, refs)
                    rec["cases"][case] = r
                    if r["status"] != "ok":
                        log(f"[bench] {name} {case}: {r['error']}")
            del model
    free_cuda(cfg.device)


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (model, case) of ``cfg``; a failing case or model is recorded, never raised."""
    from tqdm.auto import tqdm

    results: dict[str, Any] = {"config": asdict(cfg), "models": {}, "notes": []}
    with contextlib.ExitStack() as stack:
        path, model_config = prepare_weights(cfg, stack)
        results["model_config"] = {k: v for k, v in asdict(model_config).items()}
        batch, cases = _build_inputs(cfg, results, model_config)
        progress = _Progress(cfg, cases, tqdm)
        refs: dict[str, Any] = {"logits": None, "tokens": None}
        for name in cfg.row_names():
            _run_model(name, path, batch, cases, cfg, model_config, results, progress, refs, log)
        progress.bar.close()
    return results