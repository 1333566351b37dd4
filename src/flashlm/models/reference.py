"""The default (eager) model: a LLaMA decoder with BHSD attention and an explicit softmax, the ground truth
for everything else.

With the same weights it gives the same logits as ``transformers.LlamaForCausalLM`` (and
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM`` with their
config flags) in fp32; tests/test_default_model.py and tests/test_hf_families.py check that.
Parameter names are HF's, so state dicts load both ways unchanged.

Reads top to bottom: the layers the flash model shares (RMSNorm, RoPE tables, the gated MLP, the
attention projections), the eager attention, `DynamicCache` (grown by concatenation: the reference the
flash model's static cache is checked against), the decoder block, the model, input checks and the LM.

Layouts: the residual stream is (batch, seqlen, hidden). `MultiHeadAttention._project_qkv` returns q/k/v
in BSHD (batch, seqlen, heads, head_dim), straight from the projections; the eager attention transposes
to BHSD, while the flash subclass stays in BSHD and replaces only what lies between the projections.
RoPE follows transformers' "rotate_half" convention: cos/sin are (batch, seqlen, head_dim) fp32 with the
two halves duplicated, and ``x * cos + rotate_half(x) * sin`` rotates pairs (i, i + head_dim / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.errors import InputError
from flashlm.ops.cross_entropy import causal_lm_loss
from flashlm.ops.rms_norm import rms_norm_ref
from flashlm.ops.rotary import rotary_ref, rotate_half  # noqa: F401 (rotate_half: flashlm.models.layers had it)

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
        return rms_norm_ref(x, self.weight, self.eps, self.unit_offset)  # the one RMSNorm math

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
    """cos/sin tables for arbitrary (per-row) positions, for both models.

    ``forward(position_ids)`` (or ``tables``) with position_ids (batch, seqlen) or (seqlen,) integer
    returns ``(cos, sin)``, each (batch, seqlen, head_dim) fp32, halves duplicated (rotate_half
    convention); ``tables(position_ids, half_width=True)`` the half-width ones (batch, seqlen,
    head_dim // 2), the first half computed without the copy (the flash model's rotary kernel).
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
    def tables(self, position_ids: torch.Tensor, half_width: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        if not half_width:  # cos/sin of the duplicated angles, as transformers computes them (bit-equal)
            freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables(position_ids)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, heads, seqlen, head_dim) and k (batch, kv_heads, seqlen, head_dim) — BHSD —
    by cos/sin (batch, seqlen, head_dim): :func:`flashlm.ops.rotary.rotary_ref` with the full tables,
    cast to q's dtype first, as transformers does, so low-precision results match it bit for bit."""
    return rotary_ref(q, cos, sin, head_axis=1), rotary_ref(k, cos, sin, head_axis=1)


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


def attention_mask_bhsd(q_len: int, kv_len: int, padding_mask: torch.Tensor | None = None,
                        sliding_window: int | None = None, device: torch.device | str | None = None
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

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
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

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
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


IGNORE_INDEX = -100  # labels skipped by the loss (HF's convention)


@dataclass
class CausalLMOutput:
    """loss: scalar mean cross-entropy over labels != -100 (None without labels);
    logits: (batch, seqlen, vocab) or None when a model skipped them;
    past_key_values: the cache after this step (None unless use_cache or a cache was passed)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None


class DynamicCache:
    """Per-layer key/value tensors in BHSD: (batch, kv_heads, seqlen, head_dim), grown on each
    `update`. All rows share one length; padding inside it is described by the attention mask the
    caller keeps (left padding for batched prompts)."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value_states (batch, kv_heads, new_len, head_dim) to layer ``layer_idx`` and
        return the layer's full keys and values (batch, kv_heads, past_len + new_len, head_dim).
        Layers must be filled in order 0, 1, ... on the first call."""
        if key_states.shape != value_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states "
                             f"{tuple(value_states.shape)} must have the same shape")
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


def add_block_norms(block: nn.Module, config: ModelConfig) -> None:
    """A decoder block's norms under HF's names, registered after its attention and MLP (the state-dict and
    init order): input_layernorm, post_attention_layernorm, and with ``config.post_norms`` (Gemma2)
    pre_feedforward_layernorm and post_feedforward_layernorm."""
    block.input_layernorm = make_norm(config)
    block.post_attention_layernorm = make_norm(config)
    if config.post_norms:
        block.pre_feedforward_layernorm = make_norm(config)
        block.post_feedforward_layernorm = make_norm(config)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (HF names: input_layernorm,
    post_attention_layernorm before the MLP).

    With ``config.post_norms`` (Gemma2) the outputs are normalized too, with HF Gemma2's names:
    ``x + post_attention_layernorm(attn(input_layernorm(x)))`` then
    ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``.
    """

    attention_class = MultiHeadAttention

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norms = config.post_norms
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = MLP(config)
        add_block_norms(self, config)

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_values=None):
        """hidden_states (batch, q_len, hidden) -> same shape; see MultiHeadAttention.forward."""
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), cos, sin,
                                       attention_mask=attention_mask, past_key_values=past_key_values)
        if not self.post_norms:
            hidden_states = residual + hidden_states
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = residual + self.post_attention_layernorm(hidden_states)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp_out)


class ScaledEmbedding(nn.Embedding):
    """``nn.Embedding`` whose output is multiplied by ``scale`` cast to the weight's dtype first
    (Gemma: sqrt(hidden_size), which rounds in bf16 exactly as transformers does). Living inside the
    embedding module, the scaling reaches every model that calls ``embed_tokens`` (flash too)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        # the scale rounded to the output dtype, as a Python float: no host-to-device copy per call
        # (which would also break CUDA-graph capture); bf16 * float computes like bf16 * bf16 0-dim
        return out * float(torch.tensor(self.scale, dtype=out.dtype))


def make_embedding(config: ModelConfig) -> nn.Embedding:
    """The token embedding (vocab, hidden), scaled by sqrt(hidden) where the family asks (Gemma); padding_idx
    as in HF: the pad row starts at zero and gets no gradient."""
    if config.embed_scale:
        return ScaledEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id, config.hidden_size**0.5)
    return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)


class DefaultModel(nn.Module):
    """Embedding, decoder layers, final norm and the rotary tables; returns the final hidden states."""

    layer_class = DecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = make_embedding(config)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """input_ids (batch, q_len); attention_mask (batch, past_len + q_len) or None; position_ids
        (batch or 1, q_len) or None (then derived from the mask, or past_len + arange).
        Returns hidden states (batch, q_len, hidden). Inputs are assumed checked (`check_inputs`)."""
        q_len = input_ids.shape[1]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_len, q_len, input_ids.device)
        hidden_states = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids)
        if cos.shape[0] != input_ids.shape[0]:
            cos, sin = (t.expand(input_ids.shape[0], -1, -1) for t in (cos, sin))
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, attention_mask=attention_mask,
                                  past_key_values=past_key_values)
        return self.norm(hidden_states)


def default_position_ids(attention_mask: torch.Tensor | None, past_len: int, q_len: int,
                         device: torch.device) -> torch.Tensor:
    """Position ids (batch or 1, q_len) of the new tokens.

    With a mask (batch, past_len + q_len), positions count real tokens: ``cumsum(mask) - 1``
    clamped at 0, so a left-padded row starts at 0 on its first real token (pad slots get 0; their
    outputs are ignored). Without one: ``past_len + arange(q_len)``.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)[:, -q_len:]


def check_inputs(config: ModelConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, labels: torch.Tensor | None, past_len: int,
                 check_range: bool = True) -> None:
    """Raise a clear TypeError/ValueError for malformed inputs before any compute.

    The token-range check reads min/max back to the host (one sync per forward, not per layer): an
    out-of-range id would otherwise be a CUDA device-side assert that kills the process. Compiled
    callers (whose graph cannot read the device) pass ``check_range=False`` and check their
    tokens where the batch is made.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seqlen) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    batch, q_len = input_ids.shape
    if q_len == 0:
        raise ValueError("input_ids has zero tokens")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool and (attention_mask.dtype.is_floating_point
                                                   or attention_mask.dtype.is_complex):
            raise TypeError(f"attention_mask must be bool or an integer dtype (1 = token, 0 = padding), "
                            f"got {attention_mask.dtype}")
        expected = (batch, past_len + q_len)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(f"attention_mask must have shape (batch, past_len + seqlen) = {expected} "
                             f"(past_len={past_len} cached tokens), got {tuple(attention_mask.shape)}")
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[1] != q_len or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape ({batch} or 1, {q_len}), got {tuple(position_ids.shape)}")
        if position_ids.dtype.is_floating_point:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (batch, q_len):
            raise ValueError(f"labels must have the shape of input_ids {(batch, q_len)}, "
                             f"got {tuple(getattr(labels, 'shape', ()))}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if check_range:
        check_token_range(config, input_ids, labels)


def check_token_range(config: ModelConfig, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """``InputError`` when ``input_ids`` (or ``labels``, apart from -100) hold a value outside
    [0, vocab_size). One host read for both: on the GPU an out-of-range id would be a device-side
    assert that kills the process's CUDA context."""
    named = [("input_ids", input_ids)]
    if labels is not None:
        named.append(("labels", labels.masked_fill(labels == IGNORE_INDEX, 0)))
    named = [(n, t) for n, t in named if t.numel()]
    if not named:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(t)).to(input_ids.device, torch.int64) for _, t in named]).tolist()
    for (name, _), (lo, hi) in zip(named, bounds):
        if lo < 0 or hi >= config.vocab_size:
            ignored = f" or {IGNORE_INDEX} (ignored)" if name == "labels" else ""
            raise InputError(f"{name} out of range: values in [{lo}, {hi}] but vocab_size is {config.vocab_size} "
                             f"(allowed [0, {config.vocab_size - 1}]{ignored})")


class DefaultForCausalLM(nn.Module):
    """LLaMA causal LM with eager attention: ``.model`` (DefaultModel) and ``.lm_head``.

    ``lm_head.weight`` is ``model.embed_tokens.weight`` when ``config.tie_word_embeddings``.
    """

    model_class = DefaultModel

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config asks for it (call again
        after operations that re-create parameters, e.g. ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's init: Linear/Embedding weights ~ N(0, initializer_range), biases 0, norms 1 (0 for
        Gemma's ``1 + weight`` norms), the padding embedding row 0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                self.init_linear(module, std)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    @staticmethod
    def init_linear(module: nn.Linear, std: float) -> None:
        """One Linear of :meth:`init_weights`: weight ~ N(0, std), bias 0 (the flash model overrides it)."""
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | None = None,
                labels: torch.Tensor | None = None, use_cache: bool = False) -> CausalLMOutput:
        """input_ids (batch, seqlen) int; attention_mask (batch, past_len + seqlen) bool/int with 1 on
        real tokens (left padding for batched prompts) or None; position_ids (batch or 1, seqlen) or
        None (derived from the mask); past_key_values a `DynamicCache` (created when use_cache and
        None); labels (batch, seqlen), shifted inside, -100 ignored.
        Returns CausalLMOutput(loss, logits (batch, seqlen, vocab), past_key_values)."""
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        check_inputs(self.config, input_ids, attention_mask, position_ids, labels, past_len)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        logits = self._logits(self.model(input_ids, attention_mask, position_ids, past_key_values))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden_size) -> logits (..., vocab), soft-capped where the family asks (Gemma2)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits
