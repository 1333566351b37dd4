"""`flashlm bench ops`: microseconds per call of each implementation of each fused op.

    flashlm bench ops [--shapes seed,llama-1b] [--iters 100] [--dtype bf16] [--output ops.json]

Per (shape, op, impl, mode in fwd / fwd+bwd): ``host_us`` (the time of ``--iters`` back-to-back calls
before the final sync, per call: the Python + launch cost when the GPU keeps up), ``wall_us`` (after the
sync: the max of host and GPU time) and ``kernels`` (CUDA kernels one call launches, torch.profiler; null
off CUDA). Implementations: "torch" (the reference), "aten" (torch's fused F.rms_norm, norms only),
"triton" (ours), "liger" (Liger-Kernel, where installed and it has the op; "liger_split" is its SiLUMul
on the two halves). An implementation that cannot run here (a Triton kernel on the CPU) is a row with
``error``. On CPU the default shape is ``tiny`` in fp32: it checks the command, not the speed.
Prints one line per row; the last stdout line is the JSON object.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashlm import ops
from flashlm.bench.cli_common import (
    add_common_flags,
    at_least,
    dtype_field,
    emit,
    names,
    parser_from_doc,
    resolve_common,
    subcommand_main,
)
from flashlm.bench.profiling import kernels_per_call
from flashlm.bench.timing import time_loop
from flashlm.ops import liger

SHAPES = {  # batch, seqlen, hidden, heads, kv_heads, head_dim, intermediate
    "tiny": (2, 16, 64, 4, 2, 16, 128),
    "seed": (2, 256, 768, 12, 12, 64, 2048),
    "llama-1b": (8, 2048, 2048, 32, 8, 64, 8192),
}


def _inputs(shape, dtype, device) -> tuple[dict, tuple[int, int, int]]:
    """Each op's arguments at ``shape`` (BSHD activations, fused qkv for rotary_qkv), and (heads, kv, dim)."""
    b, s, hidden, h, kv, d, inter = shape
    angles = torch.rand(b, s, d // 2, device=device) * 100

    def rnd(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    return {
        "rms_norm": (rnd(b, s, hidden), rnd(hidden)),
        "add_rms_norm": (rnd(b, s, hidden), rnd(b, s, hidden), rnd(hidden)),
        "swiglu": (rnd(b, s, 2 * inter),),
        "rotary_qkv": (rnd(b, s, (h + 2 * kv) * d), angles.cos(), angles.sin()),
        "rotary": (rnd(b, s, h, d), angles.cos(), angles.sin()),
    }, (h, kv, d)


def _impls(heads) -> dict:
    """{op: {impl: callable(*tensors)}}."""
    h, kv, d = heads
    impls = {
        "rms_norm": {"torch": ops.rms_norm_ref, "aten": ops.rms_norm_aten, "triton": ops.rms_norm},
        "add_rms_norm": {"torch": ops.add_rms_norm_ref, "aten": ops.add_rms_norm_aten, "triton": ops.add_rms_norm},
        "swiglu": {"torch": ops.swiglu_ref, "triton": ops.swiglu},
        "rotary_qkv": {"torch": lambda x, c, s: ops.rotary_qkv_ref(x, c, s, h, kv, d),
                       "triton": lambda x, c, s: ops.rotary_qkv(x, c, s, h, kv, d)},
        "rotary": {"torch": ops.rotary_ref, "triton": ops.rotary},
    }
    for name, fn in liger.functions().items():
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
    """A no-argument call of ``fn`` on ``args``: forward under no_grad, or forward + autograd.grad."""
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


def _row(shape_name, op, impl, mode, fn, args, iters, device) -> dict:
    row = {"shape": shape_name, "op": op, "impl": impl, "mode": mode}
    try:
        run = _step(op, fn, args, mode == "fwd+bwd")
        t = time_loop(run, warmup=5, iters=iters, device=device)
        row.update(host_us=round(t.host_s * 1e6, 1), wall_us=round(t.wall_s * 1e6, 1),
                   kernels=kernels_per_call(run, device))
    except Exception as e:  # noqa: BLE001 an implementation that cannot run here is a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return row


def _line(row: dict) -> str:
    head = f"{row['shape']:9s} {row['op']:13s} {row['impl']:12s} {row['mode']:8s}"
    if "error" in row:
        return f"{head} {row['error'][:100]}"
    return f"{head} host {row['host_us']:8.1f} us  wall {row['wall_us']:8.1f} us  {'-' if row['kernels'] is None else row['kernels']} kernels"


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench ops", __doc__)
    p.add_argument("--shapes", default=None, help=f"comma list among {', '.join(SHAPES)} "
                                                  "(default: seed,llama-1b on CUDA, tiny on CPU)")
    p.add_argument("--iters", type=int, default=100, help="timed calls per row")
    add_common_flags(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    resolve_common(args, by_device={"shapes": ("seed,llama-1b", "tiny")})
    args.shapes = names(args.shapes, "--shapes", SHAPES)
    at_least(("--iters", args.iters, 1))
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.bench.report import package_version

    rows = []
    for shape_name in args.shapes:
        inputs, heads = _inputs(SHAPES[shape_name], args.torch_dtype, args.device)
        for op, impls in _impls(heads).items():
            for impl, fn in impls.items():
                for mode in ("fwd", "fwd+bwd"):
                    rows.append(_row(shape_name, op, impl, mode, fn, inputs[op], args.iters, args.device))
                    print(_line(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": package_version("triton"), "liger": package_version("liger-kernel"),
              "dtype": dtype_field(args.torch_dtype),
              "shapes": {k: SHAPES[k] for k in args.shapes}, "rows": rows}
    emit(result, args.output)
    return 0


main = subcommand_main("flashlm bench ops", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
