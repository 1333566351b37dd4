"""NaN/inf a query does not see must not reach its output: one case table for every backend.

Shared by tests/test_sdpa_cpu.py (sdpa_cpu vs the reference on CPU) and tests/test_attention_gpu.py
(every CUDA backend vs the reference). The reference's rule (docs/attention.md, DESIGN.md "Masked
slots must select, not multiply"): a row's output depends only on the keys it sees; a NaN/inf that
it does see makes that row non-finite, and only that row. Each builder takes (device, dtype,
head_dim) and returns a ``Case`` whose ``run(backend)`` calls the public API and returns (out, lse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from flashlm.attention import explain, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

INF, NAN = float("inf"), float("nan")
B, H, HK = 2, 4, 2  # GQA: query heads 2h, 2h+1 read kv head h


class Case(NamedTuple):
    run: Callable  # backend name -> (out, lse)
    explain: Callable  # () -> registry.Explanation of the call (which backends can run it)
    leftpad: bool = False  # the call passes cache_leftpad (explain() does not see it)


class Spec(NamedTuple):
    name: str
    build: Callable  # (device, dtype, head_dim) -> Case
    kind: str  # dense / varlen / kvcache
    kernel_kept: bool  # no query reads the non-finite values: sdpa_cpu must keep its kernel (no slow path)
    tile_read: bool  # they sit in a key tile a query reads: a vendor kernel may multiply them by 0


def _rand(device, dtype, *shape):
    return torch.randn(*shape, device=device, dtype=dtype)


def _dense(q, k, v, **kw):
    return Case(lambda be: tuple(flash_attn_func(q, k, v, return_attn_probs=True, backend=be, **kw)[:2]),
                lambda: explain(q, k, v, requires_grad=False, **kw))


def _varlen(q, k, v, lens_q, lens_k, **kw):
    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)

    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    return Case(lambda be: tuple(flash_attn_varlen_func(q, k, v, *args, return_attn_probs=True, backend=be,
                                                        **kw)[:2]),
                lambda: explain(q, k, v, cu_seqlens_q=args[0], cu_seqlens_k=args[1], max_seqlen_q=args[2],
                                max_seqlen_k=args[3], requires_grad=False, **kw))


def _kvcache(q, kc, vc, seqlens, leftpad=None, **kw):
    dev = q.device
    sl = torch.tensor(seqlens, dtype=torch.int32, device=dev)
    lp = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32, device=dev)
    # clones: the call may write the caches (it appends nothing here, but a backend owns them during it)
    return Case(lambda be: tuple(flash_attn_with_kvcache(q, kc.clone(), vc.clone(), cache_seqlens=sl,
                                                         cache_leftpad=lp, return_softmax_lse=True, backend=be,
                                                         **kw)),
                lambda: explain(q, kc, vc, kvcache=True, **kw), leftpad=leftpad is not None)


def dense_v_inf_causally_unseen(dev, dt, d):
    q, k, v = _rand(dev, dt, B, 8, H, d), _rand(dev, dt, B, 8, HK, d), _rand(dev, dt, B, 8, HK, d)
    v[0, 5, 1] = INF  # seen by rows 5.. of heads 2, 3 in batch 0 (seqlen_q == seqlen_k: the kernel's causal)
    return _dense(q, k, v, causal=True)


def dense_k_inf_causally_unseen(dev, dt, d):
    q, k, v = _rand(dev, dt, B, 5, H, d), _rand(dev, dt, B, 9, HK, d), _rand(dev, dt, B, 9, HK, d)
    k[:, 7, 0] = INF  # chunked prefill (bottom-right mask): rows 3, 4 see key 7; rows 0-2 must not
    return _dense(q, k, v, causal=True)


def dense_q_nan_row(dev, dt, d):
    # 7 keys: the CPU kernel's scalar tail skips an all-NaN row of scores (output 0; 8 keys: NaN)
    q, k, v = _rand(dev, dt, B, 7, H, d), _rand(dev, dt, B, 7, HK, d), _rand(dev, dt, B, 7, HK, d)
    q[1, 3, 2, 0] = NAN  # that row (batch 1, query 3, head 2) is NaN, every other row is not
    return _dense(q, k, v, causal=True)


def dense_window_excluded_keys(dev, dt, d):
    q, k, v = _rand(dev, dt, B, 4, H, d), _rand(dev, dt, B, 12, HK, d), _rand(dev, dt, B, 12, HK, d)
    k[:, 1], v[:, 3], k[:, 5, 1] = NAN, INF, -INF  # window (2, 0): no query sees keys 0-5
    return _dense(q, k, v, causal=True, window_size=(2, 0))


def dense_window_partly_seen(dev, dt, d):
    q, k, v = _rand(dev, dt, B, 10, H, d), _rand(dev, dt, B, 10, HK, d), _rand(dev, dt, B, 10, HK, d)
    v[:, 0], k[:, 1, 1] = INF, NAN  # window (3, 0): rows 0-3 see key 0, rows 1-4 key 1; rows 5.. neither
    return _dense(q, k, v, causal=True, window_size=(3, 0))


def varlen_v_inf_causally_unseen(dev, dt, d):
    q, k, v = _rand(dev, dt, 12, H, d), _rand(dev, dt, 12, HK, d), _rand(dev, dt, 12, HK, d)
    v[3], v[5 + 2, 0] = INF, -INF  # sequence 0 key 3 (rows 3, 4), sequence 1 key 2 (rows 2..6)
    return _varlen(q, k, v, [5, 7], [5, 7], causal=True)


def varlen_q_nan_row(dev, dt, d):
    q, k, v = _rand(dev, dt, 12, H, d), _rand(dev, dt, 12, HK, d), _rand(dev, dt, 12, HK, d)
    q[8, 1] = NAN  # sequence 1, query 3, head 1
    return _varlen(q, k, v, [5, 7], [5, 7], causal=True)


def varlen_k_inf_causally_unseen(dev, dt, d):
    q, k, v = _rand(dev, dt, 12, H, d), _rand(dev, dt, 12, HK, d), _rand(dev, dt, 12, HK, d)
    k[9, 1] = INF  # sequence 1 key 4: rows 4..6 of heads 2, 3 see it; nothing of sequence 0 does
    return _varlen(q, k, v, [5, 7], [5, 7], causal=True)


def varlen_window_excluded_keys(dev, dt, d):
    q, k, v = _rand(dev, dt, 5, H, d), _rand(dev, dt, 15, HK, d), _rand(dev, dt, 15, HK, d)
    # window (2, 0), bottom-right: sequence 0 (3 queries, 9 keys) sees keys 4..8, sequence 1 (2, 6) keys 2..5
    k[1], v[3], k[9], v[10] = NAN, INF, INF, NAN
    return _varlen(q, k, v, [3, 2], [9, 6], causal=True, window_size=(2, 0))


def kvcache_nan_past_seqlens(dev, dt, d):
    q, kc, vc = _rand(dev, dt, B, 2, H, d), _rand(dev, dt, B, 16, HK, d), _rand(dev, dt, B, 16, HK, d)
    kc[0, 4:], vc[0, 4:] = NAN, NAN  # ragged rows [4, 8]: slots past cache_seqlens are garbage
    kc[1, 8:], vc[1, 8:] = INF, -INF
    return _kvcache(q, kc, vc, [4, 8], causal=True)


def kvcache_inf_before_leftpad(dev, dt, d):
    q, kc, vc = _rand(dev, dt, B, 1, H, d), _rand(dev, dt, B, 16, HK, d), _rand(dev, dt, B, 16, HK, d)
    kc[0, :3], vc[0, :3] = INF, INF  # row 0's valid keys are [3, 8)
    return _kvcache(q, kc, vc, [8, 8], leftpad=[3, 0], causal=True)


def kvcache_window_excluded_keys(dev, dt, d):
    q, kc, vc = _rand(dev, dt, B, 1, H, d), _rand(dev, dt, B, 16, HK, d), _rand(dev, dt, B, 16, HK, d)
    kc[:, :3], vc[:, :3], kc[1, 3:7] = NAN, INF, NAN  # window (2, 0): row 0 sees keys 3-5, row 1 keys 7-9
    return _kvcache(q, kc, vc, [6, 10], causal=True, window_size=(2, 0))


def kvcache_v_inf_causally_unseen(dev, dt, d):
    q, kc, vc = _rand(dev, dt, B, 3, H, d), _rand(dev, dt, B, 16, HK, d), _rand(dev, dt, B, 16, HK, d)
    vc[:, 7] = INF  # 3 new queries on 8 keys: only the last sees key 7
    return _kvcache(q, kc, vc, [8, 8], causal=True)


SPECS = [
    Spec("dense-v-inf-causally-unseen", dense_v_inf_causally_unseen, "dense", False, True),
    Spec("dense-k-inf-causally-unseen", dense_k_inf_causally_unseen, "dense", False, True),
    Spec("dense-q-nan-row", dense_q_nan_row, "dense", False, True),
    Spec("dense-window-excluded-keys", dense_window_excluded_keys, "dense", True, True),
    Spec("dense-window-partly-seen", dense_window_partly_seen, "dense", False, True),
    Spec("varlen-v-inf-causally-unseen", varlen_v_inf_causally_unseen, "varlen", False, True),
    Spec("varlen-q-nan-row", varlen_q_nan_row, "varlen", False, True),
    Spec("varlen-k-inf-causally-unseen", varlen_k_inf_causally_unseen, "varlen", False, True),
    Spec("varlen-window-excluded-keys", varlen_window_excluded_keys, "varlen", True, True),
    Spec("kvcache-nan-past-seqlens-ragged", kvcache_nan_past_seqlens, "kvcache", True, False),
    Spec("kvcache-inf-before-leftpad", kvcache_inf_before_leftpad, "kvcache", True, False),
    Spec("kvcache-window-excluded-keys", kvcache_window_excluded_keys, "kvcache", True, True),
    Spec("kvcache-v-inf-causally-unseen", kvcache_v_inf_causally_unseen, "kvcache", False, True),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _row_finite(out):
    """(…, nheads, d) -> finite rows laid out like the lse: (B, H, Sq) dense/kvcache, (H, total) varlen."""
    return torch.isfinite(out).all(-1).movedim(-1, -2)


def assert_like_reference(got, ref, dtype, same_nonfinite_kind=True):
    """out equal to the reference's with NaN where it has NaN (and inf where it has inf); lse equal
    on the rows whose output is finite (a NaN row's lse is NaN or +inf depending on the kernel).
    ``same_nonfinite_kind=False``: where the reference is NaN or inf, any non-finite value passes (a row
    that sees both a NaN key and an inf value is NaN in the reference's softmax and may hold inf in a
    kernel's running-max one); the finite elements must still match, so no non-finite value may reach
    a row that does not see it."""
    (out, lse), (rout, rlse) = got, ref
    tol = TOL[dtype]
    if same_nonfinite_kind:
        torch.testing.assert_close(out, rout, atol=tol, rtol=tol, equal_nan=True)
    else:
        finite = torch.isfinite(rout)
        assert torch.equal(torch.isfinite(out), finite), "non-finite values reached other elements"
        torch.testing.assert_close(out[finite], rout[finite], atol=tol, rtol=tol)
    fin = _row_finite(rout)
    assert lse.shape == rlse.shape
    torch.testing.assert_close(lse.float()[fin], rlse.float()[fin], atol=tol * 10, rtol=tol)


def check_case(spec, ref):
    """Guards the table itself, on the reference's output: a case whose values no query reads leaves
    every row finite; one whose values some rows read leaves other rows finite (selection is tested)."""
    fin = _row_finite(ref[0])
    if spec.kernel_kept:
        assert fin.all(), f"{spec.name}: the reference reads a poisoned value"
    else:
        assert fin.any() and not fin.all(), f"{spec.name}: no row, or every row, sees a poisoned value"
