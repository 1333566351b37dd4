"""flashlm.ops.cross_entropy.logits_cross_entropy against ``F.cross_entropy(F.linear(h, w, b).float(), t)``.

CPU: the torch reference and the Triton kernel (in Triton's interpreter, TRITON_INTERPRET=1 from
conftest) in fp32 and fp16 only (the interpreter is not trusted for bf16). CUDA (@pytest.mark.cuda):
bf16 within Dao's rule against fp32, and the peak memory of fwd+bwd below the plain path's.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_pair, one_thread  # noqa: F401  (autouse fixture)

import flashlm.ops.cross_entropy as lk
from flashlm.errors import InputError
from flashlm.ops.cross_entropy import logits_cross_entropy

UPSTREAM = 1.7  # a non-unit upstream gradient: the backward must scale by it
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(lk.triton is None, reason="no triton"))]
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


def _inputs(n, h, v, dtype, bias=True, ignore_every=0, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)
    b = torch.randn(v, generator=g) * 0.1 if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    leaves = [None if t is None else t.to(device, dtype).requires_grad_() for t in (hidden, weight, b)]
    return (*leaves, targets.to(device))


def _run(fn, hidden, weight, bias, targets, upstream=UPSTREAM, **kw):
    """-> (loss, [grad hidden, grad weight, grad bias or None]) of ``fn`` times ``upstream``."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = fn(hidden, weight, targets, bias, **kw)
    (loss * upstream).backward()
    return loss.detach(), [None if t is None else t.grad.clone() for t in (hidden, weight, bias)]


def _reference(hidden, weight, targets, bias=None, reduction="mean"):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction=reduction)


def _assert_close(got, want, **tol):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    assert loss_g.dtype == torch.float32
    torch.testing.assert_close(loss_g, loss_w, equal_nan=True, **tol)
    for g, w, name in zip(grads_g, grads_w, ("hidden", "weight", "bias")):
        if w is None:
            assert g is None, name
        else:
            assert g.dtype == w.dtype, name
            torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,h,v", [(1, 16, 1000), (37, 16, 1000), (300, 32, 1000), (64, 16, 32003)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(backend, dtype, n, h, v, reduction):
    hidden, weight, bias, targets = _inputs(n, h, v, dtype, ignore_every=5)
    got = _run(logits_cross_entropy, hidden, weight, bias, targets, reduction=reduction, backend=backend)
    want = _run(_reference, hidden, weight, bias, targets, reduction=reduction)
    tol = TOL[dtype] if reduction == "mean" else {k: x * 10 for k, x in TOL[dtype].items()}
    _assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_frozen_weight(backend):
    hidden, weight, _, targets = _inputs(20, 16, 1000, torch.float32, bias=False, ignore_every=3)
    _assert_close(_run(logits_cross_entropy, hidden, weight, None, targets, backend=backend),
                  _run(_reference, hidden, weight, None, targets), **TOL[torch.float32])
    weight.requires_grad_(False)
    hidden.grad = weight.grad = None
    logits_cross_entropy(hidden, weight, targets, backend=backend).backward()
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_chunks_match_reference(backend, dtype, chunk, reduction):
    """Chunks of tokens (gradients folded in the forward, d_weight accumulated across chunks, the upstream
    scale applied in the backward) equal the one-shot reference; chunk 7 leaves a partial last chunk and
    an all-ignored one (rows 0..6 of 45 with every row ignored in the first chunk)."""
    hidden, weight, bias, targets = _inputs(45, 16, 1000, dtype, ignore_every=5)
    targets[:7] = -100
    got = _run(logits_cross_entropy, hidden, weight, bias, targets, reduction=reduction, backend=backend,
               chunk_tokens=chunk)
    want = _run(_reference, hidden, weight, bias, targets, reduction=reduction)
    tol = TOL[dtype] if reduction == "mean" else {k: x * 10 for k, x in TOL[dtype].items()}
    if dtype == torch.float16:  # d_weight sums the chunks in fp16 (as Liger does in the weight's dtype)
        tol = {k: x * 4 for k, x in tol.items()}
    _assert_close(got, want, **tol)


def test_token_chunks_refuse_a_second_backward():
    hidden, weight, bias, targets = _inputs(12, 16, 100, torch.float32)
    loss = logits_cross_entropy(hidden, weight, targets, bias, backend="torch", chunk_tokens=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_chunk_rows_bounds_a_chunks_logits(monkeypatch):
    assert lk.chunk_rows(16384, 128256, torch.bfloat16) == 2**30 // (128256 * 2)  # 4186: 4 chunks
    assert lk.chunk_rows(512, 32000, torch.bfloat16) == 512  # the seed: one chunk
    assert lk.chunk_rows(3, 10**12, torch.float32) == 1
    hidden, weight, bias, targets = _inputs(30, 16, 1000, torch.float32, ignore_every=4)
    monkeypatch.setattr(lk, "CHUNK_LOGITS_BYTES", 10 * 1000 * 4)  # 10 rows of fp32 logits: 3 chunks
    seen = []
    real = lk._chunked
    monkeypatch.setattr(lk, "_chunked", lambda *a: seen.append(a[8]) or real(*a))
    _assert_close(_run(logits_cross_entropy, hidden, weight, bias, targets, backend="torch"),
                  _run(_reference, hidden, weight, bias, targets), **TOL[torch.float32])
    assert seen == [10]
    with pytest.raises(InputError, match="chunk_tokens"):
        logits_cross_entropy(hidden, weight, targets, bias, chunk_tokens=0)


@pytest.mark.skipif(lk.triton is None, reason="no triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_vocab_spans_several_blocks(monkeypatch, dtype):
    """vocab 1000 in blocks of 256: the online max / log-sum-exp across steps, a partial last block."""
    monkeypatch.setattr(lk, "MAX_BLOCK", 256)
    hidden, weight, bias, targets = _inputs(45, 16, 1000, dtype, ignore_every=4)
    weight.data[7] *= 40  # one vocab entry dominating some rows: the running max must rescale
    got = _run(logits_cross_entropy, hidden, weight, bias, targets, backend="triton")
    _assert_close(got, _run(_reference, hidden, weight, bias, targets), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 6])
def test_all_ignored_gives_nan_mean_and_zero_grads(backend, n):
    hidden, weight, bias, targets = _inputs(n, 16, 100, torch.float32)
    targets.fill_(-100)
    for reduction in ("mean", "sum"):
        loss, grads = _run(logits_cross_entropy, hidden, weight, bias, targets, reduction=reduction,
                           backend=backend)
        want, _ = _run(_reference, hidden, weight, bias, targets, reduction=reduction)
        torch.testing.assert_close(loss, want, equal_nan=True)
        assert (reduction == "mean") == bool(loss.isnan())
        for g in grads:
            assert g.shape != () and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_fp32_logits(backend):
    """Autograd holds the fp16 logit gradient (and hidden, weight): no fp32 (tokens x vocab) tensor."""
    n, v = 24, 1000
    hidden, weight, bias, targets = _inputs(n, 16, v, torch.float16, ignore_every=5)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = logits_cross_entropy(hidden, weight, targets, bias, backend=backend)
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= n * v], saved
    assert sum(numel for _, numel in saved) <= n * v + hidden.numel() + weight.numel() + 64, saved
    assert (torch.float16, n * v) in saved
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_reruns_with_retain_graph(backend):
    """The upstream scale lands on fresh products, not the saved buffer: a second backward agrees."""
    hidden, weight, bias, targets = _inputs(10, 16, 300, torch.float32, ignore_every=4)
    loss = logits_cross_entropy(hidden, weight, targets, bias, backend=backend)
    (2 * loss).backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    (2 * loss).backward()
    for a, t in zip(first, (hidden, weight, bias)):
        torch.testing.assert_close(t.grad, a, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_and_int32_targets(backend):
    hidden, weight, bias, targets = _inputs(12, 16, 500, torch.float32, ignore_every=3)
    with torch.no_grad():
        loss = logits_cross_entropy(hidden, weight, targets.int(), bias, backend=backend)
        torch.testing.assert_close(loss, _reference(hidden, weight, targets, bias))


def test_autocast_casts_inputs_like_linear():
    hidden, weight, bias, targets = _inputs(12, 16, 500, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits_cross_entropy(hidden, weight, targets, bias, backend="torch")
        want = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)
    torch.testing.assert_close(got, want)
    got.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_errors():
    h, w, _, t = _inputs(4, 8, 10, torch.float32)
    cases = [
        ((h, torch.randn(10, 7), t), {}, "shape mismatch"),
        ((h, w, t[:3]), {}, "shape mismatch"),
        ((h[None], w, t), {}, r"hidden \(N, H\)"),
        ((h, w, t), {"bias": torch.zeros(9)}, "bias must have shape"),
        ((h, w, t.float()), {}, "targets must be int64"),
        ((h, w.double(), t), {}, "share a dtype"),
        ((h, w, t), {"reduction": "none"}, "reduction"),
        ((h, w, t), {"backend": "liger"}, "backend"),
    ]
    for args, kw, match in cases:
        with pytest.raises(InputError, match=match):
            logits_cross_entropy(*args, **kw)


# ------------------------------------------------------------------------------ the flash model


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    lk.triton is None, reason="no triton"))])
def test_flash_model_loss_and_grads_match_default(monkeypatch, kernel):
    """With labels and no logits asked for, the flash model's small-problem loss goes through
    logits_cross_entropy (spied) and equals the default model's, gradients included."""
    from test_flash_model import ATOL, RTOL, assert_grads_close, grads

    calls = []
    real = lk.logits_cross_entropy
    monkeypatch.setattr("flashlm.models.flash.logits_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    if kernel == "triton":  # the kernel on CPU tensors, in the interpreter
        monkeypatch.setattr(lk, "_use_triton", lambda hidden, backend: True)
    default, flash = make_pair()
    ids = torch.randint(0, 256, (2, 11))
    labels = ids.clone()
    labels[0, :3] = -100
    out_d = default(ids, labels=labels)
    out_f = flash(ids, labels=labels)
    assert calls and out_f.logits is None
    torch.testing.assert_close(out_f.loss, out_d.loss, atol=ATOL, rtol=RTOL)
    out_d.loss.backward()
    out_f.loss.backward()
    assert_grads_close(grads(flash), grads(default))


def test_flash_model_keeps_plain_path_for_softcap_and_logits(monkeypatch):
    monkeypatch.setattr("flashlm.models.flash.logits_cross_entropy",
                        lambda *a, **k: pytest.fail("softcap / return_logits must keep the plain path"))
    _, flash = make_pair(final_logit_softcap=3.0)
    ids = torch.randint(0, 256, (2, 9))
    flash(ids, labels=ids)
    _, flash = make_pair()
    assert flash(ids, labels=ids, return_logits=True).logits is not None


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("n,v,chunk", [(512, 32000, None), (300, 1000, None), (7, 50257, None), (1000, 32000, 128)])
def test_cuda_bf16_within_dao_rule(n, v, chunk):
    """bf16 Triton vs fp32 math: loss and grads within 2x (+atol) the plain bf16 path's own error."""
    ref32 = _inputs(n, 256, v, torch.float32, ignore_every=6, device="cuda")
    ref16 = _inputs(n, 256, v, torch.bfloat16, ignore_every=6, device="cuda")
    want = _run(_reference, *ref32[:3], ref32[3])
    plain = _run(_reference, *ref16[:3], ref16[3])
    got = _run(logits_cross_entropy, *ref16[:3], ref16[3], backend="triton", chunk_tokens=chunk)
    assert got[0].dtype == torch.float32
    assert abs(got[0] - want[0]) <= 2 * abs(plain[0] - want[0]) + 1e-4
    for g, p, w, name in zip(got[1], plain[1], want[1], ("hidden", "weight", "bias")):
        e_got, e_plain = ((x.float() - w).abs().max().item() for x in (g, p))
        assert e_got <= 2 * e_plain + 1e-3 * w.abs().max().item() + 1e-6, (name, e_got, e_plain)


def _peak_bytes(fn, hidden, weight, targets):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(hidden, weight, targets, None).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    hidden.grad = weight.grad = None
    return peak


@pytest.mark.cuda
def test_cuda_peak_memory_below_plain_path():
    """(512, 768) x 32000 bf16, loss fwd+bwd: the saved bf16 grad instead of fp32 log-softmax + grads."""
    hidden, weight, _, targets = _inputs(512, 768, 32000, torch.bfloat16, bias=False, device="cuda")
    plain = _peak_bytes(_reference, hidden, weight, targets)
    ours = _peak_bytes(lambda *a: logits_cross_entropy(*a, backend="triton"), hidden, weight, targets)
    print(f"peak MiB: plain {plain / 2**20:.1f}, logits_cross_entropy {ours / 2**20:.1f}")
    assert ours < 0.6 * plain, (ours, plain)
    chunked = _peak_bytes(lambda *a: logits_cross_entropy(*a, backend="triton", chunk_tokens=128), hidden, weight,
                          targets)
    # d_weight (weight's size) is held from the forward on, a quarter of the logits instead of all of them
    assert chunked < ours - 16 * 2**20, (chunked, ours)
