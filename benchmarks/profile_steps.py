"""Where a model step's time goes, default vs flash, eager vs compiled (issue 16's profile).

    python benchmarks/profile_steps.py --preset small --batch 2 --seqlen 256 [--modes eager,compiled]
        [--models default,flash] [--cases forward,train] [--steps 20] --out DIR

``--models`` also takes the bench's HF rows (hf-sdpa, hf-liger, hf-flashlm), loaded as ``flashlm bench``
loads them (the same seeded weights through a saved checkpoint).

Per (model, mode, case): the median wall time of ``--steps`` steps (after warm-up, synchronized), then
one profiled step: GPU kernels launched, their summed GPU time, the step's wall time under the
profiler, the top kernels by GPU time and the top host ops, and (compiled) Dynamo's graph/break/
recompile counters. The train step is forward + loss + backward + fused AdamW, as ``flashlm bench``'s.
Writes DIR/profile_<preset>_b<batch>x<seqlen>.json and a readable .txt beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from flashlm.models import build_model


def _load(name: str, preset: str, stack):
    """Model ``name`` in bf16 on CUDA: flashlm's built directly, HF's rows through the bench's loader."""
    if not name.startswith("hf-"):
        torch.manual_seed(0)
        return build_model(preset, attn=name, device="cuda", dtype=torch.bfloat16)
    from flashlm.bench.models import BenchConfig, _prepare_weights, load_model

    cfg = BenchConfig(model=preset)
    path, _ = _prepare_weights(cfg, stack)
    return load_model(name, path, cfg)


def _step_fn(model, case: str, ids: torch.Tensor, compiled: bool, name: str):
    fwd = torch.compile(model, fullgraph=name == "flash") if compiled else model
    if case == "forward":
        def step():
            with torch.inference_mode():
                fwd(ids, use_cache=False)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    extra = {"return_logits": False} if name == "flash" else {}

    def step():
        fwd(ids, labels=ids, use_cache=False, **extra).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _profile(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    top_gpu = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:25]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    return {"profiled_wall_ms": wall * 1e3, "kernels": len(kernels),
            "kernel_time_ms": sum(e.device_time for e in kernels) / 1e3,
            "top_kernels": [{"name": n, "calls": c, "gpu_ms": t / 1e3} for t, c, n in top_gpu],
            "host_table": table}


def run(args) -> dict:
    import torch._dynamo.utils as dynamo_utils

    results = {"preset": args.preset, "batch": args.batch, "seqlen": args.seqlen, "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "rows": []}
    stack = contextlib.ExitStack()
    for name in args.models.split(","):
        model = _load(name, args.preset, stack)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seqlen), device="cuda")
        for mode in args.modes.split(","):
            for case in args.cases.split(","):
                torch._dynamo.reset()
                dynamo_utils.counters.clear()
                step = _step_fn(model, case, ids, mode == "compiled", name)
                for _ in range(args.warmup):
                    step()
                torch.cuda.synchronize()
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
                row = {"model": name, "mode": mode, "case": case, "median_ms": statistics.median(times),
                       "peak_gb": torch.cuda.max_memory_allocated() / 1e9, **_profile(step)}
                if mode == "compiled":
                    c = dynamo_utils.counters
                    row["dynamo"] = {"graph_breaks": dict(c["graph_break"]), "stats": dict(c["stats"]),
                                     "recompiles": dict(c.get("recompiles", {}))}
                print(f"{name:8s} {mode:8s} {case:8s} median {row['median_ms']:.2f} ms, {row['kernels']} kernels, "
                      f"GPU {row['kernel_time_ms']:.2f} ms", flush=True)
                results["rows"].append(row)
                torch.cuda.reset_peak_memory_stats()
        del model
        torch.cuda.empty_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--models", default="default,flash")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--cases", default="forward,train")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"profile_{args.preset}_b{args.batch}x{args.seqlen}"
    with open(f"{stem}.txt", "w") as f:
        for r in res["rows"]:
            f.write(f"==== {r['model']} {r['mode']} {r['case']}: median {r['median_ms']:.2f} ms, profiled "
                    f"{r['profiled_wall_ms']:.2f} ms, {r['kernels']} kernels, GPU {r['kernel_time_ms']:.2f} ms, "
                    f"peak {r['peak_gb']:.2f} GB\n")
            if "dynamo" in r:
                f.write(f"dynamo: {json.dumps(r['dynamo'])}\n")
            f.writelines(f"  {k['gpu_ms']:8.3f} ms {k['calls']:5d}x  {k['name']}\n" for k in r["top_kernels"])
            f.write(r.pop("host_table") + "\n")
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
