"""MasterWeightAdamW: fp32 master weights for a bf16 model, checked against AdamW on fp32 weights."""

import copy

import pytest
import torch

from flashlm.optim import MasterWeightAdamW


def _groups(params):
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _run(n_steps, lr=1e-3, drift=False):
    """Same grads (bf16-representable) into a bf16 model + masters and an fp32 model + AdamW."""
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16))]
    low = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref]
    with torch.no_grad():  # both start from the same (bf16-representable) weights
        for r, lo in zip(ref, low):
            r.copy_(lo.float())
    opt_ref = torch.optim.AdamW(_groups(ref), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    opt = MasterWeightAdamW(_groups(low), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    for step in range(n_steps):
        g = torch.Generator().manual_seed(step)
        for r, lo in zip(ref, low):
            grad = torch.randn(r.shape, generator=g).to(torch.bfloat16)
            if drift:  # same sign every step: the weights drift by ~lr per step
                grad = grad.abs() + 1
            r.grad, lo.grad = grad.float(), grad
        opt_ref.step()
        opt.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    return ref, low, opt


def test_masters_follow_fp32_adamw_exactly_and_params_are_their_rounding():
    ref, low, opt = _run(20, lr=1e-4)
    for r, lo, m in zip(ref, low, opt._masters):
        assert m.dtype == torch.float32 and lo.dtype == torch.bfloat16
        torch.testing.assert_close(m, r.detach(), rtol=0, atol=0)  # same fp32 math, same grads
        assert torch.equal(lo.detach(), m.to(torch.bfloat16))


def test_small_updates_are_not_lost_unlike_plain_bf16_adamw():
    # 100 steps of lr 1e-4 on weights ~1: each update is far below half a bf16 ulp (2^-8), so plain
    # AdamW on bf16 weights never moves them, while the fp32 masters accumulate ~1e-2 and do
    _, low, _ = _run(100, lr=1e-4, drift=True)
    torch.manual_seed(0)
    start = torch.randn(8, 16).to(torch.bfloat16)  # the first weight as _run made it
    plain = torch.nn.Parameter(start.clone())
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(100):
        g = torch.randn(plain.shape, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        plain.grad = g.abs() + 1
        plain_opt.step()
    big = start.float().abs() > 0.5
    assert torch.equal(plain.detach()[big], start[big])  # plain bf16 AdamW lost every update there
    assert (low[0].detach()[big] != start[big]).float().mean() > 0.5  # the masters' rounding moved


def test_state_dict_resume_continues_bit_for_bit():
    _, low_a, opt_a = _run(10)
    state = copy.deepcopy(opt_a.state_dict())  # as torch.save would: AdamW's state holds live tensors
    assert len(state["master_weights"]) == 2
    # a fresh optimizer over perturbed bf16 params, loaded from the state: masters and params restored
    low_b = [torch.nn.Parameter(p.detach().clone() + 1) for p in low_a]
    opt_b = MasterWeightAdamW(_groups(low_b), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_b.load_state_dict(state)
    for pa, pb, ma, mb in zip(low_a, low_b, opt_a._masters, opt_b._masters):
        assert torch.equal(pa, pb) and torch.equal(ma, mb)
    for opt, params in ((opt_a, low_a), (opt_b, low_b)):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    for pa, pb in zip(low_a, low_b):
        assert torch.equal(pa, pb)


def test_lr_scheduler_and_fp32_params_pass_through():
    p32 = torch.nn.Parameter(torch.randn(4, 4))
    opt = MasterWeightAdamW([{"params": [p32]}], lr=1.0)
    assert opt._masters[0] is p32  # fp32 params are stepped in place
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    p32.grad = torch.ones_like(p32)
    before = p32.detach().clone()
    opt.step()
    sched.step()
    assert not torch.equal(before, p32)


def test_mismatched_state_is_refused():
    _, _, opt = _run(1)
    state = opt.state_dict()
    state["master_weights"] = state["master_weights"][:1]
    with pytest.raises(ValueError, match="master weights"):
        opt.load_state_dict(state)


def test_model_dtype_casts_an_fp32_model_and_keeps_its_exact_init_as_masters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    init = [p.detach().clone() for p in model.parameters()]
    opt = MasterWeightAdamW([{"params": list(model.parameters())}], model_dtype=torch.bfloat16, lr=1e-3)
    for p, m, p0 in zip(model.parameters(), opt._masters, init):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(m, p0) and torch.equal(p.detach(), p0.to(torch.bfloat16))
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(m, p0) for m, p0 in zip(opt._masters, init))
