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
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flashlm import folders
from flashlm.errors import InputError

__all__ = [
    "CHECKPOINTS",
    "ConfigMismatchError",
    "export_model",
    "find_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1


# What a training checkpoint folder holds (a folder with anything else is not replaced).
CHECKPOINT_ENTRIES = ("train_state.pt", "rng_rank*.pt")
CHECKPOINT_DIRS = ("model", "dcp")


class ConfigMismatchError(InputError):
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

    from flashlm.models.weights import split_fused_state_dict

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

    Unsharded: ``flashlm.models.save_pretrained``. FSDP2: the full state dict is gathered to rank 0's
    CPU and written there. ``tokenizer`` (a ``tokenizers.Tokenizer``) is saved beside the weights as
    tokenizer.json. Either way the folder is written beside ``path`` and swapped in complete; a
    ``path`` that is not a checkpoint folder (or empty, or absent) is refused before anything is written.
    """
    path = Path(path)
    target = folders.check_replaceable(path, "checkpoint")  # every rank: all refuse, or none does

    def write_tokenizer(folder) -> None:
        if tokenizer is not None:
            tokenizer.save(str(Path(folder) / "tokenizer.json"))

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() == 0:
            tmp = folders.stage(target)
            try:
                _write_full_state_dict(full, model.config, Path(tmp))
                write_tokenizer(tmp)
                folders.commit(tmp, target)
            except BaseException:
                folders.discard(tmp)
                raise
    elif _rank() == 0:
        from flashlm.models import save_pretrained

        save_pretrained(model, target, extra_files=write_tokenizer)
    _barrier()


# ------------------------------------------------------------------------------------ checkpoints


def _check_step_folder(path: Path) -> None:
    """Refuse to replace ``path`` unless it is absent or a training checkpoint folder."""
    folders.check_replaceable(path, "training checkpoint", CHECKPOINT_ENTRIES, CHECKPOINT_DIRS, "train_state.pt")


def _clean_leftovers(root: Path) -> None:
    """Remove ``.tmp-step_*`` folders of killed saves; put back a ``.old-step_*`` folder whose step
    folder a crash left missing (the swap died between its two renames)."""
    if not root.is_dir():
        return
    for p in sorted(root.glob(".old-step_*")):
        final = root / p.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)
            warnings.warn(f"restored {final} from {p.name}, left by an interrupted checkpoint save", stacklevel=3)
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)
        warnings.warn(f"removed {p}, the temporary folder of an interrupted checkpoint save", stacklevel=3)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst`` (checked by `_check_step_folder`); an existing ``dst`` is
    swapped out first, then deleted."""
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
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
    _check_step_folder(final)  # every rank, before anything is written
    if rank == 0:
        _clean_leftovers(root)
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


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` newest first: the one ``latest`` names, then step_* by step."""
    if not root.is_dir():
        return []
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named is not None and named in steps:
        steps.remove(named)
        steps.insert(0, named)
    return steps


def _require_readable(file: Path) -> None:
    """``PermissionError`` naming ``file`` when this process may not read it (safetensors reports
    that as "No such file or directory", torch as a damaged archive)."""
    try:
        with open(file, "rb"):
            pass
    except PermissionError:
        raise PermissionError(
            f"{file} is not readable (permission denied): give this user read access (chmod u+r) or run "
            "as the user who wrote it; the checkpoint itself may be intact"
        ) from None


def _first_sentence(e: BaseException) -> str:
    """The first sentence of an error message (torch's zip reader appends a paragraph of advice)."""
    return str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__


def _verify_rng_files(path: Path) -> None:
    """Every ``rng_rank*.pt`` loads (they are small: read whole); ``InputError`` naming the file."""
    for file in sorted(path.glob("rng_rank*.pt")):
        _require_readable(file)
        try:
            torch.load(file, weights_only=False, map_location="cpu")
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise InputError(f"{file} cannot be read ({_first_sentence(e)}): the checkpoint is damaged") from None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Cheap integrity check of a checkpoint folder: train_state.pt opens (its zip directory is read,
    through mmap: the tensors are not), the RNG files load and the weights' headers are complete.
    ``InputError`` naming the damaged file; ``PermissionError`` naming a file this process may not
    read (not damage: a caller must not skip such a checkpoint)."""
    path = Path(path)
    state_file = path / "train_state.pt"
    if not state_file.is_file():
        raise InputError(f"{path} holds no train_state.pt: not a (complete) training checkpoint")
    state = read_train_state(path, mmap=True)
    _verify_rng_files(path)
    if state.get("sharded"):
        if not (path / "dcp" / ".metadata").is_file():
            raise InputError(f"{path / 'dcp'} lacks its .metadata: the sharded checkpoint is incomplete")
        _require_readable(path / "dcp" / ".metadata")
    else:
        from flashlm.models.weights import _open_safetensors

        for file in check_weights_readable(path / "model"):
            with _open_safetensors(file):
                pass


def check_weights_readable(folder: str | os.PathLike) -> list[str]:
    """The safetensors files of an HF folder, each checked readable by this process
    (``PermissionError`` naming it: safetensors itself says "No such file or directory")."""
    from flashlm.models.weights import checkpoint_files

    files = checkpoint_files(folder)
    for file in files:
        _require_readable(Path(file))
    return files


def find_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint under ``<output_dir>/checkpoints`` or None, and the (folder,
    problem) of each newer one found damaged: torn train_state.pt or RNG file, truncated weights).
    A checkpoint this process may not read raises ``PermissionError``: it is not damaged, and
    falling back past it would silently throw its steps away."""
    damaged = []
    for cand in _candidates(Path(output_dir) / CHECKPOINTS):
        try:
            verify_checkpoint(cand)
        except (InputError, FileNotFoundError) as e:
            damaged.append((cand, str(e)))
            continue
        return cand, damaged
    return None, damaged


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint under ``<output_dir>/checkpoints`` (None if there is none). A
    damaged one (torn train_state.pt, truncated weights: a disk filled up, a copy cut short) is
    skipped with a warning that names the file, falling back to the one before."""
    found, damaged = find_checkpoint(output_dir)
    for cand, problem in damaged:
        warnings.warn(f"skipping damaged checkpoint {cand}: {problem}", stacklevel=2)
    return found


def damaged_error(where: str, damaged: list[tuple[Path, str]]) -> InputError:
    """The refusal of a resume whose checkpoints are all damaged, naming each damaged file."""
    return InputError(
        f"--resume: no checkpoint under {where} can be read, so the run cannot resume: "
        + "; ".join(problem for _, problem in damaged)
        + ". Nothing was written. Restore the damaged files (or --resume an intact copy of a checkpoint), "
        "or start over in a new --output"
    )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder (verified: `verify_checkpoint`), or a run's output folder (then its newest
    intact checkpoint)."""
    p = Path(path)
    if (p / "train_state.pt").is_file():
        verify_checkpoint(p)
        return p
    found, damaged = find_checkpoint(p)
    if found is None and damaged:
        raise damaged_error(str(p / CHECKPOINTS), damaged)
    for cand, problem in damaged:
        warnings.warn(f"skipping damaged checkpoint {cand}: {problem}", stacklevel=2)
    if found is None:
        raise FileNotFoundError(
            f"--resume: {p} is neither a checkpoint folder (with train_state.pt) nor a run folder "
            f"with intact checkpoints under {p / CHECKPOINTS}"
        )
    return found


def read_train_state(path: str | os.PathLike, mmap: bool = False) -> dict:
    """``train_state.pt`` of a checkpoint folder (plain containers and tensors only); ``InputError``
    naming the file when it cannot be read."""
    file = Path(path) / "train_state.pt"
    _require_readable(file)
    try:
        state = torch.load(file, weights_only=False, map_location="cpu", mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:  # torch's zip reader raises RuntimeError
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"{file} cannot be read ({_first_sentence(e)}): the checkpoint is damaged") from None
    if not isinstance(state, dict) or "step" not in state:
        raise InputError(f"{file} is not a flashlm train state")
    return state


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
        raise InputError(f"--resume: {path} has checkpoint format {state.get('format')}, expected {FORMAT_VERSION}")
    check_config(state["config"], model.config)
    sharded = is_sharded(model)
    if sharded and not state["sharded"]:
        raise InputError(
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
        from flashlm.models.weights import load_state_dict_from_folder

        load_state_dict_from_folder(model, path / "model")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    check_finite_state(path, model, optimizer)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        _require_readable(rng_file)
        try:
            rng = torch.load(rng_file, weights_only=False)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise InputError(f"{rng_file} cannot be read ({_first_sentence(e)}): the checkpoint is damaged") from None
        set_rng_state(rng)
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


def check_finite_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``InputError`` naming checkpoint ``path`` and the tensors holding NaN/inf after it was loaded
    (weights, or the optimizer's masters and moments): resuming would only fail a step later with a
    NaN loss that blames --lr. One host read; collective under torch.distributed (every rank's shard
    counts, every rank raises)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for _, p in model.named_parameters()]
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    owners = getattr(optimizer, "model_params", flat)  # MasterWeightAdamW: the model param of each master
    device = params[0].device if params else torch.device("cpu")

    def bad(tensors) -> torch.Tensor:
        flags = [(~torch.isfinite(_local(t))).any().to(device) for t in tensors
                 if torch.is_tensor(t) and t.is_floating_point()]
        return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)

    opt_tensors = [[p if id(p) not in names else None, *optimizer.state.get(p, {}).values()] for p in flat]
    flags = torch.stack([bad([p]) for p in params] + [bad(ts) for ts in opt_tensors]).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    flags = flags.tolist()
    broken = [n for (n, _), f in zip(model.named_parameters(), flags) if f]
    broken += [f"the optimizer state of {names.get(id(owner), 'a parameter')}"
               for owner, f in zip(owners, flags[len(params):]) if f]
    if broken:
        raise InputError(
            f"--resume: the checkpoint {path} holds NaN/inf in {', '.join(broken[:4])}"
            f"{f' and {len(broken) - 4} more' if len(broken) > 4 else ''}: the run had diverged (or its "
            "files were damaged) when it was saved, so it cannot continue from it; resume an earlier "
            f"checkpoint (--resume {path.parent}/step_...), or start over with a lower --lr"
        )
