"""Training checkpoints: model, optimizer, scheduler, data position, RNG states and step, atomically.

A checkpoint is a folder ``<output>/checkpoints/step_NNNNNNN/``::

    model/                HF folder (config.json + model.safetensors): loads with
                          flashlm.models.from_pretrained and transformers' AutoModelForCausalLM
    model/tokenizer.json  the run's tokenizer (when the trainer passes one)
    train_state.pt        step, scheduler, data position, model config, training args
                          (+ the optimizer state when not sharded)
    rng_rank<R>.pt        torch CPU / CUDA, python ``random`` (and numpy) RNG states of rank R
    dcp/                  FSDP2 only: model + optimizer shards via torch.distributed.checkpoint

It is written into ``.tmp-step_NNNNNNN`` beside its final place and renamed in one ``os.replace``
by rank 0 after every rank finished, so a crash never leaves a half-written checkpoint under a real
name. ``<output>/checkpoints/latest`` (a one-line text file, also replaced atomically) names the
newest one.

Single process: the model goes through ``flashlm.models.save_pretrained`` and the optimizer through
``torch.save``. FSDP2: the sharded model and optimizer state go through DCP (every rank writes its
shards; DCP reshards on load, so an N-rank checkpoint resumes on M ranks or in one process), and a
consolidated full state dict is gathered to rank 0
(``full_state_dict=True, cpu_offload=True``) and written as safetensors in ``model/``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "CHECKPOINTS",
    "ConfigMismatchError",
    "export_model",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1


class ConfigMismatchError(ValueError):
    """Resuming from a checkpoint saved for another model configuration."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP2 (DTensor) parameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


# ------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ----------------------------------------------------------------------------------------- model


def _write_full_state_dict(state: dict[str, torch.Tensor], config, path: Path) -> None:
    """Write a full (unsharded) state dict as an HF folder: config.json + model.safetensors, the
    tied ``lm_head.weight`` stored once as ``model.embed_tokens.weight`` (as transformers does)."""
    from safetensors.torch import save_file

    from flashlm.models.fused import split_fused_state_dict

    # the flash model's sharded state keeps its fused qkv_proj / gate_up_proj: stored under HF names
    state = split_fused_state_dict(state, config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    hf = config.to_hf_config()
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    hf["torch_dtype"] = names.get(next(iter(dtypes)), "float32") if len(dtypes) == 1 else "float32"
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def export_model(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> None:
    """Write ``model`` as an HF folder at ``path`` (collective under FSDP2: call on every rank).

    Unsharded: ``flashlm.models.save_pretrained`` (atomic on its own). FSDP2: the full state dict is
    gathered to rank 0's CPU and written there. ``tokenizer`` (a ``tokenizers.Tokenizer``) is saved
    beside the weights as tokenizer.json.
    """
    path = Path(path)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() == 0:
            _write_full_state_dict(full, model.config, path)
    elif _rank() == 0:
        from flashlm.models import save_pretrained

        save_pretrained(model, path)
    if tokenizer is not None and _rank() == 0:
        tokenizer.save(str(path / "tokenizer.json"))
    _barrier()


# ------------------------------------------------------------------------------------ checkpoints


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is swapped out first, then deleted."""
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data_state: dict,
    train_args: dict | None = None,
    tokenizer=None,
) -> Path:
    """Save everything needed to resume at ``step`` under ``<output_dir>/checkpoints/step_<step>``.

    Collective under ``torch.distributed`` (every rank must call it). Returns the folder.
    """
    root = Path(output_dir) / CHECKPOINTS
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f".tmp-{name}"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    sharded = is_sharded(model)
    state: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "config": model.config.to_dict(),
        "train_args": dict(train_args or {}),
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "sharded": sharded,
    }
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    else:
        state["optimizer"] = optimizer.state_dict()
    export_model(model, tmp / "model", tokenizer=tokenizer)  # collective for FSDP2
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "train_state.pt")
    _barrier()
    if rank == 0:
        _replace_dir(tmp, final)
        _write_text_atomic(root / "latest", name + "\n")
    _barrier()
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``<output_dir>/checkpoints`` (None if there is none)."""
    root = Path(output_dir) / CHECKPOINTS
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if (cand / "train_state.pt").is_file():
            return cand
    steps = sorted(p for p in root.glob("step_*") if (p / "train_state.pt").is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run's output folder (then its latest checkpoint)."""
    p = Path(path)
    if (p / "train_state.pt").is_file():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise FileNotFoundError(
            f"--resume: {p} is neither a checkpoint folder (with train_state.pt) nor a run folder "
            f"with checkpoints under {p / CHECKPOINTS}"
        )
    return found


def read_train_state(path: str | os.PathLike) -> dict:
    """``train_state.pt`` of a checkpoint folder (plain containers and tensors only)."""
    return torch.load(Path(path) / "train_state.pt", weights_only=False, map_location="cpu")


def check_config(saved: dict, config, where: str = "checkpoint") -> None:
    """Raise ``ConfigMismatchError`` listing every field that differs between ``saved`` (a config dict)
    and ``config``."""
    now = config.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} (saved) != {now.get(k)!r} (now)" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigMismatchError(
            f"--resume: the {where} was saved for another model config; differing fields: " + "; ".join(diffs)
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a checkpoint folder (collective
    under FSDP2). Returns the train state (``step``, ``data``, ``train_args``, ...).

    Raises ``ConfigMismatchError`` before touching the model if the checkpoint's model config differs
    from ``model.config``, and ``ValueError`` if a single-process checkpoint meets an FSDP2 run (an FSDP2
    checkpoint resumes on any number of ranks, one process included: DCP reshards it).
    """
    path = Path(path)
    state = read_train_state(path)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint format {state.get('format')}, expected {FORMAT_VERSION}")
    check_config(state["config"], model.config)
    sharded = is_sharded(model)
    if sharded and not state["sharded"]:
        raise ValueError(
            f"--resume: {path} is a single-process checkpoint but this run is FSDP2 (sharded); its "
            f"optimizer state cannot be resharded: start from its weights with --model {path / 'model'}"
        )
    if state["sharded"]:
        # DCP reshards on load: an FSDP2 checkpoint of N ranks resumes on M ranks, or in one process
        # (no process group: DCP then reads every shard into full tensors).
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            # one process loading on purpose; DCP warns that it assumes so
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
    else:
        from flashlm.models.io import load_state_dict_from_folder

        load_state_dict_from_folder(model, path / "model")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
