"""`flashlm bench memory`: what is alive at the peak of a train step, per model row (CUDA only).

    flashlm bench memory [--preset small] [--batch 2] [--seqlen 256] [--models default,flash] [--residue]
                         [--output memory_peak.json]

A few warm-up train steps (forward + loss + backward + fused AdamW, as ``flashlm bench``'s train case),
then one step under ``torch.cuda.memory._record_memory_history``; the allocator's trace is replayed to
find the step's peak and the blocks alive there, summed by the innermost flashlm (or caller) frame that
allocated them. Per row: ``between_steps_bytes``, ``replayed_peak_bytes``, ``max_memory_allocated``,
``alive_at_peak`` (``where``, ``bytes``, ``blocks``). Prints the top sites.

``--residue``: also what a flashlm model still holds after ``flashlm bench``'s forward and generate
cases (which run before its train case, so anything left counts in the train row's peak), by site.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections import defaultdict
from pathlib import Path

import torch

from flashlm.bench.cli_common import (
    add_cuda_only_flags,
    names,
    parser_from_doc,
    resolve_cuda_only,
    subcommand_main,
)
from flashlm.bench.profiling import model_step


def _frame(frames: list[dict]) -> str:
    """The innermost frame in flashlm's or the caller's Python code (else the first one)."""
    for f in frames:
        name = f.get("filename", "")
        if name.endswith(".py") and ("flashlm" in name or "benchmarks" in name):
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return "?" if not frames else f"{Path(frames[0].get('filename', '?')).name}:{frames[0].get('line')}"


def by_site(blocks: list[dict], most: int) -> list[dict]:
    """Blocks (each with "size" and "frames") summed per allocation site, largest first."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for blk in blocks:
        g = groups[_frame(blk.get("frames", []))]
        g[0] += blk["size"]
        g[1] += 1
    top = sorted(((b, n, k) for k, (b, n) in groups.items()), reverse=True)[:most]
    return [{"where": k, "bytes": b, "blocks": n} for b, n, k in top]


def replay_peak(trace: list[dict], base: int) -> tuple[int, list[dict]]:
    """(peak bytes, blocks alive at the peak) replaying the allocator's alloc/free events from ``base``."""
    live: dict[int, dict] = {}
    cur, peak, at_peak = base, base, []
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, list(live.values())
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]  # the first of the two counts
    return peak, at_peak


def _print_sites(sites: list[dict], most: int) -> None:
    for site in sites[:most]:
        print(f"   {site['bytes'] / 1e6:9.2f} MB {site['blocks']:5d}  {site['where']}")


def train_peak(name: str, preset: str, batch: int, seqlen: int) -> dict:
    """The peak of one train step of model ``name`` (bf16, CUDA) and what is alive there."""
    from flashlm.models import build_model

    torch.manual_seed(0)
    model = build_model(preset, attn=name, device="cuda", dtype=torch.bfloat16).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device="cuda")
    step = model_step(model, "train", ids, name)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, alive = replay_peak([ev for dev in snap["device_traces"] for ev in dev], base)
    res = {"model": name, "between_steps_bytes": base, "replayed_peak_bytes": peak,
           "max_memory_allocated": torch.cuda.max_memory_allocated(), "alive_at_peak": by_site(alive, 30)}
    print(f"{name}: between steps {base / 1e6:.1f} MB, step peak {peak / 1e6:.1f} MB "
          f"(max_memory_allocated {res['max_memory_allocated'] / 1e6:.1f} MB)")
    _print_sites(res["alive_at_peak"], 15)
    return res


def residue(name: str, preset: str, batch: int, seqlen: int) -> dict:
    """Bytes allocated after the bench's forward + generate cases of ``name`` beyond what was there
    before, by allocation site (blocks still alive in the allocator's snapshot)."""
    from flashlm.bench.batch import make_batch
    from flashlm.bench.cases import run_forward, run_generate
    from flashlm.bench.config import BenchConfig
    from flashlm.bench.rows import load_model, prepare_weights

    cfg = BenchConfig(model=preset, batch_size=batch, seq_length=seqlen, warmup_steps=2, benchmark_steps=3,
                      compare=(name,))
    with contextlib.ExitStack() as stack:
        path, model_config = prepare_weights(cfg, stack)
        model = load_model(name, path, cfg)
        inputs = make_batch(batch, seqlen, model_config.vocab_size, device="cuda")
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=500_000)
        run_forward(name, model, inputs, cfg, lambda: None)
        after_forward = torch.cuda.memory_allocated()
        run_generate(name, model, inputs, cfg, lambda: None, model_config)
        gc.collect()
        after_generate = torch.cuda.memory_allocated()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    alive = [blk for seg in snap["segments"] for blk in seg["blocks"]
             if blk["state"] == "active_allocated" and blk.get("frames")]
    res = {"model": name, "before_bytes": base, "after_forward_bytes": after_forward,
           "after_generate_bytes": after_generate, "alive_after_generate": by_site(alive, 20)}
    print(f"{name} residue: +{(after_forward - base) / 1e6:.1f} MB after forward, "
          f"+{(after_generate - base) / 1e6:.1f} MB after generate")
    _print_sites(res["alive_after_generate"], 12)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench memory", __doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--models", default="default,flash", help="comma list of flashlm rows (default, flash)")
    p.add_argument("--residue", action="store_true", help="also what forward + generate leave allocated")
    add_cuda_only_flags(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.models = names(args.models, "--models", ("default", "flash"))
    if args.batch < 1 or args.seqlen < 1:
        raise ValueError(f"--batch and --seqlen must be >= 1, got {args.batch}, {args.seqlen}")
    resolve_cuda_only(args, "flashlm bench memory (the CUDA allocator's trace)")
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.bench.report import write_json

    with torch.cuda.device(args.device):
        rows = [train_peak(n, args.preset, args.batch, args.seqlen) for n in args.models]
        if args.residue:
            rows += [residue(n, args.preset, args.batch, args.seqlen) for n in args.models]
    if args.output:
        write_json({"preset": args.preset, "batch": args.batch, "seqlen": args.seqlen, "rows": rows}, args.output)
    return 0


main = subcommand_main("flashlm bench memory", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
