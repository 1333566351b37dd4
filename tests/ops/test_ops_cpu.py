"""Every public op of flashlm.ops runs on CPU tensors without Triton's interpreter: where Triton cannot
run on the tensor's device the op is its torch reference (bit for bit, forward and backward).

conftest.py sets TRITON_INTERPRET=1 before the kernels are decorated, so in this process they stay
interpreted even after ``monkeypatch.delenv``: the in-process tests check that the op is the
reference exactly; ``test_ops_run_in_a_process_without_the_interpreter`` runs the same checks in a
fresh process, where the kernels are compiled ones and a CPU launch fails ("0 active drivers").
"""

import os
import subprocess
import sys

import pytest
import torch

from flashlm import ops

HEADS, KV, D = 2, 1, 8


def _tables(batch, seqlen):
    angles = torch.rand(batch, seqlen, D // 2) * 50
    return angles.cos(), angles.sin()


def _cases():
    """name -> (public op, reference, inputs(dtype) -> (differentiable leaves, trailing arguments))."""
    cos, sin = _tables(2, 5)
    return {
        "rms_norm": (ops.rms_norm, ops.rms_norm_ref, lambda dt: ((torch.randn(2, 5, 12, dtype=dt),
                                                                  torch.randn(12, dtype=dt)), (1e-6,))),
        "rms_norm_unit_offset": (ops.rms_norm, ops.rms_norm_ref, lambda dt: (
            (torch.randn(2, 5, 12, dtype=dt), torch.randn(12, dtype=dt)), (1e-6, True))),
        "add_rms_norm": (ops.add_rms_norm, ops.add_rms_norm_ref, lambda dt: (
            (torch.randn(2, 5, 12, dtype=dt), torch.randn(2, 5, 12, dtype=dt), torch.randn(12, dtype=dt)),
            (1e-5,))),
        "swiglu": (ops.swiglu, ops.swiglu_ref, lambda dt: ((torch.randn(2, 5, 16, dtype=dt),), ())),
        "swiglu_linear": (ops.swiglu_linear, ops.swiglu_linear_ref, lambda dt: (
            (torch.randn(2, 5, 16, dtype=dt), torch.randn(6, 8, dtype=dt), torch.randn(6, dtype=dt)), ())),
        "rotary_qkv": (ops.rotary_qkv, ops.rotary_qkv_ref, lambda dt: (
            (torch.randn(2, 5, (HEADS + 2 * KV) * D, dtype=dt),), (cos, sin, HEADS, KV, D))),
        "rotary": (ops.rotary, ops.rotary_ref, lambda dt: ((torch.randn(2, 5, 3, D, dtype=dt),), (cos, sin))),
    }


def _outputs(fn, leaves, rest):
    """Outputs of ``fn`` and the leaves' gradients for one seeded upstream gradient per output."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, *rest)
    out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    gen = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in out]
    return out, torch.autograd.grad(out, leaves, ups)


def check_op(name: str, dtype: torch.dtype) -> None:
    """The public op ``name`` on CPU equals its reference: outputs (with grad and without) and grads."""
    public, ref, inputs = _cases()[name]
    leaves, rest = inputs(dtype)
    got, got_grads = _outputs(public, leaves, rest)
    want, want_grads = _outputs(ref, leaves, rest)
    for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), name
    with torch.no_grad():
        nograd = public(*leaves, *rest)
    nograd = (nograd,) if isinstance(nograd, torch.Tensor) else nograd
    assert all(torch.equal(g, w) for g, w in zip(nograd, want, strict=True)), name


def check_append(dtype: torch.dtype) -> None:
    """rotary_qkv_append (inference only) on CPU: q and both caches as its reference writes them."""
    qkv = torch.randn(2, 5, (HEADS + 2 * KV) * D, dtype=dtype)
    cos, sin = _tables(1, 5)
    slots = torch.tensor([[0, 1, 2, 3, 4], [6, 5, 4, 3, 2]], dtype=torch.int32)
    results = []
    for fn in (ops.rotary_qkv_append, ops.rotary_qkv_append_ref):
        k_cache, v_cache = torch.zeros(3, 7, KV, D, dtype=dtype), torch.zeros(3, 7, KV, D, dtype=dtype)
        q = fn(qkv, cos, sin, HEADS, KV, D, k_cache, v_cache, slots)
        results.append((q, k_cache, v_cache))
    assert results[0][1].count_nonzero() > 0  # the cache was written
    assert all(torch.equal(g, w) for g, w in zip(*results, strict=True))


NAMES = list(_cases())
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_public_op_on_cpu_is_its_reference(no_interpreter, name, dtype):
    check_op(name, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_qkv_append_on_cpu_is_its_reference(no_interpreter, dtype):
    check_append(dtype)


def test_sized_and_aten_forms_on_cpu(no_interpreter, monkeypatch):
    """The forms that call the public ops (rms_norm_aten with unit_offset, sized ops above the size)."""
    x, w = torch.randn(3, 12), torch.randn(12)
    assert torch.equal(ops.rms_norm_aten(x, w, 1e-6, True), ops.rms_norm_ref(x, w, 1e-6, True))
    # the package's name swiglu is the function: the module from sys.modules; a small size threshold
    # sends this small input down the Triton branch
    monkeypatch.setattr(sys.modules["flashlm.ops.swiglu"], "SIZED_MIN_NUMEL", 4)
    gate_up = torch.randn(3, 16)
    assert torch.equal(ops.swiglu_sized(gate_up), ops.swiglu_ref(gate_up))


def test_compiled_op_on_cpu_traces_the_reference(no_interpreter):
    x, w = torch.randn(2, 5, 12), torch.randn(12)
    compiled = torch.compile(lambda a, b: ops.add_rms_norm(a, a, b, 1e-6), backend="aot_eager", fullgraph=True)
    for g, r in zip(compiled(x, w), ops.add_rms_norm_ref(x, x, w, 1e-6), strict=True):
        assert torch.equal(g, r)


_SCRIPT = r"""
import torch
import test_ops_cpu as t

for dtype in t.DTYPES:
    for name in t.NAMES:
        t.check_op(name, dtype)
    t.check_append(dtype)
print("all ops ran")
"""


def test_ops_run_in_a_process_without_the_interpreter():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors even on a GPU machine: the fallback, not the kernels
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "all ops ran" in proc.stdout, proc.stderr[-3000:]
