"""The one timing helper of ``flashlm bench`` and its subcommands.

Every measurement here is "warm up, then time N calls, report the median and the p10/p90 spread".
Three ways to time a call, each answering a different question:

- :func:`time_calls` with ``clock="wall"``: host wall time of each call with the device synchronized
  before and after (what a caller waits for: launches, host overhead and GPU work together);
- :func:`time_calls` with ``clock="cuda_event"``: GPU time between two CUDA events around each call
  (falls back to the wall clock off CUDA);
- :func:`time_loop`: N calls back to back, the host time before the final sync (the Python + launch
  cost when the GPU keeps up) and the wall time after it (the max of host and GPU time), per call.

:func:`time_steps` times a stepped loop from inside (``generate(on_step=...)``): its first step and
the mean of the later ones, synchronizing only at the start, after the first step and at the end.
:func:`time_once` times one synchronized call and hands back its result; :func:`graph_replay_s` is
Triton's CUDA-graph benchmark (GPU time without launch cost), for the decode-kernel probes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from flashlm._util import sync

__all__ = ["LoopTiming", "StepTiming", "Timing", "graph_replay_s", "quantile", "summarize", "time_calls",
           "time_loop", "time_once", "time_steps"]

Clock = Literal["wall", "cuda_event"]


def quantile(xs: list[float] | tuple[float, ...], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``xs`` (numpy's default method)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_s: list[float] | tuple[float, ...]) -> dict[str, float]:
    """Median and p10/p90 spread of per-call times given in seconds, as the bench JSON records them:
    ``median_ms``, ``p10_ms``, ``p90_ms``, ``steps``."""
    return {"median_ms": statistics.median(times_s) * 1e3, "p10_ms": quantile(times_s, 0.1) * 1e3,
            "p90_ms": quantile(times_s, 0.9) * 1e3, "steps": len(times_s)}


@dataclass(frozen=True)
class Timing:
    """The timed calls of one measurement (warm-up calls dropped), in seconds, and the clock used."""

    times_s: tuple[float, ...]
    clock: str

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def p10_s(self) -> float:
        return quantile(self.times_s, 0.1)

    @property
    def p90_s(self) -> float:
        return quantile(self.times_s, 0.9)

    def summary(self) -> dict[str, float]:
        """:func:`summarize` of the timed calls (``median_ms``, ``p10_ms``, ``p90_ms``, ``steps``)."""
        return summarize(self.times_s)


@dataclass(frozen=True)
class LoopTiming:
    """Per-call seconds of N back-to-back calls: ``host_s`` before the final sync, ``wall_s`` after."""

    host_s: float
    wall_s: float
    iters: int


def time_calls(fn: Callable[[], Any], *, iters: int, warmup: int = 0, device: str | torch.device = "cpu",
               clock: Clock = "wall", before: Callable[[], Any] | None = None,
               after: Callable[[], Any] | None = None) -> Timing:
    """Call ``fn`` ``warmup + iters`` times and time the last ``iters``.

    ``clock="wall"``: each call is fenced by a device sync before and after and timed on the host's
    ``perf_counter``. ``clock="cuda_event"`` (CUDA devices; the wall clock elsewhere): the warm-up
    calls run back to back, then one sync, then each call between two CUDA events (GPU time).
    ``before()`` runs untimed ahead of every call (e.g. fresh gradients for an optimizer step),
    ``after()`` untimed after every call, warm-up included (e.g. a progress bar's tick).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"time_calls needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if clock == "cuda_event" and torch.device(device).type == "cuda":
        return _time_cuda_events(fn, iters, warmup, before, after)
    if clock not in ("wall", "cuda_event"):
        raise ValueError(f"clock must be 'wall' or 'cuda_event', got {clock!r}")
    times = []
    for i in range(warmup + iters):
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return Timing(tuple(times), "wall")


def _time_cuda_events(fn, iters, warmup, before, after) -> Timing:
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
        if after is not None:
            after()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if after is not None:
            after()
    return Timing(tuple(times), "cuda_event")


def time_once(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn`` fenced by device syncs before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def time_loop(fn: Callable[[], Any], *, iters: int, warmup: int = 0,
              device: str | torch.device = "cpu") -> LoopTiming:
    """``warmup`` calls, a sync, then ``iters`` calls back to back: per call, the host time until the
    last call returned (launch-bound code: its host cost) and the wall time after the final sync."""
    if iters < 1:
        raise ValueError(f"time_loop needs iters >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = time.perf_counter() - t0
    sync(device)
    return LoopTiming(host / iters, (time.perf_counter() - t0) / iters, iters)


@dataclass(frozen=True)
class StepTiming:
    """A stepped loop timed by :func:`time_steps`, in seconds: from its start (step 0) to the end of
    its first step, and per later step (``nan`` with fewer than two steps); ``steps`` it ran."""

    first_s: float
    per_step_s: float
    steps: int


def time_steps(run: Callable[[Callable[[int], None]], Any],
               device: str | torch.device = "cpu") -> tuple[StepTiming, Any]:
    """(timing, result) of ``run(on_step)``: a loop that calls ``on_step(i)`` with the steps done so
    far, ``0`` where its timed part starts, then after each step (e.g. ``lambda on_step:
    generate(model, ids, on_step=on_step)``: 0 before the prefill, i after the i-th new token).

    The device is synchronized at ``on_step(0)``, at ``on_step(1)`` and after ``run`` returns, nowhere
    else, so the later steps queue ahead of the device as in an untimed run. First step: step 0 to
    step 1; per step: (end - step 1) / (steps - 1)."""
    marks: dict[int, float] = {}
    last = 0

    def on_step(i: int) -> None:
        nonlocal last
        if i <= 1:
            sync(device)
            marks[i] = time.perf_counter()
        last = i

    result = run(on_step)
    sync(device)
    end = time.perf_counter()
    if 0 not in marks or 1 not in marks:
        raise RuntimeError("time_steps: the loop never called on_step(0) and on_step(1) (its start and first "
                           "step); pass on_step through to it")
    per = (end - marks[1]) / (last - 1) if last > 1 else float("nan")
    return StepTiming(marks[1] - marks[0], per, last), result


def graph_replay_s(fn: Callable[[], Any], rep_ms: int = 20) -> float:
    """GPU seconds per call of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``:
    no launch cost), for kernels whose real use is a graph replay (the decode step). CUDA only."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms)) / 1e3
