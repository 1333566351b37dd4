"""Registry: choice, overrides (argument, context manager, environment), explain, refusals, warnings."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from flashlm.attention import (
    available_backends,
    explain,
    flash_attn_func,
    known_backends,
    order,
    registry,
    use_backend,
)
from flashlm.attention.backends.base import AttnCall
from flashlm.attention.backends.cudnn import BACKEND as CUDNN
from flashlm.attention.backends.torch_flash import BACKEND as TORCH_FLASH
from flashlm.errors import InputError

q = torch.randn(1, 4, 2, 16)


def _cuda_call(**kw):
    base = {"kind": "dense", "device_type": "cuda", "compute_capability": (9, 0), "dtype": torch.bfloat16, "head_dim": 128,
                "head_dim_v": 128, "nheads": 8, "nheads_k": 2, "seqlen_q": 128, "seqlen_k": 128, "causal": True, "window": False,
                "softcap": False, "alibi": False, "dropout": False, "needs_grad": False, "deterministic": False, "seqlens_equal": True}
    base.update(kw)
    return AttnCall(**base)


def test_order_is_data_and_reference_is_last():
    assert known_backends() == order.ORDER
    assert order.ORDER[-1] == "reference"
    assert "reference" in available_backends()


def test_explain_names_every_backend_and_the_choice():
    exp = explain(q, q, q, causal=True)
    assert exp.chosen == "sdpa_cpu"  # PyTorch's CPU flash kernel, before the reference
    assert set(exp.reasons) == set(known_backends())
    text = str(exp)
    assert "-> sdpa_cpu" in text and "dense cpu float32" in text and "order: cpu/dense" in text
    assert "-> reference" in str(explain(q, q, q, causal=True, softcap=5.0))
    if not torch.cuda.is_available():
        assert "no CUDA device" in exp.reasons["torch_flash"] or "unavailable" in exp.reasons["torch_flash"]


def test_use_backend_is_scoped_and_nests(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert registry.forced_backend()[0] is None
    with use_backend("reference"):
        assert registry.forced_backend() == ("reference", "use_backend()")
        with use_backend("auto"):
            assert registry.forced_backend()[0] is None
        seen = []
        t = threading.Thread(target=lambda: seen.append(registry.forced_backend()[0]))
        t.start()
        t.join()
        assert seen == [None]  # a contextvar: other threads keep their own setting
    assert registry.forced_backend()[0] is None
    with pytest.raises(InputError, match="unknown attention backend"), use_backend("bogus"):
        pass


def test_forced_backend_that_cannot_serve_raises_with_reason(monkeypatch):
    with use_backend("torch_flash"), pytest.raises(InputError, match="torch_flash.*forced by use_backend"):
        flash_attn_func(q, q, q)
    monkeypatch.setenv(registry.ENV_VAR, "cudnn")
    with pytest.raises(InputError, match=f"cudnn.*{registry.ENV_VAR}"):
        flash_attn_func(q, q, q)
    # the argument beats the environment
    flash_attn_func(q, q, q, backend="reference")
    monkeypatch.setenv(registry.ENV_VAR, "auto")
    flash_attn_func(q, q, q)


def test_capability_refusals_are_specific():
    assert "dtype float32" in TORCH_FLASH.refuse(_cuda_call(dtype=torch.float32))
    assert "head_dim 260" in TORCH_FLASH.refuse(_cuda_call(head_dim=260, head_dim_v=260))
    assert "head_dim 100" in TORCH_FLASH.refuse(_cuda_call(head_dim=100, head_dim_v=100))
    assert "softcap" in TORCH_FLASH.refuse(_cuda_call(softcap=True))
    assert "top-left" in CUDNN.refuse(_cuda_call(seqlen_q=128, seqlen_k=256, seqlens_equal=False))
    # issue 15: cuDNN's short-query forward is not bitwise repeatable, its backward fails at seqlen 1
    assert "not deterministic" in CUDNN.refuse(_cuda_call(seqlen_q=1, seqlen_k=239, causal=False,
                                                          seqlens_equal=False))
    assert "not deterministic" in CUDNN.refuse(_cuda_call(seqlen_q=127, seqlen_k=127))
    assert "seqlen_k == 0" in TORCH_FLASH.refuse(_cuda_call(seqlen_q=4, seqlen_k=0, causal=False))
    for be in (CUDNN, TORCH_FLASH):  # no deterministic backward: refused when one is asked for
        assert "deterministic" in be.refuse(_cuda_call(needs_grad=True, deterministic=True))
    assert "window" in CUDNN.refuse(_cuda_call(window=True))
    assert "leftpad" in TORCH_FLASH.refuse(_cuda_call(kind="kvcache", leftpad=True, seqlens_equal=False))
    assert TORCH_FLASH.refuse(_cuda_call()) is None and CUDNN.refuse(_cuda_call()) is None


def test_cudnn_refuses_its_seqlen_1_backward_even_where_short_queries_are_allowed(monkeypatch):
    from flashlm.attention.backends import cudnn

    monkeypatch.setattr(cudnn, "MIN_SEQLEN_Q", 1)
    one = {"seqlen_q": 1, "seqlen_k": 1, "nheads": 5, "nheads_k": 5, "head_dim": 16, "head_dim_v": 16}
    assert CUDNN.refuse(_cuda_call(**one)) is None
    assert "seqlen_q = seqlen_k = 1" in CUDNN.refuse(_cuda_call(**one, needs_grad=True))


def test_slow_fallback_warns_once():
    registry.reset_cache()
    call = _cuda_call(dtype=torch.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            pytest.skip("needs a machine where only the reference can serve")
        be = registry.select(call)
        registry.select(call)
    assert be.name == "reference"
    slow = [x for x in w if "slow reference" in str(x.message)]
    assert len(slow) == 1 and "dense cuda float32" in str(slow[0].message)
    registry.reset_cache()


def test_broken_or_missing_backend_module_is_reported(monkeypatch):
    registry.reset_cache()
    monkeypatch.setattr(order, "ORDER", ("does_not_exist", "triton", "reference"))
    exp = explain(q, q, q)
    assert exp.chosen == "reference"  # sdpa_cpu is not in the patched ORDER: the tables skip it
    assert "import failed" in exp.reasons["does_not_exist"]
    assert exp.reasons["triton"] is None or exp.reasons["triton"]  # loads or says why, never raises
    registry.reset_cache()


def test_no_backend_can_serve_lists_reasons(monkeypatch):
    registry.reset_cache()
    monkeypatch.setattr(order, "ORDER", ("cudnn", "torch_flash"))
    with pytest.raises(InputError, match="no attention backend can run.*cudnn: unavailable"):
        flash_attn_func(q, q, q)
    registry.reset_cache()


def test_order_tables_list_every_backend_with_reference_last():
    for fam, tables in order.ORDERS.items():
        assert set(tables) == {"dense", "varlen", "kvcache"}, fam
        for kind, names in tables.items():
            assert sorted(names) == sorted(order.ORDER) and names[-1] == "reference", (fam, kind)
            if fam != "cuda":
                assert (fam, kind) in order.SOURCES, f"{fam}/{kind} has no measurement named"


def test_family_of_a_device():
    assert order.family("cpu", None) == "cpu"
    assert order.family("cuda", (9, 0)) == "sm90"  # H100 and H200
    assert order.family("cuda", (8, 0)) == "cuda" and order.family("cuda", (10, 0)) == "cuda"
    assert order.family("mps", None) == "mps"
    names, table = order.order_for("dense", "mps")  # no table: the default order, and it says so
    assert names == order.ORDER and "default order" in table


def test_order_depends_on_call_kind_on_hopper():
    """FA4 leads dense on sm90, our Triton kernel leads KV-cache decode (measured: order.SOURCES)."""
    dense, dense_table = order.order_for("dense", "sm90")
    decode, decode_table = order.order_for("kvcache", "sm90")
    assert dense[0] == "fa4" and decode[0] == "triton"
    assert dense_table.startswith("sm90/dense") and decode_table.startswith("sm90/kvcache")
    assert "kernels_fa4_h100.json" in decode_table


def test_explain_shows_the_table_that_decided(monkeypatch):
    """The registry walks the (family, kind) table: a changed table changes the walk and the text."""
    registry.reset_cache()
    call = _cuda_call(kind="kvcache", needs_grad=False, seqlen_q=1, seqlen_k=4096, seqlens_equal=False)
    exp = registry.explain_call(call)
    assert next(iter(exp.reasons)) == "triton" and exp.table.startswith("sm90/kvcache")
    assert "order: sm90/kvcache" in str(exp)
    dense = registry.explain_call(_cuda_call())
    assert next(iter(dense.reasons)) == "fa4" and "order: sm90/dense" in str(dense)
    other = registry.explain_call(_cuda_call(compute_capability=(8, 0)))
    assert list(other.reasons) == list(order.ORDER) and other.table.startswith("cuda/dense")
    monkeypatch.setitem(order.ORDERS["cpu"], "dense", ("reference",) + order.ORDER[:-1])
    exp = explain(q, q, q, causal=True)
    assert exp.chosen == "reference" and "order: cpu/dense" in str(exp)
    forced = explain(q, q, q, backend="reference")
    assert forced.table is None and "order:" not in str(forced)
    registry.reset_cache()


@pytest.mark.cuda
def test_gpu_family_and_per_kind_tables_on_the_device():
    """On the real GPU: the family comes from its compute capability, and decode and dense calls are
    decided by their own tables (on an H100/H200: Triton first for decode, FA4/cuDNN for dense)."""
    registry.reset_cache()
    cc = torch.cuda.get_device_capability()
    fam = order.family("cuda", cc)
    qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(8, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    decode = explain(qd, kc, kc, causal=True, kvcache=True)
    assert f"order: {fam}/kvcache" in str(decode)
    capable = [n for n, why in decode.reasons.items() if why is None]
    assert decode.chosen == capable[0] and list(decode.reasons) == list(order.order_for("kvcache", fam)[0])
    qt = torch.randn(2, 512, 32, 128, device="cuda", dtype=torch.bfloat16)
    dense = explain(qt, qt[:, :, :8], qt[:, :, :8], causal=True)
    assert f"order: {fam}/dense" in str(dense)
    if fam == "sm90" and registry.unavailable_reason("triton") is None:
        assert decode.chosen == "triton", str(decode)
