"""The seed project's six tests, by name, on the flash model (CPU, fp32, tiny preset).

Run them alone with ``python -m flashlm.tests_seed`` or ``pytest -k seed``.
"""

from __future__ import annotations

import torch
from helpers import make_pair

from flashlm.generation import generate
from flashlm.models.kv_cache import StaticKVCache
from flashlm.ops.cross_entropy import cross_entropy

ATOL, RTOL = 2e-5, 1e-4


def _models(**overrides):
    default, flash = make_pair(**overrides)
    return flash.config, default, flash


def test_seed_basic_forward():
    config, _, flash = _models()
    ids = torch.randint(0, config.vocab_size, (3, 10))
    out = flash(ids)
    assert out.logits.shape == (3, 10, config.vocab_size)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert out.loss is None and out.past_key_values is None
    # one token, batch of one
    assert flash(ids[:1, :1]).logits.shape == (1, 1, config.vocab_size)


def test_seed_attention_mask_varlen():
    """A left-padded batch goes through varlen (padding removed once) and gives, on real tokens, what
    the default model gives and what each row gives alone; padding positions come back as zeros."""
    config, default, flash = _models()
    ids = torch.randint(3, config.vocab_size, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    hidden = flash.model(ids, attention_mask=mask)
    assert hidden.shape == (3, 8, config.hidden_size) and (hidden[mask == 0] == 0).all()
    logits = flash(ids, attention_mask=mask).logits
    ref = default(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=RTOL)
    for row, start in ((0, 0), (1, 5), (2, 7)):
        alone = flash(ids[row:row + 1, start:]).logits[0]
        torch.testing.assert_close(logits[row, start:], alone, atol=ATOL, rtol=RTOL)


def test_seed_fused_cross_entropy_loss():
    """The fused linear cross-entropy (no logits) equals plain cross-entropy on the logits, with -100
    ignored, in value and in gradients."""
    config, _, flash = _models()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    fused = flash(ids, labels=labels)
    assert fused.logits is None
    fused.loss.backward()
    g_fused = {n: p.grad.clone() for n, p in flash.named_parameters()}
    flash.zero_grad()
    logits = flash(ids).logits
    plain = cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1))
    plain_torch = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size),
                                                    labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(fused.loss, plain, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fused.loss, plain_torch, atol=ATOL, rtol=RTOL)
    plain.backward()
    for n, p in flash.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, atol=ATOL, rtol=RTOL, msg=n)


def test_seed_gradient_flow():
    """Every parameter gets a finite, non-zero gradient through the flash path (varlen + fused loss)."""
    config, _, flash = _models(tie_word_embeddings=False)
    flash.train()
    ids = torch.randint(3, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    loss = flash(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in flash.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_seed_kv_cache_generation():
    """Prefill + decode on the static BSHD cache: cache shapes and per-row lengths, decode logits equal
    to the full forward, and generate() agrees with the default model."""
    config, default, flash = _models()
    ids = torch.randint(3, config.vocab_size, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    cache = flash.allocate_cache(2, 9)
    assert isinstance(cache, StaticKVCache) and cache.num_layers == config.num_layers
    shape = (2, 9, config.num_kv_heads, config.head_dim)
    assert all(k.shape == shape and v.shape == shape for k, v in zip(cache.k, cache.v))
    assert cache.cache_seqlens.dtype == torch.int32
    with torch.no_grad():
        out = flash(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert out.past_key_values is cache and out.logits.shape == (2, 1, config.vocab_size)
        assert cache.cache_seqlens.tolist() == [5, 3]
        tokens = torch.tensor([[7], [9]])
        step = flash(tokens, past_key_values=cache).logits
        assert cache.cache_seqlens.tolist() == [6, 4]
        full = default(torch.cat([ids, tokens], 1), attention_mask=torch.cat([mask, torch.ones_like(tokens)], 1))
    torch.testing.assert_close(out.logits[:, 0], full.logits[:, 4], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(step[:, 0], full.logits[:, 5], atol=ATOL, rtol=RTOL)
    gen_f = generate(flash, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    gen_d = generate(default, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert gen_f.sequences.shape == (2, 9) and torch.equal(gen_f.sequences, gen_d.sequences)


def test_seed_determinism():
    """Same input -> bitwise the same logits, loss, gradients and generated tokens."""
    config, _, flash = _models()
    ids = torch.randint(3, config.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    runs = []
    for _ in range(2):
        flash.zero_grad()
        out = flash(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), return_logits=True)
        out.loss.backward()
        runs.append((out.logits.detach(), out.loss.detach(), [p.grad.clone() for p in flash.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": True, "top_p": 0.9, "eos_token_id": []}
    a = generate(flash, ids, generator=torch.Generator().manual_seed(3), **kw).sequences
    b = generate(flash, ids, generator=torch.Generator().manual_seed(3), **kw).sequences
    assert torch.equal(a, b)
