"""Sampling for generation: greedy, temperature, top-k, top-p, drawn without a host sync.

``sample_next_token`` picks one token per row from ``(batch, vocab)`` logits by the exponential race
``argmax(p / E)``, ``E ~ Exp(1)``, which samples from ``p`` like ``torch.multinomial`` but without a
device-to-host synchronization (so a CUDA graph can capture it). ``SamplingKey`` is the sampling rule
of a decode loop (plus its EOS ids and padding), hashable so that a captured decode step can say which
rule it bakes in. Used by ``flashlm.generation.loop`` (the loop) and ``flashlm.generation.cuda_graph`` (the
fixed-shape step); it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingKey", "argmax_rows", "sample_next_token", "top_k_filter", "top_p_filter"]


@dataclass(frozen=True)
class SamplingKey:
    """Everything a captured step bakes in besides shapes: the sampling rule, EOS ids and padding."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` largest logits of each row ``(batch, vocab)``, set the rest to -inf.
    Ties at the k-th value are all kept. ``top_k <= 0`` or ``>= vocab`` keeps everything."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter on ``(batch, vocab)`` logits: keep the smallest set of most likely tokens whose
    probability sum reaches ``top_p`` (the most likely token is always kept), -inf elsewhere."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # mass strictly before each token: drop a token once the tokens before it already reach top_p
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# argmax over a wide vocab in two passes: torch's one-pass reduction of one (1, 128256) row runs one
# block (H200 graph replay: 26.5 us); (row, group) maxima then the best group take 11.6 us.
_ARGMAX_GROUP = 256
_ARGMAX_TWO_PASS_MIN = 16384


def argmax_rows(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` of ``(batch, vocab)``, the same index (the first maximum; a NaN counts as the
    maximum, as in torch), in two passes on CUDA when vocab is wide and a multiple of 256."""
    if not x.is_cuda or x.shape[-1] < _ARGMAX_TWO_PASS_MIN or x.shape[-1] % _ARGMAX_GROUP:
        return x.argmax(dim=-1)
    return _argmax_two_pass(x)


def _argmax_two_pass(x: Tensor) -> Tensor:
    batch, vocab = x.shape
    values, within = x.reshape(batch, vocab // _ARGMAX_GROUP, _ARGMAX_GROUP).max(dim=-1)
    group = values.argmax(dim=-1, keepdim=True)
    return (group * _ARGMAX_GROUP + within.gather(-1, group)).squeeze(-1)


def sample_next_token(logits: Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                      race: Tensor | None = None) -> Tensor:
    """Pick one token per row from ``logits`` ``(batch, vocab)``; returns int64 ``(batch,)``.

    Greedy (``argmax``) unless ``do_sample``. Sampling divides by ``temperature``, applies top-k then
    top-p, and draws by the exponential race ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` (the index of
    the first of independent exponential clocks with rates ``p_i`` to ring: distributed as ``p``).
    No host synchronization. ``generator`` (on the logits' device) makes draws reproducible.
    ``race``: the E_i already drawn, fp32 ``(batch, vocab)`` (``torch.empty(...).exponential_(1.0,
    generator=...)`` gives the numbers this function would draw itself); then nothing is drawn here,
    which keeps a compiled caller free of generator calls.
    """
    if not do_sample:
        return argmax_rows(logits)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    if race is None:
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # E == 0 would give 0/0 = nan for a filtered-out token (argmax picks nan): clamp it away
    # (out of place: a caller's buffer stays as drawn).
    race = race.clamp_min(torch.finfo(race.dtype).tiny)
    return argmax_rows(probs / race)
