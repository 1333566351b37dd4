"""Cross-entropy of ``hidden @ weight.T (+ bias)`` for small problems, with the gradient written
over the logits.

For (tokens x vocab) small enough to materialize (``flashlm.losses.materialize_logits_for_loss``),
one matmul plus one row kernel beats the chunked fused loss, but plain ``F.cross_entropy`` on
upcast logits holds ~16 bytes per logit at its backward peak (fp32 upcast, saved fp32 log-softmax,
fp32 and bf16 logit grads). :func:`logits_cross_entropy` holds 2 (bf16): the forward computes the
logits in the input dtype, then one Triton kernel per row computes the row's loss (fp32 online
log-sum-exp over vocab blocks) and overwrites the logits in place with
``d loss / d logits = (softmax - onehot(target)) * scale``. Only that buffer (plus hidden and
weight, which the matmul's backward needs anyway) is saved; the backward is two matmuls.

Large problems run in token chunks whose logits stay under ``CHUNK_LOGITS_BYTES`` (llama-1b bs8 x 2048:
4 chunks of 4096 tokens, 1 GiB of bf16 logits each): each chunk's gradients are folded into d_hidden and
d_weight in the forward (``d_weight`` accumulated in the weight's dtype by ``addmm_``, as Liger does), so
memory stays bounded while the per-chunk work keeps the single-matmul speed (H200, benchmarks/
loss_crossover.py: ours at 4096 x 128256 tokens x vocab 10.6 ms, x4 = 42.3 ms, vs Liger's fused loss at
16384 tokens 48.4 ms; +0.85 GiB of memory over Liger's).

Semantics follow ``F.cross_entropy``: ``ignore_index`` targets give zero loss and zero gradient;
``"mean"`` divides by the count of non-ignored targets (a device tensor: no host sync), giving a
``nan`` loss with all-zero gradients when there are none; ``"sum"`` does not scale. Without Triton
or CUDA the same autograd Function runs its torch reference (:func:`_rows_torch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashlm.errors import InputError
from flashlm.ops._dispatch import autocast_linear_inputs, is_compiling, next_pow2, row_warps, triton

if triton is not None:  # CPU-only installs: the torch reference runs
    import triton.language as tl

__all__ = ["CHUNK_LOGITS_BYTES", "LogitsCrossEntropy", "chunk_rows", "logits_cross_entropy"]

# Vocab elements per kernel step: 32000 -> 2 steps of 16384 (16 warps hold 32 fp32 per thread).
MAX_BLOCK = 16384
# Logits per chunk, in bytes of the input dtype: from ~4096 tokens on (at vocab 128256) the time per token
# no longer falls (loss_crossover.json), so larger chunks would only hold more memory.
CHUNK_LOGITS_BYTES = 2**30
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def _ce_rows_kernel(X, Y, LOSS, NVALID, stride_x, n_cols, ignore_index,
                        MEAN: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row of X (rows, n_cols): LOSS[row] = lse - x[target] in fp32; with GRAD,
        X[row] is overwritten with (softmax - onehot) * scale in X's dtype (zeros for ignored rows)."""
        row = tl.program_id(0).to(tl.int64)
        x_ptr = X + row * stride_x
        y = tl.load(Y + row)
        if y == ignore_index:
            if GRAD:
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    tl.store(x_ptr + cols, tl.zeros((BLOCK,), dtype=X.dtype.element_ty), mask=cols < n_cols)
            tl.store(LOSS + row, 0.0)
            return
        # pass 1: online max / sum of exp; the target's logit is picked by comparison, never by an
        # indexed load, so an out-of-range target cannot read past the row
        m = float("-inf")
        d = 0.0
        x_y = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            x_y += tl.sum(tl.where(cols == y, x, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(LOSS + row, lse - x_y)
        if GRAD:
            # pass 2 (the row is still in L2): the gradient over the logits, in place
            scale = 1.0
            if MEAN:  # 1 / n_valid, clamped so all-ignored batches give 0 * finite, as torch
                scale = 1.0 / tl.maximum(tl.load(NVALID).to(tl.float32), 1.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = (tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)) * scale
                tl.store(x_ptr + cols, g.to(X.dtype.element_ty), mask=mask)


def _rows_triton(logits, targets, n_valid, ignore_index, mean, grad, block=None):
    """Row losses (N,) fp32 of logits (N, V); with ``grad``, logits are overwritten by the gradient.
    ``block``: vocab elements per kernel step (default min(next_pow2(V), MAX_BLOCK))."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = block or min(next_pow2(vocab), MAX_BLOCK)
        warps = row_warps(block)
        _ce_rows_kernel[(rows,)](logits, targets, loss, n_valid, logits.stride(0), vocab, ignore_index,
                                 MEAN=mean, GRAD=grad, BLOCK=block, num_warps=warps)
    return loss


def _rows_torch(logits, targets, n_valid, ignore_index, mean, grad, block=None):
    """Torch reference of :func:`_rows_triton`: fp32 (fp64 for fp64) math on a transient upcast copy
    of the logits, the gradient written back in the logits' dtype. ``block`` is unused."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    lf = logits.to(acc)  # (N, V): transient, never saved (is logits itself when already fp32)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long().unsqueeze(1)
    lse = torch.logsumexp(lf, dim=-1)
    loss = torch.where(valid, lse - lf.gather(1, safe).squeeze(1), torch.zeros_like(lse))
    if grad:
        g = lf.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place (the gather above is done)
        g.scatter_add_(1, safe, torch.full_like(lse, -1.0).unsqueeze(1))
        row_scale = valid.to(acc)
        if mean:
            row_scale = row_scale / n_valid.clamp(min=1).to(acc)
        logits.copy_(g.mul_(row_scale.unsqueeze(1)))
    return loss


def _logits(hidden, weight, bias):
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


class LogitsCrossEntropy(torch.autograd.Function):
    """loss = CE(hidden @ weight.T + bias, targets); saves d loss / d logits in the input dtype, or, in
    token chunks of ``chunk`` rows (fewer than N), the gradients themselves.

    forward(hidden (N, H), weight (V, H), targets (N,) int, bias (V,) or None, ignore_index,
    reduction, use_triton, chunk) -> 0-dim loss, fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, reduction, use_triton, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        grad = need_h or need_w or need_b
        n_valid = (targets != ignore_index).sum()  # device scalar: read by the kernel, no host sync
        rows = _rows_triton if use_triton else _rows_torch
        acc = torch.promote_types(hidden.dtype, torch.float32)
        ctx.need, ctx.chunked, ctx.consumed = (need_h, need_w, need_b), chunk < hidden.shape[0], False
        if ctx.chunked:
            loss, grads = _chunked(hidden, weight, targets, bias, n_valid, ignore_index, reduction, rows, chunk,
                                   ctx.need)
            ctx.save_for_backward(*grads)
        else:
            logits = _logits(hidden, weight, bias)  # (N, V)
            loss = rows(logits, targets, n_valid, ignore_index, reduction == "mean", grad).to(acc).sum()
            # logits now hold the gradient; hidden / weight only when the other's grad needs them
            ctx.save_for_backward(logits if grad else None, hidden if need_w else None, weight if need_h else None)
        if reduction == "mean":
            loss = loss / n_valid.to(acc)  # nan when nothing is valid, as torch
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        need_h, need_w, need_b = ctx.need
        if ctx.chunked:
            # the gradients were computed in the forward: scaled here by the upstream scalar, in place (a
            # copy of the (V, H) d_weight would add its size to the backward's peak), hence once only
            if ctx.consumed:
                raise RuntimeError("logits_cross_entropy in token chunks computes its gradients in the forward "
                                   "and hands them out once: a second backward through it is not supported")
            ctx.consumed = True
            d_h, d_w, d_b = (None if t is None else t.mul_(grad_output.to(t.dtype)) for t in ctx.saved_tensors)
            return d_h, d_w, None, d_b, None, None, None, None
        dlogits, hidden, weight = ctx.saved_tensors
        # The upstream grad scales only (N, H) tensors: hidden before the d_weight matmul and the
        # d_hidden product, never the saved buffer (the graph stays re-runnable with retain_graph) nor
        # the (V, H) d_weight (on the H200 a 0-dim-tensor mul_ over it cost more than the kernel).
        # Exact for the usual upstream 1 or 2^k; otherwise one input-dtype rounding, as F.linear's.
        g = grad_output
        d_h = (dlogits @ weight).mul_(g) if need_h else None
        d_w = dlogits.t() @ (hidden * g) if need_w else None
        d_b = None
        if need_b:
            acc = torch.promote_types(dlogits.dtype, torch.float32)
            d_b = dlogits.sum(0, dtype=acc).mul_(g).to(dlogits.dtype)
        return d_h, d_w, None, d_b, None, None, None, None


def _chunked(hidden, weight, targets, bias, n_valid, ignore_index, reduction, rows, chunk, need):
    """The loss sum over token chunks of ``chunk`` rows and (d_hidden, d_weight, d_bias) for an upstream
    gradient of 1 (None where not needed): each chunk's logits are overwritten by their gradient, which is
    folded into the gradients at once, so only one chunk of logits is ever held."""
    need_h, need_w, need_b = need
    acc = torch.promote_types(hidden.dtype, torch.float32)
    d_h = torch.empty_like(hidden) if need_h else None
    d_w = torch.zeros_like(weight) if need_w else None
    d_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        logits = _logits(h, weight, bias)  # (chunk, V), then its gradient in place
        loss += rows(logits, targets[start:start + chunk], n_valid, ignore_index, reduction == "mean",
                     any(need)).to(acc).sum()
        if need_h:
            torch.mm(logits, weight, out=d_h[start:start + chunk])
        if need_w:
            d_w.addmm_(logits.t(), h)
        if need_b:
            d_b += logits.sum(0, dtype=acc)
        del logits  # before the next chunk's is allocated
    return loss, (d_h, d_w, None if d_b is None else d_b.to(weight.dtype))


def chunk_rows(n_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: as many as keep a chunk's logits within ``CHUNK_LOGITS_BYTES`` (at least 1), all
    of them when they fit."""
    per_row = vocab * dtype.itemsize
    return max(1, min(n_tokens, CHUNK_LOGITS_BYTES // per_row))


def _check_args(hidden, weight, targets, bias, reduction, backend):
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if backend not in (None, "triton", "torch"):
        raise InputError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise InputError("expected hidden (N, H), weight (V, H), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise InputError(f"shape mismatch: hidden {tuple(hidden.shape)} (N, H), weight "
                         f"{tuple(weight.shape)} (V, H), targets {tuple(targets.shape)} (N,)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise InputError(f"targets must be int64 (or int32), got {targets.dtype}")


def _use_triton(hidden: torch.Tensor, backend: str | None) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if triton is None:
            raise InputError("backend='triton' needs triton installed")
        if hidden.dtype not in _KERNEL_DTYPES:
            raise InputError(f"the Triton kernel takes fp16/bf16/fp32, got {hidden.dtype}")
        return True
    return triton is not None and hidden.is_cuda and hidden.dtype in _KERNEL_DTYPES


def logits_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` holding only the input-dtype logit gradient (of
    one token chunk at a time for large problems).

    Args:
        hidden: (N, H) final hidden states, flattened over batch and sequence.
        weight: (V, H) LM head weight, same dtype as ``hidden``.
        targets: (N,) int64/int32, already shifted; ``ignore_index`` entries contribute nothing.
            Range is the caller's to check (an out-of-range target never reads out of bounds).
        bias: optional (V,) LM head bias, same dtype.
        reduction: "mean" over non-ignored targets (nan if none, zero grads, as torch) or "sum".
        backend: None (Triton on CUDA when importable, else torch), "triton" (also the CPU
            interpreter under TRITON_INTERPRET=1), or "torch" (the reference).
        chunk_tokens: tokens per chunk; default :func:`chunk_rows` (a chunk's logits within
            ``CHUNK_LOGITS_BYTES``). Fewer than N: gradients are computed chunk by chunk in the forward.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``F.linear`` does;
    under ``torch.compile`` the plain ``F.cross_entropy`` on ``F.linear`` runs (inductor fuses it).

    Returns:
        A 0-dim fp32 loss (fp64 for fp64 inputs).
    """
    _check_args(hidden, weight, targets, bias, reduction, backend)
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise InputError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise InputError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                         f" and {None if bias is None else bias.dtype}")
    if is_compiling():
        logits = F.linear(hidden, weight, bias)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.long(),
                               ignore_index=ignore_index, reduction=reduction)
    if chunk_tokens is None:
        chunk_tokens = chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
    return LogitsCrossEntropy.apply(hidden, weight, targets.contiguous(), bias, ignore_index, reduction,
                                    _use_triton(hidden, backend), chunk_tokens)
