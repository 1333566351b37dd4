"""flashlm.attention: flash-attn 2.8 compatible attention over measured backends.

Public API: the flash-attn functions (each with a keyword-only ``backend=``), ``use_backend(name)``,
``explain(...)``, ``available_backends()``; padding utils live in ``flashlm.attention.padding``.
See docs/attention.md.
"""

from .interface import (
    apply_rotary,
    explain,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .registry import available_backends, get_backend, known_backends, use_backend

__all__ = [
    "apply_rotary",
    "available_backends",
    "explain",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "get_backend",
    "known_backends",
    "use_backend",
]
