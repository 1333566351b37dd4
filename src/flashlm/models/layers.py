"""Building blocks shared by the default (eager) and flash models.

Layouts: the residual stream is (batch, seqlen, hidden). `MultiHeadAttention._project_qkv` returns
q/k/v in BSHD (batch, seqlen, heads, head_dim), straight from the projections; the default
attention transposes to BHSD for its eager math, while the flash subclass stays in BSHD and only
replaces the parts between the projections (`_project_qkv`, `_project_out`).

RoPE follows transformers' "rotate_half" convention: cos/sin are (batch, seqlen, head_dim) fp32
with the two halves duplicated, and ``x * cos + rotate_half(x) * sin`` rotates pairs
(i, i + head_dim / 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32 and cast back (as
    HF Llama does: the cast to the input dtype happens before the weight multiply).

    ``unit_offset=True`` is Gemma's variant: the stored weight w is an offset, the scale is
    ``1 + w`` (so w starts at 0), and the multiply happens in fp32 before the cast."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.unit_offset else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        offset = ", unit_offset=True" if self.unit_offset else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{offset}"


def make_norm(config: ModelConfig, size: int | None = None) -> RMSNorm:
    """The family's RMSNorm over ``size`` (default hidden_size) features."""
    return RMSNorm(
        size or config.hidden_size, eps=config.rms_norm_eps, unit_offset=config.rms_norm_unit_offset
    )


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) fp32: ``theta^(-2i/d)``, with Llama 3.1 scaling when
    ``config.rope_scaling`` asks for it (low frequencies divided by ``factor``, a smooth ramp between
    ``low_freq_factor`` and ``high_freq_factor``), the same arithmetic as transformers."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # llama3 (the only scaled type ModelConfig accepts)
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary (per-row) positions.

    ``forward(position_ids)`` with position_ids (batch, seqlen) or (seqlen,) integer returns
    ``(cos, sin)``, each (batch, seqlen, head_dim) fp32, halves duplicated (rotate_half convention).
    Consumers that want the half-width tables (e.g. an interleaving-free rotary kernel taking
    (batch, seqlen, head_dim // 2)) slice ``cos[..., : head_dim // 2]``.

    ``inv_freq`` stays fp32 whatever dtype the model is cast to (see `_apply`).
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.register_buffer("inv_freq", rope_inv_freq(config, device), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) would cast inv_freq to bf16 and lose the high positions' precision;
        # recompute it in fp32 on whatever device the buffer moved to (to_empty on meta included).
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_inv_freq(self.config, self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, heads, seqlen, head_dim) and k (batch, kv_heads, seqlen, head_dim) — BHSD —
    by cos/sin (batch, seqlen, head_dim). The tables are cast to q's dtype first, as transformers
    does, so low-precision results match it bit for bit."""
    cos = cos.unsqueeze(1).to(q.dtype)
    sin = sin.unsqueeze(1).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_ACTIVATIONS = {
    "silu": F.silu,  # SwiGLU (Llama, Mistral, Qwen)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GeGLU (Gemma2)
}


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``; act is silu (SwiGLU) or tanh-approximated gelu
    (GeGLU) per ``config.hidden_act``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seqlen, head_dim) -> (batch, kv_heads * groups, seqlen, head_dim), each kv
    head repeated for the ``groups`` query heads that share it (GQA in the eager path)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def attention_mask_bhsd(
    q_len: int,
    kv_len: int,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask (batch or 1, 1, q_len, kv_len), True where query i may attend key j.

    Causal alignment is bottom-right: query i sits at absolute index i + kv_len - q_len, so it sees
    keys j <= i + kv_len - q_len (a decode step, q_len=1, sees the whole cache). A sliding window W
    additionally requires j > i + kv_len - q_len - W (W keys, itself included). ``padding_mask``
    (batch, kv_len) bool/int marks real tokens (1) vs padding (0) over the cache and the new tokens.
    """
    if padding_mask is not None:
        device = padding_mask.device
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]
    return mask


class MultiHeadAttention(nn.Module):
    """Causal self-attention with GQA, RoPE, optional sliding window and logit softcap; eager math.

    Parameters carry HF names (q_proj, k_proj, v_proj, o_proj, and q_norm/k_norm with
    ``config.qk_norm``). ``forward`` runs: `_project_qkv` (BSHD, q/k norms included) -> transpose
    to BHSD -> `apply_rope` -> cache update (BHSD) -> `_attend` (eager softmax in fp32) ->
    `_project_out`. A subclass with another kernel reuses the projections and replaces
    `forward`/`_attend`; it reads the per-layer attention shape from the attributes set here:
    ``scaling`` (softmax scale), ``sliding_window`` (W tokens or None, this layer's),
    ``softcap`` (attention logit cap or None), ``attention_dropout``.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.num_kv_groups = config.num_kv_groups
        self.head_dim = config.head_dim
        self.scaling = config.attention_scale
        self.sliding_window = config.sliding_window_for_layer(layer_idx)
        self.softcap = config.attn_logit_softcap
        self.attention_dropout = config.attention_dropout
        h, d = config.hidden_size, config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias  # Qwen2: q/k/v biased, o_proj not
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.attention_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over head_dim, shared by all heads, before RoPE
            self.q_norm = make_norm(config, d)
            self.k_norm = make_norm(config, d)

    def _project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (batch, seqlen, hidden) -> q (batch, seqlen, heads, head_dim), k and v
        (batch, seqlen, kv_heads, head_dim): BSHD views of the projections (no copy), except q/k
        with ``config.qk_norm``, which are normalized per head here, before any RoPE."""
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(b, s, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _project_out(self, attn_output: torch.Tensor) -> torch.Tensor:
        """attn_output (batch, seqlen, heads, head_dim) BSHD -> (batch, seqlen, hidden)."""
        b, s = attn_output.shape[:2]
        return self.o_proj(attn_output.reshape(b, s, self.num_heads * self.head_dim))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eager attention. q (batch, heads, q_len, head_dim), k/v (batch, kv_heads, kv_len, head_dim)
        — BHSD, after RoPE and the cache — and ``attention_mask`` the (batch, kv_len) padding mask or
        None. Returns (batch, q_len, heads, head_dim) BSHD.

        Scores are scaled by ``self.scaling``, soft-capped if configured, masked (causal bottom-right,
        window, padding) with the dtype's lowest value as transformers does (so fully padded query
        rows stay finite), softmaxed in fp32 and cast back to q's dtype before the value product.
        """
        q_len, kv_len = q.shape[2], k.shape[2]
        k = repeat_kv(k, self.num_kv_groups)
        v = repeat_kv(v, self.num_kv_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        mask = attention_mask_bhsd(q_len, kv_len, attention_mask, self.sliding_window, device=q.device)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=self.attention_dropout, training=self.training)
        return torch.matmul(probs, v).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (batch, q_len, hidden); cos/sin (batch, q_len, head_dim) fp32 for the new
        tokens' positions; attention_mask (batch, past_len + q_len) padding mask or None;
        past_key_values a cache with ``update(k, v, layer_idx)`` in BHSD, or None.
        Returns (batch, q_len, hidden)."""
        q, k, v = self._project_qkv(hidden_states)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        return self._project_out(self._attend(q, k, v, attention_mask))
