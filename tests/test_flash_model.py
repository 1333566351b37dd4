"""The flash model against the default (eager) model: same weights, same logits and gradients.

CPU, fp32, tiny configs: the attention registry picks the reference backend, so these tests check the
flash model's plumbing (BSHD, unpad once, packing, static cache, window, softcap) exactly; the kernels
themselves are checked against the reference in the attention tests. The CUDA tests at the end run
the same comparisons in bf16 on the GPU backends with Dao's error rule.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import make_pair

from flashlm import ops as fused_ops
from flashlm.models import from_pretrained, save_pretrained
from flashlm.models.config import get_preset
from flashlm.models.flash import (
    FlashAttentionMixin,
    FlashForCausalLM,
    FlashMultiHeadAttention,
    apply_rope_bshd,
)
from flashlm.models.kv_cache import StaticKVCache
from flashlm.models.reference import RotaryEmbedding, apply_rope
from flashlm.models.weights import split_fused_state_dict

ATOL, RTOL = 2e-5, 1e-4  # fp32: reference attention (einsum) vs eager matmul, summation order only


def left_padded(lengths, seqlen, vocab=256, device="cpu", generator=None):
    ids = torch.randint(3, vocab, (len(lengths), seqlen), generator=generator).to(device)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, seqlen - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def grads(model):
    """Gradients by HF name: the flash model's fused qkv_proj / gate_up_proj grads split like its weights."""
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return split_fused_state_dict(out, model.config)


def assert_grads_close(a, b, atol=ATOL, rtol=RTOL):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


CONFIGS = {
    "gqa": {},  # tiny: 4 q heads / 2 kv heads
    "mha": {"num_kv_heads": 4},
    "mqa": {"num_kv_heads": 1},
    "window": {"sliding_window": 3},
    "softcap": {"attn_logit_softcap": 2.0, "final_logit_softcap": 3.0},
    "window+softcap+tied": {"sliding_window": 4, "attn_logit_softcap": 5.0, "tie_word_embeddings": True},
}


# ---------------------------------------------------------------------------------------------
# forward + backward equivalence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_padding_logits_and_grads_match_default(name):
    default, flash = make_pair(**CONFIGS[name])
    ids = torch.randint(0, 256, (2, 11))
    labels = ids.clone()
    labels[0, :3] = -100
    out_d = default(ids, labels=labels)
    out_f = flash(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out_f.logits, out_d.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out_f.loss, out_d.loss, atol=ATOL, rtol=RTOL)
    out_d.loss.backward()
    # the fused (chunked) linear cross-entropy path: no logits at all
    out_fused = flash(ids, labels=labels)
    assert out_fused.logits is None
    torch.testing.assert_close(out_fused.loss, out_d.loss, atol=ATOL, rtol=RTOL)
    out_fused.loss.backward()
    assert_grads_close(grads(flash), grads(default))


@pytest.mark.parametrize("impl", ["swiglu_linear", "swiglu_linear_recompute"])
def test_mlp_without_a_saved_activation_matches_default(impl):
    """The MLP's SwiGLU + down projection as the op that recomputes the activation in the backward
    (Triton under the interpreter, or its torch twin): loss and gradients as the default model's."""
    default, flash = make_pair()
    flash.model.op_sets = {mode: dataclasses.replace(ops, swiglu_linear=getattr(fused_ops, impl))
                           for mode, ops in flash.model.op_sets.items()}
    ids = torch.randint(0, 256, (2, 11))
    out_d, out_f = default(ids, labels=ids), flash(ids, labels=ids)
    torch.testing.assert_close(out_f.loss, out_d.loss, atol=ATOL, rtol=RTOL)
    out_d.loss.backward()
    out_f.loss.backward()
    assert_grads_close(grads(flash), grads(default))


@pytest.mark.parametrize("name", ["gqa", "window", "softcap"])
def test_left_padding_matches_default(name):
    default, flash = make_pair(**CONFIGS[name])
    ids, mask = left_padded([9, 4, 1], 9)
    # a row's first token has no real predecessor: the flash model has no output at padding, so it
    # cannot score it (the default model would, from the pad position); mask it for both
    first = torch.zeros_like(mask)
    first[:, 1:] = (mask[:, 1:] == 1) & (mask[:, :-1] == 0)
    labels = ids.masked_fill((mask == 0) | (first == 1), -100)
    out_d = default(ids, attention_mask=mask, labels=labels)
    out_f = flash(ids, attention_mask=mask, labels=labels, return_logits=True)
    real = mask.bool()
    torch.testing.assert_close(out_f.logits[real], out_d.logits[real], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out_f.loss, out_d.loss, atol=ATOL, rtol=RTOL)
    out_d.loss.backward()
    flash(ids, attention_mask=mask, labels=labels).loss.backward()  # fused loss on unpadded tokens
    assert_grads_close(grads(flash), grads(default))


def test_padded_rows_equal_rows_run_alone():
    _, flash = make_pair()
    ids, mask = left_padded([7, 3], 7)
    logits = flash(ids, attention_mask=mask).logits
    for row, n in enumerate([7, 3]):
        alone = flash(ids[row:row + 1, 7 - n:]).logits[0]
        torch.testing.assert_close(logits[row, 7 - n:], alone, atol=ATOL, rtol=RTOL)
    # right padding is fine for a plain forward too (varlen does not care where the padding is)
    right_ids = torch.zeros_like(ids)
    right_ids[1, :3] = ids[1, 4:]
    right_mask = torch.zeros_like(mask)
    right_mask[1, :3] = 1
    right_mask[0] = 1
    right_ids[0] = ids[0]
    out = flash(right_ids, attention_mask=right_mask).logits
    torch.testing.assert_close(out[1, :3], logits[1, 4:], atol=ATOL, rtol=RTOL)


def _packed_batch(lengths, vocab=256):
    seqs = [torch.randint(3, vocab, (n,)) for n in lengths]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return seqs, ids, position_ids, cu


@pytest.mark.parametrize("name", ["gqa", "window+softcap+tied"])
def test_packed_equals_separate_sequences(name):
    default, flash = make_pair(**CONFIGS[name])
    lengths = [5, 1, 8, 3]
    seqs, ids, position_ids, cu = _packed_batch(lengths)
    out = flash(ids, position_ids=position_ids, labels=ids, return_logits=True)
    # explicit cu_seqlens gives the same as position ids (and no detection)
    out_cu = flash(ids, cu_seqlens=cu, max_seqlen=max(lengths), labels=ids, return_logits=True)
    torch.testing.assert_close(out_cu.logits, out.logits, atol=0, rtol=0)
    total_loss, total_targets = 0.0, 0
    offset = 0
    for s in seqs:
        ref = default(s[None], labels=s[None])
        torch.testing.assert_close(out.logits[0, offset:offset + len(s)], ref.logits[0], atol=ATOL, rtol=RTOL)
        sep = flash(s[None]).logits[0]
        torch.testing.assert_close(out.logits[0, offset:offset + len(s)], sep, atol=ATOL, rtol=RTOL)
        if len(s) > 1:  # a 1-token sequence has no target (loss would be nan)
            total_loss = total_loss + ref.loss * (len(s) - 1)
            total_targets += len(s) - 1
        offset += len(s)
    expected = total_loss / total_targets
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=RTOL)
    # gradients: the packed fused loss vs the separate default losses
    expected.backward()
    flash(ids, position_ids=position_ids, labels=ids).loss.backward()
    assert_grads_close(grads(flash), grads(default))


def test_packed_rows_in_a_batch():
    """Two rows, each packing two sequences: four independent sequences."""
    _, flash = make_pair()
    a, b, c, d = (torch.randint(3, 256, (n,)) for n in (3, 4, 5, 2))
    ids = torch.stack([torch.cat([a, b]), torch.cat([c, d])])
    pos = torch.stack([torch.cat([torch.arange(3), torch.arange(4)]), torch.cat([torch.arange(5), torch.arange(2)])])
    logits = flash(ids, position_ids=pos).logits
    for row, start, s in ((0, 0, a), (0, 3, b), (1, 0, c), (1, 5, d)):
        torch.testing.assert_close(logits[row, start:start + len(s)], flash(s[None]).logits[0],
                                   atol=ATOL, rtol=RTOL)


def test_continuation_positions_are_not_packing():
    """Rows whose positions start past 0 (a continuation) are one sequence each, rotated at their
    positions: equal to the default model given the same position ids."""
    default, flash = make_pair()
    ids = torch.randint(0, 256, (2, 6))
    pos = torch.arange(4, 10)[None].expand(2, -1)
    torch.testing.assert_close(flash(ids, position_ids=pos).logits, default(ids, position_ids=pos).logits,
                               atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# static cache: prefill + decode, chunks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa", "mqa", "window", "softcap"])
def test_decode_steps_match_default_full_forward(name):
    default, flash = make_pair(**CONFIGS[name])
    lengths, steps = [6, 2, 4], 5
    ids, mask = left_padded(lengths, 6)
    new = torch.randint(3, 256, (3, steps))
    cache = flash.allocate_cache(3, 6 + steps)
    flash(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.cache_seqlens.tolist() == lengths
    decoded = [flash(new[:, t:t + 1], past_key_values=cache).logits[:, 0] for t in range(steps)]
    assert cache.cache_seqlens.tolist() == [n + steps for n in lengths]
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    ref = default(full_ids, attention_mask=full_mask).logits[:, 6:]
    torch.testing.assert_close(torch.stack(decoded, 1), ref, atol=ATOL, rtol=RTOL)
    # keys are stored left-aligned per row: row 1's first key sits at slot 0
    k0 = cache.k[0]
    assert k0.shape == (3, 6 + steps, flash.config.num_kv_heads, flash.config.head_dim)
    assert k0[1, lengths[1] + steps:].abs().sum() == 0 and k0[1, 0].abs().sum() > 0


def test_chunked_prefill_matches_full_forward():
    default, flash = make_pair(sliding_window=5)
    ids, mask = left_padded([7, 3], 7)
    chunk, chunk_mask = left_padded([4, 2], 4)
    cache = flash.allocate_cache(2, 16)
    flash(ids, attention_mask=mask, past_key_values=cache)
    # a left-padded chunk appended to a non-empty cache, then an unpadded chunk
    out1 = flash(chunk, attention_mask=chunk_mask, past_key_values=cache).logits
    more = torch.randint(3, 256, (2, 3))
    out2 = flash(more, past_key_values=cache).logits
    assert cache.cache_seqlens.tolist() == [7 + 4 + 3, 3 + 2 + 3]
    for row in range(2):
        seq = torch.cat([ids[row][mask[row].bool()], chunk[row][chunk_mask[row].bool()], more[row]])
        ref = default(seq[None]).logits[0]
        n_prev = int(mask[row].sum())
        n_chunk = int(chunk_mask[row].sum())
        torch.testing.assert_close(out1[row][chunk_mask[row].bool()], ref[n_prev:n_prev + n_chunk],
                                   atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out2[row], ref[-3:], atol=ATOL, rtol=RTOL)


def test_static_cache_errors():
    _, flash = make_pair()
    ids = torch.randint(3, 256, (2, 4))
    cache = flash.allocate_cache(2, 5)
    with pytest.raises(ValueError, match="use_cache=True needs past_key_values"):
        flash(ids, use_cache=True)
    with pytest.raises(TypeError, match="StaticKVCache"):
        flash(ids, past_key_values=[])
    with pytest.raises(ValueError, match="max_batch_size"):
        flash(torch.randint(3, 256, (3, 2)), past_key_values=cache)
    with pytest.raises(ValueError, match="room for 5"):
        flash(torch.randint(3, 256, (2, 6)), past_key_values=cache)
    flash(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="no attention_mask"):
        flash(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=cache)
    flash(ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="room for 5"):
        flash(ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="cannot be written to a StaticKVCache"):
        flash(ids, position_ids=torch.tensor([[0, 1, 0, 1]]), past_key_values=cache.reset())
    with pytest.raises(ValueError, match="either attention_mask"):
        flash(ids, attention_mask=torch.ones_like(ids), cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        flash(ids, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="positive int"):
        StaticKVCache(2, 0, 8, 2, 16)


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def test_apply_rope_bshd_equals_bhsd_rope_with_per_row_positions():
    config = get_preset("tiny")
    rope = RotaryEmbedding(config)
    q = torch.randn(2, 5, 4, 16)
    k = torch.randn(2, 5, 2, 16)
    pos = torch.tensor([[0, 0, 0, 1, 2], [3, 4, 5, 6, 7]])  # per-row positions
    cos, sin = rope(pos)
    q_bshd, k_bshd = apply_rope_bshd(q, k, cos, sin)
    q_ref, k_ref = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(q_bshd, q_ref.transpose(1, 2)) and torch.equal(k_bshd, k_ref.transpose(1, 2))
    # half-width tables (the fused kernel's input) fall back to the same math off CUDA
    half = 8
    q_half, _ = apply_rope_bshd(q, k, cos[..., :half], sin[..., :half])
    assert torch.equal(q_half, q_bshd)


def test_mixin_upad_input_three_scenarios():
    mixin = FlashAttentionMixin()
    b, kv_len, h, hk, d = 3, 6, 4, 2, 8
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    k, v = torch.randn(b, kv_len + 2, hk, d), torch.randn(b, kv_len + 2, hk, d)  # longer: a static cache
    # (a) prefill: q shares k's indices
    q = torch.randn(b, kv_len, h, d)
    qu, ku, _vu, idx, (cu_q, cu_k), (mq, mk) = mixin._upad_input(q, k, v, mask, kv_len)
    assert ku.shape == (11, hk, d) and qu.shape == (11, h, d) and mq == mk == 6
    assert cu_q.tolist() == cu_k.tolist() == [0, 4, 10, 11] and cu_q.dtype == torch.int32
    assert torch.equal(qu[4:10], q[1].reshape(6, h, d)) and torch.equal(ku[10], k[2, 5])
    # (b) decode: one query per row
    qu, _, _, idx, (cu_q, _), (mq, _) = mixin._upad_input(q[:, :1], k, v, mask, 1)
    assert qu.shape == (3, h, d) and cu_q.tolist() == [0, 1, 2, 3] and mq == 1 and idx.tolist() == [0, 1, 2]
    # (c) a chunk of 2 queries: the last two mask columns
    qu, _, _, _idx, (cu_q, _), (mq, _) = mixin._upad_input(q[:, :2], k, v, mask, 2)
    assert cu_q.tolist() == [0, 2, 4, 5] and mq == 2 and qu.shape == (5, h, d)
    bad = torch.tensor([[1, 1, 1, 1, 1, 0]] * 3)
    with pytest.raises(ValueError, match="left-padded"):
        mixin._upad_input(q[:, :2], k, v, bad, 2)


def test_mixin_forward_matches_model_layer():
    """The standalone path (a layer given a mask, no plan) equals the default layer."""
    config = get_preset("tiny", sliding_window=4)
    from flashlm.models.reference import MultiHeadAttention

    default = MultiHeadAttention(config, 0)
    flash = FlashMultiHeadAttention(config, 0)
    flash.load_state_dict(default.state_dict())
    x = torch.randn(2, 6, config.hidden_size)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cos, sin = RotaryEmbedding(config)(pos)
    ref = default(x, cos, sin, attention_mask=mask)
    out = flash(x, cos, sin, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=RTOL)
    out_dense = flash(x, cos, sin)
    torch.testing.assert_close(out_dense, default(x, cos, sin), atol=ATOL, rtol=RTOL)


def test_dropout_only_in_training():
    default, flash = make_pair(attention_dropout=0.5)
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(flash(ids).logits, default(ids).logits, atol=ATOL, rtol=RTOL)
    flash.train()
    torch.manual_seed(1)
    a = flash(ids).logits
    torch.manual_seed(2)
    b = flash(ids).logits
    assert not torch.allclose(a, b)


def test_same_safetensors_folder_loads_into_both(tmp_path):
    default, _ = make_pair(num_kv_heads=1)
    save_pretrained(default, tmp_path / "ckpt")
    flash = from_pretrained(tmp_path / "ckpt", attn="flash")
    assert isinstance(flash, FlashForCausalLM)
    assert flash.load_report.missing_keys == [] and flash.load_report.unexpected_keys == []
    ids, mask = left_padded([5, 2], 5)
    real = mask.bool()
    torch.testing.assert_close(flash(ids, attention_mask=mask).logits[real],
                               default(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# CUDA (H100): bf16 through the registry's GPU backends
# ---------------------------------------------------------------------------------------------
def _err(a, b, mask=None):
    d = (a.float() - b.float()).abs()
    return (d[mask] if mask is not None else d).max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gqa", "window", "softcap"])
def test_cuda_bf16_flash_within_dao_rule(name):
    """bf16 flash vs fp32 default: error at most 2x (+atol) the error of the default model run in
    bf16 itself (Dao's rule), for a left-padded batch, its gradients (3x), and decode steps."""
    overrides = dict(CONFIGS[name], hidden_size=256, num_heads=4, num_kv_heads=2 if name != "mha" else 4,
                     intermediate_size=512, num_layers=2)
    ref32, flash = make_pair("cuda", **overrides)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    flash = flash.to(torch.bfloat16)
    ids, mask = left_padded([300, 17, 128], 300, device="cuda")
    real = mask.bool()
    logits32 = ref32(ids, attention_mask=mask).logits
    err_ref = _err(ref16(ids, attention_mask=mask).logits, logits32, real)
    err_flash = _err(flash(ids, attention_mask=mask).logits, logits32, real)
    assert err_flash <= 2 * err_ref + 1e-2, (err_flash, err_ref)
    # gradients through the fused loss
    labels = ids.masked_fill(~real, -100)
    labels[:, 1:].masked_fill_(real[:, 1:] & ~real[:, :-1], -100)  # first real token: no predecessor
    for m in (ref32, ref16):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    flash(ids, attention_mask=mask, labels=labels).loss.backward()
    g32, g16, gf = grads(ref32), grads(ref16), grads(flash)
    for n in g32:
        e_ref, e_flash = _err(g16[n], g32[n]), _err(gf[n], g32[n])
        assert e_flash <= 3 * e_ref + 1e-3 * g32[n].abs().max().item() + 1e-6, (n, e_flash, e_ref)
    # decode: 8 steps on the static cache vs the fp32 full forward
    new = torch.randint(3, 256, (3, 8), device="cuda")
    with torch.no_grad():
        cache = flash.allocate_cache(3, 308)
        flash(ids, attention_mask=mask, past_key_values=cache)
        dec = torch.stack([flash(new[:, t:t + 1], past_key_values=cache).logits[:, 0] for t in range(8)], 1)
        full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        ref_full = ref32(full_ids, attention_mask=full_mask).logits[:, 300:]
        ref_bf16 = ref16(full_ids, attention_mask=full_mask).logits[:, 300:]
    assert _err(dec, ref_full) <= 2 * _err(ref_bf16, ref_full) + 1e-2


@pytest.mark.cuda
def test_cuda_decode_step_has_no_host_sync():
    """A decode step on the static cache issues no device->host synchronization (CUDA-graph ready)."""
    _, flash = make_pair("cuda", torch.bfloat16, hidden_size=256, num_heads=4, num_kv_heads=2,
                         intermediate_size=512)
    ids = torch.randint(3, 256, (4, 32), device="cuda")
    cache = flash.allocate_cache(4, 64)
    with torch.no_grad():
        flash(ids, past_key_values=cache)
        tok = torch.randint(3, 256, (4, 1), device="cuda")
        flash(tok, past_key_values=cache)  # warm-up: lazy imports, registry choice cache
        torch.cuda.synchronize()
        # the decode core that generate() runs and CUDA graphs capture; forward() itself reads the
        # caller's token range back once per step (an out-of-vocab id would be a device assert)
        cache.check_room(4, 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            flash.decode_logits(tok, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cache.note_appended(4, 1)
    assert cache.cache_seqlens.tolist() == [34] * 4


def test_unpad_and_packing_metadata_computed_once_per_forward(monkeypatch):
    """get_unpad_data / prepare_from_position_ids run once per forward, not once per layer, and a
    decode step on the static cache calls neither."""
    import flashlm.models.plan as flash_mod  # the planner (plan_batch) that FlashModel calls

    calls = {"unpad": 0, "packed": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(flash_mod, "get_unpad_data", counting("unpad", flash_mod.get_unpad_data))
    monkeypatch.setattr(flash_mod, "prepare_from_position_ids",
                        counting("packed", flash_mod.prepare_from_position_ids))
    _, flash = make_pair(num_layers=4)
    ids, mask = left_padded([6, 3], 6)
    cache = flash.allocate_cache(2, 8)
    flash(ids, attention_mask=mask, past_key_values=cache)
    assert calls == {"unpad": 1, "packed": 0}
    flash(ids[:, :1], past_key_values=cache)
    assert calls == {"unpad": 1, "packed": 0}
    _, packed, position_ids, _ = _packed_batch([3, 4, 2])
    flash(packed, position_ids=position_ids)
    assert calls == {"unpad": 1, "packed": 1}
