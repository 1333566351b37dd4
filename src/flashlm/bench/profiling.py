"""torch.profiler helpers of the ``bench profile`` / ``memory`` / ``ops`` / ``launches`` subcommands, and the
model step they all measure (forward, or train = forward + loss + backward + fused AdamW as ``flashlm
bench``'s train case)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flashlm.bench.timing import time_once


def model_step(model: torch.nn.Module, case: str, ids: torch.Tensor, name: str,
               compiled: bool = False) -> Callable[[], None]:
    """One step of ``case`` ("forward": inference forward; "train": forward + loss + backward + AdamW) of
    model row ``name`` on ``ids`` (batch, seqlen) int64, torch.compile'd when ``compiled`` (the flash
    model fullgraph, as ``flashlm bench --compile``). The flash model's loss skips the logits."""
    fwd = model
    if compiled:
        fwd = model.compile_forward(fullgraph=True) if name == "flash" else torch.compile(model)
    if case == "forward":
        def forward():
            with torch.inference_mode():
                fwd(ids, use_cache=False)
        return forward
    if case != "train":
        raise ValueError(f"case must be forward or train, got {case!r}")
    fused = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    extra = {"return_logits": False} if name == "flash" else {}

    def train():
        fwd(ids, labels=ids, use_cache=False, **extra).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def profile_call(fn: Callable[[], Any], device: torch.device, cpu: bool = True):
    """(profiler, wall seconds) of one synchronized call of ``fn`` under torch.profiler (CPU ops when
    ``cpu``, CUDA kernels on a CUDA device)."""
    from torch.profiler import ProfilerActivity, profile

    activities = ([ProfilerActivity.CPU] if cpu or device.type != "cuda" else []) + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall, _ = time_once(fn, device)
    return prof, wall


def cuda_kernels(prof) -> list:
    """The GPU kernel events of a profile (every launch: aten, cuBLAS, Triton)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernels_per_call(fn: Callable[[], Any], device: torch.device) -> int | None:
    """GPU kernels one call of ``fn`` launches (after one unprofiled call); None off CUDA."""
    if device.type != "cuda":
        return None
    fn()
    prof, _ = profile_call(fn, device, cpu=False)
    return len(cuda_kernels(prof))


def top_kernels(kernels: list, most: int = 25, width: int = 90, steps: int | None = None) -> list[dict]:
    """Kernels summed by name (first ``width`` characters), largest GPU time first: ``name``, ``calls``,
    ``gpu_ms`` and, given the number of ``steps`` profiled, ``per_step_us``."""
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:width], []).append(e.device_time)
    top = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:most]
    rows = [{"name": n, "calls": c, "gpu_ms": t / 1e3} for t, c, n in top]
    if steps:
        for row, (t, _, _) in zip(rows, top):
            row["per_step_us"] = t / steps
    return rows


def kernel_time_ms(kernels: list) -> float:
    """Summed GPU time of kernel events, in ms."""
    return sum(e.device_time for e in kernels) / 1e3
