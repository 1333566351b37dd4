"""Benchmark report: the seed's table (Metric | Default | Flash | Speedup | Improvement | one column per
other compared model), the JSON file (results + environment) and a PNG bar chart.

Speedup and Improvement compare flash with default, oriented so that > 1x / positive means flash is
better: times and memory are default / flash and (default - flash) / default; throughputs are
flash / default and (flash - default) / default.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any

# (case, field, label, kind): kind "time"/"mem" lower is better, "rate" higher is better.
METRICS = (
    ("train", "median_ms", "Train step (ms)", "time"),
    ("train", "tokens_per_s", "Train tokens/s", "rate"),
    ("train", "peak_memory_gb", "Train peak memory (GB)", "mem"),
    ("forward", "median_ms", "Forward (ms)", "time"),
    ("forward", "tokens_per_s", "Forward tokens/s", "rate"),
    ("forward", "peak_memory_gb", "Forward peak memory (GB)", "mem"),
    ("generate", "first_token_ms", "First token (ms)", "time"),
    ("generate", "per_token_ms", "Per token (ms)", "time"),
    ("generate", "decode_tokens_per_s", "Decode tokens/s", "rate"),
    ("generate", "decode_gb_per_s", "Decode GB/s (weights+KV)", "rate"),
    ("generate", "peak_memory_gb", "Generate peak memory (GB)", "mem"),
)

DISPLAY = {"default": "Default", "flash": "Flash", "hf-eager": "HF eager", "hf-sdpa": "HF sdpa",
           "hf-liger": "HF+Liger", "hf-flashlm": "HF+flashlm", "hf-static": "HF static"}


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """GPU, library versions, date and flashlm's git commit (when run from a checkout)."""
    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": package_version("triton"), "transformers": package_version("transformers"),
        "liger_kernel": package_version("liger-kernel"), "flash_attn_4": package_version("flash-attn-4"),
        "flashlm": package_version("flashlm"), "gpu": None, "gpu_count": 0,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    try:
        from flashlm import attention

        env["attention_backends"] = _jsonable(attention.available_backends())
    except Exception as e:  # noqa: BLE001 the attention package may be missing or partial; the report says so
        env["attention_backends"] = f"unavailable: {type(e).__name__}: {e}"
    return env


def _jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    return str(x)


def _value(results: dict, model: str, case: str, fld: str) -> float | None | str:
    """A metric's value, None when not measured, or a short failure word for the table."""
    rec = results["models"].get(model, {})
    if rec.get("status") == "skipped":
        return "skipped"
    if rec.get("status") in ("error", "oom"):
        return rec["status"]
    c = rec.get("cases", {}).get(case)
    if c is None:
        return None
    if c.get("status") != "ok":
        return c.get("status", "error")
    v = c.get(fld)
    return v if isinstance(v, (int, float)) else None


def _fmt(v: float | None | str, kind: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if kind == "rate":
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def ratios(d: float, f: float, kind: str) -> tuple[float, float]:
    """(speedup, improvement %) of flash value f over default value d, > 1 / > 0 meaning flash is better."""
    if kind == "rate":
        return f / d, (f - d) / d * 100
    return d / f, (d - f) / d * 100


def comparisons(results: dict) -> dict[str, dict[str, float]]:
    """Flash against every other measured model, per metric: speedup (> 1 means flash is better)."""
    out: dict[str, dict[str, float]] = {}
    for other in results["models"]:
        if other == "flash":
            continue
        row = {}
        for case, fld, label, kind in METRICS:
            f, o = _value(results, "flash", case, fld), _value(results, other, case, fld)
            if isinstance(f, (int, float)) and isinstance(o, (int, float)) and f > 0 and o > 0:
                row[f"{case}.{fld}"] = ratios(o, f, kind)[0]
        if row:
            out[f"flash_vs_{other}"] = row
    return out


def format_table(results: dict) -> str:
    """Markdown table: one row per measured metric, one column per compared model."""
    models = list(results["models"])
    first = [m for m in ("default", "flash") if m in models]
    rest = [m for m in models if m not in first]
    speed = "default" in models and "flash" in models
    header = ["Metric"] + [DISPLAY.get(m, m) for m in first] + (["Speedup", "Improvement"] if speed else [])
    header += [DISPLAY.get(m, m) for m in rest]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for case, fld, label, kind in METRICS:
        vals = {m: _value(results, m, case, fld) for m in models}
        if case not in _cases(results) or all(v is None for v in vals.values()):
            continue
        row = [label] + [_fmt(vals[m], kind) for m in first]
        if speed:
            d, f = vals["default"], vals["flash"]
            if isinstance(d, (int, float)) and isinstance(f, (int, float)) and d > 0 and f > 0:
                s, imp = ratios(d, f, kind)
                row += [f"{s:.2f}x", f"{imp:+.1f}%"]
            else:
                row += ["n/a", "n/a"]
        row += [_fmt(vals[m], kind) for m in rest]
        lines.append("| " + " | ".join(row) + " |")
    paths = {m: _decode_path(results["models"].get(m, {}).get("cases", {}).get("generate")) for m in models}
    if any(paths.values()):  # which decode loop each generate row timed (CUDA graph, eager, HF's)
        row = ["Decode path"] + [paths[m] or "n/a" for m in first] + (["", ""] if speed else [])
        lines.append("| " + " | ".join(row + [paths[m] or "n/a" for m in rest]) + " |")
    return "\n".join(lines)


def _decode_path(rec: dict | None) -> str | None:
    """A measured generate/decode record's decode path, for a table cell."""
    if not rec or rec.get("status") != "ok" or not rec.get("decode_path"):
        return None
    return rec["decode_path"]


def _cases(results: dict) -> set[str]:
    return set(results["config"]["cases"])


def format_decode_table(results: dict) -> str | None:
    """Per-token latency / tokens/s / GB/s per (batch, context) point of the decode sweep."""
    rows = []
    for m, rec in results["models"].items():
        grid = rec.get("cases", {}).get("decode", {}).get("grid")
        for p in grid or []:
            if p.get("status") == "ok":
                rows.append(f"| {DISPLAY.get(m, m)} | {p['batch_size']} | {p['context']} | "
                            f"{p['per_token_ms']:.3f} | {p['first_token_ms']:.1f} | "
                            f"{_fmt(p['decode_tokens_per_s'], 'rate')} | {_fmt(p.get('decode_gb_per_s'), 'rate')} | "
                            f"{_fmt(p.get('peak_memory_gb'), 'mem')} | {_decode_path(p) or 'n/a'} |")
            else:
                rows.append(f"| {DISPLAY.get(m, m)} | {p['batch_size']} | {p['context']} | "
                            f"{p.get('status')} | | | | | |")
    if not rows:
        return None
    head = ("| Model | Batch | Context | Per token (ms) | First token (ms) | Tokens/s | GB/s | Peak memory (GB) "
            "| Decode path |\n|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def format_report(results: dict) -> str:
    """The text printed after a run: a header line, the table(s) and the notes."""
    c, env = results["config"], results.get("environment", {})
    where = env.get("gpu") or "CPU"
    head = (f"flashlm bench: model={c['model']} dtype={c['dtype']} device={c['device']} ({where}) "
            f"batch={c['batch_size']} seq={c['seq_length']} warmup={c['warmup_steps']} "
            f"steps={c['benchmark_steps']}"
            + (f" padding={results['inputs']['padding_ratio']:.2f}" if c["padding_ratio"] else "")
            + (" packed" if c["packed"] else "") + (" compile" if c["compile"] else "")
            + (f" attn-backend={c['attn_backend']}" if c["attn_backend"] else ""))
    parts = [head, "", format_table(results)]
    decode = format_decode_table(results)
    if decode:
        parts += ["", decode]
    parts += ["", ("Times are medians over the benchmark steps (p10/p90 in the JSON); tokens/s count real "
                   "(non-pad) tokens; memory is the peak allocated per case, weights included.")]
    failures = [f"{m} {case}: {r.get('error')}" for m, rec in results["models"].items()
                for case, r in rec.get("cases", {}).items() if r.get("status") not in ("ok", "skipped", None)]
    failures += [f"{m}: {rec.get('error')}" for m, rec in results["models"].items()
                 if rec.get("status") in ("error", "oom")]
    for n in results.get("notes", []) + failures:
        parts.append(f"note: {n}")
    return "\n".join(parts)


def write_json(results: dict, path: str) -> None:
    """Write ``results`` (with the table) as indented JSON; non-finite floats become null."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(_jsonable(results), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # never leave a stray results file beside the target
        raise


def check_plot_available() -> None:
    """Raise ImportError naming the extra when matplotlib is missing (checked before a run starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'flashlm[plot]'") from e


def write_plot(results: dict, path: str) -> None:
    """Bar chart: one panel per measured metric, one bar per model, flash highlighted."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for case, fld, label, kind in METRICS:
        vals = {m: _value(results, m, case, fld) for m in results["models"]}
        vals = {m: v for m, v in vals.items() if isinstance(v, (int, float))}
        if vals:
            panels.append((label, kind, vals))
    if not panels:
        raise ValueError("nothing to plot: no case produced a number")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    palette = {"default": "#7f7f7f", "flash": "#d62728", "hf-eager": "#9ecae1", "hf-sdpa": "#3182bd",
               "hf-liger": "#31a354", "hf-flashlm": "#ff7f0e", "hf-static": "#08519c"}
    for ax, (label, kind, vals) in zip(axes.flat, panels):
        names = list(vals)
        bars = ax.bar([DISPLAY.get(n, n) for n in names], [vals[n] for n in names],
                      color=[palette.get(n, "#555555") for n in names])
        ax.bar_label(bars, labels=[_fmt(vals[n], kind) for n in names], fontsize=7)
        ax.set_title(f"{label}\n({'higher' if kind == 'rate' else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    c, env = results["config"], results.get("environment", {})
    fig.suptitle(f"flashlm bench: {c['model']} {c['dtype']} bs{c['batch_size']}x{c['seq_length']}"
                 + (f" pad {c['padding_ratio']}" if c["padding_ratio"] else "") + (" packed" if c["packed"] else "")
                 + f" on {env.get('gpu') or 'CPU'} ({(env.get('date') or '')[:10]})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`python -m flashlm.bench.report a.json [b.json ...]`: print the tables of saved results."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m flashlm.bench.report RESULTS.json [...]", file=sys.stderr)
        return 2
    for p in paths:
        with open(p) as f:
            results = json.load(f)
        print(f"== {p}\n{results.get('command', '')}\n{format_report(results)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
