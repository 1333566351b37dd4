"""MasterWeightAdamW's Triton kernel path (flashlm.ops.adamw.adamw_master_step) against its torch path.

CPU tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1, set per test). Both paths do
AdamW's fp32 math but round differently in places (torch's CPU lerp/addcmul use fused multiply-adds,
the interpreted kernel does not), so they agree to an fp32 ulp or so per op, not bit for bit. Bound
after 5 steps: each step the master's own rounding differs by <= 1 ulp (2^-23 ~ 1.2e-7 relative),
5 steps <= ~6e-7 relative (rtol 1e-6); the update itself (~lr) carries a few ulps of relative error,
~1e-2 * 1e-6 = 1e-8 absolute, and exp_avg/exp_avg_sq (|.| <~ 3) stay within 1 ulp of each other as
their older errors decay with beta1/beta2 (atol 1e-7 covers values near 0).
"""

import copy

import pytest
import torch

import flashlm.ops.adamw as optim_mod
from flashlm.ops.adamw import MasterWeightAdamW

TOL = {"rtol": 1e-6, "atol": 1e-7}
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the kernel's launches (the wrapped function still runs)."""
    calls = []
    real = optim_mod.adamw_master_step

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(optim_mod, "adamw_master_step", spy)
    return calls


def _model(dtype, device="cpu"):
    """A matrix spanning two kernel blocks with a masked tail (2400 > 2048), a vector, an fp32 bias."""
    torch.manual_seed(0)
    shapes = [((8, 300), dtype), ((300,), dtype), ((5,), torch.float32)]
    return [torch.nn.Parameter(torch.randn(s, device=device).to(dt)) for s, dt in shapes]


def _optimizer(params, kernel, **kw):
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    return MasterWeightAdamW(groups, kernel=kernel, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)


def _steps(opt, params, steps, first=0, skip=None):
    """``steps`` steps of seeded grads (``skip``: index of a param left without grad); the LR halves
    between steps, as a scheduler would."""
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        for i, p in enumerate(params):
            p.grad = None if i == skip else torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        opt.step()
        opt.zero_grad()
        for group in opt.param_groups:
            group["lr"] *= 0.5


def _assert_close_states(opt_a, opt_b, **tol):
    for ma, mb in zip(opt_a._masters, opt_b._masters, strict=True):
        torch.testing.assert_close(ma, mb, **tol)
        sa, sb = opt_a.state[ma], opt_b.state[mb]
        assert sa.keys() == sb.keys()
        assert torch.equal(sa["step"].cpu(), sb["step"].cpu())
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key], sb[key], **tol)


def _assert_rounded(params, opt, dtype):
    for p, m in zip(params, opt._masters, strict=True):
        if p.dtype == torch.float32:
            assert p is m
        elif dtype == torch.bfloat16 and p.device.type == "cpu":
            # the interpreter's fp32 -> bf16 cast truncates (checked: Triton 3.9) where CUDA rounds
            # to nearest even: within one bf16 ulp (2^-7 relative) of the master
            torch.testing.assert_close(p.detach().float(), m, rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(p.detach(), m.to(p.dtype))


@pytest.mark.parametrize("dtype", LOW)
def test_kernel_matches_torch_path_over_groups_and_lr_changes(interpret, kernel_calls, dtype):
    params_k, params_t = _model(dtype), _model(dtype)
    opt_k, opt_t = _optimizer(params_k, "triton"), _optimizer(params_t, "torch")
    _steps(opt_k, params_k, 5)
    _steps(opt_t, params_t, 5)
    assert len(kernel_calls) == 10 and opt_k.defaults["fused"] is None  # 2 low-precision params x 5; CPU: not fused
    _assert_close_states(opt_k, opt_t, **TOL)
    assert torch.equal(params_k[2], params_t[2])  # the fp32 param: torch's AdamW on both paths
    _assert_rounded(params_k, opt_k, dtype)
    for p, m in zip(params_k, opt_k._masters, strict=True):
        assert p.grad is None and m.grad is None  # zero_grad cleared the model's grads; no fp32 copies kept
    state = opt_k.state[opt_k._masters[0]]
    assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32  # torch's layout


def test_step_leaves_model_grads_for_zero_grad(interpret):
    params = _model(torch.float16)
    opt = _optimizer(params, "triton")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(p.grad is not None for p in params) and all(m.grad is None or m is p for p, m in
                                                            zip(params, opt._masters))
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_state_dict_round_trip_between_paths(interpret):
    params_a = _model(torch.float16)
    opt_a = _optimizer(params_a, "triton")
    _steps(opt_a, params_a, 3)
    state = copy.deepcopy(opt_a.state_dict())  # as torch.save would
    resumed = {}
    for kernel in ("torch", "triton"):
        params = [torch.nn.Parameter(p.detach().clone() + 1) for p in params_a]  # perturbed: the load restores
        opt = _optimizer(params, kernel)
        opt.load_state_dict(copy.deepcopy(state))
        _steps(opt, params, 2, first=3)
        resumed[kernel] = (params, opt)
    _steps(opt_a, params_a, 2, first=3)
    params_k, opt_k = resumed["triton"]
    for pa, pk in zip(params_a, params_k):  # kernel -> kernel: bit for bit
        assert torch.equal(pa, pk)
    _assert_close_states(opt_a, opt_k, rtol=0, atol=0)
    _assert_close_states(opt_a, resumed["torch"][1], **TOL)  # kernel -> torch: the same AdamW


def test_none_grad_skips_the_param(interpret, kernel_calls):
    params = _model(torch.float16)
    opt = _optimizer(params, "triton")
    before = params[1].detach().clone()
    _steps(opt, params, 2, skip=1)
    assert len(opt.state[opt._masters[1]]) == 0 and torch.equal(params[1], before)
    assert len(kernel_calls) == 2
    _steps(opt, params, 1, first=2)
    assert opt.state[opt._masters[1]]["step"].item() == 1 and opt.state[opt._masters[0]]["step"].item() == 3


def test_amsgrad_falls_back_to_torch(interpret, kernel_calls):
    params_k, params_t = _model(torch.float16), _model(torch.float16)
    opt_k, opt_t = _optimizer(params_k, "triton", amsgrad=True), _optimizer(params_t, "torch", amsgrad=True)
    _steps(opt_k, params_k, 3)
    _steps(opt_t, params_t, 3)
    assert kernel_calls == []
    _assert_close_states(opt_k, opt_t, rtol=0, atol=0)  # the same torch code on both
    assert "max_exp_avg_sq" in opt_k.state[opt_k._masters[0]]
    for pk, pt in zip(params_k, params_t):
        assert torch.equal(pk, pt)


def test_auto_takes_torch_on_cpu_even_under_the_interpreter(interpret, kernel_calls):
    params = _model(torch.float16)
    _steps(_optimizer(params, "auto"), params, 1)
    assert kernel_calls == []


def test_added_group_is_stepped_by_the_kernel(interpret, kernel_calls):
    """A group given to add_param_group gets masters and the kernel, as the constructor's groups do."""
    opts = []
    for kernel in ("triton", "torch"):
        params = _model(torch.float16)
        opt = MasterWeightAdamW([{"params": params[:1], "weight_decay": 0.1}], kernel=kernel, lr=1e-2,
                                betas=(0.9, 0.95), eps=1e-8)
        opt.add_param_group({"params": params[1:], "weight_decay": 0.0})
        _steps(opt, params, 3)
        opts.append(opt)
    assert len(kernel_calls) == 6  # 2 low-precision params (one in the added group) x 3 steps
    _assert_close_states(*opts, **TOL)


def test_kernel_argument_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="kernel must be"):
        _optimizer(_model(torch.float16), "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs Triton"):
        _optimizer(_model(torch.float16), "triton")


@pytest.mark.cuda
def test_kernel_matches_torch_fused_on_gpu_in_bf16():
    # the kernel's update vs torch's fused CUDA AdamW: different association of the same fp32 math
    # (and fma contraction on both), so the bound of the CPU tests, plus exact RTNE rounding of params
    params_k, params_t = _model(torch.bfloat16, "cuda"), _model(torch.bfloat16, "cuda")
    opt_k, opt_t = _optimizer(params_k, "triton"), _optimizer(params_t, "torch")
    assert opt_t.defaults["fused"] is True
    _steps(opt_k, params_k, 5)
    _steps(opt_t, params_t, 5)
    _assert_close_states(opt_k, opt_t, **TOL)
    _assert_rounded(params_k, opt_k, torch.bfloat16)
    # resume the kernel's state on the fused torch path (steps moved to the GPU) and back (to the host)
    state = copy.deepcopy(opt_k.state_dict())
    opt_t2 = _optimizer(params_t, "torch")
    opt_t2.load_state_dict(copy.deepcopy(state))
    _steps(opt_t2, params_t, 2, first=5)
    opt_k2 = _optimizer(params_k, "triton")
    opt_k2.load_state_dict(state)
    _steps(opt_k2, params_k, 2, first=5)
    assert opt_k2.state[opt_k2._masters[0]]["step"].device.type == "cpu"
    _assert_close_states(opt_k2, opt_t2, **TOL)


_AOT_SCRIPT = r"""
from triton_aot import compile_sm90
from flashlm.ops.adamw import BLOCK, _kernel

scalars = dict.fromkeys(("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "neg_step_size",
                         "bias_correction2_sqrt", "eps"), "fp32")
for low in ("*bf16", "*fp16"):
    for n in ("i32", "i64"):  # Triton types n as i64 past 2^31 elements
        for lerp_from_start in (True, False):
            compiled = compile_sm90(_kernel(False), {"BLOCK": BLOCK, "LERP_FROM_START": lerp_from_start},
                                    {"P": low, "G": low}, "*fp32", {**scalars, "n": n}, num_warps=8)
            ptx = compiled.asm["ptx"]
            assert "sqrt.approx" not in ptx and "div.full" not in ptx, "approximate sqrt/division"
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA test compiles the kernel")
def test_kernel_compiles_for_sm90_with_ieee_sqrt_and_division():
    """The interpreter misses what only the compiler checks: compile every variant for sm90 ahead of
    time (no GPU needed), and check that sqrt and division stay IEEE-rounded as torch's are."""
    pytest.importorskip("triton")
    from triton_aot import run_aot

    run_aot(_AOT_SCRIPT)
