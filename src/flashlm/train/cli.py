"""`flashlm train`: padding-free packed training with checkpoints and exact resume, one process to FSDP2.

    flashlm train --model tiny --data corpus/ --output runs/tiny --max-steps 200
    torchrun --nproc-per-node 8 -m flashlm.train --model llama-1b --data corpus/ --tokenizer tok.json \
        --seq-length 2048 --batch-size 8 --output runs/1b

This module holds the flags (`build_parser`), their checks (`check_args`), `train` (flags -> the run
of `flashlm.train.loop`) and `main` (exit codes, Ctrl-C). Data, checkpoints and metrics: see
docs/training.md, `flashlm.train.data`, `flashlm.train.checkpoint`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flashlm.errors import InputError
from flashlm.models.fp8 import RECIPES, check_fp8_available, check_fp8_device
from flashlm.train import run_folder
from flashlm.train.inputs import DEFAULT_BPE_VOCAB, DEFAULT_SEQ_LENGTH
from flashlm.train.loop import TrainingInterrupted, TrainResult, run_training
from flashlm.train.parallel import init_distributed, run_device

DTYPES = ("auto", "bf16", "fp32")
MAX_LR = 1.0


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
    g.add_argument("--model", default="tiny",
                   help="preset name (tiny, small, llama-1b, llama-3b) or an HF checkpoint folder")
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
    g.add_argument("--fp8", default=None, choices=RECIPES,
                   help="FP8 matmuls in the decoder layers' projections (torchao float8, pip install "
                        "'flashlm[fp8]'; a GPU of compute capability 8.9+, bf16): 'tensorwise' (under torchrun "
                        "its weights are all-gathered in float8) or 'rowwise'; lm_head and checkpoints stay bf16")
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
    check_fp8_flag(args)


def check_fp8_flag(args: argparse.Namespace) -> None:
    """``--fp8`` needs torchao, bf16 compute and a CUDA GPU of compute capability 8.9+ (the device the run
    would take: `run_device`): refused here, before the run touches --output."""
    if args.fp8 is None:
        return
    check_fp8_available()
    device = run_device(args.device)
    if device.type != "cuda":
        raise InputError(f"--fp8 {args.fp8}: FP8 matmuls need a CUDA GPU of compute capability 8.9+ (H100, H200, "
                         f"L40S); this run is on {device}{'' if args.device else ' (no CUDA device)'}: drop --fp8")
    check_fp8_device(device)
    if args.dtype == "fp32":
        raise InputError(f"--fp8 {args.fp8} computes in bf16 around its float8 matmuls: drop --dtype fp32 "
                         "(--dtype bf16, the CUDA default)")


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

def train(argv_or_args: list[str] | argparse.Namespace | None = None) -> TrainResult:
    """Run training (see `build_parser` for the flags). Raises ValueError/FileNotFoundError with a clear
    message for bad input before any training step."""
    if isinstance(argv_or_args, argparse.Namespace):
        args = argparse.Namespace(**vars(argv_or_args))  # a copy: defaults resolved here stay here
    else:
        args = build_parser().parse_args(argv_or_args)
    check_args(args)
    run_folder.check_output(args.output)  # the raw string: Path("") is "."
    out = Path(args.output)
    if args.resume is None:
        run_folder.refuse_used_folder(out, "pass --resume auto to continue it")
    dd, device = init_distributed(args.device)
    try:
        return run_training(args, out, dd, device)
    finally:
        if dd.enabled and dist.is_initialized():
            dist.destroy_process_group()


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

