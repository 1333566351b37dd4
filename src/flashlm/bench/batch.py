"""The benchmark's inputs: one random batch (dense, left-padded or packed) shared by every model row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """One benchmark batch, shared by every model.

    input_ids (batch, seqlen) int64; attention_mask (batch, seqlen) int64 with left padding or None;
    position_ids (batch, seqlen) int64 restarting at 0 per document when packed, else None;
    labels (batch, seqlen) HF-style (shifted inside the model), -100 at pads, at each row's first real
    token and at document starts (no context to predict them from).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor
    real_tokens: int
    row_lengths: list[int]
    doc_lengths: list[list[int]] = field(default_factory=list)
    cu_seqlens: torch.Tensor | None = None  # packed: int32 (num_docs + 1,) over the flattened batch

    @property
    def max_doc_length(self) -> int:
        return max(map(max, self.doc_lengths))

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real_tokens / self.input_ids.numel()

    def model_inputs(self, name: str) -> dict[str, Any]:
        """Keyword inputs of model ``name`` for a forward. flashlm's models derive positions from the
        left-padded mask themselves; HF's forward does not (only its generate does), so HF also gets the
        same position ids explicitly (cumsum(mask) - 1, clamped at 0). Packed, the flash model also gets
        cu_seqlens/max_seqlen, as a packing data loader would give it (no detection, no host read)."""
        hf = name.startswith("hf-")
        kw: dict[str, Any] = {"input_ids": self.input_ids}
        if name == "flash" and self.cu_seqlens is not None:
            kw.update(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_doc_length)
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask
            if hf:
                kw["position_ids"] = (self.attention_mask.cumsum(-1) - 1).clamp_(min=0)
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        return kw


def _split_total(total: int, parts: int, lo: int, hi: int, gen: torch.Generator) -> list[int]:
    """Random integers in [lo, hi] summing to ``total`` (requires parts*lo <= total <= parts*hi)."""
    weights = torch.rand(parts, generator=gen) + 0.5
    sizes = [min(hi, max(lo, int(w))) for w in (weights / weights.sum() * total).tolist()]
    i = 0
    while sum(sizes) != total:  # walk the rows, moving one token at a time toward the exact total
        step = 1 if sum(sizes) < total else -1
        if lo <= sizes[i % parts] + step <= hi:
            sizes[i % parts] += step
        i += 1
    return sizes


def make_batch(batch_size: int, seq_length: int, vocab_size: int, *, padding_ratio: float = 0.0,
               packed: bool = False, pad_token_id: int = 0, device: str | torch.device = "cpu",
               seed: int = 0) -> Batch:
    """Random tokens; left padding with random row lengths whose pad fraction is ~``padding_ratio``
    (exact up to rounding; every row keeps >= 1 real token), or rows packed with several documents of
    random lengths in [seqlen/8, seqlen/2] (the last one fills the row) with restarting positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_length), generator=gen)
    mask = position_ids = None
    labels = ids.clone()
    row_lengths = [seq_length] * batch_size
    docs: list[list[int]] = []
    if padding_ratio > 0:
        real = max(batch_size, round(batch_size * seq_length * (1.0 - padding_ratio)))
        row_lengths = _split_total(real, batch_size, 1, seq_length, gen)
        mask = torch.zeros(batch_size, seq_length, dtype=torch.long)
        for r, n in enumerate(row_lengths):
            mask[r, seq_length - n:] = 1
        ids = ids.masked_fill(mask == 0, pad_token_id)
        # No loss on pads, nor on a row's first real token: it would be predicted from a pad slot,
        # whose output each implementation leaves different (a fully masked attention row).
        labels = ids.masked_fill(mask == 0, -100)
        for r, n in enumerate(row_lengths):
            labels[r, seq_length - n] = -100
    elif packed:
        lo, hi = max(1, seq_length // 8), max(1, seq_length // 2)
        position_ids = torch.empty(batch_size, seq_length, dtype=torch.long)
        for r in range(batch_size):
            lens, left = [], seq_length
            while left > 0:
                n = left if left <= hi else int(torch.randint(lo, hi + 1, (1,), generator=gen))
                lens.append(n)
                left -= n
            docs.append(lens)
            start = 0
            for n in lens:
                position_ids[r, start:start + n] = torch.arange(n)
                labels[r, start] = -100  # no loss for predicting a document's first token from the previous one
                start += n
    real_tokens = sum(row_lengths)
    cu = None
    if docs:
        cu = torch.tensor([0, *[n for row in docs for n in row]], dtype=torch.int64).cumsum(0).to(torch.int32)

    def to(t):
        return None if t is None else t.to(device)

    return Batch(to(ids), to(mask), to(position_ids), to(labels), real_tokens, row_lengths, docs, to(cu))
