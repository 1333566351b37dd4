"""Token generation for flashlm models, read in this order:

- ``loop.py``: :func:`generate`, the loop (checks, prefill, decode steps, EOS, streaming) returning
  :class:`GenerationOutput`; it does not time itself (its ``on_step`` lets a caller time the steps);
- ``cuda_graph.py``: the fixed-shape decode step, eager or captured in a CUDA graph (and the prefill
  graphs), and the table of captured steps kept per model (:func:`release_graphs` frees them);
- ``sampling.py``: greedy / temperature / top-k / top-p by the exponential race, no host sync;
- ``cli.py``: ``flashlm generate`` / ``python -m flashlm.generation`` (the latencies it prints are
  measured there).

Every name below imports from ``flashlm.generation`` as it did when this was one module; the old
modules ``flashlm.decode_graph`` and ``flashlm.sampling`` are served by ``flashlm._moved``.
"""

from __future__ import annotations

from typing import Any

from flashlm.generation.cuda_graph import (
    COMPILE_MODES,
    CUDAGraphDecodeStep,
    DecodeStep,
    cache_capacity,
    compile_mode,
    graph_unavailable_reason,
    graphed_decode_step,
    kept_decode_steps,
    release_graphs,
)
from flashlm.generation.loop import GenerationOutput, generate
from flashlm.generation.sampling import SamplingKey, sample_next_token, top_k_filter, top_p_filter

__all__ = ["COMPILE_MODES", "CUDAGraphDecodeStep", "DecodeStep", "GenerationOutput", "SamplingKey", "cache_capacity",
           "compile_mode", "generate", "graph_unavailable_reason", "graphed_decode_step", "kept_decode_steps", "main",
           "release_graphs", "sample_next_token", "top_k_filter", "top_p_filter"]


def __getattr__(name: str) -> Any:
    # `main` (the CLI) on first use: importing the library loads no argparse/tokenizer/timing code
    if name == "main":
        from flashlm.generation.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
