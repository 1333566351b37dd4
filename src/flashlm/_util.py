"""Small helpers that several layers of flashlm need once each: a device sync, the next power of two,
dtype names. It imports torch only, so any module (ops, attention, models, bench) may use it without a
cycle.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DTYPE_ALIASES", "HF_DTYPE_NAMES", "dtype_name", "next_pow2", "parse_dtype", "sync"]

# Short name -> dtype: the names the CLI flags print and JSON records carry.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Every spelling a flag accepts -> its short name.
DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32"}
# dtype -> the name transformers writes in config.json ("torch_dtype" / "dtype").
HF_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16",
                                          torch.bfloat16: "bfloat16"}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"half"``, ``"fp32"``, ... -> the torch dtype.
    Raises ValueError naming the accepted spellings."""
    short = DTYPE_ALIASES.get(str(name).lower())
    if short is None:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_ALIASES)}")
    return DTYPES[short]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``"bf16"`` (the short name of :data:`DTYPES`)."""
    for short, dt in DTYPES.items():
        if dt == dtype:
            return short
    raise ValueError(f"no short name for {dtype} (known: {', '.join(DTYPES)})")


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` when it is a CUDA device (a no-op on the CPU, whose ops
    return when done): the fence every host-side timing needs around the timed work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
