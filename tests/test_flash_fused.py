"""The flash model's fast-path layout: fused qkv / gate_up weights under HF names, kernels and attention
backends bound at build, loss by size, torch.compile (fullgraph) on dense / padded / packed batches,
fp32 inputs in a half model."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_pair

import flashlm.models.flash as flash_mod
import flashlm.models.kernels as kernels_mod
import flashlm.ops.cross_entropy as losses
from flashlm.models import build_model, from_pretrained, save_pretrained
from flashlm.models.config import get_preset
from flashlm.models.reference import DefaultForCausalLM
from flashlm.models.weights import split_fused_state_dict

ATOL, RTOL = 2e-5, 1e-4


def test_state_dict_uses_hf_names_in_hf_order_and_seeded_init_matches_default():
    torch.manual_seed(7)
    flash = build_model("tiny", attn="flash")
    torch.manual_seed(7)
    default = build_model("tiny")
    assert list(flash.state_dict()) == list(default.state_dict())
    for name, tensor in default.state_dict().items():  # same seed, same weights (generate's CLI relies on it)
        assert torch.equal(flash.state_dict()[name], tensor), name
    names = dict(flash.named_parameters())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "architecture": "qwen2"},
                                       {"tie_word_embeddings": True}, {"num_kv_heads": 1, "mlp_bias": True}])
def test_default_weights_round_trip_through_the_fused_layout(overrides):
    default, flash = make_pair(**overrides)
    for name, tensor in flash.state_dict().items():
        assert torch.equal(tensor, default.state_dict()[name]), name
    back = DefaultForCausalLM(default.config)
    back.load_state_dict(flash.state_dict())
    ids = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(back(ids).logits, default(ids).logits, atol=0, rtol=0)


def test_in_place_loading_into_state_dict_tensors_reaches_the_fused_weight():
    """DCP and flashlm.models.weights copy into ``state_dict(keep_vars=True)`` tensors: views of the fused one."""
    flash = build_model("tiny", attn="flash")
    sd = flash.state_dict(keep_vars=True)
    with torch.no_grad():
        sd["model.layers.1.self_attn.k_proj.weight"].fill_(3.0)
        sd["model.layers.1.mlp.up_proj.weight"].fill_(5.0)
    c = flash.config
    qkv = flash.model.layers[1].self_attn.qkv_proj.weight
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    assert (qkv[q_rows:q_rows + kv_rows] == 3).all() and not (qkv[:q_rows] == 3).any()
    assert (flash.model.layers[1].mlp.gate_up_proj.weight[c.intermediate_size:] == 5).all()


def test_folder_round_trip_and_fsdp_export_of_fused_names(tmp_path):
    from flashlm.train.checkpoint import _write_full_state_dict

    default, flash = make_pair(qkv_bias=True, architecture="qwen2")
    save_pretrained(flash, tmp_path / "a")
    again = from_pretrained(tmp_path / "a", attn="default")
    assert again.load_report.missing_keys == [] and again.load_report.unexpected_keys == []
    # a gathered FSDP2 state dict keeps the fused names (sharded weights are not split): exported as HF
    fused = {n: p.detach() for n, p in flash.named_parameters()}
    assert any("qkv_proj" in n for n in fused)
    _write_full_state_dict(fused, flash.config, tmp_path / "b")
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(from_pretrained(tmp_path / "b", attn="default")(ids).logits, default(ids).logits)
    assert set(split_fused_state_dict(fused, flash.config)) == set(default.state_dict()) - {"lm_head.weight"} \
        or set(split_fused_state_dict(fused, flash.config)) == set(default.state_dict())


def test_gemma2_family_flash_equals_default():
    default, flash = make_pair(architecture="gemma2", hidden_act="gelu_pytorch_tanh", rms_norm_unit_offset=True,
                               post_norms=True, embed_scale=True, attn_logit_softcap=5.0,
                               final_logit_softcap=3.0, query_pre_attn_scalar=16.0)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(flash(ids).logits, default(ids).logits, atol=ATOL, rtol=RTOL)


def test_kernels_are_bound_at_build_and_rebound_on_move():
    flash = build_model(get_preset("tiny", kernels="torch"), attn="flash")
    attn = flash.model.layers[0].self_attn
    assert {o.names["rotary_qkv"] for o in flash.model.op_sets.values()} == {"torch"}
    assert ("dense", torch.float32, True, False) in attn.backends
    flash.to(torch.float16)
    assert attn.backends[("dense", torch.float16, False, False)].name == "sdpa_cpu"  # PyTorch's CPU flash kernel
    with pytest.raises(ValueError, match="kernels"):
        get_preset("tiny", kernels="cuda")


def test_eager_loss_in_token_chunks_and_softcapped_by_size_agree(monkeypatch):
    """Eager: logits_cross_entropy in one chunk or in several (CHUNK_LOGITS_BYTES) gives the default
    model's loss and gradients; a softcapped loss goes by size (plain cross-entropy, else fused)."""
    from test_flash_model import assert_grads_close, grads

    import flashlm.ops.cross_entropy as lk

    default, flash = make_pair()
    ids = torch.randint(0, 256, (2, 11))
    ref = default(ids, labels=ids).loss
    ref.backward()
    chunks = []
    real = lk._chunked
    monkeypatch.setattr(lk, "_chunked", lambda *a: chunks.append(a[8]) or real(*a))
    one = flash(ids, labels=ids).loss
    assert chunks == []  # 22 x 256 logits: one chunk
    monkeypatch.setattr(lk, "CHUNK_LOGITS_BYTES", 5 * 256 * 4)  # 5 tokens of fp32 logits per chunk
    several = flash(ids, labels=ids).loss
    several.backward()
    assert chunks == [5]
    torch.testing.assert_close(one, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(several, ref, atol=ATOL, rtol=RTOL)
    assert_grads_close(grads(flash), grads(default))

    _, capped = make_pair(final_logit_softcap=3.0)
    calls = []
    real_fused = flash_mod.linear_cross_entropy
    monkeypatch.setattr(flash_mod, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real_fused(*a, **k))
    plain = capped(ids, labels=ids).loss
    assert calls == [] and losses.materialize_logits_for_loss(22, 256)
    monkeypatch.setattr(losses, "MATERIALIZED_LOGITS_MAX_BYTES", 0)
    fused = capped(ids, labels=ids).loss
    assert calls == [1]
    torch.testing.assert_close(fused, plain, atol=ATOL, rtol=RTOL)


def _batches(kind, step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 256, (2, 12), generator=g)
    if kind == "dense":
        return {"input_ids": ids}
    if kind == "padded":  # left padding that changes between steps (same shapes)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, : 2 + 3 * step] = 0
        return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    docs = [[4, 8], [3, 4, 5]][step]  # packed: documents restarting inside rows, their count changing
    pos = torch.cat([torch.arange(n) for n in docs])[None].expand(2, -1)
    return {"input_ids": ids, "position_ids": pos}


@pytest.mark.parametrize("kind", ["dense", "padded", "packed"])
def test_compiled_fullgraph_train_step_equals_eager_without_recompiles(kind):
    torch._dynamo.reset()
    import copy

    _, flash = make_pair(num_layers=1)
    flash.train()
    eager = copy.deepcopy(flash)  # the unpadding/detecting plans; `flash` is told it runs compiled
    # aot_eager: the same Dynamo graph and autograd trace as inductor (what fullgraph and recompiles are
    # about) without inductor's C++ build, which would cost a minute per case on a CI CPU
    compiled = torch.compile(flash.prepare_compile(whole_model=True), fullgraph=True, backend="aot_eager")
    for step in range(2):
        batch = _batches(kind, step)
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        labels = batch["input_ids"].masked_fill(~real, -100)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = compiled(**batch, labels=labels, return_logits=True)
        out.loss.backward()
        got = {n: p.grad.clone() for n, p in flash.named_parameters()}
        flash.zero_grad()
        ref = eager(**batch, labels=labels, return_logits=True)
        ref.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.logits[real], ref.logits[real], atol=ATOL, rtol=RTOL)
        assert (out.logits[~real] == 0).all()
        for n, p in eager.named_parameters():
            torch.testing.assert_close(got[n], p.grad, atol=ATOL, rtol=RTOL, msg=n)
        eager.zero_grad()


def test_hf_model_with_fp32_upcast_activations_runs_half_kernels():
    transformers = pytest.importorskip("transformers")
    import flashlm.hf as flashlm_hf

    name = flashlm_hf.register()
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name).to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 6))
    ref = model(ids).logits
    attn = model.model.layers[0].self_attn
    seen = []
    hooks = [getattr(attn, p).register_forward_hook(lambda m, i, o: o.float()) for p in ("q_proj", "k_proj", "v_proj")]
    hooks.append(attn.o_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0].dtype)))
    kernels_mod._WARNED_FP32 = False  # half_precision_inputs warns once per process
    try:
        with pytest.warns(UserWarning, match="casting q/k/v to torch.bfloat16"):
            out = model(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert seen[0] == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


def test_eager_steps_run_no_registry_choice_and_decode_matches_default(monkeypatch):
    """Backends are chosen when the model is built: a train step, a prefill and the decode steps call
    the registry's select not once (it ran per layer and call before), and decoding stays exact."""
    from flashlm.attention import registry

    default, flash = make_pair()
    ids = torch.randint(3, 256, (2, 9))
    calls = []
    real = registry.select
    monkeypatch.setattr(registry, "select", lambda *a, **k: calls.append(a) or real(*a, **k))
    flash.train()
    flash(ids, labels=ids).loss.backward()
    flash.eval()
    cache = flash.allocate_cache(2, 12)
    with torch.no_grad():
        flash(ids[:, :6], past_key_values=cache)
        steps = [flash(ids[:, i:i + 1], past_key_values=cache).logits for i in range(6, 9)]
    assert calls == []
    ref = default(ids).logits
    for i, logits in zip(range(6, 9), steps, strict=True):
        torch.testing.assert_close(logits[:, 0], ref[:, i], atol=ATOL, rtol=RTOL)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "padded", "packed"])
def test_cuda_compiled_bf16_train_within_dao_rule(kind):
    """bf16 flash compiled by inductor (fullgraph) vs the fp32 default model: loss and grads within 2x
    (+atol) the bf16 default model's own error, two steps with no recompile."""
    import copy

    torch._dynamo.reset()
    ref32, flash = make_pair("cuda", hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512,
                             num_layers=2)
    ref16, flash = copy.deepcopy(ref32).to(torch.bfloat16), flash.to(torch.bfloat16).train()
    eager = copy.deepcopy(flash)
    compiled = torch.compile(flash.prepare_compile(whole_model=True), fullgraph=True)
    for step in range(2):
        batch = {k: v.cuda() for k, v in _batches(kind, step).items()}
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        labels = batch["input_ids"].masked_fill(~real, -100)
        labels[:, 1:].masked_fill_(real[:, 1:] & ~real[:, :-1], -100)  # no predecessor: unscored by flash
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = compiled(**batch, labels=labels)
        out.loss.backward()
        if kind == "packed":  # the default model has no packing: against eager flash, same dtype
            torch.testing.assert_close(out.loss, eager(**batch, labels=labels).loss, atol=2e-2, rtol=2e-2)
        else:
            losses_ = [m(**batch, labels=labels).loss for m in (ref32, ref16)]
            for loss in losses_:
                loss.backward()
            assert abs(out.loss.item() - losses_[0].item()) <= 2 * abs(losses_[1].item() - losses_[0].item()) + 2e-2
            g32 = {n: p.grad for n, p in ref32.named_parameters()}
            g16 = {n: p.grad for n, p in ref16.named_parameters()}
            gf = split_fused_state_dict({n: p.grad for n, p in flash.named_parameters()}, flash.config)
            for n, g in g32.items():
                e_ref = (g16[n].float() - g).abs().max().item()
                e_flash = (gf[n].float() - g).abs().max().item()
                assert e_flash <= 3 * e_ref + 1e-3 * g.abs().max().item() + 1e-6, (n, e_flash, e_ref)
        for m in (ref32, ref16, flash):
            m.zero_grad(set_to_none=True)


def test_blocks_compiled_one_by_one_after_prepare_compile_equal_eager():
    """flashlm train --compile: eager planner, each block compiled; batches of the same shape whose
    documents differ recompile at most once (cu_seqlens' length becomes dynamic), max_seqlen never."""
    torch._dynamo.reset()
    import copy

    _, flash = make_pair(num_layers=2)
    ref = copy.deepcopy(flash)
    flash.train().prepare_compile()
    ref.train()
    for layer in flash.model.layers:
        layer.compile(fullgraph=True, backend="aot_eager")
    for step, docs in enumerate([[4, 8], [3, 4, 5], [2, 2, 3, 5]]):
        pos = torch.cat([torch.arange(n) for n in docs])[None].expand(2, -1)
        ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(step))
        with torch._dynamo.config.patch(error_on_recompile=step == 2):
            loss = flash(ids, position_ids=pos, labels=ids).loss
        expected = ref(ids, position_ids=pos, labels=ids).loss
        torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
        loss.backward()
