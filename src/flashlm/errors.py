"""flashlm's exception for bad input.

flash-attn raises ``RuntimeError`` for bad arguments (its C++ checks), while Python code usually
expects ``ValueError``: code written against either catches :class:`InputError`, which derives from
both. Every check that refuses a caller's input before a kernel runs raises it (or a subclass).
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError, RuntimeError):
    """Bad input, refused before anything ran or was written: catchable as ValueError and RuntimeError."""
