"""The training run: model and optimizer built, the checkpoint loaded, the step loop (train, eval,
checkpoint, metrics), throughput and the final model. `run_training` is the run once `flashlm.train.cli`
has checked the flags and `flashlm.train.parallel` set up the processes.

Precision (``--dtype``): master weights and AdamW state are always fp32. ``bf16`` runs the forward
and backward in bf16: in one process the model's parameters are bf16 and
:class:`flashlm.ops.adamw.MasterWeightAdamW` steps fp32 copies of them (``--precision master``, the
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
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashlm.attention.padding import prepare_from_position_ids
from flashlm.ops.adamw import MasterWeightAdamW
from flashlm.train import checkpoint as ckpt
from flashlm.train import data as fdata
from flashlm.train import run_folder
from flashlm.train.inputs import PreparedData, prepare_data
from flashlm.train.parallel import Dist, apply_activation_checkpointing, apply_fp8, apply_fsdp, compile_layers

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


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

def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   model_dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95, eps 1e-8); matrices decay, norms and biases do not. With ``model_dtype``
    the model's parameters are cast to it and the optimizer steps fp32 master copies
    (:class:`~flashlm.ops.adamw.MasterWeightAdamW`)."""
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


@torch.no_grad()
def model_inputs(cpu_batch: dict[str, torch.Tensor], device: torch.device, packed: bool) -> dict:
    """A CPU batch of :class:`~flashlm.train.data.PackedDataset` moved to ``device``; with ``packed`` (the
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


@dataclass
class _Run:
    """The state the step loop works on: the built run plus the throughput counters it updates."""

    args: argparse.Namespace
    out: Path
    dd: Dist
    device: torch.device
    data: PreparedData
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
    after_step: Callable[[], None] | None = None  # run after each optimizer step (--fp8 under FSDP2)


def run_training(args, out: Path, dd: Dist, device: torch.device) -> TrainResult:
    """The run, holding --output's lock from before anything in it is read to the end."""
    lock = run_folder.lock_output(out, dd, device)
    try:
        return _train_locked(args, out, dd, device)
    finally:
        if lock is not None:
            lock.release()  # also removes --output again if this run made it and left it empty


def _train_locked(args, out: Path, dd: Dist, device: torch.device) -> TrainResult:
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    bf16 = dtype == "bf16"
    data = prepare_data(args, out, dd)
    model, fpt, n_params, after_step = _build_model(args, data, dd, device, bf16)
    optimizer, scheduler, master = _build_optimizer(args, model, dd, bf16)
    start_step = _resume(args, out, dd, data, model, optimizer, scheduler)
    run = _Run(
        args=args, out=out, dd=dd, device=device, data=data, model=model, optimizer=optimizer,
        scheduler=scheduler, autocast=_autocast_factory(bf16 and not dd.enabled and not master, device),
        fpt=fpt, peak=peak_flops(device, args.peak_tflops),
        tokens_per_step=args.batch_size * args.seq_length * args.grad_accum * dd.world_size,
        start_step=start_step, end_step=args.stop_after if args.stop_after is not None else args.max_steps,
        train_args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        metrics_path=out / "metrics.jsonl", after_step=after_step,
    )
    result = TrainResult(start_step=start_step)
    if dd.main:
        _print_banner(run, dtype, n_params)
    _run_steps(run, result)
    return _finish(run, result, dtype)


def _build_model(args, data: PreparedData, dd: Dist, device: torch.device, bf16: bool):
    """The fp32 model seeded with ``--seed`` (the same init on every rank), with FP8 projections,
    activation checkpointing, compiled layers and FSDP2 as asked, in that order; returns (model, FLOPs per
    token, parameters, what to run after each optimizer step or None)."""
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
    after_step = apply_fp8(model, args.fp8, dd.enabled, bf16) if args.fp8 else None
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    if args.compile:
        compile_layers(model)
    if dd.enabled:
        apply_fsdp(model, bf16)
    return model, fpt, n_params, after_step


def _build_optimizer(args, model: nn.Module, dd: Dist, bf16: bool):
    """(optimizer, LR scheduler, master): with bf16 in one process and ``--precision master`` the
    model's parameters become bf16 and the optimizer steps fp32 master copies (``master`` True)."""
    master = bf16 and not dd.enabled and args.precision == "master"
    optimizer = make_optimizer(model, args.lr, args.weight_decay, torch.bfloat16 if master else None)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, args.max_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.max_steps, warmup, args.min_lr_ratio))
    return optimizer, scheduler, master


def _resume(args, out: Path, dd: Dist, data: PreparedData, model, optimizer, scheduler) -> int:
    """Load the checkpoint into model, optimizer, scheduler and data iterator (and cut metrics.jsonl
    back to its step), or start a fresh log; returns the step to continue from."""
    start_step = 0
    metrics_path = out / "metrics.jsonl"
    if data.resume_dir is not None:
        state = ckpt.load_checkpoint(data.resume_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        data.train_iter.load_state_dict(state["data"])
        start_step = state["step"]
    # Every input is checked and the checkpoint loaded: from here on the run writes into --output.
    run_folder.save_run_tokenizer(out, dd, data.tok, resumed=data.resume_dir is not None)
    if data.resume_dir is not None:
        if data.changed and dd.main:
            print(f"flashlm train: resuming with changed {data.changed}: the run will not match an "
                  "uninterrupted one", file=sys.stderr)
        if dd.main:
            run_folder.truncate_metrics(metrics_path, start_step)
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
        f"flashlm train: {args.model} ({args.attn}, {n_params / 1e6:.1f}M params, {dtype}"
        f"{f' + fp8 {args.fp8}' if args.fp8 else ''}) on "
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
    if run.after_step is not None:
        run.after_step()
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
            run_folder.plot_losses(run.metrics_path, run.out / "loss.png")
    elif end_step == run.args.max_steps:
        result.final_dir = run.out / "final"  # the finished run's, left as it is
    if dd.main:
        final_loss = result.losses[-1] if trained else run_folder.logged_loss(run.metrics_path, run.start_step)
        summary = {"steps": run.start_step + len(result.losses), "final_loss": final_loss,
                   "tokens_per_s": result.tokens_per_s, "mfu": result.mfu,
                   "median_step_tokens_per_s": result.median_step_tokens_per_s, "peak_mem_gib": result.peak_mem_gib,
                   "peak_mem_gib_per_rank": peaks, "eval_s": result.eval_s, "save_s": result.save_s,
                   "flops_per_token": fpt, "world_size": dd.world_size, "dtype": dtype, "attn": run.args.attn,
                   "fp8": run.args.fp8}
        print(json.dumps(summary))
    return result


