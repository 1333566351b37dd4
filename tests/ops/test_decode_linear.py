"""flashlm.ops.decode_linear: the add + RMSNorm in the next projection's kernel (norm_linear) and the SwiGLU
in a bf16/fp16 down projection's GEMV (swiglu_gemv_linear), under TRITON_INTERPRET=1 in fp16/fp32 against
the torch references; their fallbacks (gradients, rows past the bound), errors, the op sets that carry
them, and the flash model's decode steps through them (the logits of the unfused model)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_pair, one_thread  # noqa: F401 (autouse fixture)

from flashlm.errors import InputError
from flashlm.models.kernels import fuses_norm
from flashlm.models.quantize import quantize_model
from flashlm.ops import int8_linear as il
from flashlm.ops import resolve
from flashlm.ops._dispatch import triton_usable
from flashlm.ops.decode_linear import FUSED_MAX_M, norm_linear, norm_linear_ref, swiglu_gemv_linear
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
def test_public_ops_pick_tiles_and_keep_shapes(monkeypatch):
    """norm_linear on (batch, 1, K) with default tiles (pick_config, float weights' BLOCK_K; one fused launch) and
    swiglu_gemv_linear on a (batch, 1, 2K) gate_up: shapes kept, values of the references."""
    calls = _count_fused(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x, residual, norm_w, w, bias = _inputs(3, 128, 40, torch.float32, gen)
    x, residual = x[:, None], residual[:, None]
    with torch.no_grad():
        y, h = norm_linear(x, residual, norm_w, 1e-6, False, w, None, bias)
    want_y, want_h = norm_linear_ref(x, residual, norm_w, 1e-6, False, w, None, bias)
    assert y.shape == (3, 1, 40) and torch.equal(h, want_h) and calls == [1]
    torch.testing.assert_close(y, want_y, atol=3e-3, rtol=3e-3)
    gate_up = torch.randn(2, 1, 256, generator=gen).half()
    with torch.no_grad():
        got = swiglu_gemv_linear(gate_up, w.half(), bias)
    torch.testing.assert_close(got, swiglu_linear_ref(gate_up, w.half(), bias.half()), atol=3e-3, rtol=3e-3)


@needs_interpret
def test_fallbacks_keep_gradients_and_large_batches(monkeypatch):
    """A call that wants gradients, or more rows than FUSED_MAX_M for a float weight, runs the norm then
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
    big = torch.randn(FUSED_MAX_M + 1, 64, generator=gen)
    with torch.no_grad():
        y, _ = norm_linear(big, None, norm_w, 1e-6, False, w, None)
        torch.testing.assert_close(y, norm_linear_ref(big, None, norm_w, 1e-6, False, w)[0])
        assert calls == []
        norm_linear(big[:FUSED_MAX_M], None, norm_w, 1e-6, False, w, None)
    assert calls == [1]


def test_norm_linear_refuses_bad_inputs():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(InputError, match="norm weight"):
        norm_linear(x, None, torch.ones(7), 1e-6, False, w)
    with pytest.raises(InputError, match="residual"):
        norm_linear(x, torch.randn(3, 8), torch.ones(8), 1e-6, False, w)
    with pytest.raises(InputError, match="residual"):
        norm_linear(x, torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-6, False, w)
    with pytest.raises(InputError, match="scale"):
        norm_linear(x, None, torch.ones(8), 1e-6, False, il.quantize_int8(w)[0])
    with pytest.raises(InputError, match="bias"):
        norm_linear(x, None, torch.ones(8), 1e-6, False, w, None, torch.ones(5))
    q, scale = il.quantize_int8(w)
    for bad in (scale[:1], scale.long(), scale[:, None]):  # the kernel would read past a short scale
        with pytest.raises(InputError, match="scale"):
            norm_linear(x, None, torch.ones(8), 1e-6, False, q, bad)
    with pytest.raises(InputError, match="bf16/fp16/fp32"):
        norm_linear(x.double(), None, torch.ones(8), 1e-6, False, w)


@needs_interpret
def test_edge_inputs_take_the_right_path(monkeypatch):
    """A weight whose rows are not contiguous (a transposed view) and fp16 rows > 1 (the tl.dot tiles would
    round h * g to fp16 before the rstd: overflow) run the unfused ops, and give the reference's values even
    where h * g passes fp16's range; one fp16 row (the GEMV keeps fp32) takes the kernel; N == 0 gives the
    new residual."""
    calls = []
    real = il._launch
    monkeypatch.setattr(il, "_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    x, residual, norm_w, w, bias = _inputs(2, 64, 64, torch.float32, gen)
    with torch.no_grad():
        y, _ = norm_linear(x, residual, norm_w, 1e-6, False, w.t(), None, bias)
        torch.testing.assert_close(y, norm_linear_ref(x, residual, norm_w, 1e-6, False, w.t(), None, bias)[0])
        gate_up = torch.randn(2, 128, generator=gen)
        torch.testing.assert_close(swiglu_gemv_linear(gate_up, w.t(), bias), swiglu_linear_ref(gate_up, w.t(), bias))
        assert calls == []
        big = (3000 * torch.randn(2, 64, generator=gen)).half()  # |h * g| ~ 1e5 > 65504
        g = torch.full((64,), 30.0, dtype=torch.float16)
        y, _ = norm_linear(big, None, g, 1e-6, False, w.half(), None)
        assert calls == [] and torch.isfinite(y).all()
        y, _ = norm_linear(big[:1], None, g, 1e-6, False, w.half(), None)
        assert calls == [1] and torch.isfinite(y).all()
        torch.testing.assert_close(y, norm_linear_ref(big[:1], None, g, 1e-6, False, w.half())[0], atol=5e-2,
                                   rtol=5e-3)
        y, h = il.launch_norm_linear(x, residual, norm_w, 1e-6, False, w[:0], None, None)
        assert y.shape == (2, 0) and torch.equal(h, x + residual)


def test_decode_op_sets_carry_the_fusions():
    """Only "triton"'s decode set has norm_linear (for every weight) and the bf16 down projection's GEMV;
    "auto" has neither until a GPU A/B decides; fuses_norm reads that, and refuses hooked modules, rows the
    kernel does not serve, gradients."""
    cuda = torch.device("cuda")  # resolve needs no GPU to name the choice
    triton_decode = resolve("triton", cuda, decode=True)
    assert resolve("triton", cuda).norm_linear is None and resolve("auto", cuda, decode=True).norm_linear is None
    assert resolve("torch", cuda, decode=True).norm_linear is None
    assert "norm_linear" not in resolve("auto", cuda, decode=True).names
    assert (triton_decode.names["norm_linear"], triton_decode.names["swiglu_linear"]) == ("all", "gemv")
    linear = torch.nn.Linear(8, 8, bias=False, dtype=torch.float16)
    int8, owner = il.Int8Linear.from_linear(linear), torch.nn.Module()
    bf16 = torch.bfloat16
    assert fuses_norm(triton_decode, linear, owner, 1, bf16) and fuses_norm(triton_decode, int8, owner, 64, bf16)
    assert not fuses_norm(resolve("triton", cuda), int8, owner, 1, bf16)
    assert not fuses_norm(triton_decode, int8, owner, 65, bf16) and not fuses_norm(triton_decode, int8, owner, 2,
                                                                                   torch.float16)
    assert not fuses_norm(triton_decode, linear, owner, 1, bf16, needs_grad=True)

    class LoRA(torch.nn.Linear):  # another module's forward is its own: never fused
        pass

    assert not fuses_norm(triton_decode, LoRA(8, 8), owner, 1, bf16)
    handle = owner.register_forward_pre_hook(lambda *a: None)  # e.g. FSDP2's: the fusion would skip it
    assert not fuses_norm(triton_decode, linear, owner, 1, bf16)
    handle.remove()
    handle = linear.register_forward_hook(lambda *a: None)
    assert not fuses_norm(triton_decode, linear, owner, 1, bf16)
    handle.remove()
    owner.forward = lambda *a: None  # a forward replaced on the instance (accelerate's hooks)
    assert not fuses_norm(triton_decode, linear, owner, 1, bf16)


def _count_fused(monkeypatch) -> list:
    calls = []
    real = il._launch
    monkeypatch.setattr(il, "_launch", lambda *a, norm=None, **k: (norm is not None and calls.append(1))
                        or real(*a, norm=norm, **k))
    return calls


@needs_interpret
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True},
                                       {"architecture": "gemma2", "hidden_act": "gelu_pytorch_tanh",
                                        "rms_norm_unit_offset": True, "post_norms": True}],
                         ids=["llama", "qk_norm", "gemma2"])
def test_flash_decode_steps_through_the_fusions_equal_the_default_model(overrides, monkeypatch):
    """kernels="triton": each decode step of a flash model launches the norm-fused kernel twice per layer
    (qkv_proj, gate_up_proj; explain() names them), a prefill none, and the steps give the default model's
    logits (fp32)."""
    default, flash = make_pair(kernels="triton", **overrides)
    calls = _count_fused(monkeypatch)
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
    # with grad enabled (even with every parameter frozen) a step is not fused, and explain() says so
    flash.requires_grad_(False)
    assert flash.explain(ids[:, 8:9], past_key_values=cache)["norm_fused_into"] == [[]] * flash.config.num_layers
    flash(ids[:, 8:9], past_key_values=cache)
    assert len(calls) == 3 * 2 * flash.config.num_layers


@needs_interpret
def test_int8_decode_step_fuses_the_norm_and_equals_unfused(monkeypatch):
    """An int8 flash model (fp16, kernels="triton", one row: fp16 fuses only the GEMV): the decode step's
    norm goes into the int8 kernels and the logits equal those of the same model with kernels="torch"."""
    _, flash = make_pair(kernels="triton", dtype=torch.float16)
    _, plain = make_pair(kernels="torch", dtype=torch.float16)
    plain.load_state_dict(flash.state_dict())
    ids = torch.randint(3, 256, (1, 7))
    logits = {}
    calls = _count_fused(monkeypatch)
    for name, model in (("fused", quantize_model(flash)), ("unfused", quantize_model(plain))):
        cache = model.allocate_cache(1, 10)
        with torch.no_grad():
            model(ids[:, :6], past_key_values=cache)
            logits[name] = model(ids[:, 6:], past_key_values=cache).logits
        assert len(calls) == 2 * model.config.num_layers  # the fused model's step only
    torch.testing.assert_close(logits["fused"], logits["unfused"], atol=3e-3, rtol=3e-3)


@needs_interpret
def test_hooked_modules_are_called_not_bypassed(monkeypatch):
    """A forward hook on a layer's attention or MLP (or on the projection) still fires at decode: that layer
    runs unfused; the other layers keep the fusion."""
    _, flash = make_pair(kernels="triton")
    fired = []
    flash.model.layers[0].self_attn.register_forward_hook(lambda *a: fired.append("attn"))
    flash.model.layers[0].mlp.gate_up_proj.register_forward_hook(lambda *a: fired.append("gate_up"))
    calls = _count_fused(monkeypatch)
    ids = torch.randint(3, 256, (1, 7))
    cache = flash.allocate_cache(1, 10)
    with torch.no_grad():
        flash(ids[:, :6], past_key_values=cache)
        fired.clear()
        assert flash.explain(ids[:, 6:], past_key_values=cache)["norm_fused_into"][:2] == [[], ["qkv_proj",
                                                                                            "gate_up_proj"]]
        flash(ids[:, 6:], past_key_values=cache)
    assert fired == ["attn", "gate_up"] and len(calls) == 2 * (flash.config.num_layers - 1)
