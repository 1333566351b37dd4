"""The run folder (``--output``): one run per folder, held under a lock for the whole run; which
checkpoint a run resumes from and whether its settings may; the tokenizer kept there; metrics.jsonl
and loss.png.

Every check here runs before the run writes anything into the folder, so a refused command changes
nothing on disk.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

from flashlm import folders
from flashlm.errors import InputError
from flashlm.train import checkpoint as ckpt
from flashlm.train import data as fdata
from flashlm.train.parallel import Dist

# Training args a resume may change (how the run is watched, saved or computed, not what it computes;
# --model and --vocab-size are guarded by the model-config check); batch size and accumulation may
# change too (the data position is kept in rows), with a warning.
RESUME_MAY_CHANGE = {"model", "vocab_size", "data", "cache_dir", "tokenizer", "output", "resume", "stop_after",
                     "no_progress", "eval_every", "eval_batches", "save_every", "device", "compile",
                     "activation_checkpointing", "peak_tflops", "batch_size", "grad_accum"}
# Flags added after runs were saved, with the value a run saved before the flag implicitly had (a
# checkpoint without "fp8" in its train_args trained in bf16): compared as if saved so.
RESUME_ADDED_ARGS = {"fp8": None}
# Files and folders that mark --output as holding a run (tokenizer.json alone does not: it is reused).
RUN_MARKERS = ("metrics.jsonl", ckpt.CHECKPOINTS, "final", "loss.png")


def check_output(output: str | os.PathLike) -> None:
    """Refuse an --output that names no folder (``''`` would put the run among the working
    directory's files) or that cannot be made or written. Creates nothing: the run's lock makes the
    folder once the run starts (`lock_output`)."""
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


def lock_output(out: Path, dd: Dist, device: torch.device) -> folders.FolderLock | None:
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


def refuse_used_folder(out: Path, hint: str) -> None:
    """A run folder belongs to one run: refuse to start another in a folder that holds one."""
    used = [m for m in RUN_MARKERS if (out / m).exists()]
    if used:
        raise InputError(
            f"--output {out} holds an earlier run ({', '.join(used)}); {hint}, or choose a new --output "
            "(or delete the old run)"
        )


def find_resume_dir(args, out: Path) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), refusing a resume that would mix two runs
    in --output, and a ``--resume auto`` that finds checkpoints but can read none of them (starting
    over would write over the run it could not read)."""
    if args.resume is None:
        refuse_used_folder(out, "pass --resume auto to continue it")  # again, now under the run's lock
        return None
    if args.resume == "auto":
        found, damaged = ckpt.find_checkpoint(out)
        if found is None and damaged:
            raise ckpt.damaged_error(str(out / ckpt.CHECKPOINTS), damaged)
        for cand, problem in damaged:
            warnings.warn(f"skipping damaged checkpoint {cand}: {problem}", stacklevel=3)
        if found is None and any((out / m).exists() for m in ("final", "loss.png")):
            refuse_used_folder(out, "it has no checkpoint to resume (it finished with --save-every 0?)")
        return found
    found = ckpt.resolve_checkpoint(args.resume)
    if out.resolve() not in found.resolve().parents:  # a checkpoint of another run, into this folder
        refuse_used_folder(out, f"resuming {found} there would mix two runs' logs")
    return found


def check_resume_args(saved: dict, args) -> list[str]:
    """Refuse (``InputError``) a resume whose training args differ from the saved run's beyond
    `RESUME_MAY_CHANGE`; return the changed batch-shape args (allowed, worth a warning)."""
    now, saved = vars(args), {**RESUME_ADDED_ARGS, **saved}
    diffs = [f"--{k.replace('_', '-')} {saved[k]!r} (saved) != {now[k]!r} (now)" for k in sorted(saved)
             if k in now and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if diffs:
        raise InputError(
            "--resume: the checkpoint belongs to a run with other settings: " + "; ".join(diffs)
            + ". Resume with the same flags, or start a new run from its weights with --model <checkpoint>/model "
            "and a new --output"
        )
    return [k for k in ("batch_size", "grad_accum") if k in saved and saved[k] != now.get(k)]


def save_run_tokenizer(out: Path, dd: Dist, tok, resumed: bool) -> None:
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


def read_metrics(path: Path) -> list[tuple[str, dict]]:
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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a run killed after its last checkpoint logged steps that the
    resumed run logs again), and a torn last line."""
    if not path.is_file():
        return
    keep = [ln for ln, rec in read_metrics(path) if rec.get("step", 0) <= step]
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
    rows = [rec for _, rec in read_metrics(metrics_path)]
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



def logged_loss(metrics_path: Path, step: int) -> float | None:
    """The train loss metrics.jsonl holds for ``step`` (a resumed run that had nothing to do reports
    the loss it ended with); None if the log lacks it."""
    if not metrics_path.is_file():
        return None
    return next((rec.get("loss") for _, rec in reversed(read_metrics(metrics_path)) if rec.get("step") == step), None)


