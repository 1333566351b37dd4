"""`flashlm train`: padding-free packed training with checkpoints and exact resume, one process to FSDP2.

    flashlm train --model tiny --data corpus/ --output runs/tiny --max-steps 200
    torchrun --nproc-per-node 8 -m flashlm.train --model llama-1b --data corpus/ --tokenizer tok.json \
        --seq-length 2048 --batch-size 8 --output runs/1b

One code path: without ``WORLD_SIZE > 1`` the model trains in one process; under torchrun every
decoder layer and then the root are wrapped with FSDP2 ``fully_shard`` (bf16 compute, fp32 gradient
reduction, fp32 sharded master weights and optimizer state). Data, checkpoints and metrics: see
docs/training.md, `flashlm.data`, `flashlm.checkpoint`.

Precision (``--dtype``): master weights and AdamW state are always fp32. ``bf16`` runs the forward
and backward in bf16: in one process the model's parameters are bf16 and
:class:`flashlm.optim.MasterWeightAdamW` steps fp32 copies of them (``--precision master``, the
default: activations, norms' inputs and the residual stream stay bf16) or, with ``--precision
autocast``, the parameters stay fp32 under ``torch.autocast`` (fp32 residual stream, ~1.5x the
activation memory); under torchrun FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` does the same as "master". ``fp32`` computes in fp32.

MFU: model FLOPs per token = 6 * N_matmul + 6 * L * S * (heads * head_dim), where N_matmul counts the
parameters used in matmuls (all but the input embedding; the LM head counted even when tied) and the
second term is causal attention (QK^T and PV: 4 * S * d per token per layer forward, halved by the
causal mask, x3 for forward + backward), with S = --seq-length (an upper bound under packing:
attention within shorter documents does less work). Activation recomputation is not counted (that
is MFU, not HFU). Peak: 989 TFLOP/s dense bf16 for H100 SXM / H200 (NVIDIA's datasheet), 312 for
A100; ``--peak-tflops`` overrides (e.g. 790, the dense bf16 matmul rate measured on our H100).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flashlm import checkpoint as ckpt
from flashlm import data as fdata
from flashlm import folders
from flashlm.attention.padding import prepare_from_position_ids
from flashlm.errors import InputError
from flashlm.optim import MasterWeightAdamW

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
DTYPES = ("auto", "bf16", "fp32")
MAX_LR = 1.0
# Training args a resume may change (how the run is watched, saved or computed, not what it computes;
# --model and --vocab-size are guarded by the model-config check); batch size and accumulation may
# change too (the data position is kept in rows), with a warning.
RESUME_MAY_CHANGE = {"model", "vocab_size", "data", "cache_dir", "tokenizer", "output", "resume", "stop_after",
                     "no_progress", "eval_every", "eval_batches", "save_every", "device", "compile",
                     "activation_checkpointing", "peak_tflops", "batch_size", "grad_accum"}
# Files and folders that mark --output as holding a run (tokenizer.json alone does not: it is reused).
RUN_MARKERS = ("metrics.jsonl", ckpt.CHECKPOINTS, "final", "loss.png")
DEFAULT_BPE_VOCAB = 512
DEFAULT_SEQ_LENGTH = 1024


# ----------------------------------------------------------------------------------------------- args


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it tells something: not where the help already says what
    the default is (a hand-written default would be followed by "(default: None)"), not for None
    (the flag is off or computed) nor for a store_true flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default is None or action.default is False:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashlm train",
        description="Train a flashlm model on local text (packed, padding-free) with checkpoints and resume.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="preset name (tiny, small, llama-1b) or an HF checkpoint folder")
    g.add_argument("--attn", default="flash", choices=("flash", "default"),
                   help="model class; 'default' (eager) does not isolate packed documents from each other")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocab size of a preset model (and of the BPE trained without --tokenizer); default: "
                        f"the preset's, raised to fit the tokenizer (a trained BPE gets >= {DEFAULT_BPE_VOCAB})")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help=".txt / .jsonl files or folders")
    g.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    g.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json (tokenizers library); default: the --model folder's, else "
                        "--output's (kept from an earlier run), else a byte-level BPE trained on --data "
                        "and saved in --output")
    g.add_argument("--seq-length", type=int, default=None,
                   help=f"tokens per packed row, >= 2 (default: {DEFAULT_SEQ_LENGTH}, or the model's "
                        "max_position_embeddings if smaller)")
    g.add_argument("--eval-fraction", type=float, default=0.01, help="share of rows held out for --eval-every")
    g.add_argument("--cache-dir", default=None, help="tokenized-data cache (default $FLASHLM_CACHE or ~/.cache/flashlm)")
    g.add_argument("--seed", type=int, default=0, help="model init, document and row shuffling")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 10%% of --max-steps, <= 1000)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (not norms/biases)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    g = p.add_argument_group("performance")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--precision", default="master", choices=("master", "autocast"),
                   help="bf16 in one process: bf16 parameters + fp32 master weights in the optimizer "
                        "(master, default) or fp32 parameters under torch.autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU (default by GPU name)")
    g = p.add_argument_group("run")
    g.add_argument("--output", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png, final/")
    g.add_argument("--eval-every", type=int, default=100, help="evaluate on the held-out rows every N steps (0: never)")
    g.add_argument("--eval-batches", type=int, default=8, help="micro-batches per evaluation")
    g.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps and at the last step (0: no checkpoints; the final model "
                        "is still written to --output/final)")
    g.add_argument("--resume", default=None,
                   help="a checkpoint folder, a run folder (its latest checkpoint), or 'auto' (--output's latest if any)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this step, as a preempted job would (the LR schedule "
                        "still follows --max-steps); used to test resume")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (metrics.jsonl is still written)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Range checks that need no model or data; raise ValueError naming the flag."""
    if args.seq_length is not None and args.seq_length < 2:
        # the model predicts token i + 1 from tokens <= i: a 1-token row has no target (the loss is nan)
        raise InputError(f"--seq-length must be >= 2 (a row of one token has no next token to predict), "
                         f"got {args.seq_length}")
    positive = ("batch_size", "grad_accum", "max_steps", "eval_batches")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "min_lr_ratio", "weight_decay", "max_grad_norm", "eval_fraction", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):  # argparse's float() takes "nan" and "inf"
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 < args.lr <= MAX_LR:
        raise InputError(
            f"--lr must be in (0, {MAX_LR}], got {args.lr}: AdamW moves each weight by about lr per step "
            "(weights start near 0.02; language models train at 1e-5 .. 1e-2)"
        )
    if args.weight_decay < 0 or args.lr * args.weight_decay >= 1:
        raise InputError(
            f"--weight-decay must be >= 0 with lr * weight_decay < 1 (AdamW multiplies weights by "
            f"1 - lr * weight_decay each step), got {args.weight_decay} at --lr {args.lr}"
        )
    if args.max_grad_norm < 0:
        raise InputError(f"--max-grad-norm must be >= 0 (0: off), got {args.max_grad_norm}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise InputError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.max_steps:
        raise ValueError(f"--warmup-steps must be in [0, --max-steps={args.max_steps}], got {args.warmup_steps}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.max_steps:
        raise ValueError(f"--stop-after must be in [1, --max-steps={args.max_steps}], got {args.stop_after}")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be >= 1, got {args.vocab_size}")
    check_device(args.device)


def check_device(device_arg: str | None) -> None:
    """Refuse a --device that torch does not know or this machine does not have."""
    if device_arg is None:
        return
    try:
        device = torch.device(device_arg)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device_arg!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device_arg}: CUDA is not available here (use --device cpu, or omit --device)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# -------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
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


def init_distributed(device_arg: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Dist(rank, world, local), device


# ------------------------------------------------------------------------------------------- model


def flops_per_token(model: nn.Module, seq_length: int) -> float:
    """Model FLOPs per trained token (forward + backward); formula in the module docstring."""
    cfg = model.config
    embed = model.model.embed_tokens.weight
    n_matmul = sum(p.numel() for p in model.parameters() if p is not embed)
    if cfg.tie_word_embeddings:
        n_matmul += embed.numel()  # the tied LM head is a (hidden x vocab) matmul per token
    attn = 6 * cfg.num_layers * seq_length * cfg.num_heads * cfg.head_dim
    return 6.0 * n_matmul + attn


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            # H100 PCIe has 756 dense bf16 TFLOP/s, not the SXM 989.
            return (756.0 if key == "H100" and "PCIe" in name else tflops) * 1e12
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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   model_dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95, eps 1e-8); matrices decay, norms and biases do not. With ``model_dtype``
    the model's parameters are cast to it and the optimizer steps fp32 master copies
    (:class:`~flashlm.optim.MasterWeightAdamW`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if model_dtype is not None:
        return MasterWeightAdamW(groups, model_dtype=model_dtype, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_lambda(max_steps: int, warmup: int, min_ratio: float):
    """LR multiplier after ``i`` scheduler steps: linear warmup to 1 over ``warmup`` steps, then a
    cosine down to ``min_ratio`` at ``max_steps``."""

    def fn(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# --------------------------------------------------------------------------------------- the setup


def _refuse_used_folder(out: Path, hint: str) -> None:
    """A run folder belongs to one run: refuse to start another in a folder that holds one."""
    used = [m for m in RUN_MARKERS if (out / m).exists()]
    if used:
        raise InputError(
            f"--output {out} holds an earlier run ({', '.join(used)}); {hint}, or choose a new --output "
            "(or delete the old run)"
        )


def _resume_dir(args, out: Path) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), refusing a resume that would mix two runs
    in --output, and a ``--resume auto`` that finds checkpoints but can read none of them (starting
    over would write over the run it could not read)."""
    if args.resume is None:
        _refuse_used_folder(out, "pass --resume auto to continue it")  # again, now under the run's lock
        return None
    if args.resume == "auto":
        found, damaged = ckpt.find_checkpoint(out)
        if found is None and damaged:
            raise ckpt.damaged_error(str(out / ckpt.CHECKPOINTS), damaged)
        for cand, problem in damaged:
            warnings.warn(f"skipping damaged checkpoint {cand}: {problem}", stacklevel=3)
        if found is None and any((out / m).exists() for m in ("final", "loss.png")):
            _refuse_used_folder(out, "it has no checkpoint to resume (it finished with --save-every 0?)")
        return found
    found = ckpt.resolve_checkpoint(args.resume)
    if out.resolve() not in found.resolve().parents:  # a checkpoint of another run, into this folder
        _refuse_used_folder(out, f"resuming {found} there would mix two runs' logs")
    return found


def check_resume_args(saved: dict, args) -> list[str]:
    """Refuse (``InputError``) a resume whose training args differ from the saved run's beyond
    `RESUME_MAY_CHANGE`; return the changed batch-shape args (allowed, worth a warning)."""
    now = vars(args)
    diffs = [f"--{k.replace('_', '-')} {saved[k]!r} (saved) != {now[k]!r} (now)" for k in sorted(saved)
             if k in now and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if diffs:
        raise InputError(
            "--resume: the checkpoint belongs to a run with other settings: " + "; ".join(diffs)
            + ". Resume with the same flags, or start a new run from its weights with --model <checkpoint>/model "
            "and a new --output"
        )
    return [k for k in ("batch_size", "grad_accum") if k in saved and saved[k] != now.get(k)]


def check_finite_params(model: nn.Module, dd: Dist, step: int) -> None:
    """Raise ``FloatingPointError`` naming the first parameter holding NaN/inf (on any rank), so no
    checkpoint or final model is written with broken weights. One host read per save."""
    local = [(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters()]
    bad = torch.stack([(~torch.isfinite(p.detach())).any() for p in local]).float()
    bad = dd.sum(bad)
    if bool(bad.any()):
        name = next(n for (n, _), b in zip(model.named_parameters(), bad.tolist()) if b)
        raise FloatingPointError(
            f"parameter {name} holds NaN/inf after step {step} (the loss can stay finite while an unused "
            "weight is broken); nothing was saved. Check the starting weights and lower --lr"
        )


def _check_output(output: str | os.PathLike) -> None:
    """Refuse an --output that names no folder (``''`` would put the run among the working
    directory's files) or that cannot be made or written. Creates nothing: the run's lock makes the
    folder once the run starts (`_lock_output`)."""
    if not os.fspath(output).strip():
        raise InputError(
            f"--output {os.fspath(output)!r} names no folder: the run would be written into the working "
            "directory among its files; give a folder for the run (e.g. --output runs/tiny)"
        )
    path = Path(output).absolute()
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent  # the nearest existing folder: where the run folder would be made
    if not base.is_dir():
        where = "it is a file" if base == path else f"{str(base)!r} is a file"
        raise ValueError(f"--output {os.fspath(output)!r} is not writable: {where}, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--output {os.fspath(output)!r} is not writable: {str(base)!r}: permission denied")


def _lock_output(out: Path, dd: Dist, device: torch.device) -> folders.FolderLock | None:
    """Rank 0 takes --output for the whole run (`folders.lock_folder`: a second process is refused,
    and a killed run's lock dies with it); every rank refuses when it could not."""
    lock, error = None, None
    if dd.main:
        try:
            lock = folders.lock_folder(out, "--output")
        except InputError as e:
            error = e
        except OSError as e:
            error = ValueError(f"--output {str(out)!r} is not writable: {e.strerror or e}")
    if dd.enabled:  # every rank joins: all refuse, or none does
        failed = bool(dd.sum(torch.tensor(float(error is not None), device=device)))
        if failed and error is None:
            error = InputError(f"--output {out}: rank 0 could not take the run folder (its error says why)")
    if error is not None:
        raise error
    return lock


def _resolve_model_config(args):
    """(config, hf_folder or None) for --model."""
    from flashlm.models.config import PRESETS, ModelConfig, get_preset

    if args.model in PRESETS:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
        if args.vocab_size is not None:
            # The preset's special ids may fall outside a smaller vocab; they are re-set from the tokenizer.
            overrides.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return get_preset(args.model, **overrides), None
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is neither a preset {sorted(PRESETS)} nor a folder with config.json")
    if args.vocab_size is not None:
        raise ValueError("--vocab-size only applies to a preset --model (a checkpoint folder fixes its vocab)")
    return ModelConfig.from_hf_config(folder), folder


def _first_eos(config) -> int | None:
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _find_tokenizer(args, config, hf_folder, files, out: Path, dd: Dist, resume_dir: Path | None):
    """(tokenizer, its file or None, where it came from): on resume the checkpoint's (a run keeps its
    tokenizer: a differing --tokenizer is refused), else --tokenizer, the --model folder's, the one
    kept in --output, or a byte-level BPE trained on --data. Writes nothing."""
    run_tok = resume_dir / "model" / "tokenizer.json" if resume_dir is not None else None
    if run_tok is not None and run_tok.is_file():
        tok = fdata.load_tokenizer(run_tok)
        if args.tokenizer is not None and fdata.load_tokenizer(args.tokenizer).to_str() != tok.to_str():
            raise InputError(
                f"--resume: --tokenizer {args.tokenizer} is not the run's tokenizer ({run_tok}): a run keeps "
                "the tokenizer it started with (its weights learned those token ids). Resume without "
                f"--tokenizer, or start a new run with it (a new --output, --model {resume_dir / 'model'})"
            )
        return tok, run_tok, f"{run_tok} (the checkpoint's)"
    if args.tokenizer is not None:
        return fdata.load_tokenizer(args.tokenizer), Path(args.tokenizer), f"{args.tokenizer} (--tokenizer)"
    if hf_folder is not None and (hf_folder / "tokenizer.json").is_file():
        path = hf_folder / "tokenizer.json"
        return fdata.load_tokenizer(path), path, f"{path} (the --model folder's)"
    kept = out / "tokenizer.json"
    if kept.is_file():
        return fdata.load_tokenizer(kept), kept, (
            f"{kept} (kept in --output from an earlier run there; pass --tokenizer to use another, or "
            "delete it to train a new one)")
    implicit_vocab = hf_folder is None and args.vocab_size is None
    if config.vocab_size < 257 and not implicit_vocab:
        raise ValueError(
            f"--model {args.model} has vocab_size {config.vocab_size}, too small for a trained byte-level "
            "BPE (>= 257: 256 bytes + EOS); pass --vocab-size (e.g. 512) or --tokenizer"
        )
    # Rank 0 trains once and sends it to the others (the same tokenizer everywhere, no file yet).
    tok = None
    if dd.main:
        bpe_size = max(config.vocab_size, DEFAULT_BPE_VOCAB) if implicit_vocab else config.vocab_size
        tok = fdata.train_tokenizer(fdata.read_documents(files, args.text_field), bpe_size)
    if dd.enabled:
        box = [tok.to_str() if dd.main else None]
        dist.broadcast_object_list(box, src=0)
        if not dd.main:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(box[0])
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    return tok, None, f"trained a byte-level BPE of {n_tok} tokens on --data (kept as {kept})"


def setup_tokenizer(args, config, hf_folder, files, out: Path, dd: Dist, resume_dir: Path | None = None):
    """Load or train the tokenizer (see `_find_tokenizer`: rank 0 says which); returns (tokenizer,
    eos_id, config with eos/vocab checked). Writes nothing: the run folder gets the tokenizer from
    `_save_run_tokenizer` once every input is checked."""
    tok, tok_path, source = _find_tokenizer(args, config, hf_folder, files, out, dd, resume_dir)
    if dd.main:
        print(f"flashlm train: tokenizer: {source}", file=sys.stderr)
    # A preset's vocab without --vocab-size is a default, not a choice: it follows the tokenizer.
    implicit_vocab = hf_folder is None and args.vocab_size is None
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok > config.vocab_size and implicit_vocab:
        vocab = max(DEFAULT_BPE_VOCAB, -(-n_tok // 64) * 64)  # a multiple of 64: friendlier matmul shapes
        if dd.main:
            print(f"flashlm train: the tokenizer has {n_tok} tokens, more than --model {args.model}'s "
                  f"vocab_size {config.vocab_size}; using vocab_size {vocab} (choose it with --vocab-size)",
                  file=sys.stderr)
        config = config.replace(vocab_size=vocab)
    if n_tok > config.vocab_size:
        raise ValueError(
            f"tokenizer/vocab mismatch: {tok_path or 'the trained tokenizer'} has {n_tok} tokens but the "
            f"model's vocab_size is {config.vocab_size}; token ids >= {config.vocab_size} would index past "
            "the embedding (use a matching tokenizer, or --vocab-size for a preset)"
        )
    if hf_folder is None:
        # A fresh model takes its EOS from the tokenizer (a preset's default ids mean nothing here).
        eos = fdata.resolve_eos_id(tok, None)
        if config.eos_token_id != eos:
            config = config.replace(eos_token_id=eos)
        if config.bos_token_id is not None and config.bos_token_id >= n_tok:
            config = config.replace(bos_token_id=None)
    else:
        eos = fdata.resolve_eos_id(tok, _first_eos(config))
    return tok, eos, config


def _save_run_tokenizer(out: Path, dd: Dist, tok, resumed: bool) -> None:
    """Write ``<out>/tokenizer.json`` (rank 0, atomically) unless it already holds ``tok``: the run
    folder always holds the tokenizer it uses. Called once every input is checked, so a refused or
    failed command leaves no tokenizer behind."""
    if not dd.main:
        return
    path = out / "tokenizer.json"
    if path.is_file():
        try:
            if fdata.load_tokenizer(path).to_str() == tok.to_str():
                return
        except ValueError:  # a damaged file: replaced below
            pass
        what = ("restoring the checkpoint's tokenizer there (that file was replaced since it was saved)"
                if resumed else "replacing it (left by an earlier run) with this run's tokenizer")
        print(f"flashlm train: {path} differs from the tokenizer this run uses; {what}", file=sys.stderr)
    tmp = out / ".tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, path)


@dataclass
class TrainResult:
    """What `train` returns: per-step train losses, (step, eval loss) pairs, the final model folder."""

    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    final_dir: Path | None = None
    last_checkpoint: Path | None = None
    start_step: int = 0
    tokens_per_s: float | None = None
    mfu: float | None = None
    # the median over the timed steps, the statistic `flashlm bench` reports (robust to a slow step:
    # a JIT compile, an eval, a checkpoint)
    median_step_tokens_per_s: float | None = None
    peak_mem_gib: float | None = None
    # seconds spent evaluating and checkpointing (not in any step's time, nor in tokens_per_s)
    eval_s: float = 0.0
    save_s: float = 0.0


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def _read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, record) pairs of metrics.jsonl. A last line cut by a kill is dropped with a warning;
    a damaged line before it raises ``InputError`` naming the file and line."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            if i == len(lines):
                print(f"flashlm train: dropping the torn last line of {path} (the run was killed while "
                      "writing it)", file=sys.stderr)
                break
            raise InputError(f"{path}:{i} is not a JSON record: the log is damaged; repair or delete that line")
        out.append((ln, rec))
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a run killed after its last checkpoint logged steps that the
    resumed run logs again), and a torn last line."""
    if not path.is_file():
        return
    keep = [ln for ln, rec in _read_metrics(path) if rec.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Train (and eval) loss vs step from metrics.jsonl to a PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("flashlm train: matplotlib not installed, no loss.png (pip install 'flashlm[plot]')", file=sys.stderr)
        return None
    rows = [rec for _, rec in _read_metrics(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"flashlm train: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


@torch.no_grad()
def model_inputs(cpu_batch: dict[str, torch.Tensor], device: torch.device, packed: bool) -> dict:
    """A CPU batch of :class:`~flashlm.data.PackedDataset` moved to ``device``; with ``packed`` (the
    flash model) also ``cu_seqlens`` / ``max_seqlen`` computed here on the CPU (the model's own packing
    rule, ``prepare_from_position_ids``), so the model plans the packed batch from host-known values
    instead of reading its position ids back from the device. Rows of one token are no packed batch."""
    batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
    if packed and cpu_batch["position_ids"].shape[1] > 1:
        cu_seqlens, max_seqlen = prepare_from_position_ids(cpu_batch["position_ids"])
        batch.update(cu_seqlens=cu_seqlens.to(device, non_blocking=True), max_seqlen=max_seqlen)
    return batch


@torch.no_grad()  # no graph kept for backward (no_grad, not inference_mode: FSDP2 and compiled layers accept it)
def evaluate(model, eval_ds, batch_size: int, n_batches: int, dd: Dist, device, autocast,
             packed: bool = False) -> float:
    """Token-weighted mean loss over the first ``min(len, n_batches * batch_size * world)`` held-out
    rows (the same rows every time), split evenly over ranks (a remainder of < world rows is
    skipped: under FSDP2 every rank must run the same number of forwards)."""
    per_rank = min(len(eval_ds), n_batches * batch_size * dd.world_size) // dd.world_size
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    first = dd.rank * per_rank
    for lo in range(first, first + per_rank, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, first + per_rank))
        batch = model_inputs(eval_ds.batch(idx), device, packed)
        n = (batch["labels"][:, 1:] != fdata.IGNORE_INDEX).sum()
        with autocast():
            loss = model(**batch).loss.float()
        loss_sum += torch.where(n > 0, loss * n, torch.zeros_like(loss))
        count += n
    model.train(was_training)
    return float(dd.sum(loss_sum) / dd.sum(count))


def train(argv_or_args: list[str] | argparse.Namespace | None = None) -> TrainResult:
    """Run training (see `build_parser` for the flags). Raises ValueError/FileNotFoundError with a clear
    message for bad input before any training step."""
    if isinstance(argv_or_args, argparse.Namespace):
        args = argparse.Namespace(**vars(argv_or_args))  # a copy: defaults resolved here stay here
    else:
        args = build_parser().parse_args(argv_or_args)
    check_args(args)
    _check_output(args.output)  # the raw string: Path("") is "."
    out = Path(args.output)
    if args.resume is None:
        _refuse_used_folder(out, "pass --resume auto to continue it")
    dd, device = init_distributed(args.device)
    try:
        return _train(args, out, dd, device)
    finally:
        if dd.enabled and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Data:
    """What `_prepare_data` resolves and checks before any model is built."""

    config: Any
    hf_folder: Path | None
    tok: Any
    train_ds: fdata.PackedDataset
    eval_ds: fdata.PackedDataset | None
    train_iter: fdata.DataIterator
    resume_dir: Path | None
    changed: list[str]  # batch-shape args a resume changes (warned about)


@dataclass
class _Run:
    """The state the step loop works on: the built run plus the throughput counters it updates."""

    args: argparse.Namespace
    out: Path
    dd: Dist
    device: torch.device
    data: _Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable[[], contextlib.AbstractContextManager]
    fpt: float  # model FLOPs per token
    peak: float | None  # peak FLOP/s per device (None: no MFU)
    tokens_per_step: int
    start_step: int
    end_step: int
    train_args: dict
    metrics_path: Path
    # seconds of each step after the first (throughput, MFU, the median step)
    timed_step_s: list = field(default_factory=list)
    last_ckpt: Path | None = None


def _train(args, out: Path, dd: Dist, device: torch.device) -> TrainResult:
    """The run, holding --output's lock from before anything in it is read to the end."""
    lock = _lock_output(out, dd, device)
    try:
        return _train_locked(args, out, dd, device)
    finally:
        if lock is not None:
            lock.release()  # also removes --output again if this run made it and left it empty


def _train_locked(args, out: Path, dd: Dist, device: torch.device) -> TrainResult:
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    bf16 = dtype == "bf16"
    data = _prepare_data(args, out, dd)
    model, fpt, n_params = _build_model(args, data, dd, device, bf16)
    optimizer, scheduler, master = _build_optimizer(args, model, dd, bf16)
    start_step = _resume(args, out, dd, data, model, optimizer, scheduler)
    run = _Run(
        args=args, out=out, dd=dd, device=device, data=data, model=model, optimizer=optimizer,
        scheduler=scheduler, autocast=_autocast_factory(bf16 and not dd.enabled and not master, device),
        fpt=fpt, peak=peak_flops(device, args.peak_tflops),
        tokens_per_step=args.batch_size * args.seq_length * args.grad_accum * dd.world_size,
        start_step=start_step, end_step=args.stop_after if args.stop_after is not None else args.max_steps,
        train_args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        metrics_path=out / "metrics.jsonl",
    )
    result = TrainResult(start_step=start_step)
    if dd.main:
        _print_banner(run, dtype, n_params)
    _run_steps(run, result)
    return _finish(run, result, dtype)


def _prepare_data(args, out: Path, dd: Dist) -> _Data:
    """Config, tokenizer, resume checks and packed data: every check of the input runs here, before
    the model is built. Sets ``args.seq_length`` when it was left to its default."""
    config, hf_folder = _resolve_model_config(args)
    if args.seq_length is None:
        args.seq_length = min(DEFAULT_SEQ_LENGTH, config.max_position_embeddings)
    if args.seq_length > config.max_position_embeddings:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    if hf_folder is not None:
        ckpt.check_weights_readable(hf_folder)  # a mode-000 file is not "No such file or directory"
    resume_dir = _resume_dir(args, out)
    files = fdata.find_files(args.data)
    tok, eos_id, config = setup_tokenizer(args, config, hf_folder, files, out, dd, resume_dir)
    changed = []
    if resume_dir is not None:
        # Fail on a config or settings mismatch before any tokenization or model building.
        saved = ckpt.read_train_state(resume_dir)
        ckpt.check_config(saved["config"], config)
        changed = check_resume_args(saved.get("train_args", {}), args)

    # Rank 0 tokenizes (and fills the cache) first; the others then read the cache.
    if dd.main:
        tokens, offsets = fdata.tokenize_corpus(files, tok, args.text_field, args.cache_dir)
    dd.barrier()
    if not dd.main:
        tokens, offsets = fdata.tokenize_corpus(files, tok, args.text_field, args.cache_dir)
    rows, starts = fdata.pack(tokens, offsets, args.seq_length, eos_id, seed=args.seed)
    full = fdata.PackedDataset(rows, starts)
    use_eval = args.eval_every > 0 and args.eval_fraction > 0
    train_ds, eval_ds = full.split(args.eval_fraction if use_eval else 0.0)
    if eval_ds is not None and len(eval_ds) < dd.world_size:
        raise ValueError(
            f"only {len(eval_ds)} held-out rows for {dd.world_size} processes: raise --eval-fraction or add data"
        )
    train_iter = fdata.DataIterator(train_ds, args.batch_size, seed=args.seed, rank=dd.rank, world_size=dd.world_size)
    return _Data(config, hf_folder, tok, train_ds, eval_ds, train_iter, resume_dir, changed)


def _build_model(args, data: _Data, dd: Dist, device: torch.device, bf16: bool) -> tuple[nn.Module, float, int]:
    """The fp32 model seeded with ``--seed`` (the same init on every rank), with activation
    checkpointing, compiled layers and FSDP2 as asked; returns (model, FLOPs per token, parameters)."""
    from flashlm.models import build_model, from_pretrained

    random.seed(args.seed)
    torch.manual_seed(args.seed)  # same init on every rank; fully_shard then keeps each rank's shard
    if data.hf_folder is not None:
        model = from_pretrained(data.hf_folder, attn=args.attn, device=device, dtype=torch.float32)
    else:
        model = build_model(data.config, attn=args.attn, device=device, dtype=torch.float32)
    model.train()
    fpt = flops_per_token(model, args.seq_length)
    n_params = sum(p.numel() for p in model.parameters())
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    if args.compile:
        if hasattr(model, "prepare_compile"):  # flash: plans and ops meant for compiled blocks
            model.prepare_compile()
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names unchanged
    if dd.enabled:
        apply_fsdp(model, bf16)
    return model, fpt, n_params


def _build_optimizer(args, model: nn.Module, dd: Dist, bf16: bool):
    """(optimizer, LR scheduler, master): with bf16 in one process and ``--precision master`` the
    model's parameters become bf16 and the optimizer steps fp32 master copies (``master`` True)."""
    master = bf16 and not dd.enabled and args.precision == "master"
    optimizer = make_optimizer(model, args.lr, args.weight_decay, torch.bfloat16 if master else None)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, args.max_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.max_steps, warmup, args.min_lr_ratio))
    return optimizer, scheduler, master


def _resume(args, out: Path, dd: Dist, data: _Data, model, optimizer, scheduler) -> int:
    """Load the checkpoint into model, optimizer, scheduler and data iterator (and cut metrics.jsonl
    back to its step), or start a fresh log; returns the step to continue from."""
    start_step = 0
    metrics_path = out / "metrics.jsonl"
    if data.resume_dir is not None:
        state = ckpt.load_checkpoint(data.resume_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        data.train_iter.load_state_dict(state["data"])
        start_step = state["step"]
    # Every input is checked and the checkpoint loaded: from here on the run writes into --output.
    _save_run_tokenizer(out, dd, data.tok, resumed=data.resume_dir is not None)
    if data.resume_dir is not None:
        if data.changed and dd.main:
            print(f"flashlm train: resuming with changed {data.changed}: the run will not match an "
                  "uninterrupted one", file=sys.stderr)
        if dd.main:
            _truncate_metrics(metrics_path, start_step)
    elif dd.main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in an old folder starts a fresh log
    dd.barrier()
    return start_step


def _autocast_factory(use_autocast: bool, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 in one process: bf16 parameters (master) or autocast. Under FSDP2 the MixedPrecisionPolicy casts."""

    def autocast():
        if use_autocast:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return autocast


def _print_banner(run: _Run, dtype: str, n_params: int) -> None:
    args, data = run.args, run.data
    if run.start_step >= run.end_step:
        print(f"flashlm train: nothing to do: the run in {run.out} is at step {run.start_step} "
              f"(checkpoint {data.resume_dir}) and this one ends at step {run.end_step} "
              f"(--{'stop-after' if args.stop_after is not None else 'max-steps'})", file=sys.stderr)
        return
    print(
        f"flashlm train: {args.model} ({args.attn}, {n_params / 1e6:.1f}M params, {dtype}) on "
        f"{run.dd.world_size} x {run.device.type}; {len(data.train_ds)} train rows x {args.seq_length} tokens"
        f"{f', {len(data.eval_ds)} eval rows' if data.eval_ds is not None else ''}; "
        f"{run.tokens_per_step} tokens/step; steps {run.start_step} -> {run.end_step}",
        file=sys.stderr,
    )


def _run_steps(run: _Run, result: TrainResult) -> None:
    """Steps ``start_step + 1 .. end_step``: train, log to metrics.jsonl and the progress bar, save.

    A step's loss is read back (the one host sync per step) after the next step has been enqueued, so
    the GPU is never idle while the host prepares a batch; steps that evaluate, checkpoint or end the run
    are read before anything else is enqueued (the saved data position and weights are that step's).

    A step's time runs from the end of the step before (or of the evaluation or checkpoint after it,
    which are timed apart as ``eval_s`` / ``save_s``) to the end of its own work, on the device's
    timeline (`_clock`): not between read-backs, which come one step late and, at eval and save
    steps, twice in a row."""
    args, dd = run.args, run.dd
    bar = None
    if dd.main and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, initial=run.start_step, desc="train", dynamic_ncols=True)

    metrics_file = open(run.metrics_path, "a", encoding="utf-8") if dd.main else None  # noqa: SIM115
    t_run = time.perf_counter()

    def complete(pending: _Enqueued) -> None:
        step_loss = float(pending.loss)  # waits for that step only; the next one is already queued
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {pending.step}; lower --lr or check the data")
        dt = _seconds(pending.began, pending.ended)
        rec = _step_record(run, result, pending, step_loss, dt, t_run)
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        if bar is not None:
            _update_bar(bar, rec)
        result.save_s += _maybe_save(run, pending.step)

    try:
        pending, began = None, None  # began: where the next step's time starts (None: now)
        for step in range(run.start_step + 1, run.end_step + 1):
            began = _clock(run.device) if began is None else began
            enqueued = _train_step(run, step)
            enqueued.began, began = began, enqueued.ended
            if pending is not None:
                complete(pending)
            pending = enqueued
            if _host_needs_step(run, step):
                complete(pending)
                pending, began = None, None  # an eval or a save ran: not the next step's time
    except KeyboardInterrupt:
        raise _interrupted(run, run.start_step + len(result.losses)) from None
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during the steps; ``str()`` says the last logged step, the last checkpoint and how to
    continue (`main` prints it and exits 130)."""

    def __init__(self, message: str, main_rank: bool):
        super().__init__(message)
        self.main_rank = main_rank


def _interrupted(run: _Run, step: int) -> TrainingInterrupted:
    """Where an interrupted run stands: its newest intact checkpoint in --output, else the one it
    resumed from (another run's folder), else none."""
    found = ckpt.latest_checkpoint(run.out) or run.data.resume_dir
    where = f"interrupted after step {step} of {run.end_step}"
    if found is None:
        how = (f"no checkpoint was written (--save-every {run.args.save_every}); rerun with `--resume auto` "
               f"to start over in {run.out}")
    elif run.out.resolve() in Path(found).resolve().parents:
        how = f"last checkpoint {found}: `--resume auto` (same flags) continues from it"
    else:
        how = f"no checkpoint in {run.out} yet: `--resume {found}` (same flags) continues from the one it resumed"
    return TrainingInterrupted(f"{where}; {how}", run.dd.main)


def _host_needs_step(run: _Run, step: int) -> bool:
    """Whether ``step``'s results must be read before the next step is enqueued: it evaluates, saves a
    checkpoint (weights and data position of exactly that step), or is the last."""
    return step == run.end_step or _saves_at(run, step) or _evaluates_at(run, step)


def _evaluates_at(run: _Run, step: int) -> bool:
    return run.data.eval_ds is not None and step % run.args.eval_every == 0


def _saves_at(run: _Run, step: int) -> bool:
    """Checkpoint every ``--save-every`` steps and at the last step (always at a ``--stop-after`` stop)."""
    args = run.args
    periodic = args.save_every > 0 and (step % args.save_every == 0 or step == run.end_step)
    return periodic or (step == run.end_step and args.stop_after is not None)


@dataclass
class _Enqueued:
    """A train step launched on the device, not yet read back: its global loss (0-dim, on the device),
    grad norm (or None), the learning rate it used, and the `_clock` marks its time runs between."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float
    ended: Any = None
    began: Any = None


def _clock(device: torch.device) -> float | torch.cuda.Event:
    """A mark after the work queued so far: a CUDA event on CUDA (the host runs ahead of the GPU, so
    its clock tells when work was queued, not when it ran), else the host's clock (the CPU computes
    as it goes)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(began: float | torch.cuda.Event, ended: float | torch.cuda.Event) -> float:
    """Seconds between two `_clock` marks; call it once the work before ``ended`` is done (the step's
    loss was read back), so a CUDA event's time is there without a further sync."""
    if isinstance(began, float):
        return ended - began
    return began.elapsed_time(ended) / 1e3


def _train_step(run: _Run, step: int) -> _Enqueued:
    """One optimizer step over ``--grad-accum`` micro-batches, enqueued without a host read: returns the
    global loss and grad norm as device tensors (see :func:`_run_steps`).

    Token-weighted loss over the whole global batch (all micro-batches, all ranks), so the gradient
    equals one big batch's whatever --grad-accum and the process count: each micro-batch's mean loss
    is re-weighted by its share of the step's target tokens. (FSDP averages gradients over ranks,
    hence the world_size factor.)"""
    args, dd, device, model = run.args, run.dd, run.device, run.model
    micro_batches = [next(run.data.train_iter) for _ in range(args.grad_accum)]
    n_local = torch.stack([(b["labels"][:, 1:] != fdata.IGNORE_INDEX).sum() for b in micro_batches])
    # non_blocking: a blocking host-to-device copy waits for the whole stream (the previous step)
    n_global = dd.sum(n_local.sum().float().to(device, non_blocking=True))
    loss_sum = torch.zeros((), device=device)
    for micro, cpu_batch in enumerate(micro_batches):
        batch = model_inputs(cpu_batch, device, args.attn == "flash")
        if dd.enabled:
            # Reduce-scatter gradients only on the last micro-batch.
            model.set_requires_gradient_sync(micro == args.grad_accum - 1)
        with run.autocast():
            loss = model(**batch).loss
        n = n_local[micro].to(device, non_blocking=True)
        # an all-ignored micro-batch has a nan mean (torch semantics) and zero gradients
        weighted = torch.where(n > 0, loss.float() * n, torch.zeros_like(loss, dtype=torch.float32))
        weighted = weighted / n_global
        (weighted * dd.world_size).backward()
        loss_sum += weighted.detach()
    if args.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    else:
        grad_norm = None
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used (the scheduler moves on below)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = dd.sum(loss_sum)
    return _Enqueued(step, loss_sum, grad_norm, lr, ended=_clock(device))


def _step_record(run: _Run, result: TrainResult, pending: _Enqueued, step_loss: float, dt: float,
                 t_run: float) -> dict:
    """The step's metrics.jsonl record (with ``eval_loss`` on eval steps); updates the throughput
    counters and ``result``'s losses."""
    step, grad_norm = pending.step, pending.grad_norm
    tok_s = run.tokens_per_step / dt
    if step > run.start_step + 1:  # the first step pays for compilation / allocator warmup
        run.timed_step_s.append(dt)
    mfu = run.fpt * tok_s / (run.peak * run.dd.world_size) if run.peak else None
    mem = _peak_mem_gib(run.device)
    result.losses.append(step_loss)
    rec = {"step": step, "loss": step_loss, "lr": pending.lr,
           "grad_norm": None if grad_norm is None else float(grad_norm),
           "tokens": step * run.tokens_per_step, "tokens_per_s": tok_s, "mfu": mfu,
           "peak_mem_gib": mem, "elapsed_s": time.perf_counter() - t_run}

    args = run.args
    if _evaluates_at(run, step):
        t0 = time.perf_counter()  # evaluate reads its loss back: the host's clock holds its time
        ev = evaluate(run.model, run.data.eval_ds, args.batch_size, args.eval_batches, run.dd, run.device,
                      run.autocast, packed=args.attn == "flash")
        rec["eval_loss"], rec["eval_s"] = ev, time.perf_counter() - t0
        result.eval_losses.append((step, ev))
        result.eval_s += rec["eval_s"]
    return rec


def _update_bar(bar, rec: dict) -> None:
    post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:,.0f}", "mem": f"{rec['peak_mem_gib']:.1f}G"}
    if rec["mfu"] is not None:
        post["mfu"] = f"{100 * rec['mfu']:.1f}%"
    if "eval_loss" in rec:
        post["eval"] = f"{rec['eval_loss']:.4f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def _maybe_save(run: _Run, step: int) -> float:
    """Checkpoint where :func:`_saves_at` says; returns the seconds it took (0.0: no save)."""
    if not _saves_at(run, step):
        return 0.0
    t0 = time.perf_counter()  # the save reads the weights back: the host's clock holds its time
    check_finite_params(run.model, run.dd, step)
    run.last_ckpt = ckpt.save_checkpoint(
        run.out, step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        data_state=run.data.train_iter.state_dict(), train_args=run.train_args, tokenizer=run.data.tok,
    )
    return time.perf_counter() - t0


def _finish(run: _Run, result: TrainResult, dtype: str) -> TrainResult:
    """Throughput and peak memory into ``result``; at --max-steps the final model and loss.png; the
    one-line JSON summary on stdout (rank 0)."""
    dd, fpt, end_step = run.dd, run.fpt, run.end_step
    result.last_checkpoint = run.last_ckpt
    timed_s = sum(run.timed_step_s)
    if timed_s > 0:
        result.tokens_per_s = run.tokens_per_step * len(run.timed_step_s) / timed_s
        result.mfu = fpt * result.tokens_per_s / (run.peak * dd.world_size) if run.peak else None
        result.median_step_tokens_per_s = run.tokens_per_step / statistics.median(run.timed_step_s)
    result.peak_mem_gib = _peak_mem_gib(run.device)
    # every rank's peak during training (the summary reports them all under FSDP2)
    peaks = torch.zeros(dd.world_size, device=run.device)
    peaks[dd.rank] = result.peak_mem_gib
    peaks = dd.sum(peaks).tolist()
    trained = bool(result.losses)  # False: resumed at (or past) its end, nothing ran
    if end_step == run.args.max_steps and (trained or not (run.out / "final").is_dir()):
        check_finite_params(run.model, dd, end_step)
        result.final_dir = run.out / "final"
        ckpt.export_model(run.model, result.final_dir, tokenizer=run.data.tok)
        if dd.main:
            plot_losses(run.metrics_path, run.out / "loss.png")
    elif end_step == run.args.max_steps:
        result.final_dir = run.out / "final"  # the finished run's, left as it is
    if dd.main:
        final_loss = result.losses[-1] if trained else _logged_loss(run.metrics_path, run.start_step)
        summary = {"steps": run.start_step + len(result.losses), "final_loss": final_loss,
                   "tokens_per_s": result.tokens_per_s, "mfu": result.mfu,
                   "median_step_tokens_per_s": result.median_step_tokens_per_s, "peak_mem_gib": result.peak_mem_gib,
                   "peak_mem_gib_per_rank": peaks, "eval_s": result.eval_s, "save_s": result.save_s,
                   "flops_per_token": fpt, "world_size": dd.world_size, "dtype": dtype, "attn": run.args.attn}
        print(json.dumps(summary))
    return result


def _logged_loss(metrics_path: Path, step: int) -> float | None:
    """The train loss metrics.jsonl holds for ``step`` (a resumed run that had nothing to do reports
    the loss it ended with); None if the log lacks it."""
    if not metrics_path.is_file():
        return None
    return next((rec.get("loss") for _, rec in reversed(_read_metrics(metrics_path)) if rec.get("step") == step), None)


def main(argv: list[str] | None = None) -> int:
    """`flashlm train` entry point: 0 on success, 2 with a one-line message on bad input, 130 (the
    shell's code for SIGINT) on Ctrl-C with a line saying where the run stands."""
    try:
        train(argv)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, ImportError, FloatingPointError) as e:
        print(f"flashlm train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            if e.main_rank:
                print(f"flashlm train: {e}", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0":
            print("flashlm train: interrupted before the first step", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
