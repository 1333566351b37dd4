"""Cross-entropy for causal LM training, every implementation in one place (no label shift unless
named: the caller shifts; :func:`causal_lm_loss` shifts as HF models do).

- :func:`cross_entropy`: on logits you already have, in fp32 (``F.cross_entropy`` on the upcast
  logits: the reference every other path is tested against); :func:`causal_lm_loss` is it with HF's
  shift, the reference model's loss (equal to transformers').
- :func:`linear_cross_entropy`: on the final hidden states and the LM head weight, never
  materializing (tokens x vocab) logits: Liger-Kernel's fused Triton kernel when ``liger_kernel`` is
  importable and the tensors are on CUDA, else the chunked torch ``autograd.Function``
  :class:`ChunkedLinearCrossEntropy`.
- :func:`logits_cross_entropy`: one matmul and one Triton row kernel that writes the logits' gradient
  over the logits, in token chunks of at most ``CHUNK_LOGITS_BYTES`` of logits (the flash model's eager
  loss at every size); its torch reference :func:`_rows_torch` runs without Triton or CUDA.

Semantics follow ``torch.nn.functional.cross_entropy``: targets equal to ``ignore_index`` contribute
nothing; ``reduction="mean"`` divides by the number of non-ignored targets (a device tensor: no host
sync), so a batch whose targets are all ignored gives a ``nan`` loss (0 / 0) with all-zero gradients,
exactly like torch; ``"sum"`` gives 0. (Liger's kernel is its own code: its result on an all-ignored
batch is whatever it computes.)
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from flashlm._util import next_pow2
from flashlm.errors import InputError

from ._dispatch import autocast_linear_inputs, dispatch, row_warps, triton

if triton is not None:  # CPU-only installs: the torch reference runs
    import triton.language as tl

__all__ = ["CHUNK_LOGITS_BYTES", "MATERIALIZED_LOGITS_MAX_BYTES", "ChunkedLinearCrossEntropy", "LogitsCrossEntropy",
           "causal_lm_loss", "chunk_rows", "cross_entropy", "liger_available", "linear_cross_entropy",
           "logits_cross_entropy", "materialize_logits_for_loss"]

# Loss by size, for the flash model's compiled and softcapped losses: up to this many bytes of fp32
# (tokens x vocab) logits, plain cross-entropy on materialized logits; above, the fused/chunked linear
# cross-entropy. (Its eager loss is logits_cross_entropy at every size: one lm_head matmul per token
# chunk, the bf16 logits overwritten by their gradient.) Measured on the H200 (what `flashlm bench loss`
# runs; hidden 2048, bf16, fused = Liger 0.8.5; benchmarks/results/h200/loss_crossover.json, committed in
# 0031003): ours is faster at every size (32000 vocab: 0.18x of the fused time at 256 tokens, 0.94x at
# 16384; 128256 vocab: 0.06x at 256, 0.43x at 4096, 0.74x at 8192, 0.88x at 16384), but holds the bf16
# logits, half the fp32 size (+2 GiB at 8192 x 128256, +4 GiB at 16384 x 128256 over the fused path),
# which token chunks of <= 1 GiB of logits bound (CHUNK_LOGITS_BYTES). The cut at 4 GiB of fp32 logits
# keeps a materialized loss's extra memory under 2 GiB.
MATERIALIZED_LOGITS_MAX_BYTES = 4 * 2**30


# Vocab elements per kernel step: 32000 -> 2 steps of 16384 (16 warps hold 32 fp32 per thread).
MAX_BLOCK = 16384
# Logits per chunk, in bytes of the input dtype: from ~4096 tokens on (at vocab 128256) the time per token
# no longer falls (benchmarks/results/h200/loss_crossover.json), so larger chunks would only hold more
# memory.
CHUNK_LOGITS_BYTES = 2**30
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def materialize_logits_for_loss(n_tokens: int, vocab: int) -> bool:
    """True when a (n_tokens x vocab) loss is cheaper as plain cross-entropy on materialized logits
    than as the fused linear cross-entropy (see ``MATERIALIZED_LOGITS_MAX_BYTES``)."""
    return n_tokens * vocab * 4 <= MATERIALIZED_LOGITS_MAX_BYTES


_REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str, allowed=_REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross-entropy on logits, computed in fp32 (no label shift).

    Args:
        logits: (..., vocab) any float dtype; upcast to fp32 before the log-softmax so bf16 logits
            do not lose the small differences that decide the loss.
        labels: (...) int64 targets, same leading shape as ``logits``; ``ignore_index`` entries skip.
        reduction: "mean" (over non-ignored targets; ``nan`` if there are none, as in torch),
            "sum", or "none" (per-token losses, 0 at ignored positions, shape of ``labels``).
    """
    _check_reduction(reduction, ("mean", "sum", "none"))
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., vocab) and labels (...) must share leading dims: got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    out = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return out.view(labels.shape) if reduction == "none" else out


def _default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    # Liger's rule: a chunk's fp32 logits (chunk x V) cost about as much as the hidden states
    # (N x H), so the loss never needs more than ~2x the activations it reads.
    inc = max(1, math.ceil(vocab / max(hidden, 1)))
    chunk = max(1, math.ceil(n_tokens / inc))
    return min(n_tokens, 1 << (chunk - 1).bit_length())


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Linear layer + cross-entropy over chunks of tokens, gradients computed in the forward.

    For each chunk of ``chunk_size`` tokens: logits = hidden_c @ weight.T (+ bias) in the input dtype
    (fp32 accumulation inside the matmul), upcast to fp32, optional tanh softcap, log-sum-exp, and the
    gradient d loss / d logits = (softmax - onehot) * scale, which is immediately folded into
    d hidden_c (= g @ weight), d weight (+= g.T @ hidden_c, fp32 accumulator) and d bias. Memory
    beyond the inputs: one (chunk x vocab) fp32 block, plus a (vocab x hidden) fp32 accumulator for
    d weight when weight is not fp32. The backward only multiplies by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, softcap, chunk_size, reduction):
        n_tokens, hid = hidden.shape
        vocab = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]

        valid = labels != ignore_index
        n_valid = valid.sum()
        # torch semantics: mean over valid targets; loss is nan when there are none, grads are 0
        # (grads use the clamped count, so 0 * finite instead of 0 * inf).
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        grad_scale = (1.0 / n_valid.clamp(min=1).to(acc)) if reduction == "mean" else None

        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(vocab, hid, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h_c = hidden[start:end]  # (c, H)
            y_c = labels[start:end]  # (c,)
            v_c = valid[start:end]
            logits = h_c @ weight.t()  # (c, V) materialized: chunk x vocab only
            if bias is not None:
                logits = logits + bias
            logits = logits.to(acc)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            safe_y = torch.where(v_c, y_c, torch.zeros_like(y_c))
            target_logit = logits.gather(1, safe_y.unsqueeze(1)).squeeze(1)
            loss_sum = loss_sum + torch.where(v_c, lse - target_logit, torch.zeros_like(lse)).sum()

            if need_h or need_w or need_b:
                # d loss / d logits = softmax - onehot on valid rows, 0 on ignored rows
                # in place on the (c, V) fp32 block: each pass over it costs as much as the matmul's
                # output, so the row mask and the 1/n scale are folded into one per-row factor
                g = logits.sub_(lse.unsqueeze(1)).exp_()
                g.scatter_add_(1, safe_y.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
                row_scale = v_c.to(acc) if grad_scale is None else torch.where(v_c, grad_scale, 0.0)
                g.mul_(row_scale.unsqueeze(1))
                if softcap is not None:
                    g.mul_(1.0 - capped * capped)  # d(c*tanh(x/c))/dx = 1 - tanh^2
                g_in = g.to(hidden.dtype)  # one cast serves both matmuls (tensor cores for bf16)
                if need_h:
                    g_w = g_in if weight.dtype == hidden.dtype else g.to(weight.dtype)
                    grad_h[start:end] = (g_w @ weight).to(hidden.dtype)
                if need_w:
                    # accumulate chunks in fp32; add_ promotes the (V, H) product without an fp32 copy
                    grad_w.add_(g_in.t() @ h_c)
                if need_b:
                    grad_b.add_(g.sum(0))

        if reduction == "mean":
            loss = loss_sum / n_valid.to(acc)  # nan when nothing is valid, as torch
        else:
            loss = loss_sum
        ctx.save_for_backward(
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # The upstream gradient is a scalar: the gradients were computed in the forward already.
        scale = grad_output.to(torch.promote_types(grad_output.dtype, torch.float32))
        out = []
        for g in (grad_h, grad_w, grad_b):
            out.append(None if g is None else (g * scale).to(g.dtype))
        return out[0], out[1], None, out[2], None, None, None, None


_LIGER_LOSS = {}  # (ignore_index, softcap, reduction) -> LigerFusedLinearCrossEntropyLoss instance


@functools.cache
def liger_available() -> bool:
    """True if ``liger_kernel``'s fused linear cross-entropy can be imported (checked once)."""
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def _liger_loss(hidden, weight, labels, bias, ignore_index, softcap, reduction):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    key = (ignore_index, softcap, reduction)
    fn = _LIGER_LOSS.get(key)
    if fn is None:
        fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction, softcap=softcap)
        _LIGER_LOSS[key] = fn
    out = fn(weight, hidden, labels, bias)
    # Newer Liger versions may return (loss, z_loss) or an output object.
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "loss", out)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF-style loss: logits (batch, seqlen, vocab), labels (batch, seqlen) aligned with input_ids;
    position t predicts labels[t + 1]. Mean over non-ignored targets, computed in fp32 (logits upcast
    with ``.float()`` as transformers' ``ForCausalLMLoss`` does, so the reference model's loss is
    transformers')."""
    return cross_entropy(logits[:, :-1].float(), labels[:, 1:].to(logits.device), ignore_index)


def _check_linear_shapes(hidden, weight, targets, bias, name: str) -> None:
    """hidden (N, H), weight (V, H), targets (N,), bias (V,) or None, else InputError (a ValueError)
    naming the shapes; ``name`` is what the caller calls the targets."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise InputError(f"expected hidden (N, H), weight (V, H), {name} (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise InputError(f"shape mismatch: hidden {tuple(hidden.shape)} (N, H), weight "
                         f"{tuple(weight.shape)} (V, H), {name} {tuple(targets.shape)} (N,)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


# --- linear_cross_entropy: chunked torch or Liger's fused kernel, never the (tokens x vocab) logits ---

def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` without materializing (tokens x vocab) logits.

    Args:
        hidden: (N, H) final hidden states (already normed), flattened over batch and sequence.
        weight: (V, H) LM head weight (same dtype as ``hidden``).
        labels: (N,) int64 targets, already shifted; ``ignore_index`` entries contribute nothing.
        bias: optional (V,) LM head bias.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before the softmax
            (Gemma-2's final-logit softcap).
        chunk_size: tokens per chunk for the pure-torch path (default: ~N / ceil(V / H), a power of
            two, as Liger picks); ignored by Liger.
        reduction: "mean" over non-ignored targets (nan if none, as torch) or "sum".
        backend: None (Liger on CUDA when installed, else chunked torch), "liger", or "torch".

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``F.linear`` would.

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs; Liger returns its own dtype).
    """
    _check_reduction(reduction)
    _check_softcap(softcap)
    if backend not in (None, "liger", "torch"):
        raise ValueError(f"backend must be None, 'liger' or 'torch', got {backend!r}")
    _check_linear_shapes(hidden, weight, labels, bias, "labels")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)  # as autocast casts the LM head
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    use_liger = backend == "liger" or (backend is None and hidden.is_cuda and liger_available())
    if use_liger:
        if not hidden.is_cuda:
            raise ValueError("backend='liger' needs CUDA tensors (Liger's kernels are Triton on GPU)")
        if not liger_available():
            raise ImportError("backend='liger' needs liger-kernel: pip install 'flashlm[liger]'")
        return _liger_loss(hidden, weight, labels.long(), bias, ignore_index, softcap, reduction)

    n = hidden.shape[0]
    if n == 0:
        # empty batch: torch gives nan for mean, 0 for sum; keep the graph so backward works
        zero = (hidden.sum() * 0 + weight.sum() * 0).float()
        return zero / 0.0 if reduction == "mean" else zero
    if chunk_size is None:
        chunk_size = _default_chunk_size(n, hidden.shape[1], weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels.long(), bias, ignore_index, softcap, chunk_size, reduction
    )


# --- logits_cross_entropy: the gradient written over the logits ---
#
# For (tokens x vocab) small enough to materialize (materialize_logits_for_loss), one matmul plus one row
# kernel beats the chunked fused loss, but plain F.cross_entropy on upcast logits holds ~16 bytes per logit
# at its backward peak (fp32 upcast, saved fp32 log-softmax, fp32 and bf16 logit grads); this holds 2
# (bf16): the forward computes the logits in the input dtype, then one Triton program per row computes the
# row's loss (fp32 online log-sum-exp over vocab blocks) and overwrites the logits in place with
# d loss / d logits = (softmax - onehot(target)) * scale. Only that buffer (plus hidden and weight, which
# the matmul's backward needs anyway) is saved; the backward is two matmuls.
# Large problems run in token chunks whose logits stay under CHUNK_LOGITS_BYTES (llama-1b bs8 x 2048: 4
# chunks of 4096 tokens, 1 GiB of bf16 logits each): each chunk's gradients are folded into d_hidden and
# d_weight in the forward (d_weight accumulated in the weight's dtype by addmm_, as Liger does), so memory
# stays bounded while the per-chunk work keeps the single-matmul speed (H200, what `flashlm bench loss`
# runs, benchmarks/results/h200/loss_crossover.json: ours at 4096 x 128256 tokens x vocab 10.6 ms, x4 =
# 42.3 ms, vs Liger's fused loss at 16384 tokens 48.4 ms; +0.85 GiB of memory over Liger's).

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
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if backend not in (None, "triton", "torch"):
        raise InputError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    _check_linear_shapes(hidden, weight, targets, bias, "targets")
    if targets.dtype not in (torch.int64, torch.int32):
        raise InputError(f"targets must be int64 (or int32), got {targets.dtype}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise InputError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise InputError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                         f" and {None if bias is None else bias.dtype}")
    return _logits_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, backend, chunk_tokens)


def _logits_ce_compiled(hidden, weight, targets, bias, ignore_index, reduction, backend, chunk_tokens):
    """Under torch.compile: the plain :func:`cross_entropy` on ``F.linear`` (inductor fuses it)."""
    return cross_entropy(F.linear(hidden, weight, bias), targets.long(), ignore_index, reduction)


def _logits_ce_eager(hidden, weight, targets, bias, ignore_index, reduction, backend, chunk_tokens):
    """Eager, with or without grad: :class:`LogitsCrossEntropy` (Triton rows or their torch reference)."""
    if chunk_tokens is None:
        chunk_tokens = chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
    return LogitsCrossEntropy.apply(hidden, weight, targets.contiguous(), bias, ignore_index, reduction,
                                    _use_triton(hidden, backend), chunk_tokens)


# the Function picks Triton or torch rows itself (_use_triton), so no device check: reference=None
_logits_cross_entropy = dispatch(None, _logits_ce_eager, _logits_ce_compiled)
