"""`flashlm bench launches`: ops per train step / forward of the default vs the flash model (what the host
has to launch).

    flashlm bench launches [--preset small] [--batch 2] [--seqlen 256] [--dtype bf16] [--top 10]

CPU: counts the aten ops dispatched (a ``TorchDispatchMode``; Triton launches behind an autograd.Function
are not aten ops and are not counted there). CUDA: counts the GPU kernels of one step with
``torch.profiler`` (every launch, Triton included) and the host time of the step (the time until the step
returns, before the sync: launch-bound shapes are host-bound). Prints one row per (model, case) and the
flash/default ratio; ``--output`` writes them as JSON. Random weights and tokens; one warm-up step first.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashlm.bench.cli_common import add_common_flags, emit, parser_from_doc, resolve_common, subcommand_main
from flashlm.bench.profiling import cuda_kernels, profile_call
from flashlm.bench.timing import time_loop


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _step(model, ids, case):
    # the plain model call (no optimizer, the model's own loss defaults): what each model launches
    if case == "train":
        model(ids, labels=ids).loss.backward()
    else:
        with torch.no_grad():
            model(ids)


def count(model, ids, case, device: torch.device) -> tuple[int, collections.Counter, float | None]:
    """(ops or kernels of one step, counts by name, host ms of the step on CUDA else None)."""
    _step(model, ids, case)  # warm-up (Triton JIT, backend choice)
    model.zero_grad(set_to_none=True)
    if device.type != "cuda":
        with _Count() as c:
            _step(model, ids, case)
        return sum(c.ops.values()), c.ops, None
    host_ms = time_loop(lambda: _step(model, ids, case), iters=1, device=device).host_s * 1e3
    prof, _ = profile_call(lambda: _step(model, ids, case), device, cpu=False)
    kernels = collections.Counter(e.name for e in cuda_kernels(prof))
    return sum(kernels.values()), kernels, host_ms


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench launches", __doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--kernels", default="auto", help="the config's kernels setting (default: auto)")
    p.add_argument("--top", type=int, default=0, help="also print the N most frequent ops per row")
    add_common_flags(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    from flashlm.models.config import PRESETS

    args = build_parser().parse_args(argv)
    resolve_common(args, default_dtype="bf16")
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    if args.batch < 1 or args.seqlen < 1 or args.top < 0:
        raise ValueError("--batch and --seqlen must be >= 1 and --top >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.models import build_model
    from flashlm.models.config import get_preset

    extra = {"kernels": args.kernels} if args.kernels != "auto" else {}
    config = get_preset(args.preset, **extra)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), device=args.device)
    unit = "CUDA kernels" if args.device.type == "cuda" else "aten ops"
    print(f"{args.preset} bs{args.batch} x {args.seqlen} {args.torch_dtype} on {args.device}: {unit} per step")
    rows = []
    for case in ("train", "forward"):
        counts = {}
        for attn in ("default", "flash"):
            model = build_model(config, attn=attn, device=args.device, dtype=args.torch_dtype).train()
            n, ops, host_ms = count(model, ids, case, args.device)
            counts[attn] = n
            rows.append({"case": case, "model": attn, "unit": unit, "count": n, "host_ms": host_ms,
                         "top": ops.most_common(args.top)})
            print(f"  {case:<8} {attn:<8} {n:>6}" + ("" if host_ms is None else f"   step {host_ms:.1f} ms"))
            for name, k in ops.most_common(args.top):
                print(f"      {k:>5}  {name}")
            del model
        print(f"  {case:<8} flash/default = {counts['flash'] / counts['default']:.2f}")
    emit({"preset": args.preset, "batch": args.batch, "seqlen": args.seqlen, "device": str(args.device),
          "rows": rows}, args.output, last_line=False)
    return 0


main = subcommand_main("flashlm bench launches", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
