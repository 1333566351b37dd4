"""Micro-benchmark of flashlm.ops on the GPU: microseconds per call, forward and forward+backward, for
each implementation of each op at the seed shape and the llama-1b shape.

    python benchmarks/ops_bench.py --out benchmarks/results/h200/ops_bench.json

Per (shape, op, impl, mode): ``host_us`` (loop time of N calls before the final sync: the Python +
launch cost when the GPU keeps up), ``wall_us`` (after the sync: max of host and GPU time) and the
CUDA kernels one call launches (torch.profiler). Implementations: "torch" (the reference), "aten"
(torch's fused F.rms_norm, norms only), "triton" (ours), "liger" (Liger-Kernel, where installed and
it has the op; "liger_split" is its SiLUMul on the two halves, for comparison). Prints a table; the
last stdout line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import metadata

import torch

from flashlm import ops
from flashlm.ops import liger

SHAPES = {  # batch, seqlen, hidden, heads, kv_heads, head_dim, intermediate
    "seed": (2, 256, 768, 12, 12, 64, 2048),
    "llama-1b": (8, 2048, 2048, 32, 8, 64, 8192),
}


def _inputs(shape, dtype):
    b, s, hidden, h, kv, d, inter = shape
    dev = "cuda"
    angles = torch.rand(b, s, d // 2, device=dev) * 100
    return {
        "rms_norm": (torch.randn(b, s, hidden, device=dev, dtype=dtype), torch.randn(hidden, device=dev, dtype=dtype)),
        "add_rms_norm": tuple(torch.randn(b, s, hidden, device=dev, dtype=dtype) for _ in range(2))
        + (torch.randn(hidden, device=dev, dtype=dtype),),
        "swiglu": (torch.randn(b, s, 2 * inter, device=dev, dtype=dtype),),
        "rotary_qkv": (torch.randn(b, s, (h + 2 * kv) * d, device=dev, dtype=dtype), angles.cos(), angles.sin()),
        "rotary": (torch.randn(b, s, h, d, device=dev, dtype=dtype), angles.cos(), angles.sin()),
    }, (h, kv, d)


def _impls(heads):
    """{op: {impl: callable(*tensors)}}."""
    h, kv, d = heads
    found = liger.functions()
    impls = {
        "rms_norm": {"torch": ops.rms_norm_ref, "aten": ops.rms_norm_aten, "triton": ops.rms_norm},
        "add_rms_norm": {"torch": ops.add_rms_norm_ref, "aten": ops.add_rms_norm_aten, "triton": ops.add_rms_norm},
        "swiglu": {"torch": ops.swiglu_ref, "triton": ops.swiglu},
        "rotary_qkv": {"torch": lambda x, c, s: ops.rotary_qkv_ref(x, c, s, h, kv, d),
                       "triton": lambda x, c, s: ops.rotary_qkv(x, c, s, h, kv, d)},
        "rotary": {"torch": ops.rotary_ref, "triton": ops.rotary},
    }
    for name, fn in found.items():
        impls[name]["liger"] = fn
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        impls["swiglu"]["liger_split"] = lambda gu: LigerSiLUMulFunction.apply(*gu.chunk(2, dim=-1))
    except ImportError:
        pass
    return impls


def _call(op, fn, args, eps=1e-6):
    return fn(*args, eps) if op in ("rms_norm", "add_rms_norm") else fn(*args)


def _step(op, fn, args, grad):
    if not grad:
        def run():
            with torch.no_grad():
                _call(op, fn, args)
        return run
    # activations and weights get gradients; rotary's cos/sin tables (its last two arguments) do not
    n_grad = 1 if op.startswith("rotary") else len(args)
    leaves = [a.detach().requires_grad_(i < n_grad) for i, a in enumerate(args)]
    wrt = [a for a in leaves if a.requires_grad]
    out = _call(op, fn, leaves)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    ups = [torch.randn_like(o) for o in outs]

    def run():
        res = _call(op, fn, leaves)
        res = (res,) if isinstance(res, torch.Tensor) else tuple(res)
        torch.autograd.grad(res, wrt, ups)
    return run


def _time(run, n):
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        run()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(host, 1), round((time.perf_counter() - t) / n * 1e6, 1)


def _kernels(run):
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape_name in args.shapes.split(","):
        inputs, heads = _inputs(SHAPES[shape_name], dtype)
        for op, impls in _impls(heads).items():
            for impl, fn in impls.items():
                for mode in ("fwd", "fwd+bwd"):
                    run = _step(op, fn, inputs[op], mode == "fwd+bwd")
                    host, wall = _time(run, args.iters)
                    row = {"shape": shape_name, "op": op, "impl": impl, "mode": mode, "host_us": host,
                           "wall_us": wall, "kernels": _kernels(run)}
                    rows.append(row)
                    print(f"{shape_name:9s} {op:13s} {impl:12s} {mode:8s} host {host:8.1f} us  wall {wall:8.1f} us  "
                          f"{row['kernels']} kernels", flush=True)
    import triton

    try:
        liger_version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        liger_version = None

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "liger": liger_version, "dtype": args.dtype, "shapes": {k: SHAPES[k] for k in args.shapes.split(",")},
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
