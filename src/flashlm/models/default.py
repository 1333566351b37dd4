"""The default model: a LLaMA decoder with eager BHSD attention, the reference for everything else.

With the same weights it gives the same logits as ``transformers.LlamaForCausalLM`` (and
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM`` with their
config flags) in fp32; tests/test_default_model.py and tests/test_hf_families.py check that.
Parameter names are HF's, so state dicts load both ways unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.errors import InputError

from .cache import DynamicCache
from .config import ModelConfig
from .layers import MLP, MultiHeadAttention, RMSNorm, RotaryEmbedding, make_norm

IGNORE_INDEX = -100  # labels skipped by the loss (HF's convention)


@dataclass
class CausalLMOutput:
    """loss: scalar mean cross-entropy over labels != -100 (None without labels);
    logits: (batch, seqlen, vocab) or None when a model skipped them;
    past_key_values: the cache after this step (None unless use_cache or a cache was passed)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None


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
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        if self.post_norms:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_values=None, **kwargs):
        """hidden_states (batch, q_len, hidden) -> same shape; see MultiHeadAttention.forward."""
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states),
            cos,
            sin,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
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

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, scale: float
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        # the scale rounded to the output dtype, as a Python float: no host-to-device copy per call
        # (which would also break CUDA-graph capture); bf16 * float computes like bf16 * bf16 0-dim
        return out * float(torch.tensor(self.scale, dtype=out.dtype))


class DefaultModel(nn.Module):
    """Embedding, decoder layers, final norm and the rotary tables; returns the final hidden states."""

    layer_class = DecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # padding_idx as in HF: the pad row starts at zero and gets no gradient.
        if config.embed_scale:
            self.embed_tokens = ScaledEmbedding(
                config.vocab_size, config.hidden_size, config.pad_token_id, config.hidden_size**0.5
            )
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
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
            hidden_states = layer(
                hidden_states, cos, sin, attention_mask=attention_mask, past_key_values=past_key_values
            )
        return self.norm(hidden_states)


def default_position_ids(
    attention_mask: torch.Tensor | None, past_len: int, q_len: int, device: torch.device
) -> torch.Tensor:
    """Position ids (batch or 1, q_len) of the new tokens.

    With a mask (batch, past_len + q_len), positions count real tokens: ``cumsum(mask) - 1``
    clamped at 0, so a left-padded row starts at 0 on its first real token (pad slots get 0; their
    outputs are ignored). Without one: ``past_len + arange(q_len)``.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)[:, -q_len:]


def check_inputs(
    config: ModelConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    past_len: int,
    check_range: bool = True,
) -> None:
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
        if attention_mask.dtype != torch.bool and (
            attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex
        ):
            raise TypeError(
                f"attention_mask must be bool or an integer dtype (1 = token, 0 = padding), "
                f"got {attention_mask.dtype}"
            )
        expected = (batch, past_len + q_len)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask must have shape (batch, past_len + seqlen) = {expected} "
                f"(past_len={past_len} cached tokens), got {tuple(attention_mask.shape)}"
            )
    if position_ids is not None:
        if (
            position_ids.dim() != 2
            or position_ids.shape[1] != q_len
            or position_ids.shape[0] not in (1, batch)
        ):
            raise ValueError(
                f"position_ids must have shape ({batch} or 1, {q_len}), got {tuple(position_ids.shape)}"
            )
        if position_ids.dtype.is_floating_point:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (batch, q_len):
            raise ValueError(
                f"labels must have the shape of input_ids {(batch, q_len)}, got {tuple(getattr(labels, 'shape', ()))}"
            )
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
            raise InputError(
                f"{name} out of range: values in [{lo}, {hi}] but vocab_size is {config.vocab_size} "
                f"(allowed [0, {config.vocab_size - 1}]{ignored})"
            )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF-style loss: logits (batch, seqlen, vocab), labels (batch, seqlen) aligned with input_ids;
    position t predicts labels[t + 1]. Mean over non-ignored targets, computed in fp32."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


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
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        """input_ids (batch, seqlen) int; attention_mask (batch, past_len + seqlen) bool/int with 1 on
        real tokens (left padding for batched prompts) or None; position_ids (batch or 1, seqlen) or
        None (derived from the mask); past_key_values a `DynamicCache` (created when use_cache and
        None); labels (batch, seqlen), shifted inside, -100 ignored.
        Returns CausalLMOutput(loss, logits (batch, seqlen, vocab), past_key_values)."""
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        check_inputs(self.config, input_ids, attention_mask, position_ids, labels, past_len)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden_states = self.model(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(hidden_states)
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values)
