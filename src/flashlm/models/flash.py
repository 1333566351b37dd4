"""The flash model: LLaMA whose attention calls the FlashAttention kernels directly, BSHD end to end.

Same state-dict names (HF's) and the same seeded init as :class:`~flashlm.models.default.DefaultForCausalLM`,
so one safetensors folder loads into either. What differs is the path between embedding and loss:

- ONE ``qkv_proj`` and ONE ``gate_up_proj`` per layer, saved/loaded under HF's names
  (:mod:`flashlm.models.fused`); q/k/v leave ``qkv_proj`` split and RoPE-rotated in one op
  (``ops.rotary_qkv``) as BSHD views, never transposed; SwiGLU is one op; the residual add is fused
  into the next RMSNorm (``ops.add_rms_norm``), the stream carried between blocks as (out, residual);
- every op implementation and every attention backend is chosen when the model is built or moved
  (``ModelConfig.kernels`` via ``flashlm.ops.resolve``; the registry per layer and call kind, see
  :mod:`flashlm.models.flash_backends`), never per call; small plain causal dense calls on CUDA use
  aten's FA2 op (least host time);
- GQA without ``repeat_kv``, sliding window ``(W - 1, 0)``, logit softcap, dropout in training only;
- each forward is planned once (:mod:`flashlm.models.plan`): padding removed right after the embedding
  (``(1, total_tokens, hidden)``, varlen kernels with ``cu_seqlens`` computed once), packing detected
  or given, a static BSHD cache (:class:`~flashlm.models.flash_cache.StaticKVCache`) appended in place;
  under torch.compile the planner reads nothing back from the device (sync-free plans);
- with ``labels`` (eager): ``flashlm.loss_kernels.logits_cross_entropy`` (one matmul per token chunk,
  the chunk's logits overwritten by their gradient, at most 1 GiB of them held); compiled or
  softcapped: plain cross-entropy when tokens x vocab is small, else
  ``flashlm.losses.linear_cross_entropy`` (the logits never materialized).

Host syncs (eager): at most one per forward while planning (unpadding reads the token count and the
longest row; detecting packing reads the longest sequence; the token-range check reads min/max), none
inside layers, none in a decode step; none at all under torch.compile.

This module reads top to bottom: the op binding every block shares, the attention layer, MLP, decoder
layer, model, causal LM. Kept apart (the public names re-exported here, where they lived before):
:mod:`flashlm.models.flash_rope` (RoPE on BSHD q/k), :mod:`flashlm.models.flash_backends` (which
attention kernel each layer binds), :mod:`flashlm.models.flash_mixin` (:class:`FlashAttentionMixin`, the
unplanned mask/packing -> kernel helper), :mod:`flashlm.models.fused` (``qkv_proj``/``gate_up_proj``),
:mod:`flashlm.models.plan` (the planner) and :mod:`flashlm.models.flash_cache` (the static cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flashlm import ops as fused_ops
from flashlm.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashlm.attention.padding import pad_input
from flashlm.loss_kernels import logits_cross_entropy
from flashlm.losses import cross_entropy, linear_cross_entropy, materialize_logits_for_loss

from .config import ModelConfig
from .default import (
    CausalLMOutput,
    DecoderLayer,
    DefaultForCausalLM,
    DefaultModel,
    check_inputs,
    check_token_range,
)
from .flash_backends import (
    _HALF,
    ATEN_DENSE_MAX_TOKENS,
    _aten_flash_dense,
    _select_backends,
    aten_dense_eligible,
)
from .flash_cache import StaticKVCache
from .flash_mixin import FlashAttentionMixin
from .flash_rope import apply_rope_bshd
from .fused import fuse_into
from .layers import MLP, MultiHeadAttention, RMSNorm
from .plan import FlashMeta, Plan, append_plan, plan_batch

__all__ = ["FlashAttentionMixin", "FlashDecoderLayer", "FlashForCausalLM", "FlashMLP", "FlashMeta", "FlashModel",
           "FlashMultiHeadAttention", "apply_rope_bshd", "half_precision_inputs"]


# --------------------------------------------------------------------------------------------
# Kernels bound at build, fp32 inputs in a half-precision model
# --------------------------------------------------------------------------------------------
class _BindsKernels:
    """Holds ``self.ops`` (``flashlm.ops.resolve(config.kernels, device)``): the fused-op callables,
    chosen once when the module is built and again when it moves to another device (``.to``,
    ``to_empty``), never per call."""

    def _bind_kernels(self) -> None:
        device = next(self.parameters()).device
        device = "cpu" if device.type == "meta" else device
        self.ops = fused_ops.resolve(self.config.kernels, device)
        # what a plan made under torch.compile asks for (FlashMeta.compiled): ops inductor can fuse
        self.compiled_ops = fused_ops.resolve(self.config.kernels, device, compiled=True)
        # what a decode step asks for (tokens appended to the cache, planned direct): least GPU time
        self.decode_ops = fused_ops.resolve(self.config.kernels, device, decode=True)

    def ops_for(self, meta: FlashMeta | None) -> fused_ops.Ops:
        """The op set of a planned call: compiled, decode step (eager or captured alike, so both give
        the same tokens), or any other eager call (host time counts)."""
        if meta is None:
            return self.ops
        if meta.compiled:
            return self.compiled_ops
        return self.decode_ops if meta.direct else self.ops

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._bind_kernels()
        return out


# One warning per process; tests reset it here (flashlm.hf's hook uses this function too).
_WARNED_FP32 = False


def half_precision_inputs(q: Tensor, k: Tensor, v: Tensor, weight_dtype: torch.dtype
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 q/k/v in a half-precision model (PEFT/LoRA upcasts activations) -> the autocast dtype, else
    ``weight_dtype`` (the projections'), with a one-time warning, as transformers'
    ``_flash_attention_forward`` does, instead of running a slow fp32 kernel. Anything else unchanged."""
    if q.dtype != torch.float32:
        return q, k, v
    dev = q.device.type
    target = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight_dtype
    if target == torch.float32:
        return q, k, v
    global _WARNED_FP32
    if not _WARNED_FP32:
        _WARNED_FP32 = True
        import warnings

        warnings.warn(f"attention inputs are float32 in a {target} model (upcast activations, e.g. PEFT); "
                      f"casting q/k/v to {target} for the flash kernels", stacklevel=3)
    return q.to(target), k.to(target), v.to(target)


# --------------------------------------------------------------------------------------------
# Attention layer
# --------------------------------------------------------------------------------------------
class FlashMultiHeadAttention(_BindsKernels, FlashAttentionMixin, MultiHeadAttention):
    """The default ``MultiHeadAttention`` computed in BSHD through ``flashlm.attention``: no transpose,
    no ``repeat_kv``, no (seqlen x seqlen) scores.

    q/k/v come from ONE projection ``qkv_proj`` (rows: q (heads * head_dim), k, v (kv_heads *
    head_dim) each), saved and loaded as HF's ``q_proj``/``k_proj``/``v_proj`` (see
    :mod:`flashlm.models.fused`); inside a :class:`FlashModel` the split and RoPE of q and k are one
    launch (``ops.rotary_qkv``)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        d = self.head_dim
        fuse_into(self, "qkv_proj", [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d])
        # flash-attn's inclusive window: W tokens, itself included = W - 1 to the left.
        self.window_size = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
        self.softcap_value = 0.0 if self.softcap is None else float(self.softcap)
        self._bind_kernels()

    def _bind_kernels(self) -> None:
        """Fused ops, and the attention backend of each (kind, dtype, grad, dropout) this layer can be
        called with (:mod:`flashlm.models.flash_backends`), chosen now rather than by the registry per call."""
        super()._bind_kernels()
        device = next(self.parameters()).device
        self.backends = _select_backends(self, device)
        self.aten_dense = aten_dense_eligible(self, device)  # small plain causal dense calls: aten's FA2

    def _project_qkv(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (batch, seqlen, hidden) -> q (batch, seqlen, heads, head_dim), k, v (batch, seqlen,
        kv_heads, head_dim): BSHD views of the one ``qkv_proj`` output (q/k normed with qk_norm)."""
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _rotated_qkv(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, ops) -> tuple[Tensor, Tensor, Tensor]:
        """Projection + RoPE with the half-width tables (batch or 1, seqlen, head_dim // 2) fp32."""
        if self.config.qk_norm:  # the norms sit between the split and RoPE
            q, k, v = self._project_qkv(hidden_states)
            return ops.rotary(q, cos, sin), ops.rotary(k, cos, sin), v
        return ops.rotary_qkv(self.qkv_proj(hidden_states), cos, sin, self.num_heads, self.num_kv_heads,
                                   self.head_dim)

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, attention_mask: Tensor | None = None,
                past_key_values: StaticKVCache | None = None, meta: FlashMeta | None = None,
                **kwargs) -> Tensor:
        """hidden_states (batch, seqlen, hidden) — (1, total, hidden) in "varlen" mode. With ``meta``
        (from :class:`FlashModel`) cos/sin are the half-width tables (batch or 1, seqlen, head_dim // 2);
        without it (a layer used on its own) the full or half tables of :func:`apply_rope_bshd`, and
        ``attention_mask`` (batch, seqlen) or packed ``position_ids`` are handled by the mixin (a cache
        is refused). Returns hidden_states' shape."""
        common = {"softmax_scale": self.scaling, "causal": True, "window_size": self.window_size,
                  "softcap": self.softcap_value}
        if meta is None:
            if past_key_values is not None:
                raise ValueError("FlashMultiHeadAttention with a cache needs the FlashMeta built by "
                                 "FlashModel; call the model, not the layer")
            q, k, v = self._project_qkv(hidden_states)  # (B, S, H, D) views, no copy
            q, k = apply_rope_bshd(q, k, cos, sin)
            q, k, v = half_precision_inputs(q, k, v, self.qkv_proj.weight.dtype)
            out = self._flash_attention_forward(q, k, v, attention_mask, dropout=self.attention_dropout,
                                                training=self.training,
                                                position_ids=kwargs.get("position_ids"), **common)
            return self._project_out(out.to(hidden_states.dtype))
        ops = self.ops_for(meta)
        if meta.direct and not self.config.qk_norm:
            be = self.backends.get(("kvcache", hidden_states.dtype, False, False))
            if be is not None:
                return self._project_out(self._decode_step(hidden_states, cos, sin, meta, ops, be))
        q, k, v = self._rotated_qkv(hidden_states, cos, sin, ops)
        return self._project_out(self._attend_planned(q, k, v, meta, common))

    @torch.no_grad()
    def _decode_step(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, meta: FlashMeta, ops, be) -> Tensor:
        """Tokens appended to the cache, planned direct (decode steps, eager or captured): RoPE and the
        k/v append in one launch (``ops.rotary_qkv_append``), then the bound kvcache kernel, no checks."""
        k_cache, v_cache = meta.cache.layer(self.layer_idx, hidden_states.shape[0])
        q = ops.rotary_qkv_append(self.qkv_proj(hidden_states), cos, sin, self.num_heads, self.num_kv_heads,
                                  self.head_dim, k_cache, v_cache, meta.write_slot_idx)
        return self._bound_kvcache(be, q, k_cache, v_cache, meta)

    def _bound_kvcache(self, be, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: FlashMeta) -> Tensor:
        """The bound backend's kvcache attention of a direct plan (k/v already appended), no checks."""
        return be.kvcache(q, k_cache, v_cache, meta.seqlens_after, cache_batch_idx=None, cache_leftpad=None,
                          block_table=None, softmax_scale=self.scaling, causal=True, window_size=self.window_size,
                          softcap=self.softcap_value, alibi_slopes=None, num_splits=0)[0]

    def _attend_planned(self, q: Tensor, k: Tensor, v: Tensor, meta: FlashMeta, common: dict) -> Tensor:
        """Attention of rotated BSHD q/k/v under the model's plan (cache writes included)."""
        cache = meta.cache
        if meta.mode == "kvcache":
            k_cache, v_cache = cache.layer(self.layer_idx, q.shape[0])
            if meta.append:  # direct with q/k normed (else _decode_step), or not direct
                be = self.backends.get(("kvcache", q.dtype, False, False)) if meta.direct else None
                if be is None:
                    return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                   cache_seqlens=meta.cache_seqlens, **common)
                with torch.no_grad():
                    idx = (meta.write_batch_idx, meta.write_slot_idx)
                    k_cache.index_put_(idx, k)
                    v_cache.index_put_(idx, v)
                    return self._bound_kvcache(be, q, k_cache, v_cache, meta)
            b, s = k.shape[:2]
            cache.write(self.layer_idx, k.reshape(b * s, *k.shape[2:])[meta.write_token_idx],
                        v.reshape(b * s, *v.shape[2:])[meta.write_token_idx],
                        meta.write_batch_idx, meta.write_slot_idx)
            out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=meta.cache_seqlens, **common)
            return out * meta.query_mask  # padding queries saw unrelated keys: zero them
        if cache is not None:  # prefill into an empty static cache
            if meta.mode == "dense":
                k_cache, v_cache = cache.layer(self.layer_idx, k.shape[0])
                k_cache[:, : k.shape[1]].copy_(k)
                v_cache[:, : v.shape[1]].copy_(v)
            else:
                cache.write(self.layer_idx, k[0], v[0], meta.write_batch_idx, meta.write_slot_idx)
        dropout_p = self.attention_dropout if self.training else 0.0
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        key = (meta.mode, q.dtype, needs_grad, dropout_p > 0)
        be = (self.backends.get(key + ("compiled",)) or self.backends.get(key)) if meta.compiled \
            else self.backends.get(key)
        kwargs = {"dropout_p": dropout_p, "softmax_scale": self.scaling, "causal": True,
                  "window_size": self.window_size, "softcap": self.softcap_value}
        if be is None:  # not bound (no backend serves it): the public API explains why, or finds one
            if meta.mode == "dense":
                return flash_attn_func(q, k, v, **kwargs)
            return flash_attn_varlen_func(q[0], k[0], v[0], meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen,
                                          meta.max_seqlen, **kwargs)[None]
        if meta.mode == "dense":
            if self.aten_dense and q.dtype in _HALF and q.shape[0] * q.shape[1] <= ATEN_DENSE_MAX_TOKENS:
                return _aten_flash_dense(q, k, v, dropout_p, self.scaling)
            return be.dense(q, k, v, **kwargs, alibi_slopes=None, deterministic=False)[0]
        return be.varlen(q[0], k[0], v[0], meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                         **kwargs, alibi_slopes=None, deterministic=False)[0][None]


class FlashMLP(_BindsKernels, MLP):
    """The gated MLP with gate and up as ONE projection ``gate_up_proj`` (rows: gate, then up; saved and
    loaded as HF's ``gate_proj``/``up_proj``) and SwiGLU with the down projection as one op
    (``ops.swiglu_linear``, which does not save the activation for the backward); GeGLU (Gemma2)
    splits and applies its activation in torch."""

    def __init__(self, config: ModelConfig, mlp: MLP | None = None) -> None:
        if mlp is None:
            super().__init__(config)
        else:  # take over a built MLP's projections (no second random init)
            torch.nn.Module.__init__(self)
            self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            self.act_fn = mlp.act_fn
        self.config = config
        fuse_into(self, "gate_up_proj", [config.intermediate_size, config.intermediate_size])
        self.fused_act = config.hidden_act == "silu"
        self._bind_kernels()

    def forward(self, x: Tensor, ops: fused_ops.Ops | None = None) -> Tensor:
        """x (..., hidden) -> (..., hidden); ``ops``: the op set of the planned call (see
        ``ops_for``; default: the eager one)."""
        gate_up = self.gate_up_proj(x)
        ops = ops if ops is not None else self.ops
        if self.fused_act and type(self.down_proj) is torch.nn.Linear:
            # one op with down_proj: autograd keeps gate_up, not the (..., I) activation
            return ops.swiglu_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
        if self.fused_act:  # a wrapped down_proj (PEFT/LoRA, quantized): call the module itself
            return self.down_proj(ops.swiglu(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class FlashDecoderLayer(_BindsKernels, DecoderLayer):
    """The pre-norm block with the residual add fused into the next norm (``ops.add_rms_norm``).

    ``forward(hidden_states, cos, sin, meta=..., residual=...)`` returns ``(out, residual)``; the
    block's output (the residual stream) is ``out + residual``, which the next layer (or the final
    norm) adds inside its fused norm. ``residual=None`` means ``hidden_states`` is the whole stream
    (the first layer). Gemma2's post-norms keep the default order and return ``(stream, None)``."""

    attention_class = FlashMultiHeadAttention

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.config = config
        self.mlp = FlashMLP(config, self.mlp)
        self._bind_kernels()

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, attention_mask: Tensor | None = None,
                past_key_values=None, meta: FlashMeta | None = None, residual: Tensor | None = None,
                **kwargs) -> tuple[Tensor, Tensor | None]:
        if self.post_norms:
            if residual is not None:
                hidden_states = hidden_states + residual
            return super().forward(hidden_states, cos, sin, attention_mask=attention_mask,
                                   past_key_values=past_key_values, meta=meta, **kwargs), None
        ops = self.ops_for(meta)
        norm = self.input_layernorm
        if residual is None:
            residual = hidden_states
            h = ops.rms_norm(hidden_states, norm.weight, norm.eps, norm.unit_offset)
        else:
            h, residual = ops.add_rms_norm(hidden_states, residual, norm.weight, norm.eps, norm.unit_offset)
        h = self.self_attn(h, cos, sin, attention_mask=attention_mask, past_key_values=past_key_values,
                           meta=meta, **kwargs)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps, norm.unit_offset)
        return self.mlp(h, ops), residual


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class FlashModel(_BindsKernels, DefaultModel):
    """Embedding, flash decoder layers, final norm; plans padding/packing/cache once per forward."""

    layer_class = FlashDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.plan_for_compile = False
        self._bind_kernels()

    def _plan(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
              cache: StaticKVCache | None, cu_seqlens: Tensor | None, max_seqlen: int | None) -> Plan:
        # compiled: the sync-free plans (no host read, fixed shapes where possible; see plan_batch) and
        # the ops bound for inductor -- the one place the model asks whether it is being compiled
        # (or is told so: blocks compiled one by one run this planner eagerly, see prepare_compile)
        compiling = self.plan_for_compile or torch.compiler.is_compiling()
        plan = plan_batch(input_ids, attention_mask, position_ids, cache, cu_seqlens, max_seqlen,
                          sync_free=compiling)
        return plan._replace(meta=plan.meta._replace(compiled=True)) if compiling else plan

    def forward_tokens(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None, past_key_values: StaticKVCache | None = None,
                       cu_seqlens: Tensor | None = None, max_seqlen: int | None = None
                       ) -> tuple[Tensor, Plan]:
        """Final hidden states in the compute layout — (batch, seqlen, hidden), or (1, total, hidden)
        for unpadded/packed batches — and the plan that maps them back (see `forward`)."""
        plan = self._plan(input_ids, attention_mask, position_ids, past_key_values, cu_seqlens, max_seqlen)
        hidden_states = self._run(plan)
        if past_key_values is not None:
            past_key_values.advance(input_ids.shape[0], plan.cache_lengths, input_ids.shape[1])
        return hidden_states, plan

    def _run(self, plan: Plan) -> Tensor:
        """Embedding, RoPE tables, layers and final norm of a planned forward (every forward's body).
        The residual stream is carried between layers as (out, residual) and summed inside the next
        fused norm (see :class:`FlashDecoderLayer`)."""
        hidden_states = self.embed_tokens(plan.token_ids)
        cos, sin = self._rope_half(plan.position_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, cos, sin, meta=plan.meta, residual=residual)
        norm = self.norm
        ops = self.ops_for(plan.meta)
        if residual is None:
            return ops.rms_norm(hidden_states, norm.weight, norm.eps, norm.unit_offset)
        return ops.add_rms_norm(hidden_states, residual, norm.weight, norm.eps, norm.unit_offset)[0]

    @torch.no_grad()
    def _rope_half(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Half-width RoPE tables (batch or 1, seqlen, head_dim // 2) fp32 for ``position_ids`` (batch or 1,
        seqlen): the first half of ``RotaryEmbedding``'s duplicated tables, computed without the copy."""
        freqs = position_ids[..., None].float() * self.rotary_emb.inv_freq
        return freqs.cos(), freqs.sin()

    def prefill_tokens(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Unpadded prompts ``input_ids`` (batch, seqlen) written into an empty ``cache``: the body of
        ``forward(input_ids, past_key_values=cache)`` (the dense plan) with no host check and no host
        bookkeeping, so a CUDA graph can capture it; returns the final hidden states (batch, seqlen,
        hidden). The caller runs ``cache.check_room(batch, seqlen)`` before and
        ``cache.note_appended(batch, seqlen)`` after."""
        if not cache.is_empty:
            raise ValueError("prefill_tokens writes into an empty cache; call cache.reset() first")
        hidden_states = self._run(plan_batch(input_ids, None, None, cache, None, None))  # the dense plan
        cache.bump(*input_ids.shape)
        return hidden_states

    def decode_tokens(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """The decode core: ``input_ids`` (batch, seqlen) appended to a non-empty ``cache`` without a
        mask (one token per row when decoding); returns the final hidden states (batch, seqlen, hidden).

        A pure tensor function of the tokens, the parameters and the cache tensors: it plans and runs
        exactly what :meth:`forward` does for that input and bumps ``cache_seqlens`` on the device,
        but it runs no host check and leaves the cache's host bookkeeping alone, so torch.compile
        traces it into one graph that no per-token Python value invalidates. The caller checks room
        before (``cache.check_room(batch, seqlen)``) and records the append after
        (``cache.note_appended(batch, seqlen)``).
        """
        # eager or captured: the direct plan; compiled: through the opaque kvcache op
        compiling = torch.compiler.is_compiling()
        plan = append_plan(input_ids, cache, None, direct=not compiling)
        hidden_states = self._run(plan._replace(meta=plan.meta._replace(compiled=True)) if compiling else plan)
        cache.bump(input_ids.shape[0], input_ids.shape[1])
        return hidden_states

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: StaticKVCache | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
        """input_ids (batch, seqlen); attention_mask (batch, seqlen) 1 = token or None; position_ids
        (batch or 1, seqlen) or None; past_key_values a StaticKVCache or None; cu_seqlens int32 /
        max_seqlen for explicitly packed rows. Returns hidden states (batch, seqlen, hidden), zeros
        at padding."""
        hidden, plan = self.forward_tokens(input_ids, attention_mask, position_ids, past_key_values,
                                           cu_seqlens, max_seqlen)
        return _to_padded(hidden, plan, *input_ids.shape)


def _to_padded(x: Tensor, plan: Plan, batch: int, seqlen: int) -> Tensor:
    """(1, total, ...) or (batch, seqlen, ...) compute layout -> (batch, seqlen, ...)."""
    if plan.indices is not None:
        return pad_input(x[0], plan.indices, batch, seqlen)
    if plan.token_mask is not None:  # sync-free padding: zero what the padding tokens computed
        x = x * plan.token_mask.view(1, -1, *([1] * (x.dim() - 2)))
    return x.reshape(batch, seqlen, *x.shape[2:])


class FlashForCausalLM(DefaultForCausalLM):
    """Causal LM with flash attention; parameter names and init identical to ``DefaultForCausalLM``."""

    model_class = FlashModel

    @torch.no_grad()
    def init_weights(self) -> None:
        """The default model's init, drawn per HF projection inside the fused ones (q, k, v, then o;
        gate, up, then down), so a flash model seeded like a default model holds its very weights."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                for piece in module.weight.split(getattr(module, "split_sizes", [module.out_features])):
                    piece.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def prepare_compile(self) -> FlashForCausalLM:
        """Plan every forward as a compiled one even when the planner itself runs eagerly: for models
        whose decoder blocks are compiled one by one (``flashlm train --compile``, torchtitan style).
        The blocks then see fixed ``max_seqlen`` bounds (no recompiles as batches change) and the ops
        bound for inductor; the loss takes the chunked torch path. Whole-model ``torch.compile`` needs
        no call. Returns self."""
        self.model.plan_for_compile = True
        return self

    def bind_attention(self) -> FlashForCausalLM:
        """Choose every layer's attention backends again, honouring the backend forced now
        (``use_backend``, ``FLASHLM_ATTN_BACKEND``); done automatically when built or moved."""
        for layer in self.model.layers:
            layer.self_attn._bind_kernels()
        return self

    def allocate_cache(self, max_batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> StaticKVCache:
        """A StaticKVCache for this model: per layer (max_batch_size, max_seqlen, kv_heads, head_dim)
        BSHD, in the model's dtype/device unless given."""
        weight = self.model.embed_tokens.weight
        c = self.config
        return StaticKVCache(c.num_layers, max_batch_size, max_seqlen, c.num_kv_heads, c.head_dim,
                             dtype=dtype or weight.dtype, device=device or weight.device)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: StaticKVCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool = False,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids (batch, seqlen) int.

        attention_mask (batch, seqlen): 1 = token, 0 = padding (any side for a plain forward; left for
        prompts). With a non-empty cache it covers only the new tokens and must be left-padded (None
        for a decode step). position_ids (batch or 1, seqlen): default from the mask / the cache; in a
        plain forward, rows restarting at 0 mean packed sequences (no attention across them).
        cu_seqlens int32 (num_seqs + 1,) and max_seqlen: explicit packing of the flattened
        batch * seqlen tokens (no detection, no host read when max_seqlen is given).
        past_key_values: a :class:`StaticKVCache` from :meth:`allocate_cache` (use_cache without one is
        refused: the static cache must be sized up front).
        labels (batch, seqlen): HF style, shifted inside, -100 ignored; in packed batches the last token
        of each sequence gets no target. Padding has no hidden state here, so a label whose
        predecessor is padding (the first real token of a left-padded row) is not scored; the default
        model would score it from the padding position's logits. With labels the loss never holds more than a chunk of logits (see ``_loss``) and
        logits are skipped unless ``return_logits=True``.
        logits_to_keep: if > 0, logits only for the last that many positions (prefill for generation).
        Returns CausalLMOutput(loss, logits (batch, seqlen or logits_to_keep, vocab) or None, cache).
        """
        if past_key_values is not None and not isinstance(past_key_values, StaticKVCache):
            raise TypeError("FlashForCausalLM takes a StaticKVCache (model.allocate_cache(batch, max_len)) as "
                            f"past_key_values, got {type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            raise ValueError("use_cache=True needs past_key_values=model.allocate_cache(max_batch_size, "
                             "max_seqlen): the flash model's cache is static and sized up front")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        batch, seqlen = input_ids.shape if input_ids.dim() == 2 else (0, 0)
        decoding = past_key_values is not None and not past_key_values.is_empty and seqlen == 1
        if decoding:
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
            # A caller's token past the vocab would be a device-side assert (the process's CUDA
            # context lost): one host read per step here. generate() decodes through decode_logits,
            # whose tokens come from the model, without it. Compiled: no device read in the graph.
            if not torch.compiler.is_compiling():
                check_token_range(self.config, input_ids)
        else:
            # compiled: shapes/dtypes only (the token range is a device read; see check_inputs)
            check_inputs(self.config, input_ids, attention_mask, position_ids, labels, 0,
                         check_range=not torch.compiler.is_compiling())
        if return_logits is None:
            return_logits = labels is None

        hidden, plan = self.model.forward_tokens(input_ids, attention_mask, position_ids, past_key_values,
                                                 cu_seqlens, max_seqlen)
        logits = loss = token_logits = None
        if return_logits:
            if logits_to_keep:
                logits = self._logits(_to_padded(hidden, plan, batch, seqlen)[:, -logits_to_keep:])
            else:
                token_logits = self._logits(hidden)  # (tokens, vocab): padding never reaches lm_head
                logits = _to_padded(token_logits, plan, batch, seqlen)
        if labels is not None:
            loss = self._loss(hidden, self._shifted_targets(labels, plan), token_logits, plan.meta.compiled)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values)

    def _loss(self, hidden: Tensor, targets: Tensor, token_logits: Tensor | None, compiled: bool) -> Tensor:
        """Mean cross-entropy of hidden (tokens, H) -- or of token_logits (tokens, vocab) when the
        caller asked for logits -- against targets (tokens,), -100 ignored."""
        if token_logits is None and not compiled and self.config.final_logit_softcap is None:
            # eager: one lm_head matmul + one row kernel that writes the logits' gradient in place, over
            # token chunks whose logits stay within CHUNK_LOGITS_BYTES (one chunk when small); faster than
            # Liger's fused loss at every size measured (benchmarks/results/h200/loss_crossover.json)
            return logits_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets,
                                        self.lm_head.bias)
        if token_logits is not None or materialize_logits_for_loss(targets.numel(), self.config.vocab_size):
            # logits asked for; or small and compiled (inductor fuses plain CE) or softcapped
            if token_logits is None:
                token_logits = self._logits(hidden)
            return cross_entropy(token_logits.reshape(-1, token_logits.shape[-1]), targets)
        # large, compiled or softcapped: fused, never materializes (tokens x vocab); compiled: the chunked
        # torch path that Dynamo traces (Liger's autograd Function crashed compiled steps, issue 16)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets,
                                    bias=self.lm_head.bias, softcap=self.config.final_logit_softcap,
                                    backend="torch" if compiled else None)

    def prefill_logits(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Logits (batch, vocab) of the last token of unpadded prompts ``input_ids`` (batch, seqlen)
        written into an empty ``cache``: ``forward(input_ids, past_key_values=cache,
        logits_to_keep=1)`` as a pure tensor function (see :meth:`FlashModel.prefill_tokens`). What
        ``flashlm.decode_graph`` captures for a prompt shape it has seen before."""
        return self._logits(self.model.prefill_tokens(input_ids, cache)[:, -1])

    def decode_logits(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Logits (batch, vocab) of the last of ``input_ids`` (batch, seqlen), appended to a non-empty
        ``cache``: the body of ``forward(input_ids, past_key_values=cache)`` for a decode step, as a
        pure tensor function (see :meth:`FlashModel.decode_tokens`: no host check, no host
        bookkeeping; the caller runs ``cache.check_room`` before and ``cache.note_appended`` after).
        What ``flashlm.decode_graph`` runs, compiles and captures."""
        return self._logits(self.model.decode_tokens(input_ids, cache)[:, -1])

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @staticmethod
    def _shifted_targets(labels: Tensor, plan: Plan) -> Tensor:
        """Targets aligned with the compute-layout tokens, flattened: token t predicts labels[t + 1]
        of its row; the last position of a row (and, packed, of each sequence) predicts nothing."""
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        if plan.indices is not None:
            return shifted[plan.indices]
        if plan.token_mask is not None:  # padding tokens kept (sync-free plan): they predict nothing
            return shifted.masked_fill(~plan.token_mask, -100)
        if plan.packed:
            shifted = shifted.clone()
            shifted[plan.meta.cu_seqlens[1:].long() - 1] = -100
        return shifted
