"""flashlm: LLaMA-family decoder models whose attention calls FlashAttention kernels directly (BSHD)."""

__version__ = "0.1.0"
