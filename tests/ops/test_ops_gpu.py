"""flashlm.ops on CUDA: every implementation of every op (Triton, aten, Liger where installed) against
the torch reference in bf16 and fp16, forward and backward (Dao's rule), at odd sizes and the seed
shape; and torch.compile(fullgraph=True) with inductor, with Liger installed or not."""

import pytest
import torch
from _judge import grads, judge, leaf

from flashlm import ops

pytestmark = pytest.mark.cuda
DTYPES = [torch.bfloat16, torch.float16]
DEV = "cuda"


def _impls(op):
    """{impl name: callable} for op, from every ``resolve`` choice that is available here."""
    found = {"triton": getattr(ops.resolve("triton", DEV), op)}
    if op in ("rms_norm", "add_rms_norm"):
        found["aten"] = getattr(ops, f"{op}_aten")
    try:
        chosen = ops.resolve("liger", DEV)
    except ValueError:  # Liger not installed
        return found
    if chosen.names[op] == "liger":
        found["liger"] = getattr(chosen, op)
    return found


def _check(op_name, call, inputs, n_grad, dtype):
    """Run every impl of op_name and its reference (fp32 truth and low-precision) as ``call(fn,
    *inputs)``; the first ``n_grad`` inputs get gradients from one shared upstream gradient per output."""
    ref_fn = getattr(ops, f"{op_name}_ref")
    truth_in = [leaf(t, torch.float32) if i < n_grad else t for i, t in enumerate(inputs)]
    low_in = [leaf(t, dtype) if i < n_grad else t for i, t in enumerate(inputs)]
    truth, ref = call(ref_fn, *truth_in), call(ref_fn, *low_in)
    truth_t = (truth,) if isinstance(truth, torch.Tensor) else tuple(truth)
    ups = [torch.randn(t.shape, device=DEV) for t in truth_t]
    want_grads = grads(truth, truth_in[:n_grad], ups)
    ref_grads = grads(ref, low_in[:n_grad], [u.to(dtype) for u in ups])
    for name, fn in _impls(op_name).items():
        got_in = [leaf(t, dtype) if i < n_grad else t for i, t in enumerate(inputs)]
        got = call(fn, *got_in)
        low = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
        got_t = (got,) if isinstance(got, torch.Tensor) else tuple(got)
        judge(got_t, low, tuple(t.to(r.dtype) for t, r in zip(truth_t, low)), dtype, f"{name} {op_name}")
        judge(grads(got, got_in[:n_grad], [u.to(dtype) for u in ups]), ref_grads, want_grads, dtype,
              f"{name} {op_name} grad", factor=3.0)


SIZES = [(1, 1, 77), (2, 256, 768), (3, 333, 2050)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("unit_offset", [False, True])
def test_norms(size, dtype, unit_offset):
    x, r = torch.randn(size, device=DEV), torch.randn(size, device=DEV)
    w = torch.randn(size[-1], device=DEV) * 0.1 + (0.0 if unit_offset else 1.0)
    _check("rms_norm", lambda fn, *a: fn(*a, 1e-6, unit_offset), [x, w], 2, dtype)
    _check("add_rms_norm", lambda fn, *a: fn(*a, 1e-6, unit_offset), [x, r, w], 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1, 2 * 75), (2, 256, 2 * 2048), (3, 100, 2 * 3001)])
def test_swiglu(size, dtype):
    _check("swiglu", lambda fn, a: fn(a), [torch.randn(size, device=DEV) * 3], 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,out", [((1, 1, 2 * 75), 33), ((2, 256, 2 * 2048), 768), ((3, 100, 2 * 3001), 500)])
def test_swiglu_linear(size, out, dtype):
    w = torch.randn(out, size[-1] // 2, device=DEV) / (size[-1] // 2) ** 0.5
    _check("swiglu_linear", lambda fn, a, w, b: fn(a, w, b),
           [torch.randn(size, device=DEV) * 3, w, torch.randn(out, device=DEV)], 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,h,kv,d,tb", [(1, 1, 3, 1, 10, 1), (2, 256, 12, 12, 64, 2), (2, 300, 32, 8, 64, 1),
                                           (3, 17, 5, 1, 128, 3)])
def test_rotary(b, s, h, kv, d, tb, dtype):
    angles = torch.rand(tb, s, d // 2, device=DEV) * 1000
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(b, s, (h + 2 * kv) * d, device=DEV)
    _check("rotary_qkv", lambda fn, x: fn(x, cos, sin, h, kv, d), [qkv], 1, dtype)
    _check("rotary", lambda fn, x: fn(x, cos, sin), [torch.randn(b, s, h, d, device=DEV)], 1, dtype)


def _block(o, x, residual, w, gu_w, cos, sin):
    y, residual = o.add_rms_norm(x, residual, w, 1e-6)
    q, k, v = o.rotary_qkv(y[..., : 16 * 64], cos, sin, 8, 4, 64)
    h = o.swiglu(y @ gu_w)
    down = o.swiglu_linear(y @ gu_w, gu_w[:, :512])  # weight (1024, 512): a leaf's view
    return q.float().sum() + k.float().pow(2).sum() + v.float().sum() + h.float().pow(2).sum() \
        + o.rms_norm(residual, w, 1e-6).float().sum() + down.float().pow(2).sum()


@pytest.mark.parametrize("kernels", ["auto", "triton", "liger", "torch"])
def test_compile_fullgraph_inductor(kernels):
    """Inductor compiles a block of ops with no graph break, forward and backward, and matches eager;
    with Liger installed the "liger" choice must not crash (issue 16): compiled code runs our ops."""
    try:
        o = ops.resolve(kernels, DEV)
    except ValueError:
        pytest.skip("Liger-Kernel not installed")
    x, r = (torch.randn(2, 64, 1024, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(1024, device=DEV, dtype=torch.bfloat16)
    gu = torch.randn(1024, 2 * 512, device=DEV, dtype=torch.bfloat16) * 0.03
    angles = torch.rand(2, 64, 32, device=DEV) * 100
    leaves = [t.requires_grad_(True) for t in (x, r, w, gu)]
    eager = _block(o, x, r, w, gu, angles.cos(), angles.sin())
    want = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _block(o, *a), fullgraph=True)
    out = compiled(x, r, w, gu, angles.cos(), angles.sin())
    got = torch.autograd.grad(out, leaves)
    torch.cuda.synchronize()
    for a, b in zip((out, *got), (eager, *want), strict=True):  # inductor may round differently
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
