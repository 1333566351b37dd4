"""KV caches for the default (eager, BHSD) model.

`DynamicCache` grows by concatenation: simple and exact, the reference the flash model's static BSHD
cache (`flashlm.models.flash_cache`) is checked against.
"""

from __future__ import annotations

import torch


class DynamicCache:
    """Per-layer key/value tensors in BHSD: (batch, kv_heads, seqlen, head_dim), grown on each
    `update`. All rows share one length; padding inside it is described by the attention mask the
    caller keeps (left padding for batched prompts)."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value_states (batch, kv_heads, new_len, head_dim) to layer ``layer_idx`` and
        return the layer's full keys and values (batch, kv_heads, past_len + new_len, head_dim).
        Layers must be filled in order 0, 1, ... on the first call."""
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} and value_states "
                f"{tuple(value_states.shape)} must have the same shape"
            )
        if layer_idx < len(self.key_cache):
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key_states], dim=2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value_states], dim=2)
        elif layer_idx == len(self.key_cache):
            self.key_cache.append(key_states)
            self.value_cache.append(value_states)
        else:
            raise ValueError(f"layer_idx {layer_idx} skips layers: the cache holds {len(self.key_cache)}")
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for ``layer_idx`` (0 when empty)."""
        if layer_idx >= len(self.key_cache):
            return 0
        return self.key_cache[layer_idx].shape[2]

    def __len__(self) -> int:
        return len(self.key_cache)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select/reorder batch rows (e.g. drop finished rows): index_select on dim 0 of every layer."""
        for i in range(len(self.key_cache)):
            self.key_cache[i] = self.key_cache[i].index_select(0, beam_idx.to(self.key_cache[i].device))
            self.value_cache[i] = self.value_cache[i].index_select(0, beam_idx.to(self.value_cache[i].device))

    def crop(self, max_length: int) -> None:
        """Keep only the first ``max_length`` cached positions of every layer."""
        for i in range(len(self.key_cache)):
            self.key_cache[i] = self.key_cache[i][:, :, :max_length]
            self.value_cache[i] = self.value_cache[i][:, :, :max_length]
