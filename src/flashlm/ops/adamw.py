"""AdamW with fp32 master weights for a model whose parameters are bf16 (or fp16).

Training a bf16 model with plain AdamW on its bf16 parameters loses updates smaller than one bf16 ulp
of the weight; autocast over fp32 parameters avoids that but keeps the residual stream, the norms'
inputs and every saved activation that does not come out of a matmul in fp32, and casts every weight
on every forward. The usual answer (Megatron, torchtitan's FSDP2 mixed precision): compute in bf16,
keep an fp32 copy of each parameter in the optimizer, step the copy in fp32 and write it back rounded.

Per step this costs one read of the bf16 grads, the fp32 AdamW update (which plain fp32 training pays
anyway) and one bf16 write of the parameters: ~30 bytes per parameter, ~9 ms for 1.2B parameters at
4 TB/s, against ~0.3 s of compute per llama-1b step of 16k tokens.

On CUDA the low-precision parameters take a one-pass Triton kernel (:func:`adamw_master_step`: 28
bytes per parameter, no fp32 grad copies); the rest (fp32 parameters, amsgrad/maximize/capturable/
differentiable groups, tensor lr or betas, non-contiguous tensors, CPU unless ``kernel="triton"`` under
TRITON_INTERPRET=1) takes torch's AdamW over the masters, fused by default on CUDA. Measured on an H200
at 1.236B parameters in 98 tensors (what `flashlm bench optim` runs; benchmarks/results/h200/
optim_bench.txt): torch's foreach 33.1 ms and 29.7 GB peak, fused 16.1 ms and 24.7 GB; the kernel's
variant ("master_triton") is not measured yet.

The kernel: ``adamw_master_step(param, grad, master, exp_avg, exp_avg_sq, ...)`` does, per element and in one
read and one write of each tensor, what ``MasterWeightAdamW`` otherwise does in four passes (fp32
copy of the grad, torch's AdamW over the masters, copy back rounded):

    g = grad.float()
    master *= 1 - lr * weight_decay                      # decoupled weight decay
    exp_avg = lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    master += -lr / bias_correction1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
    param = master.to(param.dtype)                       # round to nearest even, as copy_ does

with the operations in the order of torch's single-tensor AdamW and IEEE-rounded sqrt and division
(Triton's default ``/`` and ``sqrt`` on CUDA are approximate), so it agrees with torch to an ulp or
so per step (fused multiply-adds may differ). 28 bytes per parameter instead of ~50 for the
torch path, and no fp32 grad copies (4 bytes per parameter of peak memory).

Runs for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). The kernel is jitted on
first use, so importing this module does not depend on how TRITON_INTERPRET is set at import time.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import _get_scalar_dtype

from flashlm.errors import InputError

from ._dispatch import triton, triton_usable

if triton is not None:  # CPU-only installs: MasterWeightAdamW keeps torch's path
    import triton.language as tl

__all__ = ["LOW_PRECISION", "MasterWeightAdamW", "adamw_master_step"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
BLOCK = 2048  # elements per program: 8 per thread at 8 warps, a streaming kernel's usual size


def _adamw_kernel_fn(P, G, W, M, V, n, decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size,
                     bias_correction2_sqrt, eps, BLOCK: tl.constexpr, LERP_FROM_START: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2^31 elements
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    w = w * decay  # decay == 1.0 without weight decay: exact
    # torch's lerp: start + weight * (end - start) for weight < 0.5, else end - (end - start) * (1 - weight)
    if LERP_FROM_START:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + tl.div_rn(neg_step_size * m, denom)
    tl.store(W + offs, w, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(P + offs, w.to(P.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(interpret: bool):
    # one jitted function per mode: triton.jit returns an interpreted function under TRITON_INTERPRET=1,
    # so a test setting it must not leave the CUDA path interpreted (or the reverse)
    return triton.jit(_adamw_kernel_fn)


def adamw_master_step(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, *, step: float, lr: float, beta1: float, beta2: float,
                      weight_decay: float, eps: float, block: int = BLOCK) -> None:
    """Step ``master``, ``exp_avg``, ``exp_avg_sq`` (fp32) in place from ``grad`` (``param``'s
    dtype) and write ``master`` rounded into ``param``. ``step`` is the step count after this
    step's increment (1 on the first step), as torch's AdamW uses it. All five tensors contiguous
    and of one shape; the caller checks (``MasterWeightAdamW`` falls back to torch otherwise)."""
    n = master.numel()
    if n == 0:
        return
    # the step-derived factors in double on the host, as torch's non-capturable AdamW computes them;
    # the kernel receives them as fp32 scalars, as torch's elementwise ops cast them
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    one_minus_beta1 = 1 - beta1
    _kernel(os.environ.get("TRITON_INTERPRET") == "1")[(triton.cdiv(n, block),)](
        param, grad, master, exp_avg, exp_avg_sq, n, *map(float, (
            1 - lr * weight_decay, one_minus_beta1, beta2, 1 - beta2, -(lr / bias_correction1),
            bias_correction2 ** 0.5, eps)),
        BLOCK=block, LERP_FROM_START=abs(one_minus_beta1) < 0.5, num_warps=8)


# --- the optimizer ---

KERNELS = ("auto", "triton", "torch")
# group options under which the kernel's math is AdamW's (anything else: torch's implementation)
_KERNEL_OFF = ("amsgrad", "maximize", "capturable", "differentiable")


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW stepping fp32 copies of low-precision model parameters.

    ``params``: what torch's optimizers take, over the model's parameters (any dtype; fp32 ones are
    stepped in place, as plain AdamW would): an iterable of parameters (``model.parameters()``), of
    (name, parameter) pairs (``model.named_parameters()``), or of AdamW's groups (dicts with "params"
    and options); each parameter once (refused with InputError otherwise: two masters of one tensor
    would lose one group's update). :meth:`add_param_group` takes a group later (masters made for
    it). The optimizer's own parameters are the fp32 masters, so LR schedulers, ``state_dict`` and
    ``load_state_dict`` work as for AdamW; ``state_dict`` also carries the master weights (a resume
    continues bit for bit).
    ``step`` reads the model parameters' ``.grad``, steps the masters and copies them back rounded.
    The state has torch's non-fused layout (``step`` a CPU scalar tensor) for the parameters the
    kernel steps, so a checkpoint loads into either path.

    ``model_dtype``: cast the model's fp32 parameters to this dtype in place (``param.data``: the
    Parameter objects, and so the module's names and ties, stay) after taking their fp32 values as
    the masters, so a model built and initialized in fp32 trains in bf16 from its exact fp32 init.

    ``kernel``: "auto" (default) steps low-precision parameters with the Triton kernel when the
    masters are on CUDA and the group allows it; "triton" the same, also on CPU under
    TRITON_INTERPRET=1 (tests), and raises ValueError at construction (or ``add_param_group``) where
    Triton cannot run on the masters' device; "torch" always takes torch's AdamW (fp32 grad copies,
    then a copy back), e.g. to benchmark it. Unless a group or ``adamw_kwargs`` chooses ``foreach``,
    ``fused`` or ``differentiable``, torch's AdamW is fused when every master is on CUDA (twice as
    fast as foreach on an H200).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *,
                 model_dtype: torch.dtype | None = None, kernel: str = "auto", **adamw_kwargs: Any) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self._model_dtype, self._kernel_choice = model_dtype, kernel
        self.model_params: list[nn.Parameter] = []  # one per master, in the groups' order
        self._masters: list[torch.Tensor] = []
        self._pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per group: (model param, master)
        self._kernel_ok: list[bool] = []  # per group: whether Triton may step it (its masters' devices)
        # model params to cast to model_dtype, held back until every group is accepted (a refused
        # construction leaves the model as it was); None once constructed
        self._uncast: list[torch.Tensor] | None = []
        groups = _as_groups(params)
        if _default_to_fused(groups, adamw_kwargs):
            adamw_kwargs["fused"] = True
        super().__init__(groups, **adamw_kwargs)  # calls add_param_group per group
        uncast, self._uncast = self._uncast, None
        self._cast(uncast)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` over model parameters: fp32 masters are made for the group's
        parameters (fp32 ones cast to ``model_dtype`` where given, as at construction), so the group
        trains and ``state_dict`` carries its masters. A parameter already held, or twice in the
        group, is refused (InputError) before anything changes."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        entries = _group_params(param_group)
        params = [e[1] if isinstance(e, tuple) else e for e in entries]
        self._check_new(params)
        masters = [self._master(p) for p in params]
        kernel_ok = self._kernel_usable(masters)
        # (name, tensor) entries keep their names: torch records them as the group's param_names
        master_entries = [(e[0], m) if isinstance(e, tuple) else m for e, m in zip(entries, masters, strict=True)]
        super().add_param_group({**param_group, "params": master_entries})
        self.model_params += params
        self._masters += masters
        self._pairs.append(list(zip(params, masters, strict=True)))
        self._kernel_ok.append(kernel_ok)
        if self._uncast is None:
            self._cast(params)
        else:
            self._uncast += params

    def _check_new(self, params: list) -> None:
        """Refuse non-tensors (as torch does) and parameters held already or repeated in ``params``."""
        seen = set(self.model_params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            if p in seen:
                raise InputError(f"MasterWeightAdamW: a parameter of shape {tuple(p.shape)} appears more than "
                                 "once (in two parameter groups, or twice in one): its two masters would each "
                                 "take one update and one would be lost; pass each parameter once")
            seen.add(p)

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of model parameter ``p``: ``p`` itself if fp32 and not cast, else a copy."""
        if p.dtype != torch.float32:
            return p.detach().float()
        return p if self._model_dtype is None else p.detach().clone()

    def _cast(self, params: list[torch.Tensor]) -> None:
        if self._model_dtype is not None:
            for p in params:
                p.data = p.data.to(self._model_dtype)

    def _kernel_usable(self, masters: list[torch.Tensor]) -> bool:
        """Whether the Triton kernel may step these masters (``kernel`` and their devices)."""
        devices = {m.device for m in masters}
        # "auto" never takes Triton's CPU interpreter: tests set TRITON_INTERPRET=1 globally, and the
        # interpreted kernel is slow and casts fp32 -> bf16 by truncation
        usable = all(triton_usable(d) for d in devices)
        if self._kernel_choice == "triton" and not usable:
            raise InputError(f"kernel='triton' needs Triton on CUDA (or TRITON_INTERPRET=1); masters on "
                             f"{sorted(map(str, devices))}")
        return usable and (self._kernel_choice == "triton" or (self._kernel_choice == "auto" and
                                                               all(d.type == "cuda" for d in devices)))

    def _low_precision_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = [(p, m) for p, m in zip(self.model_params, self._masters, strict=True) if p is not m]
        return [p for p, _ in pairs], [m for _, m in pairs]

    @staticmethod
    def _kernel_group(group: dict[str, Any]) -> bool:
        """Whether the kernel's math is this group's AdamW: plain options, float hyperparameters."""
        return (not any(group.get(k) for k in _KERNEL_OFF)
                and group.get("decoupled_weight_decay", True)
                and all(isinstance(group[k], (int, float)) for k in ("lr", "weight_decay", "eps"))
                and all(isinstance(b, (int, float)) for b in group["betas"]))

    def _kernel_step(self, group: dict[str, Any], p: torch.Tensor, m: torch.Tensor) -> bool:
        """Step one low-precision parameter with the kernel; False (nothing done) where it cannot."""
        grad = p.grad
        if (p.dtype not in LOW_PRECISION or grad.dtype != p.dtype or grad.is_sparse or grad.shape != p.shape
                or not (p.is_contiguous() and m.is_contiguous())):
            return False
        state = self.state[m]
        if len(state) == 0:  # torch's non-fused, non-capturable layout: step a CPU scalar tensor
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        elif not (state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()):
            return False
        elif state["step"].device.type != "cpu":  # loaded into a fused group: read once, keep on host
            state["step"] = state["step"].detach().to("cpu", _get_scalar_dtype())
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_master_step(p, grad.contiguous(), m, state["exp_avg"], state["exp_avg_sq"],
                          step=state["step"].item(), lr=group["lr"], beta1=beta1, beta2=beta2,
                          weight_decay=group["weight_decay"], eps=group["eps"])
        return True

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter with a grad (``.grad`` of the model parameters)."""
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        copied: list[tuple[torch.Tensor, torch.Tensor]] = []  # stepped by torch: fp32 grad copies
        torch_steps = False
        for group, pairs, kernel_ok in zip(self.param_groups, self._pairs, self._kernel_ok, strict=True):
            kernel = kernel_ok and self._kernel_group(group)
            for p, m in pairs:
                if p.grad is None:
                    continue
                if p is m:  # an fp32 model parameter: torch steps it in place
                    torch_steps = True
                elif not (kernel and self._kernel_step(group, p, m)):
                    _place_step(self.state[m], group, m.device)
                    m.grad = p.grad.float()
                    copied.append((p, m))
        if torch_steps or copied:
            super().step()
        if copied:
            torch._foreach_copy_([p for p, _ in copied], [m for _, m in copied])  # rounds to the model's dtype
            for _, m in copied:
                m.grad = None  # the fp32 grad copies are not kept between steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_weights"] = [m.detach().clone() for m in self._masters]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if masters is None:  # a plain AdamW state: the masters start from the model's weights
            return
        if len(masters) != len(self._masters):
            raise ValueError(f"optimizer state holds {len(masters)} master weights, the model "
                             f"{len(self._masters)} parameters")
        with torch.no_grad():
            for m, saved in zip(self._masters, masters, strict=True):
                if m.shape != saved.shape:
                    raise ValueError(f"master weight of shape {tuple(saved.shape)} in the optimizer state "
                                     f"for a parameter of shape {tuple(m.shape)}")
                m.copy_(saved)
            model_params, low = self._low_precision_pairs()
            if model_params:
                torch._foreach_copy_(model_params, low)


def _group_params(group: dict[str, Any]) -> list:
    """A group's "params" as a list (of tensors or (name, tensor) pairs), as torch's add_param_group
    reads it: one tensor, or any ordered iterable (a generator too); a set is refused as torch does."""
    if "params" not in group:
        raise InputError(f"a parameter group needs a 'params' entry, got keys {sorted(group)}")
    params = group["params"]
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                        "of tensors in sets will change between runs. Please use a list instead.")
    return list(params)


def _as_groups(params: Any) -> list:
    """``params`` in any form torch's optimizers take, as a list of groups whose "params" are lists
    (read once: a generator is consumed here). Torch's own errors for what it refuses."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {torch.typename(params)}")
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        return [{"params": groups}]
    for g in groups:
        if not isinstance(g, dict):
            raise TypeError(f"param_group must be a dict, but got {type(g)}")
    return [{**g, "params": _group_params(g)} for g in groups]


def _default_to_fused(groups: list[dict[str, Any]], adamw_kwargs: dict[str, Any]) -> bool:
    """Whether to pass ``fused=True``: every master on CUDA and no foreach/fused/differentiable choice."""
    chosen = ("foreach", "fused", "differentiable")
    if any(k in adamw_kwargs for k in chosen) or any(k in g for g in groups for k in chosen):
        return False
    tensors = [p[1] if isinstance(p, tuple) else p for g in groups for p in g["params"]]
    return all(isinstance(p, torch.Tensor) and p.device.type == "cuda" for p in tensors)


def _place_step(state: dict[str, Any], group: dict[str, Any], device: torch.device) -> None:
    """Move a kernel-stepped parameter's CPU ``step`` where torch's fused/capturable AdamW expects it
    (the master's device, as torch's load_state_dict would put it) before torch steps it."""
    step = state.get("step")
    if step is not None and (group.get("fused") or group.get("capturable")) and step.device != device:
        state["step"] = step.to(device, torch.float32)
