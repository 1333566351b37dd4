"""flashlm.ops.cross_entropy: cross_entropy and the chunked linear cross-entropy against plain torch in fp32."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread  # noqa: F401  (autouse fixture)

from flashlm.ops.cross_entropy import (
    ChunkedLinearCrossEntropy,
    cross_entropy,
    liger_available,
    linear_cross_entropy,
)

UPSTREAM = 1.7  # one shared non-unit upstream gradient: the backward must scale by it


def _reference(hidden, weight, labels, bias=None, softcap=None, ignore_index=-100, reduction="mean"):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _inputs(n, h, v, bias=False, dtype=torch.float32, ignore_every=0, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) / math.sqrt(h)).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = ignore_index
    return hidden, weight, b, labels


def _loss_and_grads(fn, hidden, weight, bias, labels, **kw):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = fn(hidden, weight, labels, bias=bias, **kw)
    (loss * UPSTREAM).backward()
    return loss.detach(), [None if t is None else t.grad.clone() for t in (hidden, weight, bias)]


def _check_close(got, want, atol=1e-5, rtol=1e-5):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    torch.testing.assert_close(loss_g, loss_w.to(loss_g.dtype), atol=atol, rtol=rtol)
    for g, w, name in zip(grads_g, grads_w, ("hidden", "weight", "bias")):
        if w is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


# ------------------------------------------------------------------------------------ cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    got = cross_entropy(logits, labels, reduction=reduction)
    want = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction=reduction)
    torch.testing.assert_close(got, want.view(labels.shape) if reduction == "none" else want)


def test_cross_entropy_upcasts_bf16_logits():
    logits = torch.randn(64, 1000).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (64,))
    got = cross_entropy(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(logits.float(), labels))


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="leading dims"):
        cross_entropy(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- linear_cross_entropy


@pytest.mark.parametrize("n,h,v", [(1, 8, 5), (37, 16, 53), (130, 24, 301)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_matches_torch(n, h, v, bias, softcap, reduction):
    hidden, weight, b, labels = _inputs(n, h, v, bias=bias, ignore_every=4 if n > 1 else 0)
    kw = {"softcap": softcap, "reduction": reduction}
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, chunk_size=16, backend="torch", **kw)
    want = _loss_and_grads(_reference, hidden, weight, b, labels, **kw)
    _check_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, 7, 8, 9, 15, 16, 17, 1000, None])
def test_linear_ce_chunk_boundaries(chunk_size):
    """Chunks that divide N, miss by one either way, exceed N, or are picked by default: same result."""
    hidden, weight, b, labels = _inputs(16, 12, 29, bias=True, ignore_every=3)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, chunk_size=chunk_size, backend="torch")
    want = _loss_and_grads(_reference, hidden, weight, b, labels)
    _check_close(got, want)


def test_linear_ce_custom_ignore_index_and_negative_labels():
    hidden, weight, _, labels = _inputs(20, 8, 13)
    labels[3:9] = 7  # a real class used as the ignore index
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, None, labels, ignore_index=7, backend="torch")
    want = _loss_and_grads(_reference, hidden, weight, None, labels, ignore_index=7)
    _check_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_all_ignored_follows_torch(reduction):
    """All targets ignored: torch gives nan (mean, 0/0) or 0 (sum), and zero gradients; so do we."""
    hidden, weight, b, labels = _inputs(10, 8, 11, bias=True)
    labels[:] = -100
    loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction=reduction,
                                  chunk_size=3, backend="torch")
    ref_loss, ref_grads = _loss_and_grads(_reference, hidden, weight, b, labels, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref_loss)
    else:
        assert loss.item() == 0.0 == ref_loss.item()
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(r, torch.zeros_like(r))


def test_linear_ce_keeps_no_logits_for_backward():
    """Only the (N, H), (V, H), (V,) gradients are saved for backward, never (N, V) logits."""
    n, h, v = 64, 8, 500
    hidden, weight, b, labels = _inputs(n, h, v, bias=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=16, backend="torch")
    loss.backward()
    assert saved and all(math.prod(s) < n * v for s in saved), saved
    assert sorted(saved) == sorted([(n, h), (v, h), (v,)])


def test_linear_ce_only_requested_grads():
    hidden, weight, _, labels = _inputs(9, 8, 7)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, backend="torch")
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_linear_ce_bf16_error_within_2x_of_bf16_reference():
    """bf16 inputs: error vs an fp32 reference at most 2x (+atol) that of plain bf16 F.linear + fp32 CE."""
    hidden, weight, _, labels = _inputs(96, 64, 1000, dtype=torch.bfloat16, ignore_every=5)
    ref = _loss_and_grads(_reference, hidden.float().detach().requires_grad_(),
                          weight.float().detach().requires_grad_(), None, labels)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, None, labels, chunk_size=32, backend="torch")

    def plain_bf16(hd, w, y, bias=None):
        return F.cross_entropy(F.linear(hd, w).float(), y)

    low = _loss_and_grads(plain_bf16, hidden, weight, None, labels)
    for i, (g_ours, g_low, g_ref) in enumerate(zip(got[1][:2], low[1][:2], ref[1][:2])):
        err = (g_ours.float() - g_ref).abs().max().item()
        base = (g_low.float() - g_ref).abs().max().item()
        assert g_ours.dtype == torch.bfloat16
        assert err <= 2 * base + 1e-5, (i, err, base)
    assert abs(got[0].item() - ref[0].item()) <= 2 * abs(low[0].item() - ref[0].item()) + 1e-3


def test_linear_ce_under_autocast_casts_like_linear():
    hidden, weight, _, labels = _inputs(32, 16, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    want = F.cross_entropy(F.linear(hidden.bfloat16(), weight.bfloat16()).float(), labels)
    torch.testing.assert_close(loss, want, atol=2e-3, rtol=2e-3)


def test_linear_ce_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 8, 2, 2])
    assert torch.autograd.gradcheck(
        lambda h, w, b: ChunkedLinearCrossEntropy.apply(h, w, labels, b, -100, 3.0, 4, "mean"), (hidden, weight, bias)
    )


def test_linear_ce_errors():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, y, softcap=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_cross_entropy(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match=r"hidden \(N, H\)"):
        linear_cross_entropy(h[None], w, y)
    with pytest.raises(TypeError, match="share a dtype"):
        linear_cross_entropy(h, w.double(), y)
    with pytest.raises(TypeError, match="labels must be int64"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, y, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA"):
        linear_cross_entropy(h, w, y, backend="liger")


@pytest.mark.cuda
@pytest.mark.skipif(not liger_available(), reason="liger-kernel not installed")
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_liger_matches_chunked_torch(softcap):
    hidden, weight, _, labels = _inputs(1000, 256, 4096, ignore_every=7)
    hidden, weight = (t.detach().cuda().requires_grad_() for t in (hidden, weight))
    labels = labels.cuda()
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, None, labels, softcap=softcap, backend="liger")
    want = _loss_and_grads(linear_cross_entropy, hidden, weight, None, labels, softcap=softcap, backend="torch")
    _check_close(got, want, atol=1e-4, rtol=1e-4)
