"""flashlm.ops.decode_linear: the add + RMSNorm in the next projection's kernel (norm_linear) and the SwiGLU
in a bf16/fp16 down projection's GEMV (swiglu_gemv_linear), under TRITON_INTERPRET=1 in fp16/fp32 against
the torch references; their fallbacks (gradients, rows past the bound), errors, the op sets that carry
them, and the flash model's decode steps through them (the logits of the unfused model)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_pair, one_thread  # noqa: F401 (autouse fixture)

import flashlm.models.flash as flash_mod
from flashlm.errors import InputError
from flashlm.models.kernels import fuses_norm
from flashlm.models.quantize import quantize_model
from flashlm.ops import int8_linear as il
from flashlm.ops import resolve
from flashlm.ops._dispatch import triton_usable
from flashlm.ops.decode_linear import HALF_GEMV_MAX_M, norm_linear, norm_linear_ref, swiglu_gemv_linear
from flashlm.ops.swiglu import swiglu_linear_ref

needs_interpret = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                     reason="needs Triton and TRITON_INTERPRET=1")

TILES = {1: ([1, 16, 64, 4, 2, 1], [1, 8, 64, 4, 2, 2]), 20: ([16, 16, 64, 4, 2, 1], [32, 16, 32, 4, 2, 4])}


def _inputs(m, k, n, dtype, gen):
    x = torch.randn(m, k, generator=gen).to(dtype)
    residual = torch.randn(m, k, generator=gen).to(dtype)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    w = torch.randn(n, k, generator=gen) * 0.05
    return x, residual, norm_w, w, torch.randn(n, generator=gen).to(dtype)


@needs_interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 256), (1, 200), (20, 256), (20, 200)])
def test_norm_linear_kernels_equal_the_reference(dtype, m, k):
    """Every tile form (GEMV, tl.dot; split over K and not; K a multiple of the slice or ragged), with and
    without the residual, Llama's and Gemma's norm, int8 (with scales) and float weights: y within the
    reference's rounding, the new residual exact."""
    gen = torch.Generator().manual_seed(m * k)
    x, residual, norm_w, w, bias = _inputs(m, k, 48, dtype, gen)
    q, scale = il.quantize_int8(w)
    for tile in TILES[m]:
        cfg = il.Int8Config(*tile)
        for res in (None, residual):
            for offset in (False, True):
                for weight, s in ((q, scale), (w.to(dtype), None)):
                    y, h = il.launch_norm_linear(x, res, norm_w, 1e-5, offset, weight, s, bias, cfg)
                    want_y, want_h = norm_linear_ref(x, res, norm_w, 1e-5, offset, weight, s, bias)
                    assert torch.equal(h, want_h)
                    torch.testing.assert_close(y, want_y, atol=3e-3, rtol=3e-3)


@needs_interpret
def test_public_ops_pick_tiles_and_keep_shapes():
    """norm_linear on (batch, 1, K) with default tiles (pick_config, 2-byte weights' BLOCK_K) and
    swiglu_gemv_linear on a (batch, 1, 2K) gate_up: shapes kept, values of the references."""
    gen = torch.Generator().manual_seed(0)
    x, residual, norm_w, w, bias = _inputs(3, 128, 40, torch.float16, gen)
    x, residual = x[:, None], residual[:, None]
    with torch.no_grad():
        y, h = norm_linear(x, residual, norm_w, 1e-6, False, w.half(), None, bias)
    want_y, want_h = norm_linear_ref(x, residual, norm_w, 1e-6, False, w.half(), None, bias)
    assert y.shape == (3, 1, 40) and torch.equal(h, want_h)
    torch.testing.assert_close(y, want_y, atol=3e-3, rtol=3e-3)
    gate_up = torch.randn(2, 1, 256, generator=gen).half()
    with torch.no_grad():
        got = swiglu_gemv_linear(gate_up, w.half(), bias)
    torch.testing.assert_close(got, swiglu_linear_ref(gate_up, w.half(), bias), atol=3e-3, rtol=3e-3)


@needs_interpret
def test_fallbacks_keep_gradients_and_large_batches(monkeypatch):
    """A call that wants gradients, or more rows than HALF_GEMV_MAX_M for a float weight, runs the norm then
    the linear (no kernel launch of ours): the gradient flows, the values are the reference's."""
    calls = []
    real = il._launch
    monkeypatch.setattr(il, "_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(1)
    x, residual, norm_w, w, _ = _inputs(2, 64, 24, torch.float32, gen)
    x.requires_grad_(True)
    y, _ = norm_linear(x, residual, norm_w, 1e-6, False, w, None)
    y.sum().backward()
    assert x.grad is not None and calls == []
    w.requires_grad_(True)  # a weight (or norm weight) wanting its gradient: also the differentiable path
    y, _ = norm_linear(x.detach(), residual, norm_w, 1e-6, False, w, None)
    y.sum().backward()
    assert w.grad is not None and calls == []
    w = w.detach()
    big = torch.randn(HALF_GEMV_MAX_M + 1, 64, generator=gen)
    with torch.no_grad():
        y, _ = norm_linear(big, None, norm_w, 1e-6, False, w, None)
        torch.testing.assert_close(y, norm_linear_ref(big, None, norm_w, 1e-6, False, w)[0])
        assert calls == []
        norm_linear(big[:HALF_GEMV_MAX_M], None, norm_w, 1e-6, False, w, None)
    assert calls == [1]


def test_norm_linear_refuses_bad_inputs():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(InputError, match="norm weight"):
        norm_linear(x, None, torch.ones(7), 1e-6, False, w)
    with pytest.raises(InputError, match="residual"):
        norm_linear(x, torch.randn(3, 8), torch.ones(8), 1e-6, False, w)
    with pytest.raises(InputError, match="scale"):
        norm_linear(x, None, torch.ones(8), 1e-6, False, il.quantize_int8(w)[0])


def test_decode_op_sets_carry_the_fusions():
    """Only decode sets have norm_linear; "triton" takes it for every weight and the bf16 down projection's
    GEMV, "auto" for int8 weights only (bf16 GEMV vs cuBLAS unmeasured); fuses_norm reads that."""
    cuda = torch.device("cuda")  # resolve needs no GPU to name the choice
    triton_decode = resolve("triton", cuda, decode=True)
    auto_decode = resolve("auto", cuda, decode=True)
    assert resolve("triton", cuda).norm_linear is None and resolve("auto", cuda, compiled=True).norm_linear is None
    assert resolve("torch", cuda, decode=True).norm_linear is None
    assert (triton_decode.names["norm_linear"], triton_decode.names["swiglu_linear"]) == ("all", "gemv")
    assert (auto_decode.names["norm_linear"], auto_decode.names["swiglu_linear"]) == ("int8", "triton")
    linear = torch.nn.Linear(8, 8, bias=False, dtype=torch.float16)
    int8 = il.Int8Linear.from_linear(linear)
    assert fuses_norm(triton_decode, linear) and fuses_norm(triton_decode, int8)
    assert not fuses_norm(auto_decode, linear) and fuses_norm(auto_decode, int8)
    class LoRA(torch.nn.Linear):  # another module's forward is its own: never fused
        pass

    assert not fuses_norm(triton_decode, LoRA(8, 8)) and not fuses_norm(resolve("triton", cuda), int8)


@needs_interpret
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True},
                                       {"architecture": "gemma2", "hidden_act": "gelu_pytorch_tanh",
                                        "rms_norm_unit_offset": True, "post_norms": True}],
                         ids=["llama", "qk_norm", "gemma2"])
def test_flash_decode_steps_through_the_fusions_equal_the_default_model(overrides, monkeypatch):
    """kernels="triton": each decode step of a flash model runs the norm inside qkv_proj's and gate_up_proj's
    kernels (explain() names them; norm_linear is called twice per layer and step) and gives the default
    model's logits (fp32)."""
    default, flash = make_pair(kernels="triton", **overrides)
    calls = []
    real = flash_mod.fuses_norm
    monkeypatch.setattr(flash_mod, "fuses_norm", lambda ops, proj: (real(ops, proj) and not calls.append(1))
                        or False)
    ids = torch.randint(3, 256, (2, 9))
    cache = flash.allocate_cache(2, 12)
    with torch.no_grad():
        flash(ids[:, :6], past_key_values=cache)
        assert calls == []  # a prefill is not fused
        assert flash.explain(ids[:, 6:7], past_key_values=cache)["norm_fused_into"] == \
            [["qkv_proj", "gate_up_proj"]] * flash.config.num_layers
        steps = [flash(ids[:, i:i + 1], past_key_values=cache).logits for i in range(6, 9)]
        ref = default(ids).logits
    assert len(calls) == 3 * 2 * flash.config.num_layers
    for i, logits in zip(range(6, 9), steps, strict=True):
        torch.testing.assert_close(logits[:, 0], ref[:, i], atol=1e-4, rtol=1e-4)


@needs_interpret
def test_int8_decode_step_fuses_the_norm_and_equals_unfused(monkeypatch):
    """An int8 flash model (fp16, kernels="triton"): the decode step's norm goes into the int8 kernels and
    the logits equal those of the same model with the fusion turned off."""
    _, flash = make_pair(kernels="triton", dtype=torch.float16)
    q = quantize_model(flash)
    ids = torch.randint(3, 256, (2, 7))
    logits = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(flash_mod, "fuses_norm", lambda ops, proj: False)
        cache = q.allocate_cache(2, 10)
        with torch.no_grad():
            q(ids[:, :6], past_key_values=cache)
            if fused:
                assert q.explain(ids[:, 6:], past_key_values=cache)["norm_fused_into"][0] == ["qkv_proj",
                                                                                            "gate_up_proj"]
            logits[fused] = q(ids[:, 6:], past_key_values=cache).logits
    torch.testing.assert_close(logits[True], logits[False], atol=3e-3, rtol=3e-3)
