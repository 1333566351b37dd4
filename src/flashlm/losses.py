"""Cross-entropy losses for causal LM training.

Two entry points, both without a label shift (the caller shifts; HF-style models shift inside):

- :func:`cross_entropy` takes logits you already have and computes in fp32.
- :func:`linear_cross_entropy` takes the final hidden states and the LM head weight and never
  materializes the full (tokens x vocab) logits: it uses Liger-Kernel's fused Triton kernel when
  ``liger_kernel`` is importable and the tensors are on CUDA, and otherwise a chunked pure-torch
  ``autograd.Function`` (:class:`ChunkedLinearCrossEntropy`) that walks the tokens chunk by chunk.

Semantics follow ``torch.nn.functional.cross_entropy``: targets equal to ``ignore_index`` contribute
nothing; ``reduction="mean"`` divides by the number of non-ignored targets, so a batch whose targets are
all ignored gives a ``nan`` loss (0 / 0) with all-zero gradients, exactly like torch; ``"sum"`` gives 0.
(Liger's kernel is its own code: its result on an all-ignored batch is whatever it computes.)
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from flashlm.ops._dispatch import autocast_linear_inputs

__all__ = ["MATERIALIZED_LOGITS_MAX_BYTES", "ChunkedLinearCrossEntropy", "cross_entropy", "liger_available",
           "linear_cross_entropy", "materialize_logits_for_loss"]

# Loss by size, for the flash model's compiled and softcapped losses: up to this many bytes of fp32
# (tokens x vocab) logits, plain cross-entropy on materialized logits; above, the fused/chunked linear
# cross-entropy. (Its eager loss is flashlm.loss_kernels.logits_cross_entropy at every size: one lm_head
# matmul per token chunk, the bf16 logits overwritten by their gradient.) Measured on the H200
# (benchmarks/loss_crossover.py, hidden 2048, bf16, fused = Liger 0.8.5;
# benchmarks/results/h200/loss_crossover.json): ours is faster at every size (32000 vocab: 0.18x of the
# fused time at 256 tokens, 0.94x at 16384; 128256 vocab: 0.06x at 256, 0.43x at 4096, 0.74x at 8192,
# 0.88x at 16384), but holds the bf16 logits, half the fp32 size (+2 GiB at 8192 x 128256, +4 GiB at
# 16384 x 128256 over the fused path), which token chunks of <= 1 GiB of logits bound
# (flashlm.loss_kernels.CHUNK_LOGITS_BYTES). The cut at 4 GiB of fp32 logits keeps a materialized
# loss's extra memory under 2 GiB.
MATERIALIZED_LOGITS_MAX_BYTES = 4 * 2**30


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
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            "expected hidden (N, H), weight (V, H), labels (N,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)} (N, H), weight {tuple(weight.shape)} (V, H), "
            f"labels {tuple(labels.shape)} (N,)"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
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
