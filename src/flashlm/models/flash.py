"""The flash model: LLaMA whose attention calls the FlashAttention kernels directly, BSHD end to end.

Same state-dict names (HF's) and seeded init as :class:`~flashlm.models.reference.DefaultForCausalLM`, so one
safetensors folder loads into either. Between embedding and loss: ONE ``qkv_proj`` and ONE ``gate_up_proj``
per layer (:mod:`flashlm.models.weights`), q/k/v split and RoPE-rotated in one op as BSHD views; SwiGLU one
op; the residual add fused into the next RMSNorm, the stream carried as (out, residual); GQA without
``repeat_kv``, window ``(W - 1, 0)``, logit softcap, dropout in training only. Each forward is planned once
(:mod:`flashlm.models.plan`: padding removed, packing detected or given, a static cache appended in place);
every kernel is chosen once, when the model is built or moved (:mod:`flashlm.models.kernels`), the plan
carrying its mode's op set; :meth:`FlashForCausalLM.explain` says what a call runs. Compiling is said by
the caller that compiles (:meth:`FlashForCausalLM.prepare_compile`, ``decode_logits(compiled=True)``).
Host syncs (eager): at most one per forward while planning, none in layers or a decode step or compiled plans.

Reads top to bottom: the unplanned path (:class:`FlashAttentionMixin`; its RoPE is
:func:`flashlm.ops.rotary.apply_rope_bshd`), the attention layer, MLP, block, model, causal LM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from flashlm.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

# names the old paths flashlm.models.flash_mixin / flash_rope (served as this module by flashlm._moved) had
from flashlm.attention.interface import apply_rotary  # noqa: F401
from flashlm.attention.padding import (  # noqa: F401
    get_unpad_data,
    index_first_axis,
    pad_input,
    prepare_from_position_ids,
    unpad_input,
)
from flashlm.ops.cross_entropy import cross_entropy, linear_cross_entropy, logits_cross_entropy
from flashlm.ops.int8_linear import int8_swiglu_linear
from flashlm.ops.rotary import apply_rope_bshd, rotate_half  # noqa: F401 (rotate_half: for old paths)

from .config import ModelConfig
from .fp8 import swiglu_float8_linear
from .kernels import (
    AttentionKernels,
    _aten_flash_dense,
    compute_dtype,
    explain_plan,
    fuses_norm_at,
    half_precision_inputs,
    loss_kind,
    mlp_down_path,
    op_sets,
)
from .kv_cache import StaticKVCache
from .plan import BatchPlan, append_plan, check_call, packed_sequences, plan_batch, unpad_data, unpad_qkv
from .reference import (
    MLP,
    CausalLMOutput,
    DefaultForCausalLM,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    add_block_norms,
    make_embedding,
    make_norm,
)
from .weights import fuse_into, init_per_part

__all__ = ["FlashAttentionMixin", "FlashDecoderLayer", "FlashForCausalLM", "FlashMLP", "FlashModel",
           "FlashMultiHeadAttention", "apply_rope_bshd", "half_precision_inputs"]

# --------------------------------------------------------------------------------------------
# Unplanned calls: a layer on its own, transformers' attention hook

class FlashAttentionMixin:
    """``flashlm.attention`` on BSHD q/k/v without a precomputed plan (a :class:`FlashMultiHeadAttention`
    used on its own; transformers' hook, :mod:`flashlm.hf`); the packing test and the unpadding are the
    planner's (:mod:`flashlm.models.plan`, computed once per mask / position-ids tensor)."""

    @staticmethod
    def _get_unpad_data(attention_mask: Tensor) -> tuple[Tensor, Tensor, int]:
        """attention_mask (batch, seqlen), 1 = token -> (indices int64 (total,) into the flattened
        batch * seqlen, cu_seqlens int32 (batch + 1,), max_seqlen_in_batch int). One host sync per mask."""
        return unpad_data(attention_mask)

    def _upad_input(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                    query_length: int):
        """Padding removed from q/k/v: :func:`~flashlm.models.plan.unpad_qkv` (shapes and cases there)."""
        return unpad_qkv(query, key, value, attention_mask, query_length, self._get_unpad_data(attention_mask))

    def _flash_attention_forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None, *,
        dropout: float = 0.0, softmax_scale: float | None = None, causal: bool = True,
        training: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
        position_ids: Tensor | None = None, cu_seqlens_q: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None, max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None, deterministic: bool = False, first_layer: bool = False,
    ) -> Tensor:
        """Attention on BSHD q (batch, q_len, heads, d), k/v (batch, kv_len, kv_heads, d), the entry point
        chosen from what is given, in this order: ``cu_seqlens_q/k`` (+ max_seqlen_q/k): packed
        sequences; ``attention_mask`` (batch, kv_len), 1 = token: unpad, varlen, re-pad; ``position_ids``
        (batch, q_len) restarting inside a row (q_len == kv_len > 1): packed sequences
        (:func:`~flashlm.models.plan.packed_sequences`); otherwise ``flash_attn_func``. ``dropout`` only
        when ``training``; ``first_layer``: the metadata of inference tensors is recomputed (a new
        forward). Returns (batch, q_len, heads, d_v), zeros at padding."""
        batch, q_len, heads = query.shape[:3]
        kwargs = {"dropout_p": dropout if training else 0.0, "softmax_scale": softmax_scale,
                  "causal": causal, "window_size": window_size, "softcap": softcap,
                  "deterministic": deterministic}
        if cu_seqlens_q is None and attention_mask is None and position_ids is not None and \
                q_len == key.shape[1] and q_len > 1 and position_ids.dim() == 2:
            found = packed_sequences(position_ids, batch, refresh=first_layer)
            if found is not None:
                cu_seqlens_q = cu_seqlens_k = found[0]
                max_seqlen_q = max_seqlen_k = found[1]
        if cu_seqlens_q is not None:
            if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
                raise ValueError("cu_seqlens_q needs cu_seqlens_k, max_seqlen_q and max_seqlen_k")
            out = flash_attn_varlen_func(
                query.reshape(batch * q_len, heads, query.shape[-1]),
                key.reshape(-1, *key.shape[2:]), value.reshape(-1, *value.shape[2:]),
                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
            return out.view(batch, q_len, heads, out.shape[-1])
        if attention_mask is not None:
            if first_layer:
                unpad_data(attention_mask, refresh=True)
            q, k, v, indices_q, (cu_q, cu_k), (max_q, max_k) = self._upad_input(
                query, key, value, attention_mask, q_len)
            out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
            return pad_input(out, indices_q, batch, q_len)
        return flash_attn_func(query, key, value, **kwargs)


# --------------------------------------------------------------------------------------------
# Attention layer

class FlashMultiHeadAttention(FlashAttentionMixin, MultiHeadAttention):
    """The default ``MultiHeadAttention`` computed in BSHD through ``flashlm.attention``: no transpose,
    no ``repeat_kv``, no (seqlen x seqlen) scores.

    q/k/v come from ONE projection ``qkv_proj`` (rows: q (heads * head_dim), k, v (kv_heads * head_dim)),
    saved and loaded as HF's ``q_proj``/``k_proj``/``v_proj``; inside a :class:`FlashModel` the split and
    RoPE of q and k are one launch (``ops.rotary_qkv``). Its attention kernels are bound when it is built
    or moved (``self.kernels``, :class:`~flashlm.models.kernels.AttentionKernels`)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        d = self.head_dim
        fuse_into(self, "qkv_proj", [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d])
        # flash-attn's inclusive window: W tokens, itself included = W - 1 to the left.
        self.window_size = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
        self.softcap_value = 0.0 if self.softcap is None else float(self.softcap)
        self.compiled = False  # a layer used on its own: whether its caller compiles it (apply_rope_bshd)
        self.bind_kernels()

    def bind_kernels(self) -> None:
        """Choose the attention backends of every call kind again (honours a backend forced now)."""
        self.kernels = AttentionKernels(self, next(self.parameters()).device)

    @property
    def backends(self) -> dict:
        """{(kind, dtype, needs_grad, dropout[, "compiled"]): Backend} bound for this layer."""
        return self.kernels.backends

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.bind_kernels()
        return out

    def _project_qkv(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (batch, seqlen, hidden) -> q (batch, seqlen, heads, head_dim), k, v (batch, seqlen,
        kv_heads, head_dim): BSHD views of the one ``qkv_proj`` output (q/k normed with qk_norm)."""
        return self._split_qkv(self.qkv_proj(hidden_states))

    def _split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, attention_mask: Tensor | None = None,
                past_key_values: StaticKVCache | None = None, plan: BatchPlan | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """hidden_states (batch, seqlen, hidden) — (1, total, hidden) in a "varlen" plan. With ``plan``
        (from :class:`FlashModel`) cos/sin are the half-width tables (batch or 1, seqlen, head_dim // 2);
        without it (a layer used on its own) the full or half tables of :func:`apply_rope_bshd`, and
        ``attention_mask`` (batch, seqlen) or packed ``position_ids`` are handled by the mixin (a cache is
        refused). Returns hidden_states' shape."""
        if plan is None:
            if past_key_values is not None:
                raise ValueError("FlashMultiHeadAttention with a cache needs the plan made by FlashModel; "
                                 "call the model, not the layer")
            q, k, v = self._project_qkv(hidden_states)  # (B, S, H, D) views, no copy
            q, k = apply_rope_bshd(q, k, cos, sin, compiled=self.compiled)
            q, k, v = half_precision_inputs(q, k, v, compute_dtype(self.qkv_proj))
            out = self._flash_attention_forward(
                q, k, v, attention_mask, dropout=self.attention_dropout, training=self.training,
                position_ids=position_ids, softmax_scale=self.scaling, causal=True,
                window_size=self.window_size, softcap=self.softcap_value, first_layer=True)
            return self._project_out(out.to(hidden_states.dtype))
        return self.forward_qkv(self.qkv_proj(hidden_states), cos, sin, plan)

    def forward_qkv(self, qkv: Tensor, cos: Tensor, sin: Tensor, plan: BatchPlan) -> Tensor:
        """The planned forward from the projected ``qkv`` (batch, seqlen, (heads + 2 * kv_heads) * head_dim)
        (the decoder layer may make it with the norm in the projection's kernel: ``ops.norm_linear``)."""
        ops = plan.ops
        if plan.kind == "append" and not plan.compiled and not self.config.qk_norm:
            choice = self.kernels.select("kvcache", qkv.dtype, False, False, False, 0)
            if choice.backend is not None:  # RoPE and the k/v append in one launch, then the bound kernel
                with torch.no_grad():
                    k_cache, v_cache = plan.cache.layer(self.layer_idx, qkv.shape[0])
                    q = ops.rotary_qkv_append(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim,
                                              k_cache, v_cache, plan.write_slot_idx)
                    return self._project_out(self._bound_kvcache(choice.backend, q, k_cache, v_cache, plan))
        if self.config.qk_norm:  # the norms sit between the split and RoPE
            q, k, v = self._split_qkv(qkv)
            q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
        else:
            q, k, v = ops.rotary_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        if plan.cache is not None and plan.kind != "append":
            self._write_cache(k, v, plan)
        return self._project_out(self._attend(q, k, v, plan))

    def _write_cache(self, k: Tensor, v: Tensor, plan: BatchPlan) -> None:
        """This layer's k/v into the cache before attention: a prefill ("dense": slots [0, seqlen);
        "varlen": the real tokens scattered) or a padded "chunk" (its real tokens scattered)."""
        if plan.kind == "dense":
            k_cache, v_cache = plan.cache.layer(self.layer_idx, k.shape[0])
            k_cache[:, : k.shape[1]].copy_(k)
            v_cache[:, : v.shape[1]].copy_(v)
        elif plan.kind == "varlen":
            plan.cache.write(self.layer_idx, k[0], v[0], plan.write_batch_idx, plan.write_slot_idx)
        else:
            b, s = k.shape[:2]
            plan.cache.write(self.layer_idx, k.reshape(b * s, *k.shape[2:])[plan.write_token_idx],
                             v.reshape(b * s, *v.shape[2:])[plan.write_token_idx],
                             plan.write_batch_idx, plan.write_slot_idx)

    def _bound_kvcache(self, be, q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: BatchPlan) -> Tensor:
        """The bound backend's kvcache attention of an eager append (k/v already in the cache), no checks."""
        return be.kvcache(q, k_cache, v_cache, plan.seqlens_after, cache_batch_idx=None, cache_leftpad=None,
                          block_table=None, softmax_scale=self.scaling, causal=True, window_size=self.window_size,
                          softcap=self.softcap_value, alibi_slopes=None, num_splits=0)[0]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, plan: BatchPlan) -> Tensor:
        """Attention of rotated BSHD q/k/v under ``plan`` (the cache already written, except an append's),
        through the kernel :meth:`AttentionKernels.select` names."""
        common = {"softmax_scale": self.scaling, "causal": True, "window_size": self.window_size,
                  "softcap": self.softcap_value}
        if plan.kind in ("append", "chunk"):
            k_cache, v_cache = plan.cache.layer(self.layer_idx, q.shape[0])
            if plan.kind == "chunk":
                out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=plan.cache_seqlens, **common)
                return out * plan.query_mask  # padding queries saw unrelated keys: zero them
            choice = self.kernels.select("kvcache", q.dtype, False, False, plan.compiled, 0)
            if choice.backend is None:
                return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=plan.cache_seqlens,
                                               **common)
            with torch.no_grad():  # qk-normed eager appends (others fuse the append with RoPE in forward)
                idx = (plan.write_batch_idx, plan.write_slot_idx)
                k_cache.index_put_(idx, k)
                v_cache.index_put_(idx, v)
                return self._bound_kvcache(choice.backend, q, k_cache, v_cache, plan)
        dropout_p = self.attention_dropout if self.training else 0.0
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        choice = self.kernels.select(plan.kind, q.dtype, needs_grad, dropout_p > 0, plan.compiled,
                                     q.shape[0] * q.shape[1])
        kwargs = {"dropout_p": dropout_p, **common}
        if choice.name == "aten_flash":
            return _aten_flash_dense(q, k, v, dropout_p, self.scaling)
        if choice.backend is None:  # not bound (no backend serves it): the public API explains why, or finds one
            if plan.kind == "dense":
                return flash_attn_func(q, k, v, **kwargs)
            return flash_attn_varlen_func(q[0], k[0], v[0], plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                                          plan.max_seqlen, **kwargs)[None]
        if plan.kind == "dense":
            return choice.backend.dense(q, k, v, **kwargs, alibi_slopes=None, deterministic=False)[0]
        return choice.backend.varlen(q[0], k[0], v[0], plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                                     plan.max_seqlen, **kwargs, alibi_slopes=None, deterministic=False)[0][None]


# --------------------------------------------------------------------------------------------
# MLP and decoder block

class FlashMLP(MLP):
    """The gated MLP with gate and up as ONE projection ``gate_up_proj`` (rows: gate, then up; saved and
    loaded as HF's ``gate_proj``/``up_proj``) and SwiGLU with the down projection as one op that does
    not save the activation for the backward: ``ops.swiglu_linear`` for a plain Linear, ``fp8.
    swiglu_float8_linear`` for a torchao Float8Linear, ``int8_swiglu_linear`` for an int8 ``Int8Linear``
    (inference), else swiglu then the module (which path:
    ``kernels.mlp_down_path``, shown by ``explain()``); GeGLU (Gemma2) applies its activation in torch."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        fuse_into(self, "gate_up_proj", [config.intermediate_size, config.intermediate_size])
        self.fused_act = config.hidden_act == "silu"

    def forward(self, x: Tensor, ops) -> Tensor:
        """x (..., hidden) -> (..., hidden) with ``ops`` (the plan's op set, ``flashlm.ops.Ops``)."""
        return self.forward_gate_up(self.gate_up_proj(x), ops)

    def forward_gate_up(self, gate_up: Tensor, ops) -> Tensor:
        """From the projected gate_up (..., 2 * intermediate) (made with the norm in its kernel at decode)."""
        path = mlp_down_path(self)
        if path == "swiglu_linear":  # one op with down_proj: autograd keeps gate_up, not the (..., I) activation
            return ops.swiglu_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
        if path == "swiglu_float8_linear":  # the same around torchao's FP8 matmul
            return swiglu_float8_linear(gate_up, self.down_proj, ops.swiglu)
        if path == "swiglu_int8_linear":  # int8 weights (inference): swiglu in the int8 kernel's prologue
            return int8_swiglu_linear(gate_up, self.down_proj.weight, self.down_proj.scale, self.down_proj.bias)
        if self.fused_act:  # another down_proj (int8, PEFT/LoRA, fuse_mlp=False): call the module itself
            return self.down_proj(ops.swiglu(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _norm(ops, norm: RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)`` through the plan's ops."""
    return ops.rms_norm(x, norm.weight, norm.eps, norm.unit_offset)


def _add_norm(ops, norm: RMSNorm, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` through the plan's ops (residual None: x is the stream)."""
    if residual is None:
        return _norm(ops, norm, x), x
    return ops.add_rms_norm(x, residual, norm.weight, norm.eps, norm.unit_offset)


def _norm_linear(ops, norm: RMSNorm, x: Tensor, residual: Tensor | None, proj: nn.Module) -> tuple[Tensor, Tensor]:
    """``(proj(norm(x + residual)), x + residual)`` in proj's kernel (``ops.norm_linear``; decode steps)."""
    return ops.norm_linear(x, residual, norm.weight, norm.eps, norm.unit_offset, proj.weight,
                           getattr(proj, "scale", None), proj.bias)


class FlashDecoderLayer(nn.Module):
    """The pre-norm block with the residual add fused into the next norm (``ops.add_rms_norm``), and at
    decode that add + norm in the kernel of the projection after it (:func:`_norm_linear`):
    ``forward(hidden_states, cos, sin, plan, residual)`` -> ``(out, residual)``, the stream being ``out +
    residual``, summed inside the next layer's (or the final) fused norm; ``residual=None``: hidden_states
    is the whole stream (the first layer). Gemma2's post-norms the same way: ``out`` is the post-feedforward
    norm's output, the post-attention norm's output is added into the pre-feedforward norm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.post_norms = config.post_norms
        self.self_attn = FlashMultiHeadAttention(config, layer_idx)
        self.mlp = FlashMLP(config)
        add_block_norms(self, config)

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, plan: BatchPlan,
                residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ops, attn, mlp = plan.ops, self.self_attn, self.mlp
        if fuses_norm_at(ops, hidden_states, attn.qkv_proj, attn):  # decode: the add + norm in qkv_proj's kernel
            qkv, residual = _norm_linear(ops, self.input_layernorm, hidden_states, residual, attn.qkv_proj)
            h = attn.forward_qkv(qkv, cos, sin, plan)
        else:
            h, residual = _add_norm(ops, self.input_layernorm, hidden_states, residual)
            h = attn(h, cos, sin, plan=plan)
        if self.post_norms:
            h = _norm(ops, self.post_attention_layernorm, h)
        norm = self.pre_feedforward_layernorm if self.post_norms else self.post_attention_layernorm
        if fuses_norm_at(ops, h, mlp.gate_up_proj, mlp):
            gate_up, residual = _norm_linear(ops, norm, h, residual, mlp.gate_up_proj)
            out = mlp.forward_gate_up(gate_up, ops)
        else:
            h, residual = _add_norm(ops, norm, h, residual)
            out = mlp(h, ops)
        return (_norm(ops, self.post_feedforward_layernorm, out) if self.post_norms else out), residual


# --------------------------------------------------------------------------------------------
# Model

class FlashModel(nn.Module):
    """Embedding, flash decoder layers, final norm; plans padding/packing/cache once per forward.

    ``op_sets`` ({mode: Ops}, :func:`~flashlm.models.kernels.op_sets`) are resolved when the model is
    built or moved; ``compiled`` (set by ``FlashForCausalLM.prepare_compile``) plans every forward as a
    compiled one (sync-free plans, the compiled op set)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = make_embedding(config)
        self.layers = nn.ModuleList(FlashDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.rotary_emb = RotaryEmbedding(config)
        self.compiled = False
        self.bind_ops()

    def bind_ops(self) -> None:
        """Resolve the op sets for the parameters' device (done when built or moved)."""
        self.op_sets = op_sets(self.config.kernels, next(self.parameters()).device)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.bind_ops()
        return out

    def plan(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
             past_key_values: StaticKVCache | None = None, cu_seqlens: Tensor | None = None,
             max_seqlen: int | None = None) -> BatchPlan:
        """The plan :meth:`forward` runs for these arguments (:func:`~flashlm.models.plan.plan_batch`)."""
        return plan_batch(input_ids, attention_mask, position_ids, past_key_values, cu_seqlens, max_seqlen,
                          compiled=self.compiled, op_sets=self.op_sets)

    def forward_tokens(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None, past_key_values: StaticKVCache | None = None,
                       cu_seqlens: Tensor | None = None, max_seqlen: int | None = None
                       ) -> tuple[Tensor, BatchPlan]:
        """Final hidden states in the compute layout — (batch, seqlen, hidden), or (1, total, hidden)
        for unpadded/packed batches — and the plan that maps them back (see `forward`)."""
        plan = self.plan(input_ids, attention_mask, position_ids, past_key_values, cu_seqlens, max_seqlen)
        hidden_states = self.run(plan)
        if past_key_values is not None:
            past_key_values.advance(input_ids.shape[0], plan.cache_lengths, input_ids.shape[1])
        return hidden_states, plan

    def run(self, plan: BatchPlan) -> Tensor:
        """Embedding, RoPE tables, layers and final norm of a planned forward (every forward's body).
        The residual stream is carried between layers as (out, residual) and summed inside the next
        fused norm (see :class:`FlashDecoderLayer`)."""
        hidden_states = self.embed_tokens(plan.token_ids)
        cos, sin = self.rotary_emb.tables(plan.position_ids, half_width=True)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, cos, sin, plan, residual)
        return _add_norm(plan.ops, self.norm, hidden_states, residual)[0]  # (residual None: no layers)

    def prefill_tokens(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Unpadded prompts ``input_ids`` (batch, seqlen) written into an empty ``cache`` -> final hidden
        states (batch, seqlen, hidden): ``forward(input_ids, past_key_values=cache)`` (the dense plan) as a
        pure tensor function, like :meth:`decode_tokens`, so a CUDA graph can capture it."""
        if not cache.is_empty:
            raise ValueError("prefill_tokens writes into an empty cache; call cache.reset() first")
        hidden_states = self.run(plan_batch(input_ids, None, None, cache, None, None, op_sets=self.op_sets))
        cache.bump(*input_ids.shape)
        return hidden_states

    def decode_tokens(self, input_ids: Tensor, cache: StaticKVCache, compiled: bool = False) -> Tensor:
        """The decode core: ``input_ids`` (batch, seqlen) appended to a non-empty ``cache`` without a mask
        -> final hidden states (batch, seqlen, hidden). A pure tensor function of the tokens, parameters and
        cache tensors: what :meth:`forward` runs, ``cache_seqlens`` bumped on the device, no host check or
        host bookkeeping, so torch.compile traces one graph that no per-token value invalidates. ``compiled``:
        the caller compiles it (the kvcache attention's opaque op, the compiled op set); else the fused
        append and the bound kernel. The caller runs ``cache.check_room`` before, ``note_appended`` after."""
        hidden_states = self.run(append_plan(input_ids, cache, None, compiled=compiled, op_sets=self.op_sets))
        cache.bump(input_ids.shape[0], input_ids.shape[1])
        return hidden_states

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: StaticKVCache | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
        """Hidden states (batch, seqlen, hidden), zeros at padding; arguments as in
        :meth:`FlashForCausalLM.forward`."""
        hidden, plan = self.forward_tokens(input_ids, attention_mask, position_ids, past_key_values,
                                           cu_seqlens, max_seqlen)
        return plan.to_padded(hidden, *input_ids.shape)


# --------------------------------------------------------------------------------------------
# Causal LM

class FlashForCausalLM(DefaultForCausalLM):
    """Causal LM with flash attention; parameter names and init identical to ``DefaultForCausalLM``.

    ``host_checks`` (default True): the forward reads the token range back to the host (an out-of-range
    id would be a device-side assert); ``prepare_compile(whole_model=True)`` turns it off."""

    model_class = FlashModel
    host_checks = True

    # the default model's init_weights, each Linear drawn per HF projection inside the fused ones (q, k,
    # v, then o; gate, up, then down), so a flash model seeded like a default model holds its very weights
    init_linear = staticmethod(init_per_part)

    def prepare_compile(self, whole_model: bool = False) -> FlashForCausalLM:
        """Plan every forward as a compiled one (sync-free plans, fixed ``max_seqlen`` bounds, the op set
        meant for inductor, the loss's chunked torch path); blocks compiled one by one (``flashlm train
        --compile``) still plan and check eagerly; ``whole_model=True`` (before ``torch.compile(model)``)
        also drops the token-range check, a host read. Returns self."""
        return self._set_compiled(True, whole_model)

    def _set_compiled(self, compiled: bool, whole_model: bool = False) -> FlashForCausalLM:
        self.model.compiled = compiled
        for layer in self.model.layers:
            layer.self_attn.compiled = compiled
        self.host_checks = not (compiled and whole_model)
        return self

    def compile_forward(self, **compile_kwargs) -> Callable:
        """``torch.compile(self, **compile_kwargs)`` whose calls are planned as compiled ones while eager
        calls keep eager plans: the flag is on only during each compiled call (Dynamo guards on it, so it
        never recompiles for it). What ``flashlm bench --compile`` runs; ``model.compile()`` sets it for good."""
        compiled = torch.compile(self, **compile_kwargs)

        def call(*args, **kwargs):
            self._set_compiled(True, whole_model=True)
            try:
                return compiled(*args, **kwargs)
            finally:
                self._set_compiled(False)

        return call

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile`` (in place): every later call runs compiled, so every forward is planned
        as a compiled one (``prepare_compile(whole_model=True)``) first."""
        self.prepare_compile(whole_model=True)
        super().compile(*args, **kwargs)

    def bind_attention(self) -> FlashForCausalLM:
        """Choose every layer's attention backends again, honouring the backend forced now
        (``use_backend``, ``FLASHLM_ATTN_BACKEND``); done automatically when built or moved."""
        for layer in self.model.layers:
            layer.self_attn.bind_kernels()
        return self

    def allocate_cache(self, max_batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> StaticKVCache:
        """A StaticKVCache for this model: per layer (max_batch_size, max_seqlen, kv_heads, head_dim)
        BSHD, in the model's dtype/device unless given."""
        weight = self.model.embed_tokens.weight
        c = self.config
        return StaticKVCache(c.num_layers, max_batch_size, max_seqlen, c.num_kv_heads, c.head_dim,
                             dtype=dtype or weight.dtype, device=device or weight.device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: StaticKVCache | None = None, labels: Tensor | None = None,
                use_cache: bool = False, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                return_logits: bool | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids (batch, seqlen) int. attention_mask (batch, seqlen): 1 = token, 0 = padding (any side
        for a plain forward; left for prompts; with a non-empty cache it covers only the new tokens, None
        for a decode step). position_ids (batch or 1, seqlen): default from the mask / the cache; rows
        restarting at 0 in a plain forward are packed sequences. cu_seqlens int32 (num_seqs + 1,) /
        max_seqlen: explicit packing of the flattened batch * seqlen tokens (no host read with max_seqlen).
        past_key_values: a :class:`StaticKVCache` (:meth:`allocate_cache`; use_cache needs one).
        labels (batch, seqlen): HF style, shifted inside, -100 ignored; a packed sequence's last token and a
        label whose predecessor is padding are not scored. With labels the loss never holds more than a
        chunk of logits (``loss_kind``) and logits are skipped unless ``return_logits``. logits_to_keep > 0:
        logits of the last positions only. Returns CausalLMOutput(loss, logits or None, cache)."""
        check_call(self.config, input_ids, attention_mask, position_ids, past_key_values, labels, use_cache,
                   logits_to_keep, self.host_checks)
        batch, seqlen = input_ids.shape
        if return_logits is None:
            return_logits = labels is None
        hidden, plan = self.model.forward_tokens(input_ids, attention_mask, position_ids, past_key_values,
                                                 cu_seqlens, max_seqlen)
        logits = loss = token_logits = None
        if return_logits:
            if logits_to_keep:
                logits = self._logits(plan.to_padded(hidden, batch, seqlen)[:, -logits_to_keep:])
            else:
                token_logits = self._logits(hidden)  # (tokens, vocab): padding never reaches lm_head
                logits = plan.to_padded(token_logits, batch, seqlen)
        if labels is not None:
            loss = self._loss(hidden, plan.shifted_targets(labels), token_logits, plan.compiled)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values)

    def _loss(self, hidden: Tensor, targets: Tensor, token_logits: Tensor | None, compiled: bool) -> Tensor:
        """Mean cross-entropy of hidden (tokens, H) -- or of token_logits (tokens, vocab) when the
        caller asked for logits -- against targets (tokens,), -100 ignored; which one: ``loss_kind``."""
        # an int8 lm_head (flashlm.models.quantize) has no float weight for the fused losses: call the module
        logits_wanted = token_logits is not None or not self.lm_head.weight.is_floating_point()
        kind = loss_kind(logits_wanted, compiled, self.config.final_logit_softcap is not None, targets.numel(),
                         self.config.vocab_size)
        if kind == "logits_cross_entropy":
            return logits_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets,
                                        self.lm_head.bias)
        if kind == "cross_entropy":
            if token_logits is None:
                token_logits = self._logits(hidden)
            return cross_entropy(token_logits.reshape(-1, token_logits.shape[-1]), targets)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets,
                                    bias=self.lm_head.bias, softcap=self.config.final_logit_softcap,
                                    backend="torch" if compiled else None)

    def prefill_logits(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Logits (batch, vocab) of the last prompt token of :meth:`FlashModel.prefill_tokens`; what
        ``flashlm.generation.cuda_graph`` captures for a prompt shape it has seen before."""
        return self._logits(self.model.prefill_tokens(input_ids, cache)[:, -1])

    def decode_logits(self, input_ids: Tensor, cache: StaticKVCache, compiled: bool = False) -> Tensor:
        """Logits (batch, vocab) of the last token of :meth:`FlashModel.decode_tokens` (``compiled``: True
        where the caller compiles it); what ``flashlm.generation.cuda_graph`` runs, compiles and captures."""
        return self._logits(self.model.decode_tokens(input_ids, cache, compiled=compiled)[:, -1])

    def explain(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: StaticKVCache | None = None, labels: Tensor | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None, compiled: bool | None = None
                ) -> dict:
        """What ``forward`` (or, with ``compiled``, a decode step of ``decode_logits``) runs for these
        arguments, without running it: the plan's kind and mode, each op's implementation, each layer's
        attention kernel, and the loss (see :func:`~flashlm.models.kernels.explain_plan`)."""
        if compiled is not None:
            plan = append_plan(input_ids, past_key_values, None, compiled=compiled, op_sets=self.model.op_sets)
        else:
            plan = self.model.plan(input_ids, attention_mask, position_ids, past_key_values, cu_seqlens, max_seqlen)
        return explain_plan(self, plan, labels)
