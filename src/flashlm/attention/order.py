"""Backend order for the registry: fastest first, as measured on the GPU.

Data, not logic: `flashlm bench kernels` prints a suggested order from its measurement (its JSON's
``suggested_order``); the committed measurement is benchmarks/results/kernels_h100.json. The registry
asks each backend in this order and takes the first that can serve a call; the reference comes last.
"""

# H100, torch 2.11 (benchmarks/results/kernels_h100.json): cuDNN's dense forward and forward+backward
# beat PyTorch's FA2 at every size measured there. With FA4 carried (kernels_fa4_h100.json): FA4 beats
# cuDNN in forward+backward at 4k and 16k tokens per sequence (D=128: 495 vs 441 at 4k causal, 623 vs
# 547 at 16k non-causal); cuDNN leads at 1k. The bench's suggested order (a mean over all rows, noisy
# forward-only rows included) put cuDNN first; training time is forward+backward, so FA4 stays first.
# Backends absent or incapable for a call are skipped.
ORDER: tuple[str, ...] = ("fa4", "flash_attn", "cudnn", "triton", "torch_flash", "reference")
