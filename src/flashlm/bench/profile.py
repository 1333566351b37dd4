"""`flashlm bench profile`: where a model step's time goes, per model row, eager and compiled.

    flashlm bench profile [--preset small] [--batch 2] [--seqlen 256] [--models default,flash]
                          [--modes eager,compiled] [--cases forward,train,decode] [--steps 20]
                          [--points 1x128,32x128] [--tokens 33] [--output profile.json]

Cases ``forward`` and ``train`` (forward + loss + backward + fused AdamW, as ``flashlm bench``'s): per
(model, mode, case) the median wall time of ``--steps`` steps after ``--warmup`` (device synchronized),
then one profiled step: GPU kernels launched, their summed GPU time, the step's wall time under the
profiler, the top kernels by GPU time, the top host ops, and (compiled) Dynamo's graph/break/recompile
counters. ``--models`` also takes the bench's HF rows (hf-sdpa, hf-liger, hf-flashlm), loaded as
``flashlm bench`` loads them.

Case ``decode`` (the flash model): per ``--points`` BATCHxCONTEXT, the per-token time of ``generate``
(CUDA graph on CUDA, eager elsewhere; ``--decode-compile MODE`` compiles the graphed step) measured as
``flashlm bench decode`` does ((T(1 + N) - T(1)) / N), then one profiled generate of ``--tokens`` tokens:
kernels and GPU time per step, the top kernels per step, and the bytes a step reads as GB/s (and % of
the GPU's measured copy bandwidth where known).

Writes the JSON (``--output``) and a readable .txt beside it. On CPU the defaults are the ``tiny``
preset in fp32, eager only, and no kernels are listed (the profiler sees CPU ops only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from flashlm.bench.cli_common import (
    add_device_flags,
    at_least,
    check_output_file,
    names,
    parser_from_doc,
    positive_ints,
    resolve_device,
    resolve_dtype,
    subcommand_main,
)
from flashlm.bench.profiling import cuda_kernels, kernel_time_ms, model_step, profile_call, top_kernels
from flashlm.bench.timing import time_calls

CASES = ("forward", "train", "decode")
MODELS = ("default", "flash", "hf-eager", "hf-sdpa", "hf-liger", "hf-flashlm")


def _load(name: str, args, stack: contextlib.ExitStack):
    """Model ``name``: flashlm's built directly (seed 0), HF's rows through the bench's loader."""
    if not name.startswith("hf-"):
        from flashlm.models import build_model

        torch.manual_seed(0)
        return build_model(args.preset, attn=name, device=args.device, dtype=args.torch_dtype)
    from flashlm.bench.config import BenchConfig
    from flashlm.bench.rows import load_model, prepare_weights

    cfg = BenchConfig(model=args.preset, device=str(args.device), dtype=args.dtype_name)
    path, _ = prepare_weights(cfg, stack)
    return load_model(name, path, cfg)


def profile_step(step, device: torch.device) -> dict:
    """One profiled call of ``step``: wall ms, kernels, GPU ms, top kernels and the host-op table."""
    prof, wall = profile_call(step, device)
    kernels = cuda_kernels(prof)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    return {"profiled_wall_ms": wall * 1e3, "kernels": len(kernels), "kernel_time_ms": kernel_time_ms(kernels),
            "top_kernels": top_kernels(kernels), "host_table": table}


def step_row(model, name: str, mode: str, case: str, ids: torch.Tensor, args) -> dict:
    """The forward/train row of (model, mode, case): timed steps, then one profiled step."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    step = model_step(model, case, ids, name, compiled=mode == "compiled")
    timing = time_calls(step, warmup=args.warmup, iters=args.steps, device=args.device)
    row = {"model": name, "mode": mode, "case": case, "median_ms": timing.median_ms,
           "peak_gb": torch.cuda.max_memory_allocated(args.device) / 1e9 if args.device.type == "cuda" else None,
           **profile_step(step, args.device)}
    if mode == "compiled":
        c = dynamo_utils.counters
        row["dynamo"] = {"graph_breaks": dict(c["graph_break"]), "stats": dict(c["stats"]),
                         "recompiles": dict(c.get("recompiles", {}))}
    return row


def decode_row(model, batch: int, ctx: int, args) -> dict:
    """The decode row of one BATCHxCONTEXT point (see the module doc)."""
    from flashlm.bench.bandwidth import peak_bandwidth
    from flashlm.bench.decode import measure, weight_read_bytes
    from flashlm.bench.records import kv_bytes_per_token
    from flashlm.generation import generate
    from flashlm.generation.cuda_graph import cache_capacity

    graph = args.device.type == "cuda"
    n = args.tokens - 1
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=args.device)
    kw = {"eos_token_id": [], "cuda_graph": graph, "compile": args.decode_compile or False,
          "max_cache_len": cache_capacity(ctx + 1 + n)}
    timed = measure(lambda x, k: generate(model, x, max_new_tokens=k, **kw).sequences[:, ctx:], ids, n,
                    args.repeats, args.device)
    prof, wall = profile_call(lambda: generate(model, ids, max_new_tokens=args.tokens, **kw), args.device)
    kernels = cuda_kernels(prof)
    steps = max(1, args.tokens - 1)
    read = weight_read_bytes(model) + kv_bytes_per_token(model.config, args.torch_dtype) * batch * (
        ctx + args.tokens / 2)
    per_token_ms = timed["per_token_ms"]
    row = {"model": "flash", "mode": "cuda_graph" if graph else "eager", "case": "decode", "batch": batch,
           "context": ctx, "compile": args.decode_compile, "per_token_ms": per_token_ms,
           "first_token_ms": timed["first_token_ms"], "profiled_wall_ms": wall * 1e3,
           "kernels": len(kernels), "kernel_time_ms": kernel_time_ms(kernels), "bytes_per_step": read,
           "gb_per_s": read / per_token_ms / 1e6 if per_token_ms > 0 else None,
           "top_kernels": top_kernels(kernels, width=100, steps=steps)}
    peak = peak_bandwidth(torch.cuda.get_device_name(args.device)) if graph else None
    if peak is not None and row["gb_per_s"]:
        row["pct_of_copy"] = 100 * row["gb_per_s"] / peak.gbs
    return row


def _line(r: dict) -> str:
    where = f"b{r['batch']} ctx{r['context']}" if r["case"] == "decode" else ""
    ms = r["per_token_ms"] if r["case"] == "decode" else r["median_ms"]
    unit = "ms/token" if r["case"] == "decode" else "ms"
    return (f"{r['model']:10s} {r['mode']:10s} {r['case']:8s} {where} median {ms:.3f} {unit}, {r['kernels']} kernels, "
            f"GPU {r['kernel_time_ms']:.2f} ms")


def write_text(rows: list[dict], path: str) -> None:
    """The readable profile: one block per row, top kernels, then the host-op table."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(f"==== {_line(r)}, profiled {r['profiled_wall_ms']:.2f} ms"
                    + (f", peak {r['peak_gb']:.2f} GB" if r.get("peak_gb") is not None else "") + "\n")
            if "dynamo" in r:
                f.write(f"dynamo: {json.dumps(r['dynamo'])}\n")
            f.writelines(f"  {k['gpu_ms']:8.3f} ms {k['calls']:5d}x  {k['name']}\n" for k in r["top_kernels"])
            if "host_table" in r:
                f.write(r["host_table"] + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench profile", __doc__)
    p.add_argument("--preset", default=None, help="model preset (default: small on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--models", default="default,flash", help=f"comma list among {', '.join(MODELS)}")
    p.add_argument("--modes", default=None, help="eager,compiled (default on CUDA; eager on CPU)")
    p.add_argument("--cases", default="forward,train", help=f"comma list among {', '.join(CASES)}")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--points", default="1x128,32x128", help="decode case: BATCHxCONTEXT points")
    p.add_argument("--tokens", type=int, default=33, help="decode case: tokens of the profiled generate")
    p.add_argument("--repeats", type=int, default=3, help="decode case: timed generate calls (median)")
    p.add_argument("--decode-compile", default=None, help="decode case: inductor mode of the graphed step")
    add_device_flags(p)
    p.add_argument("--output", default=None, help="write the JSON here (and the .txt beside it)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    from flashlm._util import dtype_name

    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    args.torch_dtype = resolve_dtype(args.dtype, args.device)
    args.dtype_name = dtype_name(args.torch_dtype)
    args.preset = args.preset or ("small" if cuda else "tiny")
    args.models = names(args.models, "--models", MODELS)
    args.modes = names(args.modes or ("eager,compiled" if cuda else "eager"), "--modes", ("eager", "compiled"))
    args.cases = names(args.cases, "--cases", CASES)
    args.points = [tuple(positive_ints(p.lower().replace("x", ","), "--points")) for p in args.points.split(",")]
    if any(len(p) != 2 for p in args.points):
        raise ValueError("--points takes BATCHxCONTEXT items, e.g. 1x128,32x128")
    at_least(("--batch", args.batch, 1), ("--seqlen", args.seqlen, 1), ("--warmup", args.warmup, 0),
             ("--steps", args.steps, 1), ("--tokens", args.tokens, 2), ("--repeats", args.repeats, 1))
    check_output_file("--output", args.output)
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.bench.records import free_cuda
    from flashlm.bench.report import write_json

    results = {"preset": args.preset, "batch": args.batch, "seqlen": args.seqlen, "device": str(args.device),
               "torch": torch.__version__, "rows": []}
    with contextlib.ExitStack() as stack:
        for name in args.models:
            model = _load(name, args, stack)
            ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), device=args.device)
            for case in (c for c in args.cases if c != "decode"):
                for mode in args.modes:
                    results["rows"].append(step_row(model, name, mode, case, ids, args))
                    print(_line(results["rows"][-1]), flush=True)
            if name == "flash" and "decode" in args.cases:
                for batch, ctx in args.points:
                    results["rows"].append(decode_row(model.eval(), batch, ctx, args))
                    print(_line(results["rows"][-1]), flush=True)
            del model
            free_cuda(args.device)
    if args.output:
        stem = args.output.removesuffix(".json")
        write_text(results["rows"], f"{stem}.txt")
        for r in results["rows"]:
            r.pop("host_table", None)
        write_json(results, args.output)
    return 0


main = subcommand_main("flashlm bench profile", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
