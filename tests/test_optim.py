"""MasterWeightAdamW: fp32 master weights for a bf16 model, checked against AdamW on fp32 weights."""

import copy

import pytest
import torch

from flashlm.ops.adamw import MasterWeightAdamW


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


def _bf16_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).to(torch.bfloat16)


def _step_all(opt, params, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("form", ["generator", "named", "dict_generator", "tensor_group"])
def test_params_in_every_form_torch_accepts(form):
    """model.parameters() (a generator: the usual call), named parameters, a generator of groups and a
    group whose params is one tensor or a generator train as the same groups given as lists."""
    ref_model, model = _bf16_model(), _bf16_model()
    ref = MasterWeightAdamW([{"params": list(ref_model.parameters())}], lr=1e-2)
    params = list(model.parameters())
    given = {"generator": lambda: model.parameters(),
             "named": lambda: model.named_parameters(),
             "dict_generator": lambda: ({"params": (p for p in params[i:i + 1])} for i in range(len(params))),
             "tensor_group": lambda: [{"params": p} for p in params]}[form]()
    opt = MasterWeightAdamW(given, lr=1e-2)
    assert [id(p) for p in opt.model_params] == [id(p) for p in params] and len(opt._masters) == len(params)
    init = [p.detach().clone() for p in params]
    for step in range(3):
        _step_all(ref, list(ref_model.parameters()), step)
        _step_all(opt, params, step)
    for r, p, p0 in zip(ref_model.parameters(), params, init, strict=True):
        assert not torch.equal(p, p0) and torch.equal(r, p)
    if form == "named":
        assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_empty_or_unordered_params_are_refused_as_torch_does():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="empty parameter list"):
        MasterWeightAdamW(iter([]), lr=1e-3)
    with pytest.raises(TypeError, match="ordered collections"):
        MasterWeightAdamW([{"params": {p}}], lr=1e-3)
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        MasterWeightAdamW(p, lr=1e-3)


def test_a_parameter_in_two_groups_is_refused_and_nothing_is_cast():
    """torch's AdamW refuses it too; here one group's update would be lost (two masters, one model
    tensor). Refused before model_dtype casts anything."""
    model = torch.nn.Linear(4, 4)
    w, b = model.weight, model.bias
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.AdamW([{"params": [w]}, {"params": [w, b]}], lr=1e-3)
    for groups in ([{"params": [w, b]}, {"params": [w]}], [{"params": [w, b, w]}]):
        with pytest.raises(ValueError, match="more than once") as err:
            MasterWeightAdamW(groups, model_dtype=torch.bfloat16, lr=1e-3)
        assert "(4, 4)" in str(err.value)
        assert w.dtype == b.dtype == torch.float32  # refused: the model was not cast
    opt = MasterWeightAdamW([{"params": [w]}], lr=1e-3)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [b, w]})
    assert len(opt.param_groups) == 1 and len(opt.model_params) == len(opt._masters) == 1


def test_add_param_group_trains_the_new_group_with_its_own_masters():
    """A group added after construction (e.g. layers unfrozen mid-training) gets fp32 masters (its
    fp32 params cast by model_dtype, as at construction), steps like fp32 AdamW, and round-trips
    through state_dict / load_state_dict."""

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        opt = MasterWeightAdamW([{"params": list(model[0].parameters())}], model_dtype=torch.bfloat16, lr=1e-2)
        init = [p.detach().clone() for p in model[1].parameters()]
        opt.add_param_group({"params": model[1].parameters(), "lr": 1e-3, "weight_decay": 0.0})
        return model, opt, init

    model, opt, init = build()
    new = list(model[1].parameters())
    assert all(p.dtype == torch.bfloat16 for p in new) and len(opt._masters) == 4
    for m, p0 in zip(opt._masters[2:], init, strict=True):
        assert m.dtype == torch.float32 and torch.equal(m, p0)  # the exact fp32 init
    # the new group's masters follow fp32 AdamW with its own options, given the same grads
    ref = [torch.nn.Parameter(p0.clone()) for p0 in init]
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.0)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        for r, p in zip(ref, new):
            r.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for r, m, p in zip(ref, opt._masters[2:], new, strict=True):
        assert torch.equal(m, r.detach()) and torch.equal(p.detach(), m.to(torch.bfloat16))
    # resume: a fresh optimizer built the same way loads the state and continues bit for bit
    state = copy.deepcopy(opt.state_dict())
    assert len(state["master_weights"]) == 4 and len(state["param_groups"]) == 2
    model_b, opt_b, _ = build()
    opt_b.load_state_dict(state)
    for (pa, pb), ma, mb in zip(zip(model.parameters(), model_b.parameters()), opt._masters, opt_b._masters):
        assert torch.equal(pa, pb) and torch.equal(ma, mb)
    _step_all(opt, list(model.parameters()), 7)
    _step_all(opt_b, list(model_b.parameters()), 7)
    assert all(torch.equal(pa, pb) for pa, pb in zip(model.parameters(), model_b.parameters()))
