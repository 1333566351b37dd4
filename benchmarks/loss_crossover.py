"""Where plain cross-entropy on materialized logits stops beating the fused linear cross-entropy.

    python benchmarks/loss_crossover.py [--hidden 2048] [--vocabs 32000,128256] [--dtype bf16]

For each (tokens, vocab): forward + backward time (median of 20, CUDA-synchronized) and peak memory of
(a) ``cross_entropy(hidden @ W.T)`` (plain torch), (b) ``logits_cross_entropy(hidden, W, ...)``, what the
eager flash model runs below the threshold (one matmul, the logits overwritten by their gradient), and
(c) ``linear_cross_entropy(hidden, W, ...)`` (Liger when installed, else the chunked torch path), with
the fp32 logits size tokens x vocab x 4 bytes that ``flashlm.losses.MATERIALIZED_LOGITS_MAX_BYTES``
compares. Set that constant to the largest size where (b) is faster than (c) and its extra memory is
acceptable. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flashlm.loss_kernels import logits_cross_entropy
from flashlm.losses import MATERIALIZED_LOGITS_MAX_BYTES, cross_entropy, liger_available, linear_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _time(fn, device, repeats=20):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _peak(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(fn, device) -> tuple[float, float]:
    try:
        return _time(fn, device), _peak(fn, device)
    except torch.OutOfMemoryError:
        return float("inf"), float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocabs", default="32000,128256")
    p.add_argument("--tokens", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    fused_name = "liger" if liger_available() else "chunked"
    print(f"threshold now: {MATERIALIZED_LOGITS_MAX_BYTES / 2**20:.0f} MiB of fp32 logits; "
          f"hidden {args.hidden}, {args.dtype}, {device}; fused = {fused_name}")
    print(f"{'tokens':>7} {'vocab':>7} {'logits MiB':>10} {'plain ms':>9} {'ours ms':>8} {'fused ms':>9} "
          f"{'plain MiB':>10} {'ours MiB':>9} {'fused MiB':>10}  ours vs fused")
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        weight = (torch.randn(vocab, args.hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
        for n in (int(t) for t in args.tokens.split(",")):
            hidden = torch.randn(n, args.hidden, device=device, dtype=dtype).requires_grad_()
            labels = torch.randint(0, vocab, (n,), device=device)

            def plain(hidden=hidden, labels=labels, weight=weight):
                cross_entropy(hidden @ weight.t(), labels).backward()

            def ours(hidden=hidden, labels=labels, weight=weight):
                logits_cross_entropy(hidden, weight, labels).backward()

            def fused(hidden=hidden, labels=labels, weight=weight):
                linear_cross_entropy(hidden, weight, labels).backward()

            (tp, mp), (to, mo), (tf, mf) = (_measure(f, device) for f in (plain, ours, fused))
            mib = n * vocab * 4 / 2**20
            print(f"{n:>7} {vocab:>7} {mib:>10.0f} {tp:>9.2f} {to:>8.2f} {tf:>9.2f} {mp:>10.0f} {mo:>9.0f} "
                  f"{mf:>10.0f}  {to / tf:.2f}x")
            rows.append({"tokens": n, "vocab": vocab, "logits_mib": mib, "plain_ms": tp, "ours_ms": to,
                         "fused_ms": tf, "plain_mib": mp, "ours_mib": mo, "fused_mib": mf})
            hidden.grad = weight.grad = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hidden": args.hidden, "dtype": args.dtype, "device": str(device), "fused": fused_name,
                       "threshold_mib": MATERIALIZED_LOGITS_MAX_BYTES / 2**20, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
