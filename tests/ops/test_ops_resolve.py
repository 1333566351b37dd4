"""resolve(kernels, device): the choice made once; and the ops traced by torch.compile(fullgraph=True)."""

import importlib.util

import pytest
import torch

from flashlm import ops
from flashlm.errors import InputError


def test_resolve_names_each_choice():
    assert set(ops.resolve("torch").names.values()) == {"torch"}
    assert ops.resolve("auto", "cpu").rms_norm is ops.rms_norm_ref  # CPU default: torch
    chosen = ops.resolve("triton", "cpu")  # runs under the interpreter (tests/conftest.py)
    assert set(chosen.names.values()) == {"triton"} and chosen.rotary_qkv is ops.rotary_qkv


def test_resolve_swiglu_linear_per_mode(monkeypatch):
    """The activation-not-saved op: our Triton one where kernels are chosen (Liger has none), by size
    for "auto" on CUDA (eager or compiled: ours is faster than inductor's at large shapes), the plain
    reference on CPU."""
    assert ops.resolve("torch").swiglu_linear is ops.swiglu_linear_ref
    assert ops.resolve("auto", "cpu").swiglu_linear is ops.swiglu_linear_ref
    assert ops.resolve("auto", "cuda", compiled=True).swiglu_linear is ops.swiglu_linear_sized
    assert ops.resolve("auto", "cuda").swiglu_linear is ops.swiglu_linear_sized
    assert ops.resolve("triton", "cpu").swiglu_linear is ops.swiglu_linear
    from flashlm.ops import liger

    monkeypatch.setattr(liger, "functions", lambda: {"rms_norm": ops.rms_norm_ref})  # as if installed
    chosen = ops.resolve("liger", "cpu")
    assert chosen.swiglu_linear is ops.swiglu_linear and chosen.names["swiglu_linear"] == "triton"


def test_resolve_refuses_what_cannot_run(monkeypatch):
    with pytest.raises(InputError, match="kernels must be one of"):
        ops.resolve("fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="needs Triton on a CUDA device"):
        ops.resolve("triton", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="Liger installed")
def test_resolve_liger_without_liger_is_refused():
    with pytest.raises(InputError, match="needs Liger-Kernel"):
        ops.resolve("liger", "cpu")


def _block(ops_, x, residual, w, gate_up_w, cos, sin):
    """A pre-norm block's worth of the ops, as a model would chain them."""
    y, residual = ops_.add_rms_norm(x, residual, w, 1e-6)
    q, k, v = ops_.rotary_qkv(y[..., : 4 * 8], cos, sin, 2, 1, 8)
    h = ops_.swiglu(y @ gate_up_w)
    down = ops_.swiglu_linear(y @ gate_up_w, gate_up_w[:, :24])  # weight (40, 24): a leaf's view
    return (q.sum() + 2 * k.sum() + 3 * v.sum()) + h.pow(2).sum() + ops_.rms_norm(residual, w, 1e-6).sum() \
        + down.pow(2).sum()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_ops_compile_fullgraph_and_match_eager(kernels):
    """fullgraph=True fails on any graph break; aot_eager runs the custom ops' fakes and autograd
    formulas (what inductor sees) without a C++ build."""
    chosen = ops.resolve(kernels, "cpu")
    x, r = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    w, gu = torch.randn(40), torch.randn(40, 2 * 24) * 0.2
    cos, sin = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    leaves = [t.requires_grad_(True) for t in (x, r, w, gu)]
    eager = _block(chosen, x, r, w, gu, cos, sin)
    want = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _block(chosen, *a), backend="aot_eager", fullgraph=True)
    out = compiled(x, r, w, gu, cos, sin)
    got = torch.autograd.grad(out, leaves)
    torch.testing.assert_close(out, eager)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_resolve_auto_on_cuda_takes_the_measured_table():
    """Only builds the namespace: nothing runs on the device, so this holds on a CPU machine too."""
    from flashlm.ops.resolve import _AUTO

    chosen = ops.resolve("auto", "cuda")
    assert {k: v for k, v in chosen.names.items() if v != "liger"} == {
        k: v for k, v in _AUTO.items() if chosen.names[k] != "liger"}
    assert chosen.rms_norm is ops.rms_norm_aten and chosen.swiglu is ops.swiglu_sized
    assert chosen.swiglu_linear is ops.swiglu_linear_sized
    assert chosen.rotary_qkv is ops.rotary_qkv


def test_resolve_auto_for_a_compiled_model():
    """Inductor fuses the norms' references itself; SwiGLU and RoPE go by size (our Triton custom ops
    from SIZED_MIN_NUMEL on, where their kernels beat inductor's); CPU stays torch."""
    chosen = ops.resolve("auto", "cuda", compiled=True)
    assert chosen.rms_norm is ops.rms_norm_ref and chosen.add_rms_norm is ops.add_rms_norm_ref
    assert chosen.swiglu is ops.swiglu_sized and chosen.rotary_qkv is ops.rotary_qkv_sized
    assert chosen.rotary is ops.rotary_sized and chosen.rotary_qkv_append is ops.rotary_qkv_append_ref
    assert set(ops.resolve("auto", "cpu", compiled=True).names.values()) == {"torch"}
    assert ops.resolve("triton", "cpu", compiled=True).names["swiglu"] == "triton"  # explicit choice kept


def test_resolve_auto_for_decode_steps_takes_our_kernels():
    """A decode step (mostly a CUDA-graph replay) pays GPU time only: every op is our Triton kernel;
    CPU and explicit choices are unchanged."""
    chosen = ops.resolve("auto", "cuda", decode=True)
    assert set(chosen.names.values()) == {"triton"}
    assert chosen.add_rms_norm is ops.add_rms_norm and chosen.swiglu_linear is ops.swiglu_linear
    assert ops.resolve("auto", "cpu", decode=True).add_rms_norm is ops.add_rms_norm_ref
    assert set(ops.resolve("torch", "cuda", decode=True).names.values()) == {"torch"}


def test_flash_model_binds_the_decode_set_to_direct_cache_appends():
    """Eager decode steps and captured ones plan alike (direct appends) and so run the same ops."""
    from flashlm.models import build_model
    from flashlm.models.plan import append_plan

    flash = build_model("tiny", attn="flash")
    sets, ids = flash.model.op_sets, torch.zeros(1, 3, dtype=torch.long)
    cache = flash.allocate_cache(1, 8)
    cache.note_appended(1, 1)  # non-empty: the next forward appends
    assert append_plan(ids, cache, None, op_sets=sets).ops is sets["decode"]
    assert flash.model.plan(ids, past_key_values=cache).ops is sets["decode"]
    assert flash.model.plan(ids, past_key_values=cache, attention_mask=torch.ones_like(ids)).ops is sets["eager"]
    assert flash.model.plan(ids).ops is sets["eager"]
    assert append_plan(ids, cache, None, compiled=True, op_sets=sets).ops is sets["compiled"]
    assert flash.prepare_compile().model.plan(ids).ops is sets["compiled"]
