"""`flashlm train` and its library: padding-free packed training with checkpoints and exact resume,
one process to FSDP2 (docs/training.md).

    cli.py         the flags, their checks, `train` (flags -> a run) and `main` (exit codes, Ctrl-C)
    loop.py        the run: model and optimizer, the step loop, eval, timing, metrics, the final model
    parallel.py    processes (`Dist`), FSDP2, activation checkpointing, compiled layers
    inputs.py      config, tokenizer, resume checks and packed data: checked before any model is built
    run_folder.py  --output: its lock, the checkpoint to resume, the kept tokenizer, metrics.jsonl
    data.py        files -> tokens (cached) -> packed rows -> a resumable sharded iterator
    checkpoint.py  atomic training checkpoints (HF weights + optimizer/scheduler/data/RNG state, DCP)
"""

from flashlm.train.cli import DTYPES, MAX_LR, build_parser, check_args, check_device, main, train
from flashlm.train.inputs import DEFAULT_BPE_VOCAB, DEFAULT_SEQ_LENGTH, setup_tokenizer
from flashlm.train.loop import (
    PEAK_BF16_TFLOPS,
    TrainingInterrupted,
    TrainResult,
    check_finite_params,
    evaluate,
    flops_per_token,
    lr_lambda,
    make_optimizer,
    model_inputs,
    peak_flops,
)
from flashlm.train.parallel import Dist, apply_activation_checkpointing, apply_fsdp, init_distributed
from flashlm.train.run_folder import RESUME_MAY_CHANGE, RUN_MARKERS, check_resume_args, plot_losses

__all__ = [
    "DEFAULT_BPE_VOCAB", "DEFAULT_SEQ_LENGTH", "DTYPES", "MAX_LR", "PEAK_BF16_TFLOPS", "RESUME_MAY_CHANGE",
    "RUN_MARKERS", "Dist", "TrainResult", "TrainingInterrupted", "apply_activation_checkpointing", "apply_fsdp",
    "build_parser", "check_args", "check_device", "check_finite_params", "check_resume_args", "evaluate",
    "flops_per_token", "init_distributed", "lr_lambda", "main", "make_optimizer", "model_inputs", "peak_flops",
    "plot_losses", "setup_tokenizer", "train",
]
