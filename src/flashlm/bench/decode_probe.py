"""`flashlm bench decode-probe`: the measurements that pick the decode path's kernels and configs (CUDA only).

    flashlm bench decode-probe [--parts kernel,ops,prefill] [--output probe_decode.json]

- ``kernel``: the Triton split-KV decode kernel (``attn_decode``) at the llama-1b attention shape
  (32 query / 8 kv heads, head_dim 64, bf16) for batch 1/8/32 x context 128/2k/8k (cache capacity
  rounded up as generation does), swept over ``num_splits`` x ``block_n`` x ``num_warps``; each timed
  as a CUDA-graph replay (GPU time, no launch cost).
- ``ops``: the per-token elementwise ops of a decode step, eager vs fused, timed the same way at batch
  1 and 32: add + RMSNorm (aten's two kernels vs our one), SwiGLU (torch vs ours), the k/v cache append
  (two ``index_put_``), greedy argmax over a 128k vocab.
- ``prefill``: where the first token's time goes, llama-1b batch 1 x 128: the prefill forward into an
  empty static cache vs a plain forward (medians, synchronized), ``generate``'s first token (the median
  time of a one-token call, CUDA graph), and one profiled prefill: kernels, GPU time, CPU ops by self time.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from flashlm.bench.cli_common import (
    add_cuda_only_flags,
    names,
    parser_from_doc,
    resolve_cuda_only,
    subcommand_main,
)
from flashlm.bench.profiling import cuda_kernels, kernel_time_ms, profile_call
from flashlm.bench.timing import graph_replay_s, time_calls

PARTS = ("kernel", "ops", "prefill")


def _graph_us(fn) -> float:
    return graph_replay_s(fn) * 1e6


def _kernel_point(batch: int, ctx: int, rows: list[dict]) -> None:
    """Every (block_n, warps, splits) of one (batch, context) into ``rows``; prints today's vs the best."""
    from flashlm.attention.backends.triton.decode import attn_decode
    from flashlm.generation.cuda_graph import cache_capacity

    heads, kv_heads, dim = 32, 8, 64
    cap = cache_capacity(ctx + 32)  # as generate sizes the cache for 32 new tokens
    q = torch.randn(batch, 1, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, cap, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
    point = []
    for block_n in (32, 64, 128):
        for warps in (2, 4):
            for splits in (0, 1, 2, 4, 8, 16, 32, 64):
                if splits > max(1, cap // block_n):
                    continue
                us = _graph_us(functools.partial(attn_decode, q, k, v, seqlens, None, None, None, dim ** -0.5, True,
                                                 -1, -1, 0.0, None, splits, block_n=block_n, num_warps=warps))
                point.append({"batch": batch, "context": ctx, "capacity": cap, "block_n": block_n,
                              "num_warps": warps, "num_splits": splits, "us": us, "gb_per_s": kv_bytes / us / 1e3})
    best = min(point, key=lambda r: r["us"])
    auto = next(r for r in point if r["num_splits"] == 0 and r["block_n"] == 128 and r["num_warps"] == 4)
    print(f"decode kernel b{batch} ctx{ctx}: today (auto, 128, 4w) {auto['us']:.1f} us; best {best['us']:.1f} us "
          f"(block_n {best['block_n']}, {best['num_warps']} warps, splits {best['num_splits']}), "
          f"{best['gb_per_s']:.0f} GB/s", flush=True)
    rows += point


def probe_kernel() -> list[dict]:
    rows: list[dict] = []
    for batch in (1, 8, 32):
        for ctx in (128, 2048, 8192):
            _kernel_point(batch, ctx, rows)
    return rows


def _argmax_two_stage(logits: torch.Tensor, group: int = 256) -> torch.Tensor:
    b, v = logits.shape
    vals, idx = logits.view(b, v // group, group).max(-1)
    g = vals.argmax(-1, keepdim=True)
    return (g * group + idx.gather(-1, g)).squeeze(-1)


def _op_cases(batch: int) -> dict:
    from flashlm import ops

    hidden, inter, vocab, kv_heads, dim = 2048, 8192, 128256, 8, 64
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(batch, 1, hidden, **bf)
    res = torch.randn_like(x)
    w = torch.ones(hidden, **bf)
    gate_up = torch.randn(batch, 1, 2 * inter, **bf)
    logits = torch.randn(batch, vocab, **bf)
    cache = torch.zeros(batch, 512, kv_heads, dim, **bf)
    kv = torch.randn(batch, 1, kv_heads, dim, **bf)
    idx = (torch.arange(batch, device="cuda")[:, None], torch.full((batch, 1), 130, device="cuda"))
    return {
        "add_rms_norm aten": lambda: ops.add_rms_norm_aten(x, res, w, 1e-5),
        "add_rms_norm triton": lambda: ops.add_rms_norm(x, res, w, 1e-5),
        "swiglu torch": lambda: ops.swiglu_ref(gate_up),
        "swiglu triton": lambda: ops.swiglu(gate_up),
        "cache append index_put x2": lambda: (cache.index_put_(idx, kv), cache.index_put_(idx, kv)),
        "argmax": lambda: logits.argmax(-1),
        "argmax two-stage": lambda: _argmax_two_stage(logits),
    }


def probe_ops() -> list[dict]:
    rows = []
    for batch in (1, 32):
        for name, fn in _op_cases(batch).items():
            us = _graph_us(fn)
            rows.append({"batch": batch, "op": name, "us": us})
            print(f"ops b{batch}: {name:28s} {us:7.2f} us", flush=True)
    return rows


def probe_prefill() -> dict:
    from flashlm.generation import generate
    from flashlm.models import build_model

    torch.manual_seed(0)
    model = build_model("llama-1b", attn="flash", device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    cache = model.allocate_cache(1, 256)

    @torch.no_grad()
    def prefill():
        model(ids, past_key_values=cache.reset(), use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def plain():
        model(ids, logits_to_keep=1)

    for _ in range(3):
        prefill(), plain()
    res = {"prefill_ms": time_calls(prefill, iters=15, device="cuda").median_ms,
           "plain_forward_ms": time_calls(plain, iters=15, device="cuda").median_ms}
    kw = {"max_new_tokens": 1, "eos_token_id": [], "cuda_graph": True}
    res["generate_first_token_ms"] = time_calls(lambda: generate(model, ids, **kw), warmup=2, iters=7,
                                                device="cuda").median_ms
    prof, _ = profile_call(prefill, torch.device("cuda"))
    kernels = cuda_kernels(prof)
    res.update(kernels=len(kernels), gpu_ms=kernel_time_ms(kernels),
               cpu_table=prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    print(f"prefill b1x128: {res['prefill_ms']:.2f} ms (plain forward {res['plain_forward_ms']:.2f} ms), "
          f"generate first token {res['generate_first_token_ms']:.2f} ms; {res['kernels']} kernels, "
          f"GPU {res['gpu_ms']:.2f} ms", flush=True)
    print(res["cpu_table"], flush=True)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = parser_from_doc("flashlm bench decode-probe", __doc__)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list among {', '.join(PARTS)}")
    add_cuda_only_flags(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.parts = names(args.parts, "--parts", PARTS)
    resolve_cuda_only(args, "flashlm bench decode-probe (CUDA-graph replays of the decode kernels)")
    return args


def run(args: argparse.Namespace) -> int:
    from flashlm.bench.report import write_json

    probes = {"ops": probe_ops, "prefill": probe_prefill, "kernel": probe_kernel}
    with torch.cuda.device(args.device):
        res = {"device": torch.cuda.get_device_name()}
        for part in ("ops", "prefill", "kernel"):  # the long kernel sweep last
            if part in args.parts:
                res[part] = probes[part]()
    if args.output:
        write_json(res, args.output)
    return 0


main = subcommand_main("flashlm bench decode-probe", parse_args, run)


if __name__ == "__main__":
    sys.exit(main())
