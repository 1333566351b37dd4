"""What one ``flashlm bench`` run measures: the compared model rows, the cases, and
:class:`BenchConfig` (the validated CLI flags), shared by the loaders, the cases and the report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashlm._util import DTYPES

MODEL_NAMES = ("default", "flash", "hf-eager", "hf-sdpa", "hf-liger", "hf-flashlm", "hf-static")
# Rows that only measure generation (train/forward would repeat another row).
GENERATION_ONLY = {"hf-static": "HF sdpa with a static cache in generate (transformers compiles its decode step on CUDA)"}
CASE_NAMES = ("train", "forward", "generate", "decode")
HF_ATTN = {"hf-eager": "eager", "hf-sdpa": "sdpa", "hf-liger": "sdpa", "hf-flashlm": None, "hf-static": "sdpa"}
# --fp8 adds a row "<base>-fp8-<recipe>" after each of these bases in --compare: the same weights with
# torchao Float8Linear projections (flashlm.models.fp8); such rows time train and forward only
FP8_BASES = ("default", "flash")
FP8_CASES = ("train", "forward")


def fp8_row(base: str, recipe: str) -> str:
    return f"{base}-fp8-{recipe}"


def base_name(row: str) -> str:
    """The compared model a row runs ("flash" for "flash-fp8-rowwise")."""
    return row.partition("-fp8-")[0]


def fp8_recipe(row: str) -> str | None:
    """The FP8 recipe of a ``--fp8`` row, None for the others."""
    return row.partition("-fp8-")[2] or None


@dataclass
class BenchConfig:
    """What one benchmark run measures (the CLI flags, validated by ``flashlm.bench.cli``)."""

    model: str = "small"  # preset name or HF checkpoint folder
    batch_size: int = 2
    seq_length: int = 256
    warmup_steps: int = 10
    benchmark_steps: int = 20
    dtype: str = "bf16"
    device: str = "cuda"
    attn_backend: str | None = None
    padding_ratio: float = 0.0
    packed: bool = False
    compile: bool = False
    cuda_graph: str = "auto"  # flashlm's generate: "auto" (its default: CUDA graph where it works) or "off"
    compare: tuple[str, ...] = ("default", "flash", "hf-sdpa")
    cases: tuple[str, ...] = ("train", "forward", "generate")
    new_tokens: int = 32
    decode_batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_contexts: tuple[int, ...] = (128, 2048, 8192)
    seed: int = 0
    progress: bool = True
    fp8: tuple[str, ...] = ()  # --fp8 recipes: adds fp8 rows (row_names)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def row_names(self) -> list[str]:
        """The rows in order: ``compare``, each of :data:`FP8_BASES` followed by its ``--fp8`` rows."""
        rows = []
        for name in self.compare:
            rows.append(name)
            if name in FP8_BASES:
                rows += [fp8_row(name, recipe) for recipe in self.fp8]
        return rows
