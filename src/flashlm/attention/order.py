"""Backend order for the registry: fastest first, as measured on the GPU.

Data, not logic: `flashlm bench kernels` prints a suggested order from its measurement (its JSON's
``suggested_order``); the committed measurement is benchmarks/results/kernels_h100.json. The registry
asks each backend in this order and takes the first that can serve a call; the reference comes last.
"""

# H100, torch 2.11 (benchmarks/results/kernels_h100.json): cuDNN's dense forward and forward+backward
# beat PyTorch's FA2 at every size measured there; FA4 (not installed there) measured faster still
# in ../shared/DESIGN.md. Backends absent or incapable for a call are skipped.
ORDER: tuple[str, ...] = ("fa4", "flash_attn", "cudnn", "triton", "torch_flash", "reference")
