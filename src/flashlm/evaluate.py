"""``flashlm eval``: perplexity of a checkpoint on held-out text, and of its int8 copy beside it.

    flashlm eval --checkpoint RUN/final --data heldout.txt [--quantize int8] [--seq-length 512]
        [--batch-size 8] [--max-tokens N] [--tokenizer tokenizer.json] [--dtype bf16] [--output eval.json]

The text (``.txt`` / ``.jsonl`` files or folders, read as ``flashlm train`` reads them) is encoded with the
checkpoint's ``tokenizer.json`` (or ``--tokenizer``), an EOS after each document, and cut into
non-overlapping windows of ``--seq-length`` tokens (a tail of >= 2 tokens is one more, shorter window).
Each window is scored on its own: the loss is the mean negative log-likelihood of every token but each
window's first, and perplexity = exp(loss). With ``--quantize int8`` the same windows are scored by the
model as loaded and then by its int8 copy (:func:`flashlm.models.quantize.quantize_model`, in place),
and ``int8_vs_unquantized`` is the ratio of the perplexities (the issue's target: within 1%).

Prints one line per model; the last stdout line is the JSON record (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import torch
from torch import Tensor

from flashlm._util import DTYPE_ALIASES, dtype_name, parse_dtype
from flashlm.errors import InputError

__all__ = ["build_parser", "encode_text", "main", "perplexity", "windows"]


def windows(tokens: Tensor, seq_length: int) -> list[Tensor]:
    """1-D ``tokens`` -> non-overlapping rows of ``seq_length`` (one (n, seq_length) tensor) and the tail of
    >= 2 tokens as a (1, tail) tensor; each is scored on its own."""
    if seq_length < 2:
        raise InputError(f"--seq-length must be >= 2 (a window predicts all its tokens but the first), got {seq_length}")
    n = tokens.numel() // seq_length
    out = [tokens[: n * seq_length].view(n, seq_length)] if n else []
    tail = tokens[n * seq_length:]
    if tail.numel() >= 2:
        out.append(tail.view(1, -1))
    if not out:
        raise InputError(f"the text encodes to {tokens.numel()} token(s): at least 2 are needed to score one")
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, rows: list[Tensor], batch_size: int, device: torch.device) -> dict:
    """Mean NLL (nats) and perplexity of ``model`` over ``rows`` (:func:`windows`), ``batch_size`` rows per
    forward; each row's first token is context only. Returns {"loss", "perplexity", "tokens", "seconds"}."""
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for block in rows:
        for i in range(0, block.shape[0], batch_size):
            ids = block[i:i + batch_size].to(device)
            n = ids.shape[0] * (ids.shape[1] - 1)
            loss = model(ids, labels=ids).loss  # mean over the n shifted targets (none ignored)
            total += float(loss) * n
            count += n
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count, "seconds": time.perf_counter() - t0}


def encode_text(data: list[str], tokenizer, eos_id: int, max_tokens: int | None, text_field: str = "text") -> Tensor:
    """The documents of ``data`` (``flashlm train``'s reader) encoded, ``eos_id`` after each, as one int64
    tensor, cut at ``max_tokens``."""
    from flashlm.train.data import find_files, read_documents

    ids: list[int] = []
    for doc in read_documents(find_files(data), text_field):
        ids += tokenizer.encode(doc).ids + [eos_id]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashlm eval", description="Perplexity of a checkpoint on held-out text; "
                                "with --quantize int8, of its int8 weight-only copy beside it.")
    p.add_argument("--checkpoint", required=True, help="a model folder (config.json + safetensors), e.g. RUN/final")
    p.add_argument("--data", nargs="+", required=True, help=".txt / .jsonl files or folders (held-out text)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint folder's)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also score the int8 weight-only copy (needs a bf16/fp16 --dtype)")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per scored window (>= 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of the text")
    p.add_argument("--attn", choices=("flash", "default"), default="flash")
    p.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), default=None,
                   help="default: bfloat16 on cuda or with --quantize, else float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default=None, help="write the JSON record here")
    return p


def _check_args(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Every refusal that needs no model: InputError naming the flag."""
    if not os.path.isdir(args.checkpoint) or not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise InputError(f"--checkpoint {args.checkpoint!r} is not a model folder (config.json + safetensors)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise InputError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.seq_length < 2:
        raise InputError(f"--seq-length must be >= 2, got {args.seq_length}")
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output) or not os.path.isdir(parent):
            raise InputError(f"--output {args.output!r}: must be a file in an existing folder")
    tok = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.json")
    if not os.path.isfile(tok):
        raise InputError(f"no tokenizer: {tok!r} is not a file; pass --tokenizer PATH (the tokenizer.json the "
                         "model was trained with)")
    args.tokenizer = tok
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" or args.quantize else torch.float32)
    if args.quantize is not None:
        from flashlm.models.quantize import check_quantize_args

        check_quantize_args(args.quantize, dtype, "--quantize")
    return device, dtype


def _tokens(args: argparse.Namespace, config) -> Tensor:
    """The encoded text, checked against the model's vocab and context."""
    from flashlm.train.data import load_tokenizer, resolve_eos_id

    tokenizer = load_tokenizer(args.tokenizer)
    tokens = encode_text(args.data, tokenizer, resolve_eos_id(tokenizer, config.eos_token_id), args.max_tokens,
                         args.text_field)
    if tokens.numel() and int(tokens.max()) >= config.vocab_size:
        raise InputError(f"the tokenizer {args.tokenizer!r} gives id {int(tokens.max())} but the model's vocab_size "
                         f"is {config.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
    if args.seq_length > config.max_position_embeddings:
        raise InputError(f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    return tokens


def run(args: argparse.Namespace, log=print) -> dict:
    """Score the checkpoint (and its int8 copy with ``--quantize``); the JSON record."""
    from flashlm.models import from_pretrained
    from flashlm.models.config import ModelConfig
    from flashlm.models.quantize import quantize_model

    device, dtype = _check_args(args)
    rows = windows(_tokens(args, ModelConfig.from_hf_config(args.checkpoint)), args.seq_length)
    model = from_pretrained(args.checkpoint, attn=args.attn, device=device, dtype=dtype)
    name = dtype_name(dtype)
    results = {name: perplexity(model, rows, args.batch_size, device)}
    log(f"{name}: loss {results[name]['loss']:.5f}, perplexity {results[name]['perplexity']:.4f} "
        f"({results[name]['tokens']} tokens)")
    record = {"benchmark": "eval", "checkpoint": args.checkpoint, "data": args.data, "attn": args.attn,
              "dtype": name, "device": str(device), "seq_length": args.seq_length, "batch_size": args.batch_size,
              "windows": sum(r.shape[0] for r in rows), "results": results}
    if args.quantize is not None:
        quantize_model(model, args.quantize)
        q = results[args.quantize] = perplexity(model, rows, args.batch_size, device)
        log(f"{args.quantize}: loss {q['loss']:.5f}, perplexity {q['perplexity']:.4f} ({q['tokens']} tokens)")
        record["quantize"] = args.quantize
        record[f"{args.quantize}_vs_unquantized"] = q["perplexity"] / results[name]["perplexity"]
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = run(args, log=lambda line: print(line, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:  # InputError is a ValueError
        print(f"flashlm eval: {e}", file=sys.stderr)
        return 2
    record["command"] = "flashlm eval " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    print(json.dumps(record))
    return 0
