"""Summarize benchmarks/multigpu.sh's three runs (1 GPU, N GPUs with FSDP2, N-GPU checkpoint resumed
on 1 GPU) into one JSON and a loss plot: tokens/s per GPU, scaling efficiency, peak memory per GPU,
and how closely the loss curves agree."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _summary_line(log: Path) -> dict:
    """The JSON summary `flashlm train` prints last (in the tee'd log)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and '"tokens_per_s"' in line:
            return json.loads(line)
    raise ValueError(f"no summary line in {log}")


def _max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", required=True, help="the RUNS folder of multigpu.sh")
    p.add_argument("--ngpu", type=int, required=True)
    p.add_argument("--logs", default=None, help="folder with train_*.log (default: --output's folder)")
    p.add_argument("--output", required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    runs, n = Path(args.runs), args.ngpu
    logs = Path(args.logs) if args.logs else Path(args.output).parent
    one, multi, resumed = (_metrics(runs / r) for r in ("1gpu", f"{n}gpu", "resume1"))
    s_one, s_multi, s_res = (_summary_line(logs / f"train_{r}.log") for r in ("1gpu", f"{n}gpu", "resume1"))

    loss_one = [m["loss"] for m in one]
    loss_multi = [m["loss"] for m in multi]
    start = resumed[0]["step"] - 1  # the checkpoint's step
    loss_res = [m["loss"] for m in resumed]
    per_gpu_1 = s_one["tokens_per_s"]
    per_gpu_n = s_multi["tokens_per_s"] / n
    # run-to-run noise of bf16 training: how far apart the two curves drift vs the loss drop itself
    diffs = [abs(a - b) for a, b in zip(loss_one, loss_multi, strict=True)]
    out = {
        "ngpu": n,
        "tokens_per_s_per_gpu": {"1gpu": per_gpu_1, f"{n}gpu": per_gpu_n},
        "tokens_per_s_total": {"1gpu": s_one["tokens_per_s"], f"{n}gpu": s_multi["tokens_per_s"]},
        "scaling_efficiency": per_gpu_n / per_gpu_1,
        "mfu": {"1gpu": s_one["mfu"], f"{n}gpu": s_multi["mfu"]},
        "peak_mem_gib_per_gpu": {"1gpu": s_one.get("peak_mem_gib_per_rank", [s_one["peak_mem_gib"]]),
                                 f"{n}gpu": s_multi.get("peak_mem_gib_per_rank", [s_multi["peak_mem_gib"]])},
        "loss": {"1gpu": loss_one, f"{n}gpu": loss_multi, "resumed_1gpu_from_step": start,
                 "resumed_1gpu": loss_res},
        "loss_first_last": {"1gpu": [loss_one[0], loss_one[-1]], f"{n}gpu": [loss_multi[0], loss_multi[-1]]},
        "max_abs_loss_diff_1gpu_vs_ngpu": max(diffs),
        "mean_abs_loss_diff_1gpu_vs_ngpu_last10": sum(diffs[-10:]) / len(diffs[-10:]),
        "max_abs_loss_diff_resumed_vs_ngpu": _max_abs_diff(loss_res, loss_multi[start:]),
        "max_abs_loss_diff_resumed_vs_1gpu": _max_abs_diff(loss_res, loss_one[start:]),
        "resumed_1gpu_tokens_per_s": s_res["tokens_per_s"],
        "summaries": {"1gpu": s_one, f"{n}gpu": s_multi, "resumed_1gpu": s_res},
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(f"tokens/s per GPU: 1 GPU {per_gpu_1:,.0f}, {n} GPUs {per_gpu_n:,.0f} -> scaling efficiency "
          f"{100 * out['scaling_efficiency']:.1f}%")
    print(f"peak memory per GPU (GiB): 1 GPU {out['peak_mem_gib_per_gpu']['1gpu']}, "
          f"{n} GPUs {out['peak_mem_gib_per_gpu'][f'{n}gpu']}")
    print(f"loss 1 GPU {loss_one[0]:.3f} -> {loss_one[-1]:.3f}; {n} GPUs {loss_multi[0]:.3f} -> {loss_multi[-1]:.3f}; "
          f"max |diff| {out['max_abs_loss_diff_1gpu_vs_ngpu']:.4f}, mean of last 10 "
          f"{out['mean_abs_loss_diff_1gpu_vs_ngpu_last10']:.4f}")
    print(f"resumed on 1 GPU from the {n}-GPU step {start}: max |diff| vs {n} GPUs "
          f"{out['max_abs_loss_diff_resumed_vs_ngpu']:.4f}, vs 1 GPU {out['max_abs_loss_diff_resumed_vs_1gpu']:.4f}")
    assert all(math.isfinite(x) for x in loss_one + loss_multi + loss_res)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(loss_one) + 1), loss_one, label="1 GPU (grad-accum N)")
        ax.plot(range(1, len(loss_multi) + 1), loss_multi, label=f"{n} GPUs FSDP2", linestyle="--")
        ax.plot(range(start + 1, start + len(loss_res) + 1), loss_res, label=f"{n}-GPU ckpt resumed on 1 GPU",
                linestyle=":")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title(f"llama-1b, seq 2048, 8 rows/GPU: {n}-GPU scaling {100 * out['scaling_efficiency']:.0f}%")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
