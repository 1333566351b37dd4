"""What is alive at the peak of a train step (issue 16's memory row), default vs flash.

    python benchmarks/memory_peak.py --preset small --batch 2 --seqlen 256 --models default,flash --out DIR

On CUDA: a few warm-up train steps (forward + loss + backward + fused AdamW, as ``flashlm bench``'s), then
one step under ``torch.cuda.memory._record_memory_history``; the allocator's trace is replayed to find
the step's peak and the blocks alive there, grouped by the innermost flashlm/torch frame that made them.
Writes DIR/memory_peak_<preset>.json (and prints the top groups).

``--residue``: also what a flashlm model still holds after ``flashlm bench``'s forward and generate cases
(which run before its train case, so anything left counts in the train row's peak), by allocation site.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from flashlm.models import build_model


def _frame(frames: list[dict]) -> str:
    """The innermost frame in flashlm's or the caller's Python code (else the first one)."""
    for f in frames:
        name = f.get("filename", "")
        if name.endswith(".py") and ("flashlm" in name or "benchmarks" in name):
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return "?" if not frames else f"{Path(frames[0].get('filename', '?')).name}:{frames[0].get('line')}"


def _by_site(blocks: list[dict], most: int) -> list[dict]:
    """Blocks (each with "size" and "frames") summed per allocation site, largest first."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for blk in blocks:
        g = groups[_frame(blk.get("frames", []))]
        g[0] += blk["size"]
        g[1] += 1
    top = sorted(((b, n, k) for k, (b, n) in groups.items()), reverse=True)[:most]
    return [{"where": k, "bytes": b, "blocks": n} for b, n, k in top]


def _print_sites(sites: list[dict], most: int) -> None:
    for site in sites[:most]:
        print(f"   {site['bytes'] / 1e6:9.2f} MB {site['blocks']:5d}  {site['where']}")


def _peak(trace: list[dict], base: int) -> tuple[int, list[dict]]:
    """(peak bytes, blocks alive at the peak) replaying alloc/free events from ``base`` bytes."""
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


def run(name: str, preset: str, batch: int, seqlen: int) -> dict:
    torch.manual_seed(0)
    model = build_model(preset, attn=name, device="cuda", dtype=torch.bfloat16).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    extra = {"return_logits": False} if name == "flash" else {}

    def step():
        model(ids, labels=ids, use_cache=False, **extra).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

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
    trace = [ev for dev in snap["device_traces"] for ev in dev]
    peak, alive = _peak(trace, base)
    res = {"model": name, "between_steps_bytes": base, "replayed_peak_bytes": peak,
           "max_memory_allocated": torch.cuda.max_memory_allocated(), "alive_at_peak": _by_site(alive, 30)}
    print(f"{name}: between steps {base / 1e6:.1f} MB, step peak {peak / 1e6:.1f} MB "
          f"(max_memory_allocated {res['max_memory_allocated'] / 1e6:.1f} MB)")
    _print_sites(res["alive_at_peak"], 15)
    return res


def residue(name: str, preset: str, batch: int, seqlen: int) -> dict:
    """Bytes allocated after the bench's forward + generate cases of ``name`` beyond what was there before,
    grouped by allocation site (blocks still alive in the allocator's snapshot)."""
    import contextlib
    import gc

    from flashlm.bench.models import (
        BenchConfig,
        _prepare_weights,
        load_model,
        make_batch,
        run_forward,
        run_generate,
    )

    cfg = BenchConfig(model=preset, batch_size=batch, seq_length=seqlen, warmup_steps=2, benchmark_steps=3,
                      compare=(name,))
    with contextlib.ExitStack() as stack:
        path, model_config = _prepare_weights(cfg, stack)
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
           "after_generate_bytes": after_generate, "alive_after_generate": _by_site(alive, 20)}
    print(f"{name} residue: +{(after_forward - base) / 1e6:.1f} MB after forward, "
          f"+{(after_generate - base) / 1e6:.1f} MB after generate")
    _print_sites(res["alive_after_generate"], 12)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--models", default="default,flash")
    p.add_argument("--residue", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [run(n, args.preset, args.batch, args.seqlen) for n in args.models.split(",")]
    if args.residue:
        rows += [residue(n, args.preset, args.batch, args.seqlen) for n in args.models.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory_peak_{args.preset}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
