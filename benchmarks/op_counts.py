"""Ops per train step / forward of the default vs the flash model (what the host has to launch).

    python benchmarks/op_counts.py [--preset small] [--batch 2] [--seqlen 256] [--device cpu|cuda]
                                   [--dtype bf16] [--kernels auto]

CPU: counts the aten ops dispatched (a ``TorchDispatchMode``; Triton launches behind an
autograd.Function are not aten ops and are not counted there). CUDA: counts the GPU kernels of one step
with ``torch.profiler`` (every launch, Triton included) and the host time of the step. Prints one row
per (model, case) and the flash/default ratio. Random weights and tokens; one warm-up step first.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashlm.models import build_model
from flashlm.models.config import get_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _step(model, ids, case):
    if case == "train":
        model(ids, labels=ids).loss.backward()
    else:
        with torch.no_grad():
            model(ids)


def _count(model, ids, case, device) -> tuple[int, collections.Counter, float | None]:
    _step(model, ids, case)  # warm-up (Triton JIT, backend choice)
    model.zero_grad(set_to_none=True)
    if device.type != "cuda":
        with _Count() as c:
            _step(model, ids, case)
        return sum(c.ops.values()), c.ops, None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _step(model, ids, case)
    host_ms = (time.perf_counter() - t0) * 1e3  # launch-bound shapes: ~the host time of the step
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(model, ids, case)
        torch.cuda.synchronize()
    kernels = collections.Counter(e.name for e in prof.events() if e.device_type.name == "CUDA")
    return sum(kernels.values()), kernels, host_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--kernels", default="auto")
    p.add_argument("--top", type=int, default=0, help="also print the N most frequent ops per row")
    args = p.parse_args()
    device = torch.device(args.device)
    extra = {"kernels": args.kernels} if args.kernels != "auto" else {}  # ("auto" also runs on older trees)
    config = get_preset(args.preset, **extra)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), device=device)
    unit = "CUDA kernels" if device.type == "cuda" else "aten ops"
    print(f"{args.preset} bs{args.batch} x {args.seqlen} {args.dtype} on {device}: {unit} per step")
    for case in ("train", "forward"):
        counts = {}
        for attn in ("default", "flash"):
            model = build_model(config, attn=attn, device=device, dtype=DTYPES[args.dtype]).train()
            n, ops, host_ms = _count(model, ids, case, device)
            counts[attn] = n
            print(f"  {case:<8} {attn:<8} {n:>6}" + ("" if host_ms is None else f"   step {host_ms:.1f} ms"))
            for name, k in ops.most_common(args.top):
                print(f"      {k:>5}  {name}")
            del model
        print(f"  {case:<8} flash/default = {counts['flash'] / counts['default']:.2f}")


if __name__ == "__main__":
    main()
