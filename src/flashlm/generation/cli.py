"""``flashlm generate`` (also ``python -m flashlm.generation``): build or load a model, encode the
prompts, call :func:`flashlm.generation.generate`, print the new tokens or text and the latencies.

The latencies are the CLI's own measurement (``flashlm.bench.timing.time_steps`` around the call,
through generate's ``on_step``): first token = from the start of the prefill (after every check,
allocation, capture and compile) to the first token; per token = the mean of the later steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import torch
from torch import Tensor

from flashlm._util import DTYPE_ALIASES, parse_dtype
from flashlm.bench.timing import StepTiming, time_steps
from flashlm.errors import InputError
from flashlm.generation.cuda_graph import graph_unavailable_reason
from flashlm.generation.loop import GenerationOutput, generate
from flashlm.generation.sampling import SamplingKey

__all__ = ["main"]

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
    p.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu (bfloat16 everywhere with --quantize)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8 weight-only projections and lm_head (flashlm.models.quantize; needs a bf16/fp16 "
                        "--dtype); the CUDA-graph decode step replays the int8 kernels")
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
    from flashlm.models.quantize import check_quantize_args, quantize_model

    torch.manual_seed(args.seed)
    if args.quantize is not None:
        check_quantize_args(args.quantize, dtype, "--quantize")
    if os.path.isdir(args.model):
        return from_pretrained(args.model, attn=args.attn, device=device, dtype=dtype, quantize=args.quantize)
    if args.model in PRESETS:
        model = build_model(get_preset(args.model), attn=args.attn, device=device, dtype=dtype)
        return model if args.quantize is None else quantize_model(model, args.quantize)
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
                   width: int, out: GenerationOutput, timing: StepTiming, tokenizer: Any) -> dict:
    """The JSON object `main` prints: settings, latencies (``timing``: first token = from the start of
    the prefill to the first token, per token = mean of the later steps), decode path and the new
    tokens per row."""
    per = timing.per_step_s
    per_ok = math.isfinite(per) and per > 0
    result = {"model": args.model, "attn": args.attn, "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "quantize": args.quantize, "batch": n_rows,
              "prompt_len": width, "num_new_tokens": out.num_new_tokens.tolist(),
              "first_token_ms": round(timing.first_s * 1e3, 3),
              "per_token_ms": round(per * 1e3, 3) if math.isfinite(per) else None,
              "tokens_per_s": round(n_rows / per, 1) if per_ok else None,
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
          f"({args.attn}, {result['dtype']}{' + int8 weights' if args.quantize else ''}, {device}{graph})")


def main(argv: list[str] | None = None) -> int:
    """``flashlm generate``: build or load a model, generate, print tokens/text and latencies."""
    args = _build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" or args.quantize else torch.float32)
    try:
        model = _load_model(args, device, dtype)
    except InputError as e:  # --quantize with an fp32 --dtype
        print(f"flashlm generate: {e}", file=sys.stderr)
        return 2
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
        timing, out = time_steps(lambda on_step: generate(
            model, input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, streamer=streamer,
            generator=generator, cuda_graph=cuda_graph, max_cache_len=args.max_cache_len, compile=compile_step,
            on_step=on_step), device)
    except (ValueError, TypeError) as e:
        print(f"flashlm generate: {e}", file=sys.stderr)
        return 2
    if streamer is not None:
        print()
    result = _result_record(args, device, dtype, len(rows), input_ids.shape[1], out, timing, tokenizer)
    if not args.json:
        _print_text(args, result, out, device, tokenizer)
    print(json.dumps(result))
    return 0
