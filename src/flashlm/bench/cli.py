"""`flashlm bench`: default vs flash vs transformers models, same weights and inputs.

    flashlm bench [--model small] [--batch-size 2 --seq-length 256 --warmup-steps 10 --benchmark-steps 20]
                  [--compare default,flash,hf-sdpa] [--cases train,forward,generate] [--output r.json]
                  [--plot r.png] ...
    flashlm bench kernels ...      attention kernel benchmark (flashlm.bench.kernels)
    flashlm bench decode ...       fast-decode benchmark (flashlm.bench.decode)

(``SUBCOMMANDS``, the table both ``--help`` texts print.)

On CPU the defaults become the ``tiny`` preset in fp32: that run checks the command works; its
numbers say nothing about GPU speed. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

import torch

from flashlm._util import DTYPE_ALIASES, DTYPES
from flashlm.bench.cli_common import check_output_file as _check_output_file
from flashlm.bench.config import CASE_NAMES, FP8_BASES, MODEL_NAMES, BenchConfig
from flashlm.cli import BENCH_SUBCOMMANDS as SUBCOMMANDS


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, SUBCOMMANDS))
    subs = "\n".join(f"  flashlm bench {name:<{width}} {doc}" for name, (_, doc) in SUBCOMMANDS.items())
    p = argparse.ArgumentParser(
        prog="flashlm bench",
        description="Benchmark flashlm's default and flash models against transformers' Llama on the same "
                    "weights and inputs: train step, inference forward, generation latency, peak memory.",
        epilog=f"subcommands (`flashlm bench <name> --help` for their options):\n{subs}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="preset name (tiny, small, llama-1b, llama-3b) or an HF checkpoint folder "
                        "(default: small on CUDA, tiny on CPU)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256, help="tokens per row (also the generation prompt length)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--benchmark-steps", type=int, default=20)
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--attn-backend", default=None,
                   help="force a flashlm.attention backend (e.g. cudnn, torch_flash, fa4, triton, reference); "
                        "default: the registry's choice, recorded in the JSON")
    p.add_argument("--padding-ratio", type=float, default=0.0,
                   help="fraction of pad tokens in the batch (left padding, random row lengths); "
                        "default uses the mask, flash runs varlen")
    p.add_argument("--packed", action="store_true",
                   help="rows packed with several documents, position_ids restarting at 0 per document")
    p.add_argument("--compile", action="store_true", help="torch.compile the models for train/forward, and the flash model's CUDA-graph decode step")
    p.add_argument("--cuda-graph", choices=("auto", "off"), default="auto",
                   help="flashlm's generate/decode cases: 'auto' (generate()'s default: the flash model's decode "
                        "step replayed from a CUDA graph on CUDA, eager elsewhere; each row records its "
                        "decode_path) or 'off' (eager decode steps)")
    p.add_argument("--fp8", default=None,
                   help="comma-separated FP8 recipes among tensorwise, rowwise (torchao float8, pip install "
                        "'flashlm[fp8]'; bf16): adds a row <model>-fp8-<recipe> after the default and flash rows "
                        "of --compare, the same weights with Float8Linear projections (train and forward cases)")
    p.add_argument("--compare", default="default,flash,hf-sdpa",
                   help=f"comma-separated models among {', '.join(MODEL_NAMES)}")
    p.add_argument("--cases", default="train,forward,generate",
                   help=f"comma-separated cases among {', '.join(CASE_NAMES)}")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated after the prompt")
    p.add_argument("--decode-batch-sizes", default="1,8,32", help="decode case: batch sizes of the sweep")
    p.add_argument("--decode-contexts", default="128,2048,8192", help="decode case: prompt lengths of the sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _csv(value: str, flag: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    if not items:
        raise ValueError(f"{flag} is empty; choose from {', '.join(allowed or ())}")
    if len(set(items)) != len(items):
        raise ValueError(f"{flag} lists a name twice: {value!r}")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}")
    return items


def _positive_ints(value: str, flag: str) -> tuple[int, ...]:
    try:
        xs = tuple(int(x) for x in _csv(value, flag))
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {value!r}") from e
    if any(x < 1 for x in xs):
        raise ValueError(f"{flag} must be positive integers, got {value!r}")
    return xs


def _check_model(model: str) -> None:
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"--model {model!r} is a folder without config.json (not an HF checkpoint)")
        return
    from flashlm.models.config import PRESETS

    if model not in PRESETS:
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")


def _check_backend(name: str) -> None:
    from flashlm.attention import available_backends, known_backends

    if name not in known_backends():
        raise ValueError(f"--attn-backend {name!r} is unknown; known: {', '.join(known_backends())}")
    if name not in available_backends():
        from flashlm.attention.registry import unavailable_reason

        raise ValueError(f"--attn-backend {name!r} cannot run here ({unavailable_reason(name)}); "
                         f"available: {', '.join(available_backends())}")


def _check_fp8(value: str | None, compare: tuple[str, ...], dtype: str, device: str, notes: list[str]
               ) -> tuple[str, ...]:
    """--fp8's recipes, refused where its rows cannot run: torchao missing, no default/flash row to convert,
    a dtype other than bf16, a GPU before compute capability 8.9. On CPU the rows run (torch's CPU
    _scaled_mm) with a note: they check the command, not FP8 speed."""
    if value is None:
        return ()
    from flashlm.models.fp8 import RECIPES, check_fp8_available, check_fp8_device

    recipes = _csv(value, "--fp8", RECIPES)
    check_fp8_available()
    if not set(compare) & set(FP8_BASES):
        raise ValueError(f"--fp8 converts the {' and '.join(FP8_BASES)} rows: add one to --compare")
    if dtype != "bf16":
        raise ValueError(f"--fp8 computes in bf16 around its float8 matmuls: pass --dtype bf16 (got {dtype})")
    if device == "cpu":
        notes.append("--fp8 on CPU: torch's CPU float8 matmul, nothing like an FP8 GPU's speed")
    else:
        check_fp8_device(device)
    return recipes


def parse_args(argv: list[str]) -> tuple[BenchConfig, argparse.Namespace, list[str]]:
    """Flags -> (BenchConfig, raw namespace, notes to print). Raises ValueError on a bad flag."""
    args = build_parser().parse_args(argv)
    notes: list[str] = []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available here (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    cpu = device == "cpu"
    if args.dtype is None:
        dtype = "fp32" if cpu else "bf16"
    elif args.dtype.lower() in DTYPE_ALIASES:
        dtype = DTYPE_ALIASES[args.dtype.lower()]
    else:
        raise ValueError(f"--dtype {args.dtype!r}: allowed {', '.join(DTYPES)}")
    model = args.model or ("tiny" if cpu else "small")
    if cpu:
        notes.append("running on CPU: these numbers say nothing about GPU speed"
                     + (" (model reduced to the 'tiny' preset" if args.model is None else " (")
                     + (f"{', ' if args.model is None else ''}{dtype}); run on a CUDA GPU for real figures."))
    for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--seq-length", args.seq_length, 1),
                        ("--warmup-steps", args.warmup_steps, 0), ("--benchmark-steps", args.benchmark_steps, 1)):
        if v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if not 0.0 <= args.padding_ratio < 1.0:
        raise ValueError(f"--padding-ratio must be in [0, 1), got {args.padding_ratio}")
    if args.padding_ratio > 0 and args.packed:
        raise ValueError("--padding-ratio and --packed are exclusive: a batch is either left-padded or packed")
    if args.packed and args.seq_length < 2:
        raise ValueError("--packed needs --seq-length >= 2 (several documents per row)")
    compare = _csv(args.compare, "--compare", MODEL_NAMES)
    cases = _csv(args.cases, "--cases", CASE_NAMES)
    if args.new_tokens < 2 and ({"generate", "decode"} & set(cases)):
        raise ValueError(f"--new-tokens must be >= 2 (per-token latency needs a second token), got {args.new_tokens}")
    decode_bs = _positive_ints(args.decode_batch_sizes, "--decode-batch-sizes")
    decode_ctx = _positive_ints(args.decode_contexts, "--decode-contexts")
    if args.plot:
        from flashlm.bench.report import check_plot_available

        try:
            check_plot_available()
        except ImportError as e:
            raise ValueError(str(e)) from None
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        _check_output_file(flag, path)
    _check_model(model)
    if args.attn_backend is not None:
        _check_backend(args.attn_backend)
    fp8 = _check_fp8(args.fp8, compare, dtype, device, notes)
    cfg = BenchConfig(model=model, batch_size=args.batch_size, seq_length=args.seq_length,
                      warmup_steps=args.warmup_steps, benchmark_steps=args.benchmark_steps, dtype=dtype,
                      device=device, attn_backend=args.attn_backend, padding_ratio=args.padding_ratio,
                      packed=args.packed, compile=args.compile, cuda_graph=args.cuda_graph,
                      compare=compare, cases=cases,
                      new_tokens=args.new_tokens, decode_batch_sizes=decode_bs, decode_contexts=decode_ctx,
                      seed=args.seed, progress=not args.no_progress, fp8=fp8)
    return cfg, args, notes


def _subcommand(name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
    except ImportError as e:
        print(f"flashlm bench {name}: not available ({e})", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    from flashlm.bench import report
    from flashlm.bench.models import run_benchmark

    try:
        cfg, args, notes = parse_args(argv)
    except ValueError as e:
        print(f"flashlm bench: error: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", flush=True)
    results = run_benchmark(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    results["notes"] = notes + results["notes"]
    results["command"] = "flashlm bench " + shlex.join(argv)
    results["argv"] = argv
    results["environment"] = report.environment()
    results["comparisons"] = report.comparisons(results)
    results["table"] = report.format_table(results)
    print(report.format_report(results), flush=True)
    if args.output:
        report.write_json(results, args.output)
        print(f"wrote {args.output}")
    if args.plot:
        try:
            report.write_plot(results, args.plot)
            print(f"wrote {args.plot}")
        except (ValueError, ImportError) as e:
            print(f"flashlm bench: no plot: {e}", file=sys.stderr)
    measured = [r for rec in results["models"].values() for r in rec.get("cases", {}).values()]
    return 0 if any(r.get("status") == "ok" for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
