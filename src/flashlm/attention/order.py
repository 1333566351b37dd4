"""Backend order for the registry: fastest first, per call kind and device family, as measured.

Data, not logic. One global order cannot be right: FA4 leads dense forward+backward on Hopper while
our Triton kernel leads KV-cache decode at 8k-32k keys. So the registry looks up
``ORDERS[family][kind]`` (``family(call)``: "cpu", "sm90" for Hopper, "cuda" for any other GPU;
kind: "dense", "varlen", "kvcache"), asks each backend in that order and takes the first that can
serve the call. ``SOURCES`` names the measurement behind each table; ``explain()`` prints both.
``flashlm bench kernels`` prints a suggested order per kind from its own run (its JSON's
``suggested_order``), the way to refresh a table. Backends absent or incapable for a call are
skipped; the reference comes last everywhere.
"""

from __future__ import annotations

# Every backend the registry knows, in the default order (a family/kind without its own table).
ORDER: tuple[str, ...] = ("fa4", "flash_attn", "cudnn", "triton", "torch_flash", "sdpa_cpu", "reference")

# PyTorch's FA2 ahead of our Triton kernels on Hopper (2026-12-01, H200): with cuDNN refusing calls under
# 128 queries, the next in line serves small, host-bound calls, where torch_flash costs 386 µs of host time
# per fwd+bwd against Triton's 796 (benchmarks/results/h200/diag_start.json); and the Triton backward's
# dQ was wrong on the H200 before its revert in 8fc2555 (h200/diag_varlen_grads.txt), not yet re-measured.
# Triton still serves what FA2 cannot (softcap, ALiBi).
_HOPPER_DENSE = ("fa4", "flash_attn", "cudnn", "torch_flash", "triton", "sdpa_cpu", "reference")

ORDERS: dict[str, dict[str, tuple[str, ...]]] = {
    # CPU: only sdpa_cpu and the reference run there; the others are listed so explain() names them.
    "cpu": {kind: ("sdpa_cpu", "fa4", "flash_attn", "cudnn", "triton", "torch_flash", "reference")
            for kind in ("dense", "varlen", "kvcache")},
    "sm90": {
        "dense": _HOPPER_DENSE,
        # cuDNN refuses varlen (a new plan per call, ~49 ms host time); FA4 served varlen on the H100.
        "varlen": _HOPPER_DENSE,
        # decode: Triton 1730 GB/s, FA4 1639, PyTorch FA2 628 at 32k (H100); 2.58 / 2.14 / 0.66 TB/s
        # (H200). At a 1k cache PyTorch FA2 led on the H100 (153 vs 101 GB/s, launch-bound, 0.2 ms).
        "kvcache": ("triton", "fa4", "flash_attn", "torch_flash", "cudnn", "sdpa_cpu", "reference"),
    },
    # Other GPUs (Ampere, Ada, Blackwell): not measured here; FA4 is not installed for most.
    "cuda": {kind: ORDER for kind in ("dense", "varlen", "kvcache")},
}

SOURCES: dict[tuple[str, str], str] = {
    ("cpu", "dense"): "benchmarks/results/cpu/kernels_cpu.json (flashlm bench kernels on CPU)",
    ("cpu", "varlen"): "benchmarks/results/cpu/kernels_cpu.json (the reference pads; sdpa_cpu does not)",
    ("cpu", "kvcache"): "benchmarks/results/cpu/kernels_cpu.json (decode rows)",
    ("sm90", "dense"): ("benchmarks/results/kernels_fa4_h100.json (H100 fwd+bwd: FA4 495 vs cuDNN 441 "
                        "TFLOP/s at 4k causal); H200 4k causal FA4 522, cuDNN 475 (the project design notes, 2026-12-01)"),
    ("sm90", "varlen"): "benchmarks/results/kernels_fa4_h100.json (dense figures; cuDNN refuses varlen)",
    ("sm90", "kvcache"): ("benchmarks/results/kernels_fa4_h100.json decode rows (H100, 8k-32k: triton "
                          "leads); H200 batch 8, 32/8 heads, 32k: triton 2.58, fa4 2.14, torch_flash "
                          "0.66 TB/s (the project design notes, 2026-12-01)"),
}


def family(device_type: str, compute_capability: tuple[int, int] | None) -> str:
    """The table family of a device: "cpu", "sm90" (Hopper), "cuda" (other GPUs), else the type."""
    if device_type == "cuda":
        return "sm90" if compute_capability is not None and compute_capability[0] == 9 else "cuda"
    return device_type


def order_for(kind: str, fam: str) -> tuple[tuple[str, ...], str]:
    """(backend names in preference order, the table that decided) for a call kind and family.

    The table is restricted to the names in ``ORDER`` (the backends known here) and any known name
    it lacks is appended, so a table never hides a backend from ``explain()``.
    """
    table = ORDERS.get(fam, {}).get(kind)
    if table is None:
        return tuple(ORDER), f"default order (no table for {fam}/{kind})"
    names = tuple(n for n in table if n in ORDER) + tuple(n for n in ORDER if n not in table)
    source = SOURCES.get((fam, kind))
    return names, f"{fam}/{kind}" + (f" ({source})" if source else "")
