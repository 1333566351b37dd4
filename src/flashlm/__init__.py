"""flashlm: LLaMA-family decoder models whose attention calls FlashAttention kernels directly (BSHD)."""

from flashlm import _moved

__version__ = "0.1.0"

_moved.install()  # old import paths of moved modules (flashlm._moved.MOVED) still work, with a warning
