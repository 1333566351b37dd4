"""`flashlm bench loss`: where cross-entropy on materialized logits stops beating the fused linear loss.

    flashlm bench loss [--hidden 2048] [--vocabs 32000,128256] [--tokens 256,...,16384] [--output loss.json]

For each (tokens, vocab): forward + backward time (median of ``--repeats`` after one warm-up call, device
synchronized) and peak CUDA memory of (a) ``cross_entropy(hidden @ W.T)`` (plain torch), (b)
``logits_cross_entropy(hidden, W, ...)``, what the eager flash model runs (one matmul, the logits
overwritten by their gradient, in token chunks), and (c) ``linear_cross_entropy(hidden, W, ...)`` (Liger
when installed, else the chunked torch path), with the fp32 logits size tokens x vocab x 4 bytes. An
out-of-memory call reads as inf. On CPU the defaults are a tiny grid (hidden 64, vocab 512) in fp32.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashlm.bench.cli_common import (
    add_common_flags,
    dtype_field,
    emit,
    parser_from_doc,
    positive_ints,
    resolve_common,
    subcommand_main,
)
from flashlm.bench.timing import time_calls


def _peak_mib(fn, device: torch.device) -> float:
    """Peak CUDA MiB one call of ``fn`` adds above what was allocated before it (nan off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _measure(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB) of ``fn``; (inf, inf) when it runs out of memory."""
    try:
        ms = time_calls(fn, warmup=1, iters=repeats, device=device).median_ms
        return ms, _peak_mib(fn, device)
    except torch.OutOfMemoryError:
        return float("inf"), float("inf")


def _losses():
    from flashlm.ops.cross_entropy import cross_entropy, linear_cross_entropy, logits_cross_entropy

    return {"plain": lambda h, w, y: cross_entropy(h @ w.t(), y).backward(),
            "ours": lambda h, w, y: logits_cross_entropy(h, w, y).backward(),
            "fused": lambda h, w, y: linear_cross_entropy(h, w, y).backward()}


def point(vocab: int, n: int, weight: torch.Tensor, args) -> dict:
    """One (tokens, vocab) row: ms and MiB of each of plain / ours / fused."""
    hidden = torch.randn(n, args.hidden, device=args.device, dtype=args.torch_dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=args.device)
    row = {"tokens": n, "vocab": vocab, "logits_mib": n * vocab * 4 / 2**20}
    for name, loss in _losses().items():
        row[f"{name}_ms"], row[f"{name}_mib"] = _measure(lambda loss=loss: loss(hidden, weight, labels),
                                                        args.device, args.repeats)
    hidden.grad = weight.grad = None
    return row


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench loss", __doc__)
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 2048 on CUDA, 64 on CPU)")
    p.add_argument("--vocabs", default=None, help="default: 32000,128256 on CUDA, 512 on CPU")
    p.add_argument("--tokens", default=None, help="default: 256,512,...,16384 on CUDA, 16,64 on CPU")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    add_common_flags(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    resolve_common(args, by_device={"hidden": (2048, 64), "vocabs": ("32000,128256", "512"),
                                    "tokens": ("256,512,1024,2048,4096,8192,16384", "16,64")})
    args.vocabs = positive_ints(args.vocabs, "--vocabs")
    args.tokens = positive_ints(args.tokens, "--tokens")
    if args.hidden < 1 or args.repeats < 1:
        raise ValueError(f"--hidden and --repeats must be >= 1, got {args.hidden}, {args.repeats}")
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.ops.cross_entropy import MATERIALIZED_LOGITS_MAX_BYTES, liger_available

    fused = "liger" if liger_available() else "chunked"
    print(f"threshold now: {MATERIALIZED_LOGITS_MAX_BYTES / 2**20:.0f} MiB of fp32 logits; hidden {args.hidden}, "
          f"{args.torch_dtype}, {args.device}; fused = {fused}")
    print(f"{'tokens':>7} {'vocab':>7} {'logits MiB':>10} {'plain ms':>9} {'ours ms':>8} {'fused ms':>9} "
          f"{'plain MiB':>10} {'ours MiB':>9} {'fused MiB':>10}  ours vs fused")
    rows = []
    for vocab in args.vocabs:
        weight = (torch.randn(vocab, args.hidden, device=args.device, dtype=args.torch_dtype) * 0.02).requires_grad_()
        for n in args.tokens:
            r = point(vocab, n, weight, args)
            rows.append(r)
            print(f"{n:>7} {vocab:>7} {r['logits_mib']:>10.0f} {r['plain_ms']:>9.2f} {r['ours_ms']:>8.2f} "
                  f"{r['fused_ms']:>9.2f} {r['plain_mib']:>10.0f} {r['ours_mib']:>9.0f} {r['fused_mib']:>10.0f}  "
                  f"{r['ours_ms'] / r['fused_ms']:.2f}x", flush=True)
    emit({"hidden": args.hidden, "dtype": dtype_field(args.torch_dtype), "device": str(args.device),
          "fused": fused, "threshold_mib": MATERIALIZED_LOGITS_MAX_BYTES / 2**20, "rows": rows},
         args.output, last_line=False)
    return 0


main = subcommand_main("flashlm bench loss", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
