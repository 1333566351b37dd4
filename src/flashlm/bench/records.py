"""What a measurement records besides its time: peak CUDA memory, the bytes a decode step reads, the
record of a case that failed; and freeing CUDA blocks between cases so each peak is its own."""

from __future__ import annotations

import gc
import traceback
from typing import Any

import torch


def free_cuda(device: str | torch.device) -> None:
    """Return freed CUDA blocks so the next case's peak starts from live tensors only. (On CPU there is
    no peak to protect, and gc.collect costs ~0.5 s once transformers is imported.)"""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak CUDA memory of one case: reset at entry, read at exit (None on CPU)."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak: int | None = None
        self.before: int | None = None

    def __enter__(self):
        if self.cuda:
            free_cuda("cuda")
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        return False

    def record(self) -> dict[str, Any]:
        if not self.cuda:
            return {"peak_memory_bytes": None, "peak_memory_gb": None, "memory_note": "n/a on CPU"}
        return {"peak_memory_bytes": self.peak, "peak_memory_gb": self.peak / 1e9,
                "memory_before_bytes": self.before}


def error_record(exc: BaseException, with_traceback: bool = True) -> dict[str, Any]:
    """A failed case's record: ``status`` "oom" or "error", ``error`` (type and the message's first line)
    and, unless ``with_traceback=False``, the traceback's tail."""
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    rec = {"status": "oom" if oom else "error", "error": msg[:500]}
    if with_traceback:
        rec["traceback"] = "".join(traceback.format_exception(exc))[-3000:]
    return rec


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the unique parameters (tied embeddings counted once): what one decode step reads."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """KV-cache bytes per cached token per row: 2 (k and v) x layers x kv_heads x head_dim x elem."""
    c = model_config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()
