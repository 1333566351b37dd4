"""How a training run spreads over processes and is made cheaper: the process group (`Dist`,
`init_distributed`), FP8 projections (`apply_fp8`), FSDP2 (`apply_fsdp`), activation checkpointing and
compiled decoder layers.

Without ``WORLD_SIZE > 1`` the model trains in one process; under torchrun every decoder layer and
then the root are wrapped with FSDP2 ``fully_shard`` (bf16 compute, fp32 gradient reduction, fp32
sharded master weights and optimizer state).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place in the run (rank 0 of 1 without torchrun) and the collectives the run
    uses, each the identity in one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity in one process)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (SUM + divide: gloo has no AVG)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value


def run_device(device_arg: str | None) -> torch.device:
    """The device this process trains on: ``--device`` (a bare "cuda" is this rank's GPU), else
    cuda:LOCAL_RANK where CUDA is available, else CPU. Nothing is initialized."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device("cuda", local) if device.type == "cuda" and device.index is None else device


def init_distributed(device_arg: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = run_device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Dist(rank, world, local), device


# ------------------------------------------------------------------------------------------- model


def apply_fp8(model: nn.Module, recipe: str, fsdp: bool, bf16: bool) -> Callable[[], None] | None:
    """``--fp8``: the projections become torchao Float8Linears (:func:`flashlm.models.fp8.convert_to_fp8`),
    before activation checkpointing, compiled layers and FSDP2 (torchao's order: the module swap first).
    Under FSDP2 "tensorwise" all-gathers the weights in float8: returns the call to run after each optimizer
    step (every weight's scale in one all-reduce), else None."""
    from flashlm.models.fp8 import convert_to_fp8, needs_scale_precompute, precompute_scales

    convert_to_fp8(model, recipe, fsdp=fsdp, dtype=torch.bfloat16 if bf16 else torch.float32)
    if fsdp and needs_scale_precompute(model):
        return lambda: precompute_scales(model)
    return None


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant ``torch.utils.checkpoint``).

    The layer's ``forward`` is replaced on the instance, so parameter names (and so checkpoints and
    FSDP2 state dicts) stay exactly the model's own.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def apply_fsdp(model: nn.Module, bf16: bool) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embedding, final norm, LM head)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (parameter names unchanged); the flash model first
    sets the plans and ops meant for compiled blocks."""
    if hasattr(model, "prepare_compile"):
        model.prepare_compile()
    for layer in model.model.layers:
        layer.compile()
