"""Ahead-of-time compilation of our Triton kernels for Hopper (sm90) on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), which
executes a kernel's Python and accepts code the compiler refuses (a variable whose type changes across
an if/else, a dot inside a branch, ...). ``triton.compile`` of an ``ASTSource`` for
``GPUTarget("cuda", 90, 32)`` runs the frontend, the TTIR/TTGIR passes, LLVM and ptxas without a
device, and so catches those errors on CPU.

The interpreter is chosen when a kernel is decorated, so the compile runs in a fresh process whose
environment lacks TRITON_INTERPRET: a test calls :func:`run_aot` with a script that imports
:func:`compile_sm90` from this module (pytest puts tests/ on sys.path; the subprocess gets it on
PYTHONPATH) and prints ``compiled`` at its end.
"""

from __future__ import annotations

import os
import subprocess
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_TESTS), "src")


def signature(jit, consts: dict, ptrs: dict | None = None, default_ptr: str = "*fp16",
              scalars: dict | None = None) -> tuple[dict, dict]:
    """(signature, constexprs) for ``ASTSource`` from a kernel's parameter names: constexprs from
    ``consts`` (every one must be given), pointers (our kernels capitalise their names) from ``ptrs``
    else ``default_ptr``, scalars from ``scalars`` else ``"i32"``."""
    ptrs, scalars = ptrs or {}, scalars or {}
    sig, cx = {}, {}
    for p in jit.params:
        if p.is_constexpr:
            sig[p.name], cx[p.name] = "constexpr", consts[p.name]
        elif p.name[0].isupper():
            sig[p.name] = ptrs.get(p.name, default_ptr)
        else:
            sig[p.name] = scalars.get(p.name, "i32")
    return sig, cx


def compile_sm90(jit, consts: dict, ptrs: dict | None = None, default_ptr: str = "*fp16",
                 scalars: dict | None = None, num_warps: int = 4, num_stages: int = 3):
    """Compile ``jit`` (a ``triton.jit`` function, not interpreted) for sm90 down to a cubin; raise
    (``triton.compiler.errors.CompilationError`` or a pass/ptxas failure) naming the variant if it fails.
    Arguments as :func:`signature`. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, cx = signature(jit, consts, ptrs, default_ptr, scalars)
    try:
        compiled = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=cx),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:
        raise RuntimeError(f"{jit.__name__} with {cx} and {sig} fails to compile for sm90") from e
    assert compiled.asm["cubin"], jit.__name__
    return compiled


def run_aot(script: str, timeout: float = 600) -> str:
    """Run ``script`` in a subprocess without TRITON_INTERPRET (src/ and tests/ on its path); skip the
    calling test without triton's NVIDIA backend or ptxas; fail with the script's stderr unless it
    exits 0 having printed ``compiled``. Returns its stdout."""
    import pytest

    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, _TESTS, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    res = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
    return res.stdout
