"""`flashlm bench decode --int8-linears`: the int8 weight-only linear alone, at a preset's decode shapes.

For each projection of the preset (qkv, o, gate_up, down, lm_head: (N, K) from its config) and each M in
``--batch-sizes`` (tokens per decode step), microseconds per call and GB/s read of:

- ``bf16``: ``F.linear`` on the weight in the model's dtype (cuBLAS), the bf16 decode's matmul;
- ``int8-triton``: :func:`flashlm.ops.int8_linear.int8_linear` (our kernels for M <= KERNEL_MAX_M);
- ``int8-dequant``: :func:`~flashlm.ops.int8_linear.int8_linear_ref` (dequantize per call + matmul);
- ``torchao-int8wo`` (only when named in ``--linear-impls``): torchao's ``Int8WeightOnlyConfig`` on an
  ``nn.Linear``, ``torch.compile``d (how torchao runs it fast; one compile per shape).

On CUDA each call is timed from a CUDA-graph replay (``bench.timing.graph_replay_s``: GPU time, no launch
cost) over enough copies of the weight to exceed the L2 cache (a replayed single weight of a few MB would
be served from L2, which a decode step reading 1-2 GB of weights never is). GB/s = (weight bytes (+ the
fp32 scales) + x + y) / time; ``pct_of_peak`` against the copy bandwidth of ``flashlm.bench.bandwidth``.
On CPU it checks the command, not the speed. Each int8 row carries ``max_rel_err_vs_dequant``.

``--tune`` (:func:`run_tune`) times every candidate tile (:func:`candidates`: BLOCK_N, BLOCK_K, warps,
stages, split-K) of the int8 kernels at each (projection, M), beside cuBLAS in bf16 and, at M <= 64, the
same kernels reading the bf16 weight ("bf16-triton"); the down projection as the model runs it, the SwiGLU
made in the kernels' prologue from a (M, 2K) gate_up, and qkv / gate_up at decode rows as a fusing decode
step runs them, with the add + RMSNorm prologue (``launch_norm_linear``; cuBLAS beside them times the
projection alone, without the norm's own launch). Its JSON's ``tuned`` (the fastest tile per (M bucket,
N, K)) is what ``flashlm.ops.int8_linear.load_tuned`` reads and :data:`~flashlm.ops.int8_linear.TUNED`
holds; ``--int8-configs`` loads such a file before any run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from flashlm.ops.decode_linear import norm_linear_rows
from flashlm.ops.int8_linear import (
    KERNEL_MAX_M,
    Int8Config,
    int8_linear,
    int8_linear_ref,
    launch_kernels,
    launch_norm_linear,
    m_bucket,
    pick_config,
    quantize_int8,
)
from flashlm.ops.rms_norm import rms_norm_ref
from flashlm.ops.swiglu import swiglu_ref

LINEAR_IMPLS = ("bf16", "int8-triton", "int8-dequant", "torchao-int8wo")
DEFAULT_LINEAR_IMPLS = "bf16,int8-triton,int8-dequant"
_L2_DEFEAT_BYTES = 256 * 2**20  # > 4x the H100's / H200's 50 MB L2
TUNE_REP_MS = 5  # --tune times hundreds of tiles: shorter replays than the micro-benchmark's 20 ms


def shapes(config) -> dict[str, tuple[int, int]]:
    """{projection: (N, K)} of one decoder layer and lm_head for a ModelConfig."""
    c, d = config, config.head_dim
    return {"qkv": ((c.num_heads + 2 * c.num_kv_heads) * d, c.hidden_size), "o": (c.hidden_size, c.num_heads * d),
            "gate_up": (2 * c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size),
            "lm_head": (c.vocab_size, c.hidden_size)}


def _callers(impl: str, weights: list[torch.Tensor], dtype: torch.dtype) -> list[Callable]:
    """One callable x -> y per weight copy for ``impl``."""
    if impl == "bf16":
        return [lambda x, w=w: F.linear(x, w) for w in weights]
    if impl in ("int8-triton", "int8-dequant"):
        fn = int8_linear if impl == "int8-triton" else int8_linear_ref
        packed = [quantize_int8(w) for w in weights]
        return [lambda x, q=q, s=s: fn(x, q, s) for q, s in packed]
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # impl == "torchao-int8wo"

    out = []
    for w in weights:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=dtype)
        lin.weight.data.copy_(w)
        quantize_(lin, Int8WeightOnlyConfig())
        out.append(torch.compile(lin, dynamic=False))
    return out


def _time_s(calls: list[Callable], x: torch.Tensor, device: torch.device, rep_ms: int = 20) -> float:
    """Seconds per call, every weight copy called once per timed run (replays for about ``rep_ms``)."""
    from flashlm.bench.timing import graph_replay_s, time_loop

    def run():
        for c in calls:
            c(x)

    if device.type == "cuda":
        run()  # JIT / compile outside the graph
        torch.cuda.synchronize()
        return graph_replay_s(run, rep_ms) / len(calls)
    return time_loop(run, iters=3, warmup=1, device=device).wall_s / len(calls)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: a row's error against the dequantize reference."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def _row(name: str, n: int, k: int, m: int, impl: str, weights, x, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "impl": impl}
    try:
        calls = _callers(impl, weights, args.torch_dtype)
        with torch.no_grad():
            t = _time_s(calls, x, args.device)
            if impl != "bf16":
                want = int8_linear_ref(x, *quantize_int8(weights[0]))
                row["max_rel_err_vs_dequant"] = _rel_err(calls[0](x), want)
    except Exception as e:  # noqa: BLE001 one impl failing (torchao missing, a compile error) ends only its row
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
        return row
    w_bytes = n * k * (weights[0].element_size() if impl == "bf16" else 1) + (0 if impl == "bf16" else 4 * n)
    moved = w_bytes + (m * k + m * n) * x.element_size()
    row.update(status="ok", us=t * 1e6, bytes=moved, gb_per_s=moved / t / 1e9)
    if args.peak is not None:
        row["pct_of_peak"] = 100 * row["gb_per_s"] / args.peak.gbs
    if impl == "int8-triton" and m <= KERNEL_MAX_M:  # above it the dequantize path runs: no tile
        row["tile"] = pick_config(m, n, k, args.device).as_list()
    return row


def _weights(n: int, k: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """Random (n, k) weights, enough copies on CUDA that one timed run of them all exceeds L2."""
    copies = max(1, min(64, -(-_L2_DEFEAT_BYTES // (n * k)))) if device.type == "cuda" else 1
    return [(torch.randn(n, k, generator=gen) * 0.02).to(device, dtype) for _ in range(copies)]


def parse_impls(text: str) -> list[str]:
    """``--linear-impls`` -> its implementations; ValueError naming the choices for an unknown or empty list."""
    impls = [s.strip() for s in text.split(",") if s.strip()]
    bad = [i for i in impls if i not in LINEAR_IMPLS]
    if bad or not impls:
        raise ValueError(f"--linear-impls: unknown {bad or 'empty'}; choose among {', '.join(LINEAR_IMPLS)}")
    return impls


def run_linears(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (projection, M, impl) row of the preset; the JSON record."""
    from flashlm.models.config import get_preset

    impls = parse_impls(args.linear_impls)
    config, device, dtype = get_preset(args.preset), args.device, args.torch_dtype
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for name, (n, k) in shapes(config).items():
        weights = _weights(n, k, device, dtype, gen)
        for m in args.batch_sizes:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            for impl in impls:
                row = _row(name, n, k, m, impl, weights, x, args)
                rows.append(row)
                log(f"  {name:<8} {n:>6} x {k:<5} M {m:>3} {impl:<15} " + (
                    f"{row['us']:9.1f} us {row['gb_per_s']:7.0f} GB/s" if row["status"] == "ok" else row["error"]))
        del weights
    peak = args.peak.as_dict() if args.peak is not None else {"peak_gbs": None}
    return {"benchmark": "int8_linears", "preset": args.preset, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), **peak, "method": "GPU time per call from a CUDA-graph replay over weight "
            "copies exceeding L2; GB/s = (weight + scales + x + y bytes) / time", "rows": rows}


def candidates(m: int, k: int) -> list[Int8Config]:
    """The tiles ``--tune`` times at M rows over K inputs: the GEMV (M = 1) over BLOCK_N x BLOCK_K x
    split-K; tl.dot tiles of the M bucket's BLOCK_M for decode batches (<= 64 rows) with split-K; larger
    BLOCK_M / BLOCK_N / warps and no split for prefill rows. A split leaves each slice >= 1 BLOCK_K step."""
    if m == 1:
        grid = [(1, bn, bk, 4, 3, sk) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for sk in (1, 2, 4, 8)]
    elif m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        grid = [(bm, bn, bk, 4, 4, sk) for bn in (16, 32, 64) for bk in (64, 128, 256) for sk in (1, 2, 4, 8)]
    else:
        grid = [(bm, bn, bk, w, 3, 1) for bm in (64, 128) for bn in (64, 128) for bk in (64, 128) for w in (4, 8)]
    return [Int8Config(*t) for t in grid if k >= t[2] * t[5]]


def _tune_point(name, n, k, m, weights, x, args, log, swiglu: bool = False, norm: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows of every candidate tile at one (projection, M) and the fastest one's ``tuned`` entry.
    ``swiglu``: x is gate_up (M, 2K) and the kernels run as the model runs down_proj (the SwiGLU prologue,
    which reads twice the x bytes and needs more shared memory); the bf16 row is cuBLAS on swiglu(x).
    ``norm``: the kernels run as a fusing decode step runs qkv / gate_up (``launch_norm_linear``: the add +
    RMSNorm prologue, so a tile chosen here also fits it); the bf16 row is cuBLAS on the normed x alone."""
    device = args.device
    packed = [quantize_int8(w) for w in weights]
    residual, g = (torch.randn_like(x), torch.rand(k, device=device).to(x.dtype) + 0.5) if norm else (None, None)
    act = swiglu_ref(x) if swiglu else rms_norm_ref(x + residual, g, 1e-5) if norm else x

    def launch(t, q, s, c):
        if norm:
            return launch_norm_linear(t, residual, g, 1e-5, False, q, s, None, c)[0]
        return launch_kernels(t, q, s, None, c, swiglu)

    want = int8_linear_ref(act, *packed[0])
    base = {"shape": name, "n": n, "k": k, "m": m, "swiglu": swiglu, "norm": norm}
    rows = [{**base, "impl": "bf16", "status": "ok",
             "us": _time_s(_callers("bf16", weights, args.torch_dtype), act, device, TUNE_REP_MS) * 1e6}]
    default = pick_config(m, n, k, device)
    trials = [("int8-triton", c, packed) for c in dict.fromkeys([default, *candidates(m, k)])]
    if m <= 64:  # the same kernels reading bf16 weights (no scales): do they beat cuBLAS at decode?
        half_default = pick_config(m, n, k, device, weights[0].element_size())
        trials += [("bf16-triton", c, [(w, None) for w in weights]) for c in dict.fromkeys(
                   [half_default, *(c for c in candidates(m, k) if c.block_k <= (512 if m == 1 else 128)
                                    and c.split_k <= 4)])]
        want_half = F.linear(act, weights[0])
    for impl, cfg, ws in trials:
        calls = [lambda t, q=q, s=s, c=cfg: launch(t, q, s, c) for q, s in ws]
        row = {**base, "impl": impl, "status": "ok", "tile": cfg.as_list(),
               "default": cfg == (default if impl == "int8-triton" else half_default)}
        try:
            with torch.no_grad():
                row["us"] = _time_s(calls, x, device, TUNE_REP_MS) * 1e6
                if impl == "int8-triton":
                    row["max_rel_err_vs_dequant"] = _rel_err(calls[0](x), want)
                else:
                    row["max_rel_err_vs_cublas"] = _rel_err(calls[0](x), want_half)
        except Exception as e:  # noqa: BLE001 a tile that does not compile (registers, shared memory) ends its row
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:200])
        rows.append(row)
    ok = [r for r in rows if r["impl"] == "int8-triton" and "us" in r and r["max_rel_err_vs_dequant"] < 1e-2]
    if not ok:
        log(f"  {name} M {m}: no tile ran correctly")
        return rows, None
    best = min(ok, key=lambda r: r["us"])
    w_bytes = n * k + 4 * n
    entry = {"m_bucket": m_bucket(m), "n": n, "k": k, "shape": name, "m": m, "tile": best["tile"],
             "us": best["us"], "gb_per_s": w_bytes / best["us"] / 1e3,
             "default_us": next((r["us"] for r in ok if r["default"]), None), "bf16_us": rows[0]["us"],
             "swiglu": swiglu, "norm": norm}
    bf16_triton = [r for r in rows if r["impl"] == "bf16-triton" and "us" in r and r["max_rel_err_vs_cublas"] < 1e-2]
    if bf16_triton:
        fastest = min(bf16_triton, key=lambda r: r["us"])
        entry.update(bf16_triton_us=fastest["us"], bf16_triton_tile=fastest["tile"])
    if args.peak is not None:
        entry["pct_of_peak"] = 100 * entry["gb_per_s"] / args.peak.gbs
    log(f"  {name:<8} {n:>6} x {k:<5} M {m:>4}: best {best['tile']} {best['us']:7.1f} us "
        f"({entry['gb_per_s']:5.0f} GB/s), default {entry['default_us'] or float('nan'):7.1f}, "
        f"bf16 {entry['bf16_us']:7.1f}"
        + (f", bf16-triton {entry['bf16_triton_us']:7.1f}" if bf16_triton else ""))
    return rows, entry


def run_tune(args: argparse.Namespace, log: Callable[[str], None] = print,
             save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``--tune``: every candidate tile at each (projection, M in ``--batch-sizes``), the record saved after
    each projection (``save``) so a run cut short keeps what it measured. M values sharing an M bucket:
    the last one's tile is the bucket's."""
    from flashlm.models.config import get_preset

    config, device, dtype = get_preset(args.preset), args.device, args.torch_dtype
    gen = torch.Generator().manual_seed(args.seed)
    peak = args.peak.as_dict() if args.peak is not None else {"peak_gbs": None}
    record = {"benchmark": "int8_tune", "preset": args.preset, "dtype": str(dtype).replace("torch.", ""),
              "device": str(device), **peak, "method": "GPU time per call from a CUDA-graph replay over weight "
              "copies exceeding L2, every candidate tile of flashlm.bench.int8_linears.candidates", "rows": [],
              "tuned": []}
    # down first (split-K matters most there), as the model runs it: with the SwiGLU prologue
    order = sorted(shapes(config).items(), key=lambda item: item[0] != "down")
    for name, (n, k) in order:
        weights = _weights(n, k, device, dtype, gen)
        swiglu = name == "down"
        for m in args.batch_sizes:
            x = torch.randn(m, 2 * k if swiglu else k, generator=gen).to(device, dtype)
            # qkv / gate_up with the norm prologue where a fusing decode step runs them so
            norm = name in ("qkv", "gate_up") and norm_linear_rows(m, dtype)
            rows, entry = _tune_point(name, n, k, m, weights, x, args, log, swiglu, norm)
            record["rows"] += rows
            if entry is not None:
                record["tuned"] = [e for e in record["tuned"] if (e["m_bucket"], e["n"], e["k"]) !=
                                   (entry["m_bucket"], n, k)] + [entry]
        del weights
        if save is not None:
            save(record)
    return record


def format_tuned(entries: list[dict[str, Any]]) -> str:
    """Markdown table of ``--tune``'s fastest tiles."""
    head = ("| shape | N x K | M | tile (bm, bn, bk, warps, stages, split) | us | GB/s | default us | bf16 us | "
            "bf16-triton us |")
    out = [head, "|---|---|--:|---|--:|--:|--:|--:|--:|"]
    for e in entries:
        bt = e.get("bf16_triton_us")
        default = "" if e["default_us"] is None else f"{e['default_us']:.1f}"
        out.append(f"| {e['shape']}{' (+swiglu)' if e.get('swiglu') else ''} | {e['n']} x {e['k']} | {e['m']} | "
                   f"{tuple(e['tile'])} | {e['us']:.1f} | {e['gb_per_s']:.0f} | {default} | {e['bf16_us']:.1f} | "
                   f"{'' if bt is None else f'{bt:.1f}'} |")
    return "\n".join(out)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    out = ["| shape | N x K | M | impl | us | GB/s | % peak | rel err |", "|---|---|--:|---|--:|--:|--:|--:|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['shape']} | {r['n']} x {r['k']} | {r['m']} | {r['impl']} | {r['error'][:60]} | | | |")
            continue
        pct, err = r.get("pct_of_peak"), r.get("max_rel_err_vs_dequant")
        out.append(f"| {r['shape']} | {r['n']} x {r['k']} | {r['m']} | {r['impl']} | {r['us']:.1f} | "
                   f"{r['gb_per_s']:.0f} | {'' if pct is None else f'{pct:.0f}'} | {'' if err is None else f'{err:.1e}'} |")
    return "\n".join(out)


def main_linears(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> int:
    """``flashlm bench decode --int8-linears`` (``--tune``): the rows (or the sweep), their table, the JSON
    through ``save``; exit 0 when every row ran."""
    if args.tune:
        results = run_tune(args, save=save)
        results["table"] = format_tuned(results["tuned"])
    else:
        results = run_linears(args)
        results["table"] = format_table(results["rows"])
    save(results)
    print(results["table"])
    if args.output:
        print(f"wrote {args.output}")
    print(json.dumps({"rows": len(results["rows"]), "errors": sum(r["status"] != "ok" for r in results["rows"])}))
    return 0 if all(r["status"] == "ok" for r in results["rows"]) else 1
