"""ops/_dispatch.dispatch: which entry point runs a call, with and without a torch reference, and the ops
that go through its no-reference form (logits_cross_entropy, swiglu_linear_recompute) keep the branches
they had when each wrote its own is_compiling() / is_grad_enabled() switch."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import flashlm.ops._dispatch as dispatch_mod
import flashlm.ops.cross_entropy as ce
from flashlm.ops._dispatch import dispatch

swi = importlib.import_module("flashlm.ops.swiglu")  # the module: flashlm.ops.swiglu is also the function


def _recorder(calls):
    class Function:
        @staticmethod
        def apply(*args):
            calls.append("apply")

    def entry(name):
        return lambda *args: calls.append(name)

    return Function, entry("launch"), entry("compiled"), entry("reference")


def _modes(monkeypatch, fn, x):
    """The entry point ``fn`` takes compiled, eager with grad and eager without grad (in that order)."""
    calls = []
    fn_calls = fn(calls)
    monkeypatch.setattr(dispatch_mod, "is_compiling", lambda: True)
    fn_calls(x)
    monkeypatch.setattr(dispatch_mod, "is_compiling", lambda: False)
    fn_calls(x)
    with torch.no_grad():
        fn_calls(x)
    return calls


def test_no_reference_picks_by_mode_on_every_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU tensor Triton cannot take

    def build(calls):
        function, launch, compiled, _ = _recorder(calls)
        return dispatch(function, launch, compiled)

    assert _modes(monkeypatch, build, torch.zeros(2)) == ["compiled", "apply", "launch"]


@pytest.mark.skipif(dispatch_mod.triton is None, reason="no triton")
def test_reference_where_triton_cannot_run(monkeypatch):
    def build(calls):
        return dispatch(*_recorder(calls))

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _modes(monkeypatch, build, torch.zeros(2)) == ["reference"] * 3
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _modes(monkeypatch, build, torch.zeros(2)) == ["compiled", "apply", "launch"]


def test_logits_cross_entropy_compiled_is_plain_cross_entropy(monkeypatch):
    """Under compile: F.cross_entropy on F.linear, never the autograd Function (inductor fuses it)."""
    hidden, weight, targets = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
    monkeypatch.setattr(dispatch_mod, "is_compiling", lambda: True)
    monkeypatch.setattr(ce.LogitsCrossEntropy, "apply", lambda *a: pytest.fail("the Function ran compiled"))
    got = ce.logits_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(hidden, weight), targets))


def test_logits_cross_entropy_eager_runs_the_function_with_and_without_grad(monkeypatch):
    hidden, weight, targets = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
    calls = []
    real = ce.LogitsCrossEntropy.apply
    monkeypatch.setattr(ce.LogitsCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    want = F.cross_entropy(F.linear(hidden, weight), targets)
    torch.testing.assert_close(ce.logits_cross_entropy(hidden, weight, targets, backend="torch"), want)
    with torch.no_grad():
        torch.testing.assert_close(ce.logits_cross_entropy(hidden, weight, targets, backend="torch"), want)
    assert calls == [1, 1]


def test_swiglu_linear_recompute_runs_its_function_only_eager_with_grad(monkeypatch):
    """Compiled: the reference (AOTAutograd recomputes it itself); eager with grad: the recompute Function
    (seen as the output's grad_fn); eager without grad: the reference."""
    gate_up, weight = torch.randn(3, 8, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    want = swi.swiglu_linear_ref(gate_up, weight)
    monkeypatch.setattr(dispatch_mod, "is_compiling", lambda: True)
    compiled = swi.swiglu_linear_recompute(gate_up, weight)
    monkeypatch.setattr(dispatch_mod, "is_compiling", lambda: False)
    eager = swi.swiglu_linear_recompute(gate_up, weight)
    with torch.no_grad():
        no_grad = swi.swiglu_linear_recompute(gate_up, weight)
    assert "SwiGLULinearRecompute" not in compiled.grad_fn.name()
    assert "SwiGLULinearRecompute" in eager.grad_fn.name()
    assert no_grad.grad_fn is None
    for out in (compiled, eager, no_grad):
        torch.testing.assert_close(out, want)


def test_logits_cross_entropy_traces_fullgraph():
    """torch.compile(fullgraph=True) traces the compiled branch (plain cross-entropy: no graph break)."""
    hidden, weight, targets = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
    targets[1] = -100
    torch._dynamo.reset()
    fn = torch.compile(ce.logits_cross_entropy, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(hidden, weight, targets), F.cross_entropy(F.linear(hidden, weight), targets))
