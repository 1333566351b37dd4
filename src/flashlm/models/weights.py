"""Weights: the fused projection layout and HF-format checkpoint folders (config.json + safetensors).

**Fused projections as a weight layout**: one ``nn.Linear`` holding several HF projections.
The flash model computes q/k/v with one matmul (``qkv_proj``) and gate/up with one (``gate_up_proj``):
one launch (and one weight read in decode) instead of three or two. Checkpoints keep HF's names
(``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``), so one safetensors folder loads into the
default model, the flash model and transformers (gpt-fast's ``wqkv`` idea):

- ``state_dict()`` splits the fused weight (and bias) into the HF names as row *views* of it. Code
  that loads in place into ``model.state_dict()`` tensors (:func:`load_state_dict_from_folder`, DCP) therefore
  writes straight into the fused parameter.
- ``load_state_dict()`` concatenates the HF names back into the fused name before the module looks
  for its keys; a state dict already in the fused name loads unchanged.
- Sharded (DTensor, FSDP2) fused weights stay under the fused name: a row slice of a ``Shard(0)``
  DTensor is not a view, so an in-place DCP load into split tensors would be lost. FSDP2 checkpoints
  (``dcp/``) therefore hold ``qkv_proj``/``gate_up_proj``; :func:`split_fused_state_dict` turns a full
  (gathered) state dict into HF names for safetensors export.

**Checkpoint folders**: parameter names are HF's, so a transformers Llama/Mistral/Qwen2/Qwen3/Gemma2
folder loads here and ours loads in transformers. Tied embeddings are stored once
(``model.embed_tokens.weight``) as transformers does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flashlm import folders
from flashlm.errors import InputError

from .config import ModelConfig
from .hf_config import read_json

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


@torch.no_grad()
def init_per_part(module: nn.Linear, std: float) -> None:
    """Draw a Linear's weight ~ N(0, std) one HF projection at a time (``split_sizes`` rows each, in row
    order; the whole weight when it is not fused) and zero its bias: a fused projection seeded like the
    default model's separate ones holds their very values."""
    for piece in module.weight.split(getattr(module, "split_sizes", [module.out_features])):
        piece.normal_(0.0, std)
    if module.bias is not None:
        module.bias.zero_()


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class LoadReport:
    """What `load_state_dict_from_folder` found: keys the model wanted but the checkpoint lacked,
    and keys the checkpoint held that the model has no place for."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "500MB" / "2GiB" / "1000"; InputError otherwise."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    value = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip().upper()
        unit = next((u for u in sorted(units, key=len, reverse=True) if text.endswith(u)), "")
        try:
            value = int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))
        except (ValueError, OverflowError):
            value = None
    if value is None or value < 1:
        raise InputError(
            f"max_shard_size must be a positive number of bytes or a string like '500MB' or '2GiB', got {size!r}"
        )
    return value


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors kept once (the first name wins, i.e. the embedding), made
    contiguous on CPU, as safetensors requires."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (
            (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if tensor.device.type != "meta"
            else None
        )
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_pretrained(
    model: nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB", extra_files=None
) -> str:
    """Write ``model`` (a flashlm causal LM with ``.config``) to the folder ``path``: config.json (HF
    format, with the weights' dtype) and model.safetensors, or model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json when the weights exceed ``max_shard_size`` (bytes or "500MB").
    ``extra_files(folder)``, when given, writes more files (a tokenizer.json) into the new folder
    before it is swapped in.

    Atomic: everything is written to a temporary folder beside ``path`` and renamed into place, so
    a crash never leaves a half-written checkpoint. ``path`` may be absent, an empty folder, or an
    existing checkpoint folder (config.json, weights, tokenizer files), which is replaced; anything
    else (a file, a folder with other files, the working directory) raises ``InputError`` before
    anything is written. Temporary folders left by killed saves are removed. Returns the path. A quantized
    model (:mod:`flashlm.models.quantize`) is refused: save the unquantized one and quantize on load.
    """
    from safetensors.torch import save_file

    if getattr(model, "quantization", None) or any(
            not t.is_floating_point() for n, t in model.state_dict().items() if n.endswith("weight")):
        raise InputError(
            "save_pretrained: the model is quantized (int8 weights under HF names would load as garbage into an "
            "unquantized model); save the unquantized model and quantize on load: "
            "from_pretrained(path, quantize='int8'), or torch.save(model.state_dict()) for a quantized copy"
        )
    config: ModelConfig = model.config
    hf_config = config.to_hf_config()  # raises before anything is written if not expressible
    limit = _parse_size(max_shard_size)
    tensors = _tensors_to_save(model)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    hf_config["torch_dtype"] = _DTYPE_NAMES.get(dtype, "float32")

    # Greedy sharding in state-dict order, as transformers does.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    target = folders.check_replaceable(path, "checkpoint")
    tmp = folders.stage(target)
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, SAFE_WEIGHTS_NAME), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, SAFE_INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if extra_files is not None:
            extra_files(tmp)
        folders.commit(tmp, target)
    except BaseException:
        folders.discard(tmp)
        raise
    return target


def _open_safetensors(file: str):
    """``safe_open`` with the file named in the error when it is truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"{file} is not a readable safetensors file ({e}): truncated or damaged?") from None


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint folder (one file, or the shards named in the index)."""
    path = os.fspath(path)
    index = os.path.join(path, SAFE_INDEX_NAME)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(
                f"{index} has no weight_map (a dict of tensor name -> shard file): the index is damaged; "
                "restore it or re-save the checkpoint"
            )
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in the folder: {absent}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise FileNotFoundError(
        f"no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} in {path!r} (found: {found[:10]}); "
        "only safetensors checkpoints are supported"
    )


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The floating dtype stored in the checkpoint (from config.json, else the first tensor)."""
    hf = read_json(os.path.join(os.fspath(path), CONFIG_NAME))
    name = hf.get("torch_dtype") or hf.get("dtype")
    if name in _NAME_DTYPES:
        return _NAME_DTYPES[name]
    with _open_safetensors(checkpoint_files(path)[0]) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_slice(key)
            dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t.get_dtype())
            if dt is not None:
                return dt
    return None


def _get_tensor(f, key: str, file: str) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise InputError(f"{file}: cannot read tensor {key!r} ({e}): the file is truncated or damaged") from None


@torch.no_grad()
def load_state_dict_from_folder(
    model: nn.Module, path: str | os.PathLike, allow_missing: bool = False
) -> LoadReport:
    """Copy the checkpoint's tensors into ``model``'s parameters (cast to each parameter's dtype and
    device). Raises ``ValueError`` listing missing keys unless ``allow_missing``; unexpected keys
    are reported, not fatal. For tied models a stored ``lm_head.weight`` is ignored (transformers
    does the same); a checkpoint with only ``lm_head.weight`` fills the shared embedding."""
    params = dict(model.state_dict(keep_vars=True))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in checkpoint_files(path):
        with _open_safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key not in params:
                    unexpected.append(key)
                    continue
                if tied and key == "lm_head.weight":
                    continue  # the shared tensor is filled from model.embed_tokens.weight
                target = params[key]
                tensor = _get_tensor(f, key, file)
                if tensor.shape != target.shape:
                    raise ValueError(
                        f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)} (config.json does not match the weights?)"
                    )
                target.copy_(tensor.to(dtype=target.dtype))
                loaded.add(key)
    if tied and "model.embed_tokens.weight" not in loaded and "lm_head.weight" in params:
        # Only the output projection was stored: fill the shared tensor from it.
        for file in checkpoint_files(path):
            with _open_safetensors(file) as f:
                if "lm_head.weight" in f.keys():  # noqa: SIM118
                    params["lm_head.weight"].copy_(f.get_tensor("lm_head.weight"))
                    loaded.add("model.embed_tokens.weight")
    if tied and "model.embed_tokens.weight" in loaded:
        loaded.add("lm_head.weight")  # the same tensor
    missing = [k for k in params if k not in loaded]
    if missing and not allow_missing:
        raise ValueError(f"checkpoint {os.fspath(path)!r} lacks {len(missing)} model tensors: {missing[:20]}")
    return LoadReport(missing_keys=missing, unexpected_keys=sorted(unexpected))
