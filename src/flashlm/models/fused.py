"""Fused projections as a weight layout: one ``nn.Linear`` holding several HF projections.

The flash model computes q/k/v with one matmul (``qkv_proj``) and gate/up with one (``gate_up_proj``):
one launch (and one weight read in decode) instead of three or two. Checkpoints keep HF's names
(``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``), so one safetensors folder loads into the
default model, the flash model and transformers (gpt-fast's ``wqkv`` idea):

- ``state_dict()`` splits the fused weight (and bias) into the HF names as row *views* of it. Code
  that loads in place into ``model.state_dict()`` tensors (``flashlm.models.io``, DCP) therefore
  writes straight into the fused parameter.
- ``load_state_dict()`` concatenates the HF names back into the fused name before the module looks
  for its keys; a state dict already in the fused name loads unchanged.
- Sharded (DTensor, FSDP2) fused weights stay under the fused name: a row slice of a ``Shard(0)``
  DTensor is not a view, so an in-place DCP load into split tensors would be lost. FSDP2 checkpoints
  (``dcp/``) therefore hold ``qkv_proj``/``gate_up_proj``; :func:`split_fused_state_dict` turns a full
  (gathered) state dict into HF names for safetensors export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["FUSED_PROJECTIONS", "fuse_into", "fuse_linears", "register_fused_names", "split_fused_state_dict",
           "split_sizes"]

# fused name -> the HF names it holds, in row order
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_linears(parts: Sequence[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output rows are ``parts``' outputs concatenated (same input size; biases
    all present or all absent), on the parts' device and dtype, initialized from their weights."""
    first = parts[0]
    has_bias = first.bias is not None
    if any(p.in_features != first.in_features or (p.bias is not None) != has_bias for p in parts):
        raise ValueError("fuse_linears: parts must share in_features and the presence of a bias")
    out = sum(p.out_features for p in parts)
    # built on meta and allocated empty: no random init, so the global RNG advances exactly as when the
    # parts alone were built (a flash model seeded like a default model gets the same weights)
    fused = nn.Linear(first.in_features, out, bias=has_bias, device="meta", dtype=first.weight.dtype)
    fused = fused.to_empty(device=first.weight.device)
    fused.split_sizes = [p.out_features for p in parts]  # rows of each part (init_weights draws per part)
    if first.weight.device.type != "meta":
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if has_bias:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


def _is_sharded(t: Tensor) -> bool:
    return hasattr(t, "placements")  # DTensor (FSDP2) without importing torch.distributed


def register_fused_names(module: nn.Module, fused_name: str, part_names: Sequence[str],
                         part_sizes: Sequence[int]) -> None:
    """Make ``module.<fused_name>`` (an ``nn.Linear`` of ``sum(part_sizes)`` output rows) save and load
    under ``part_names`` (``<name>.weight`` / ``<name>.bias`` of ``part_sizes`` rows each)."""
    sizes = list(part_sizes)

    def split(mod, state_dict, prefix, local_metadata):
        for suffix in ("weight", "bias"):
            key = f"{prefix}{fused_name}.{suffix}"
            fused = state_dict.get(key)
            if fused is None or _is_sharded(fused):
                continue
            keys = list(state_dict)
            later = keys[keys.index(key) + 1:]  # this module's keys after the fused one: kept after it
            del state_dict[key]
            # detach: views that loaders may copy into in place (keep_vars=True hands out Parameters)
            for name, piece in zip(part_names, fused.detach().split(sizes), strict=True):
                state_dict[f"{prefix}{name}.{suffix}"] = piece
            for k in later:
                state_dict.move_to_end(k)

    def join(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{name}.{suffix}" for name in part_names]
            present = [k in state_dict for k in keys]
            if not any(present):
                continue
            if not all(present):
                # leave them: the module reports the missing fused key and the stray parts
                continue
            state_dict[f"{prefix}{fused_name}.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)


def fuse_into(module: nn.Module, fused_name: str, sizes: list[int]) -> None:
    """Replace ``module``'s HF projections (FUSED_PROJECTIONS[fused_name]) by one fused Linear, first in
    the module order (so init and state-dict order stay q, k, v, o), saved/loaded under the HF names."""
    parts = FUSED_PROJECTIONS[fused_name]
    fused = fuse_linears([getattr(module, name) for name in parts])
    for name in parts:
        delattr(module, name)
    module._modules = {fused_name: fused, **module._modules}
    register_fused_names(module, fused_name, parts, sizes)


def split_sizes(config) -> dict[str, list[int]]:
    """Row counts of each fused projection for a ``ModelConfig``."""
    d = config.head_dim
    return {"qkv_proj": [config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d],
            "gate_up_proj": [config.intermediate_size, config.intermediate_size]}


def split_fused_state_dict(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """A state dict that holds fused names (``...qkv_proj.weight``, ``...gate_up_proj.bias``; e.g. a
    full state dict gathered from FSDP2) -> the same tensors under HF names, rows split per ``config``
    (:func:`split_sizes`). Other keys pass through unchanged, in order."""
    sizes = split_sizes(config)
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        head, _, suffix = key.rpartition(".")
        parent, _, name = head.rpartition(".")
        if name not in FUSED_PROJECTIONS:
            out[key] = tensor
            continue
        base = f"{parent}." if parent else ""
        for part, piece in zip(FUSED_PROJECTIONS[name], tensor.split(sizes[name]), strict=True):
            out[f"{base}{part}.{suffix}"] = piece
    return out
