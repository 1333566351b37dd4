"""`flashlm bench decode`: decode latency, tokens/s and achieved GB/s (issue 7).

    python -m flashlm.bench.decode [--preset llama-1b] [--batch-sizes 1,8,32] [--contexts 128,2048,8192]
        [--models flashlm-graph,flashlm-graph-inductor,flashlm-eager,hf-dynamic,hf-static-compile]
        [--new-tokens 64] [--repeats 2] [--hf-compile-configs 1x128] [--inductor-mode default]
        [--output decode.json]

Implementations, all on the same random weights (bf16 on CUDA) and the same prompts (no padding):

- ``flashlm-graph``: ``flashlm.generation.generate(cuda_graph=True)``: decode step replayed from a
  CUDA graph captured once per batch size (in the warm-up call); the prefill replayed from a graph of
  its prompt shape, captured on the shape's second use (a second, untimed warm-up call), eager for
  prompts over ``flashlm.generation.cuda_graph.PREFILL_GRAPH_MAX_TOKENS`` tokens;
- ``flashlm-graph-inductor``: ``generate(cuda_graph=True, compile=...)``: the decode step compiled by
  ``torch.compile`` (inductor, ``--inductor-mode``; fullgraph, static shapes) and captured in the
  CUDA graph (compiled and captured in the warm-up call);
- ``flashlm-eager``: the same fixed-shape decode step launched from Python;
- ``hf-dynamic``: transformers' ``LlamaForCausalLM.generate`` (sdpa, DynamicCache);
- ``hf-static-compile``: the same with ``cache_implementation="static"``, which transformers >= 4.5x
  compiles itself on CUDA (``torch.compile(mode="reduce-overhead")`` of the decode forward, see
  ``GenerationConfig.compile_config``). Each new shape recompiles (about a minute), so by default it
  runs only at the grid points of ``--hf-compile-configs`` (``1x128``: the issue's anchor; ``all``).

Timing, the same for every implementation: T(n) = wall time of one generate call making n new tokens
(device synchronized before and after), median over ``--repeats`` calls after two warm-up calls (T(1 + N), then T(1)).
first token = T(1) (prefill + first sample); per token = (T(1 + N) - T(1)) / N with N = ``--new-tokens``.
tokens/s = batch / per token. GB/s = bytes a decode step must read / per token, where bytes = the
weights (unique parameters; an untied input embedding only reads ``batch`` rows, so it is left out)
+ KV cache bytes of the mean context ``batch x (context + N / 2)``. EOS is disabled: every row makes
exactly n tokens.

Writes one JSON (``--output``) with the environment, the command, every grid point and a summary
against the issue's targets; prints a table; the last stdout line is the summary as one JSON object.

JSON: top level ``benchmark``, ``preset``, ``dtype``, ``device``, ``new_tokens``, ``repeats``,
``inductor_mode``, ``weight_bytes_per_step``, ``kv_bytes_per_token_per_row``, ``peak_gbs``, ``peak_basis``
("measured copy", "datasheet" or "--peak-gbs"; see ``flashlm.bench.bandwidth``), ``peak_gpu``, ``peak_label``
(all None, and no ``pct_of_peak``, on a GPU the table does not know, unless ``--peak-gbs``), ``method``,
``points``, ``summary``, ``notes``, ``command``, ``environment``, ``table``. Each point: ``impl``,
``batch``, ``context``, ``new_tokens``, ``status`` (ok / skipped + ``reason`` / error or oom +
``error``), ``first_token_ms``, ``per_token_ms``, ``total_ms`` (T(1 + N)), ``warmup_ms`` (the first
call: compile, capture, JIT), ``tokens_per_s``, ``bytes_per_step``, ``gb_per_s``, ``pct_of_peak``,
``peak_memory_gb`` (CUDA), ``wall_s``; riders: ``graph_tokens_equal_eager`` (flashlm-graph*: the greedy
tokens equal flashlm-eager's; exact for flashlm-graph, whose replay runs the eager kernels, while
inductor's fused kernels round differently, so in bf16 a near tie can flip a token),
``token_agreement_with_eager`` (flashlm-graph-inductor: fraction of equal tokens), ``compile_mode``
(flashlm-graph-inductor), ``token_agreement_with_flashlm`` (hf-dynamic), ``compiled``
(hf-static-compile), ``token_agreement_with_bf16`` (``*-int8``: greedy tokens equal to the same row
without int8). ``summary``: per implementation ``per_token_ms_b1_ctx128``,
``first_token_ms_b1_ctx128``, ``tokens_per_s_b32_ctx128``, plus ``speedup_vs_hf_static_compile_b1_ctx128``
(flashlm-graph) and ``speedup_inductor_vs_graph_b1_ctx128`` when both rows ran, and
``speedup_int8_vs_bf16_graph_b1_ctx128`` with int8 rows.

``--quantize int8`` adds an ``<impl>-int8`` row beside each flashlm row (or name them in ``--models``): the
same generate call on an int8 weight-only copy of the model (``flashlm.models.quantize``: projections and
lm_head int8, per-channel scales); its bytes per step count int8 weights and their fp32 scales
(``weight_bytes_per_step_int8``). ``--int8-linears`` runs only the int8 linear micro-benchmark at the
preset's projection shapes (``flashlm.bench.int8_linears``; M = ``--batch-sizes``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flashlm._util import DTYPES
from flashlm.bench.bandwidth import peak_bandwidth
from flashlm.bench.cli_common import positive_ints
from flashlm.bench.records import error_record, free_cuda, kv_bytes_per_token, weight_bytes
from flashlm.bench.timing import time_once
from flashlm.generation.cuda_graph import COMPILE_MODES

FLASHLM_IMPLS = ("flashlm-graph", "flashlm-graph-inductor", "flashlm-eager")
INT8_IMPLS = tuple(f"{i}-int8" for i in FLASHLM_IMPLS)
IMPLS = (*FLASHLM_IMPLS, "hf-dynamic", "hf-static-compile", *INT8_IMPLS)
GRAPH_IMPLS = ("flashlm-graph", "flashlm-graph-inductor", "flashlm-graph-int8", "flashlm-graph-inductor-int8")
DEFAULT_IMPLS = (*FLASHLM_IMPLS, "hf-dynamic", "hf-static-compile")
TARGETS = {"per_token_ms_b1_ctx128": 1.2, "first_token_ms_b1_ctx128": 15.0, "tokens_per_s_b32": 20000.0}


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashlm bench decode",
        description="Decode benchmark: per-token latency, tokens/s and GB/s of flashlm (CUDA graph with and "
                    "without torch.compile, eager decode) next to transformers' generate (dynamic cache; static "
                    "cache + compile).")
    p.add_argument("--preset", default=None, help="model preset (default: llama-1b on CUDA, tiny on CPU)")
    p.add_argument("--batch-sizes", default=None, help="default: 1,8,32 on CUDA, 1,2 on CPU")
    p.add_argument("--contexts", default=None, help="prompt lengths; default: 128,2048,8192 on CUDA, 16,32 on CPU")
    p.add_argument("--models", default=",".join(DEFAULT_IMPLS), help=f"comma-separated among {', '.join(IMPLS)}")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="add an <impl>-int8 row (int8 weight-only copy of the model) beside each flashlm row")
    p.add_argument("--int8-linears", action="store_true",
                   help="only the int8 linear micro-benchmark at the preset's projection shapes, M = --batch-sizes "
                        "(flashlm.bench.int8_linears)")
    p.add_argument("--linear-impls", default="bf16,int8-triton,int8-dequant",
                   help="with --int8-linears: among bf16, int8-triton, int8-dequant, torchao-int8wo")
    p.add_argument("--tune", action="store_true",
                   help="with --int8-linears: time every candidate tile of the int8 kernels per projection and M; "
                        "the JSON's 'tuned' is what --int8-configs (flashlm.ops.int8_linear.load_tuned) reads")
    p.add_argument("--int8-configs", default=None, metavar="JSON[,JSON]",
                   help="load measured int8 tiles (--tune JSON files, comma-separated) before running the int8 rows")
    p.add_argument("--new-tokens", type=int, default=None, help="N decode steps timed (default 64; 8 on CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    p.add_argument("--inductor-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of flashlm-graph-inductor (max-autotune-no-cudagraphs: slower to "
                        "compile, autotunes the matmuls)")
    p.add_argument("--hf-compile-configs", default="1x128",
                   help="grid points (BATCHxCONTEXT, comma-separated, or 'all') where hf-static-compile runs")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="the flashlm model's kernels setting (triton: also the decode fusions, which auto does not take yet)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--attn-backend", default=None, help="force a flashlm.attention backend for flashlm rows")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="memory bandwidth (GB/s) for the %%-of-peak column (default: the GPU's measured copy "
                        "bandwidth from flashlm.bench.bandwidth, e.g. 4300 on an H200; no column for a GPU "
                        "not in that table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.preset = args.preset or ("llama-1b" if cuda else "tiny")
    args.batch_sizes = positive_ints(args.batch_sizes or ("1,8,32" if cuda else "1,2"), "--batch-sizes")
    args.contexts = positive_ints(args.contexts or ("128,2048,8192" if cuda else "16,32"), "--contexts")
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (64 if cuda else 8)
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.peak_gbs is not None and not args.peak_gbs > 0:
        raise ValueError(f"--peak-gbs must be > 0, got {args.peak_gbs}")
    args.gpu_name = torch.cuda.get_device_name(args.device) if cuda else None
    args.peak = peak_bandwidth(args.gpu_name, args.peak_gbs)
    args.torch_dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    from flashlm.ops import resolve

    resolve(args.kernels, args.device)  # its refusal (e.g. triton without Triton here) before any model is built
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in IMPLS]
    if bad or not args.models:
        raise ValueError(f"--models: unknown {bad or 'empty'}; choose among {', '.join(IMPLS)}")
    if args.quantize:  # each flashlm row followed by its int8 twin
        args.models = list(dict.fromkeys(x for m in args.models
                                         for x in ((m, f"{m}-int8") if m in FLASHLM_IMPLS else (m,))))
    if any(m in INT8_IMPLS for m in args.models) and args.torch_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("int8 rows need --dtype bf16 or fp16 (int8 weights are dequantized into the activations' "
                         f"dtype), got {args.torch_dtype}")
    if args.tune and not args.int8_linears:
        raise ValueError("--tune goes with --int8-linears")
    if args.tune:
        from flashlm.ops.int8_linear import KERNEL_MAX_M

        if max(args.batch_sizes) > KERNEL_MAX_M:
            raise ValueError(f"--tune: M (--batch-sizes) above {KERNEL_MAX_M} runs the dequantize path, which has "
                             f"no tile to tune; got {max(args.batch_sizes)}")
    if args.int8_configs:
        from flashlm.ops.int8_linear import load_tuned

        for path in [p for p in args.int8_configs.split(",") if p.strip()]:
            try:
                load_tuned(path.strip())
            except (OSError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"--int8-configs {path}: not a --tune JSON ({type(e).__name__}: {e})") from None
    if args.int8_linears:
        from flashlm.bench.int8_linears import parse_impls

        parse_impls(args.linear_impls)  # refused before any model is built
    if args.hf_compile_configs.strip() == "all":
        args.hf_compile_points = None
    else:
        try:
            args.hf_compile_points = {tuple(int(v) for v in x.lower().split("x")) for x in
                                      args.hf_compile_configs.split(",") if x.strip()}
        except ValueError:
            raise ValueError("--hf-compile-configs takes BATCHxCONTEXT items (e.g. 1x128,8x2048) or 'all', "
                             f"got {args.hf_compile_configs!r}") from None
    return args


# --------------------------------------------------------------------------------------------------
# Models and byte counts
# --------------------------------------------------------------------------------------------------
def weight_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: unique parameters (tied embeddings counted once; int8 weights
    and their fp32 scales), minus an untied input embedding (a lookup reads only ``batch`` rows of it)."""
    from flashlm.ops.int8_linear import Int8Linear

    total = weight_bytes(model) + sum(m.scale.numel() * m.scale.element_size() for m in model.modules()
                                      if isinstance(m, Int8Linear))
    emb = model.model.embed_tokens.weight  # flashlm and transformers' Llama share these names
    if model.lm_head.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def build_hf(flash: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (sdpa) holding the flash model's weights (copied)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_dict = flash.config.to_hf_config()
    hf_dict = {k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")}
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**hf_dict), attn_implementation="sdpa")
    hf = hf.to(dtype).eval()
    missing, unexpected = hf.load_state_dict(flash.state_dict(), strict=False)
    params = {n for n, _ in hf.named_parameters()}
    if [m for m in missing if m in params] or unexpected:
        raise RuntimeError(f"weights did not map onto transformers' Llama: missing {missing}, "
                           f"unexpected {unexpected}")
    gen = hf.generation_config  # random weights: never stop early, never warn about padding
    gen.eos_token_id = None
    gen.pad_token_id = 0
    return hf


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
Runner = Callable[[torch.Tensor, int], torch.Tensor]  # (input_ids, n) -> new tokens (batch, n)


def make_runner(impl: str, flash, hf, max_cache_len: int, inductor_mode: str = "default") -> Runner:
    if impl.startswith("flashlm"):
        from flashlm.generation import generate

        graph = impl in GRAPH_IMPLS
        compile = inductor_mode if impl.startswith("flashlm-graph-inductor") else False

        def ours(ids, n):
            # eos_token_id=[]: no EOS at all; one cache capacity for every call of a grid point, so the
            # graph captured (and compiled) in the warm-up call serves all of them
            out = generate(flash, ids, max_new_tokens=n, eos_token_id=[], cuda_graph=graph,
                           max_cache_len=max_cache_len, compile=compile)
            if graph and not out.cuda_graph:
                raise RuntimeError(f"{impl}: generate did not use a CUDA graph")
            return out.sequences[:, ids.shape[1]:]

        return ours
    kw: dict[str, Any] = {"cache_implementation": "static"} if impl == "hf-static-compile" else {"disable_compile": True}

    def theirs(ids, n):
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **kw)
        return out[:, ids.shape[1]:]

    return theirs


def measure(run: Runner, ids: torch.Tensor, n: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """first token = median T(1); per token = (median T(1 + n) - median T(1)) / n (see the module doc)."""
    def timed(k: int) -> tuple[float, torch.Tensor]:
        return time_once(lambda: run(ids, k), device)

    t_warm, _ = timed(1 + n)  # warm-up: Triton JIT, graph capture, torch.compile
    timed(1)  # the prompt shape's second use: flashlm captures its prefill graph here, untimed
    # T(1 + n) right after the warm-up of the same shape (transformers keeps its static cache between
    # calls of one shape; a T(1) call in between could make it re-allocate and re-record), then T(1)
    runs = [timed(1 + n) for _ in range(repeats)]
    tn = statistics.median(t for t, _ in runs)
    t1 = statistics.median(timed(1)[0] for _ in range(repeats))
    tokens = runs[-1][1]
    if tokens.shape[1] != 1 + n:
        raise RuntimeError(f"generation made {tokens.shape[1]} tokens, expected {1 + n}")
    per_token = (tn - t1) / n
    return {"first_token_ms": t1 * 1e3, "per_token_ms": per_token * 1e3, "total_ms": tn * 1e3,
            "warmup_ms": t_warm * 1e3, "tokens_per_s": ids.shape[0] / per_token if per_token > 0 else None,
            "_tokens": tokens}


def _skip_reason(impl: str, args: argparse.Namespace, batch: int, ctx: int) -> str | None:
    if impl in GRAPH_IMPLS and args.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if impl.startswith("hf-"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install 'flashlm[hf]')"
    if impl == "hf-static-compile":
        if args.device.type != "cuda":
            return "transformers compiles generate only on accelerators"
        if args.hf_compile_points is not None and (batch, ctx) not in args.hf_compile_points:
            return "not in --hf-compile-configs (each shape recompiles)"
    return None


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def format_table(points: list[dict[str, Any]], peak_label: str | None = None) -> str:
    """Markdown table of the points; the % peak column only with a ``peak_label`` (its caption, which
    says which bandwidth it divides by)."""
    pct = peak_label is not None
    head = (f"| {'impl':<23}| batch | context | first token ms | ms/token | tokens/s | GB/s | "
            + ("% peak | " if pct else "") + f"graph == eager |\n|{'-' * 24}|------:|--------:|---------------:|"
            "---------:|---------:|-----:|" + ("-------:|" if pct else "") + ":--------------:|")
    rows = [head]
    for p in points:
        if p["status"] != "ok":
            note = p.get("reason") or p.get("error", "")
            rows.append(f"| {p['impl']:<23}| {p['batch']:>5} | {p['context']:>7} | {p['status']}: {note[:60]} "
                        "| | | | " + ("| " if pct else "") + "|")
            continue
        same = p.get("graph_tokens_equal_eager")
        rows.append(f"| {p['impl']:<23}| {p['batch']:>5} | {p['context']:>7} | {_f(p['first_token_ms']):>14} | "
                    f"{_f(p['per_token_ms'], 3):>8} | {_f(p['tokens_per_s'], 0):>8} | {_f(p.get('gb_per_s'), 0):>4} | "
                    + (f"{_f(p.get('pct_of_peak'), 0):>6} | " if pct else "") + f"{'' if same is None else str(same):^14} |")
    return "\n".join(rows) + (f"\n\n{peak_label}" if pct else "")


def summarize(points: list[dict[str, Any]]) -> dict[str, Any]:
    def get(impl, batch, ctx, key):
        for p in points:
            if p["impl"] == impl and p["batch"] == batch and p["context"] == ctx and p["status"] == "ok":
                return p[key]
        return None

    s: dict[str, Any] = {"targets": TARGETS}
    for impl in IMPLS:
        s[impl] = {"per_token_ms_b1_ctx128": get(impl, 1, 128, "per_token_ms"),
                   "first_token_ms_b1_ctx128": get(impl, 1, 128, "first_token_ms"),
                   "tokens_per_s_b32_ctx128": get(impl, 32, 128, "tokens_per_s")}
    g, h = s["flashlm-graph"], s["hf-static-compile"]
    if g["per_token_ms_b1_ctx128"] and h["per_token_ms_b1_ctx128"]:
        s["speedup_vs_hf_static_compile_b1_ctx128"] = h["per_token_ms_b1_ctx128"] / g["per_token_ms_b1_ctx128"]
    i = s["flashlm-graph-inductor"]
    if g["per_token_ms_b1_ctx128"] and i["per_token_ms_b1_ctx128"]:
        s["speedup_inductor_vs_graph_b1_ctx128"] = g["per_token_ms_b1_ctx128"] / i["per_token_ms_b1_ctx128"]
    q = s["flashlm-graph-int8"]
    if g["per_token_ms_b1_ctx128"] and q["per_token_ms_b1_ctx128"]:
        s["speedup_int8_vs_bf16_graph_b1_ctx128"] = g["per_token_ms_b1_ctx128"] / q["per_token_ms_b1_ctx128"]
    return s


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
@dataclass
class _Sweep:
    """What every grid point shares: the arguments, the flashlm model (and the HF copy of its weights,
    None when it is not needed or could not be built), the byte counts, and the points and notes so far."""

    args: argparse.Namespace
    config: Any
    flash: torch.nn.Module
    hf: torch.nn.Module | None
    w_bytes: int
    kv_tok: int
    peak_fields: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flash_int8: torch.nn.Module | None = None  # the int8 copy (int8 rows only)
    w_bytes_int8: int | None = None

    def model(self, impl: str) -> torch.nn.Module:
        return self.flash_int8 if impl.endswith("-int8") else self.flash

    def results(self) -> dict[str, Any]:
        """The JSON record of the points measured so far."""
        args = self.args
        return {"benchmark": "decode", "preset": args.preset, "dtype": str(args.torch_dtype).replace("torch.", ""),
                "device": str(args.device), "new_tokens": args.new_tokens, "repeats": args.repeats,
                "inductor_mode": args.inductor_mode, "kernels": args.kernels,
                "weight_bytes_per_step": self.w_bytes, "weight_bytes_per_step_int8": self.w_bytes_int8,
                "kv_bytes_per_token_per_row": self.kv_tok,
                **self.peak_fields,
                "method": "first token = median T(1); per token = (median T(1+N) - median T(1)) / N; T = wall "
                          "time of one generate call, device synchronized; GB/s = (weights + KV of batch x "
                          "(context + N/2)) / per token",
                "points": self.points, "summary": summarize(self.points), "notes": self.notes}


def _build_sweep(args: argparse.Namespace, log: Callable[[str], None]) -> _Sweep:
    """Build the models (seeded with ``args.seed``), log the header line, note a missing peak."""
    from flashlm.models import build_model
    from flashlm.models.config import get_preset

    device, dtype = args.device, args.torch_dtype
    torch.manual_seed(args.seed)
    config = get_preset(args.preset, kernels=args.kernels)
    flash = build_model(config, attn="flash", device=device, dtype=dtype).eval()
    notes: list[str] = []
    hf = None
    if any(m.startswith("hf-") for m in args.models) and _skip_reason("hf-dynamic", args, 0, 0) is None:
        try:
            hf = build_hf(flash, device, dtype)
        except Exception as e:  # noqa: BLE001 the flashlm rows still run; the HF rows say why not
            notes.append(f"transformers model could not be built: {type(e).__name__}: {e}")
    w_bytes = weight_read_bytes(flash)
    kv_tok = kv_bytes_per_token(config, dtype)
    log(f"decode bench: {args.preset} {str(dtype).replace('torch.', '')} on {device}; weights read per step "
        f"{w_bytes / 1e9:.3f} GB, KV {kv_tok} B per token per row; N = {args.new_tokens} new tokens, "
        f"{args.repeats} repeats")
    peak = args.peak
    if peak is None:
        notes.append("no %-of-peak column: " + (
            f"the bandwidth of {args.gpu_name!r} is not in flashlm.bench.bandwidth's table; pass --peak-gbs"
            if args.gpu_name else "a CPU run (pass --peak-gbs to get one)"))
    peak_fields = peak.as_dict() if peak is not None else {
        "peak_gbs": None, "peak_basis": None, "peak_gpu": None, "peak_label": None}
    sweep = _Sweep(args, config, flash, hf, w_bytes, kv_tok, peak_fields, notes=notes)
    if any(m.endswith("-int8") for m in args.models):
        import copy

        from flashlm.models.quantize import quantize_model

        sweep.flash_int8 = quantize_model(copy.deepcopy(flash), "int8")
        sweep.w_bytes_int8 = weight_read_bytes(sweep.flash_int8)
        log(f"int8 copy: weights read per step {sweep.w_bytes_int8 / 1e9:.3f} GB")
    return sweep


def _measure_point(sw: _Sweep, point: dict[str, Any], ids: torch.Tensor, max_cache_len: int,
                   tokens: dict[str, torch.Tensor]) -> None:
    """Time ``point["impl"]`` on ``ids`` (batch, context) into ``point`` (or its error record); its greedy
    tokens go to ``tokens[impl]`` for the correctness riders."""
    from flashlm.attention import use_backend
    from flashlm.generation.cuda_graph import release_graphs

    args, device = sw.args, sw.args.device
    impl, batch, ctx, n = point["impl"], point["batch"], point["context"], point["new_tokens"]
    t0 = time.perf_counter()
    try:
        runner = make_runner(impl, sw.model(impl), sw.hf, max_cache_len, args.inductor_mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if impl.startswith("flashlm") and args.attn_backend:
            with use_backend(args.attn_backend):
                res = measure(runner, ids, n, args.repeats, device)
        else:
            res = measure(runner, ids, n, args.repeats, device)
        tokens[impl] = res.pop("_tokens").cpu()
        point.update(status="ok", **res)
        read = (sw.w_bytes_int8 if impl.endswith("-int8") else sw.w_bytes) + sw.kv_tok * batch * (ctx + n / 2)
        point["bytes_per_step"] = read
        if point["per_token_ms"] > 0:
            point["gb_per_s"] = read / (point["per_token_ms"] / 1e3) / 1e9
            if args.peak is not None:
                point["pct_of_peak"] = 100 * point["gb_per_s"] / args.peak.gbs
        if device.type == "cuda":
            point["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if impl == "hf-static-compile":
            point["compiled"] = getattr(sw.hf, "_compiled_call", None) is not None
        if impl.startswith("flashlm-graph-inductor"):
            point["compile_mode"] = args.inductor_mode
    except Exception as e:  # noqa: BLE001 one point failing (OOM, compile error) must not end the sweep
        point.update(error_record(e, with_traceback=False))
    point["wall_s"] = time.perf_counter() - t0
    if impl in GRAPH_IMPLS:
        release_graphs(sw.model(impl))  # the next grid point has another cache shape
    free_cuda(device)


def _point_line(point: dict[str, Any]) -> str:
    """The log line of one measured point."""
    return f"  {point['impl']:<23} batch {point['batch']:>3} ctx {point['context']:>5}: " + (
        f"first {point['first_token_ms']:.2f} ms, {point['per_token_ms']:.3f} ms/token, "
        f"{_f(point.get('gb_per_s'), 0)} GB/s ({point['wall_s']:.1f} s)" if point["status"] == "ok"
        else f"{point['status']}: {point.get('error', '')}")


def _token_riders(grid_points: list[dict[str, Any]], tokens: dict[str, torch.Tensor]) -> None:
    """Correctness riders on one grid point's records: same greedy tokens graph vs eager (same kernels;
    inductor's fused ones round differently: its agreement is recorded too); agreement with HF."""
    for graph_impl in GRAPH_IMPLS:
        eager = "flashlm-eager-int8" if graph_impl.endswith("-int8") else "flashlm-eager"
        if graph_impl in tokens and eager in tokens:
            same = tokens[graph_impl] == tokens[eager]
            for p in grid_points:
                if p["impl"] == graph_impl and p["status"] == "ok":
                    p["graph_tokens_equal_eager"] = bool(same.all())
                    if graph_impl.startswith("flashlm-graph-inductor"):
                        p["token_agreement_with_eager"] = float(same.float().mean())
    for p in grid_points:  # int8 vs the same path in the model's dtype
        base = p["impl"].removesuffix("-int8")
        if p["impl"].endswith("-int8") and p["status"] == "ok" and base in tokens and p["impl"] in tokens:
            p["token_agreement_with_bf16"] = float((tokens[p["impl"]] == tokens[base]).float().mean())
    ours = tokens.get("flashlm-eager", tokens.get("flashlm-graph"))
    if ours is not None and "hf-dynamic" in tokens:
        for p in grid_points:
            if p["impl"] == "hf-dynamic" and p["status"] == "ok":
                p["token_agreement_with_flashlm"] = float((tokens["hf-dynamic"] == ours).float().mean())


def run(args: argparse.Namespace, log: Callable[[str], None] = print,
        checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every (batch, context, implementation); ``checkpoint(partial results)`` after each point
    (so a run cut short by a time limit still leaves its JSON)."""
    from flashlm.generation.cuda_graph import cache_capacity

    sw = _build_sweep(args, log)
    n, points = args.new_tokens, sw.points
    gen = torch.Generator().manual_seed(args.seed + 1)
    for batch in args.batch_sizes:
        for ctx in args.contexts:
            ids = torch.randint(3, sw.config.vocab_size, (batch, ctx), generator=gen).to(args.device)
            max_cache_len = cache_capacity(ctx + 1 + n)
            tokens: dict[str, torch.Tensor] = {}
            for impl in args.models:
                point: dict[str, Any] = {"impl": impl, "batch": batch, "context": ctx, "new_tokens": n}
                reason = _skip_reason(impl, args, batch, ctx)
                if reason is None and impl.startswith("hf-") and sw.hf is None:
                    reason = "no transformers model (see notes)"
                if reason is not None:
                    point.update(status="skipped", reason=reason)
                    points.append(point)
                    continue
                _measure_point(sw, point, ids, max_cache_len, tokens)
                points.append(point)
                if checkpoint is not None:
                    checkpoint(sw.results())
                log(_point_line(point))
            _token_riders(points[-len(args.models):], tokens)
    return sw.results()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"flashlm bench decode: {e}", file=sys.stderr)
        return 2
    command = "flashlm bench decode " + shlex.join(argv)
    try:
        from flashlm.bench.report import environment, write_json
    except ImportError as e:  # the report module is optional here: fall back to plain json
        env: dict[str, Any] = {"torch": torch.__version__, "error": str(e)}
        write_json = None
    else:
        env = environment()

    if args.int8_linears:
        from flashlm.bench.int8_linears import main_linears

        return main_linears(args, _saver(args, command, env, write_json))
    save = _saver(args, command, env, write_json, lambda r: format_table(r["points"], r["peak_label"]))
    results = run(args, checkpoint=save)
    save(results)
    results.update(command=command, environment=env, table=format_table(results["points"], results["peak_label"]))
    print(results["table"])
    for note in results["notes"]:
        print(f"note: {note}")
    if args.output:
        print(f"wrote {args.output}")
    print(json.dumps(results["summary"], default=lambda x: None))
    return 0 if all(p["status"] in ("ok", "skipped") for p in results["points"]) else 1


def _saver(args: argparse.Namespace, command: str, env: dict[str, Any], write_json, table=None):
    """``save(record)``: the record with the command, environment (and ``table(record)``) written to
    ``--output`` (nothing without it), atomically through ``report.write_json`` where it imports."""
    def save(record: dict[str, Any]) -> None:
        if not args.output:
            return
        record = {**record, "command": command, "environment": env}
        if table is not None:
            record["table"] = table(record)
        if write_json is not None:
            write_json(record, args.output)
        else:
            with open(args.output, "w") as f:
                json.dump(record, f, indent=2, default=str)

    return save


if __name__ == "__main__":
    sys.exit(main())
