"""Every Triton kernel of flashlm.ops compiles for Hopper (sm90), ahead of time, without a GPU.

The other CPU tests run these kernels in Triton's interpreter, which accepts code the compiler refuses;
here each forward and backward kernel is compiled with triton.compile (frontend, TTGIR passes, ptxas)
in every constexpr variant its launcher uses and with the pointer dtypes the launcher passes for fp16,
bf16 and fp32 inputs (and an fp32 norm weight under half inputs). The script also fails when a kernel
in flashlm.ops has no case here, so a new kernel cannot go unchecked.
"""

from triton_aot import run_aot

_SCRIPT = r"""
import importlib
import pkgutil

import triton
import torch
from triton_aot import compile_sm90

import flashlm.ops
from flashlm._util import next_pow2
from flashlm.ops._dispatch import row_warps

rms = importlib.import_module("flashlm.ops.rms_norm")
swi = importlib.import_module("flashlm.ops.swiglu")
rot = importlib.import_module("flashlm.ops.rotary")
ce = importlib.import_module("flashlm.ops.cross_entropy")
i8 = importlib.import_module("flashlm.ops.int8_linear")

DTYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
done, count = set(), 0


def build(jit, consts, ptrs, num_warps=4):
    global count
    compile_sm90(jit, consts, ptrs, scalars={"eps": "fp32"}, num_warps=num_warps)
    done.add(jit)
    count += 1


# rms_norm / add_rms_norm: _launch_fwd / _launch_bwd. Weight in x's dtype or fp32; y (and so the
# backward's dy) in x's dtype with OFFSET, else promote(x, weight); ds is dy's buffer without HAS_DRES.
block = next_pow2(2048)
for xd in DTYPES:
    for wd in {xd, torch.float32}:
        for res in (False, True):
            for off in (False, True):
                x, w = DTYPES[xd], DTYPES[wd]
                y = x if off else DTYPES[torch.promote_types(xd, wd)]
                consts = {"BLOCK": block, "OFFSET": off}
                build(rms._fwd_kernel, {**consts, "HAS_RES": res},
                      {"X": x, "R": x, "W": w, "Y": y, "S": x, "RSTD": "*fp32"}, row_warps(block))
                build(rms._bwd_kernel, {**consts, "HAS_DRES": res},
                      {"DY": y, "DS": x if res else y, "X": x, "W": w, "RSTD": "*fp32", "DX": x,
                       "DW": "*fp32"}, row_warps(block))

# swiglu: one dtype for all tensors; BLOCK = min(next_pow2(I), 1024), triton's default 4 warps
for xd, p in DTYPES.items():
    build(swi._fwd_kernel, {"BLOCK": min(next_pow2(5632), swi._BLOCK)}, dict.fromkeys(("GU", "OUT"), p))
    for store_act in (False, True):  # swiglu's backward; swiglu_linear's (also writes the activation)
        build(swi._bwd_kernel, {"BLOCK": min(next_pow2(5632), swi._BLOCK), "STORE_ACT": store_act},
              dict.fromkeys(("DO", "GU", "DGU", "ACT"), p))

# rotary_qkv / rotary: x's dtype, fp32 cos/sin tables; a power-of-two head_dim and one that is not
for xd, p in DTYPES.items():
    ptrs = {**dict.fromkeys(("X", "OUT", "GQ", "GK", "GV", "DQKV"), p), "COS": "*fp32", "SIN": "*fp32"}
    for head_dim in (128, 80):
        consts = {"HALF": head_dim // 2, "BLOCK_D": next_pow2(head_dim // 2), "BLOCK_H": rot._MAX_BLOCK_H}
        # rotary: full and partial rotary_dim (the tail copied), half-split and interleaved pairs
        for r2 in (head_dim // 2, head_dim // 4):
            tail = head_dim - 2 * r2
            for inter in (False, True):
                for conj in (False, True):
                    build(rot._fwd_kernel, {"HEAD_DIM": head_dim, "R2": r2, "BLOCK_D": next_pow2(r2),
                                            "BLOCK_TAIL": next_pow2(tail) if tail else 0,
                                            "BLOCK_H": rot._MAX_BLOCK_H, "INTERLEAVED": inter,
                                            "CONJUGATE": conj}, ptrs)
        build(rot._qkv_bwd_kernel, consts, ptrs)
        # rotary_qkv_append: q buffer and caches in x's dtype, int64 slots (the model's)
        build(rot._append_kernel, consts, {**dict.fromkeys(("X", "Q", "KC", "VC"), p), "COS": "*fp32",
                                           "SIN": "*fp32", "SLOTS": "*i64"})

# logits_cross_entropy's row kernel: logits in the input dtype (overwritten by their gradient), int64
# targets (the model's), fp32 row losses, the int64 count of valid targets; BLOCK min(next_pow2(V),
# MAX_BLOCK) with row_warps(BLOCK) warps, at vocab 32000 (two steps per row) and 1000 (one)
for xd, p in DTYPES.items():
    for vocab in (32000, 1000):
        blk = min(next_pow2(vocab), ce.MAX_BLOCK)
        for mean, grad in ((True, True), (False, True), (True, False), (False, False)):
            build(ce._ce_rows_kernel, {"MEAN": mean, "GRAD": grad, "BLOCK": blk},
                  {"X": p, "Y": "*i64", "LOSS": "*fp32", "NVALID": "*i64"}, row_warps(blk))

# int8_linear: x / bias / y in x's dtype (fp16, bf16; fp32 in tests), int8 weight, fp32 scales; every
# CONFIGS tile (the GEMV's BLOCK_N also at its floor, pick_config's halving), even and ragged K, with
# and without bias; the split-K partials (fp32 Y) and the SwiGLU prologue in bf16; the split reduce.
# In bf16 also the decode_linear forms: a bf16 weight without scales (HAS_SCALE False), and the RMSNorm
# prologue (NORM: residual R / h out H in x's dtype, norm weight G, fp32 split sums of squares SS) with
# and without the residual, Gemma's offset, split and not, over int8 and bf16 weights.
# M, N, K, K_SPLIT, MN are capitalised but scalars: their types given with the pointers'
scalars = {"M": "i32", "N": "i32", "K": "i32", "K_SPLIT": "i32", "MN": "i32"}
for xd, p in DTYPES.items():
    for cfg in i8.CONFIGS.values():
        gemv = cfg.block_m == 1
        kernel = i8._gemv_kernel if gemv else i8._mm_kernel
        for block_n in ({cfg.block_n, i8.MIN_BLOCK_N[1]} if gemv else {cfg.block_n}):
            extra = {} if gemv else {"BLOCK_M": cfg.block_m, "PRECISION": "ieee" if xd == torch.float32 else "tf32"}
            # (has_bias, even_k, split, swiglu, weight, norm: None or (has_res, offset))
            variants = [(b, e, False, False, "*i8", None) for b in (False, True) for e in (False, True)]
            if xd == torch.bfloat16:
                variants += [(False, e, sp, sw, "*i8", None) for e in (False, True)
                             for sp, sw in ((True, False), (False, True), (True, True))]
                variants += [(False, True, sp, sw, p, None) for sp, sw in ((False, False), (True, False), (True, True))]
                if cfg.block_m <= 64:  # the decode buckets (decode_linear.FUSED_MAX_M), where the norm fuses
                    variants += [(False, e, sp, False, wt, (res, off)) for wt in ("*i8", p) for e in (False, True)
                                 for sp, res, off in ((False, True, False), (True, True, False), (True, False, True))]
            for has_bias, even_k, split, swiglu, weight, norm in variants:
                consts = {"BLOCK_N": block_n, "BLOCK_K": cfg.block_k, "HAS_BIAS": has_bias, "EVEN_K": even_k,
                          "SPLIT": split, "SWIGLU": swiglu, "HAS_SCALE": weight == "*i8", "NORM": norm is not None,
                          "HAS_RES": bool(norm and norm[0]), "OFFSET": bool(norm and norm[1]), **extra}
                ptrs = {"X": p, "W": weight, "S": "*fp32", "B": p, "Y": "*fp32" if split else p, "R": p, "G": p,
                        "H": p, "SS": "*fp32", **scalars}
                build(kernel, consts, ptrs, cfg.num_warps)
    for split_k in (2, 8):
        for has_bias, has_scale, norm in ((False, True, False), (True, True, False), (False, False, True),
                                          (False, True, True)):
            build(i8._split_reduce_kernel, {"SPLIT_K": split_k, "HAS_BIAS": has_bias, "HAS_SCALE": has_scale,
                                            "NORM": norm, "BLOCK": 1024},
                  {"P": "*fp32", "S": "*fp32", "B": p, "Y": p, "SS": "*fp32", **scalars})
done |= {i8._load_x, i8._norm_x}  # device functions: compiled inside the GEMV / tl.dot kernels above

done.add(rot._rotated_heads)  # a device function: compiled inside _fwd_kernel and _append_kernel above

kernels = set()
for info in pkgutil.iter_modules(flashlm.ops.__path__):
    mod = importlib.import_module(f"flashlm.ops.{info.name}")
    kernels |= {v for v in vars(mod).values() if isinstance(v, triton.runtime.jit.JITFunction)}
missing = sorted(f"{k.__module__}.{k.__name__}" for k in kernels - done)
assert not missing, f"kernels with no AOT case in tests/ops/test_ops_aot.py: {missing}"
print("compiled", count, "variants of", len(done), "kernels")
"""


def test_ops_kernels_compile_for_sm90():
    """rms_norm, add_rms_norm, swiglu (and swiglu_linear's backward), rotary_qkv and rotary kernels (forward
    and backward), logits_cross_entropy's row kernel and int8_linear's GEMV / tl.dot / split-reduce kernels compile for sm90 in each variant and dtype their launchers use (the interpreter would not catch an error the
    compiler reports, e.g. a variable whose type changes across an if/else)."""
    run_aot(_SCRIPT)
