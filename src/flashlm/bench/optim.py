"""`flashlm bench optim`: one optimizer step over a model's parameter shapes, per AdamW variant.

    flashlm bench optim [--preset llama-1b] [--steps 10] [--output optim.json]

Variants, on the model's bf16 parameters with random gradients: MasterWeightAdamW (fp32 master weights)
with torch's foreach AdamW (``master_foreach``), torch's fused AdamW (``master_fused``; both forced with
kernel="torch") and its one-pass Triton kernel (``master_triton``, what the default takes on CUDA), and
plain fused AdamW on the bf16 parameters (``bf16_fused``, what ``flashlm bench``'s train case steps).
Per variant: median ms of ``--steps`` steps after 2 warm-up steps (device synchronized around each;
the gradients are written untimed before each step) and the peak CUDA memory (null on CPU). A variant
that cannot run here is a row with ``error``. On CPU the default preset is ``tiny`` in fp32.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashlm.bench.cli_common import (
    add_common_flags,
    at_least,
    dtype_field,
    emit,
    parser_from_doc,
    resolve_common,
    subcommand_main,
)
from flashlm.bench.timing import time_calls

BETAS = (0.9, 0.95)


def variants(params: list[torch.Tensor]) -> dict:
    """{name: () -> optimizer} of the compared AdamW variants over ``params``."""
    from flashlm.ops.adamw import MasterWeightAdamW

    groups = [{"params": params}]
    return {
        "master_foreach": lambda: MasterWeightAdamW(groups, kernel="torch", lr=1e-5, betas=BETAS, foreach=True),
        "master_fused": lambda: MasterWeightAdamW(groups, kernel="torch", lr=1e-5, betas=BETAS, fused=True),
        "master_triton": lambda: MasterWeightAdamW(groups, kernel="triton", lr=1e-5, betas=BETAS),
        "bf16_fused": lambda: torch.optim.AdamW(params, lr=1e-5, betas=BETAS, fused=True),
    }


def measure(make, params: list[torch.Tensor], steps: int, device: torch.device) -> dict:
    """Median step time and peak memory of the optimizer ``make()`` builds (fresh gradients per step)."""
    opt = make()

    def fresh_grads():
        opt.zero_grad(set_to_none=True)
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_calls(opt.step, warmup=2, iters=steps, device=device, before=fresh_grads)
    opt.zero_grad(set_to_none=True)
    return {"median_ms": timing.median_ms, "p10_ms": timing.p10_s * 1e3, "p90_ms": timing.p90_s * 1e3,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None}


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench optim", __doc__)
    p.add_argument("--preset", default=None, help="model preset (default: llama-1b on CUDA, tiny on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    add_common_flags(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    from flashlm.models.config import PRESETS

    args = build_parser().parse_args(argv)
    resolve_common(args, by_device={"preset": ("llama-1b", "tiny")})
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    at_least(("--steps", args.steps, 1))
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.bench.records import free_cuda
    from flashlm.models import build_model

    model = build_model(args.preset, attn="flash", device=args.device, dtype=args.torch_dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    print(f"{sum(q.numel() for q in params) / 1e9:.3f} B parameters in {len(params)} tensors")
    rows = []
    for name, make in variants(params).items():
        row = {"variant": name}
        try:
            row.update(measure(make, params, args.steps, args.device))
            peak = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.1f}"
            print(f"{name:16s} median {row['median_ms']:7.2f} ms  peak {peak} GB", flush=True)
        except Exception as e:  # noqa: BLE001 a variant this machine lacks (Triton on CPU) is a row
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: {row['error']}", flush=True)
        rows.append(row)
        free_cuda(args.device)
    result = {"preset": args.preset, "device": str(args.device), "dtype": dtype_field(args.torch_dtype),
              "steps": args.steps, "rows": rows}
    emit(result, args.output)
    return 0


main = subcommand_main("flashlm bench optim", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
