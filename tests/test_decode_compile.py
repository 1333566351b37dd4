"""torch.compile'd decode steps (flashlm.generation.cuda_graph with compile=...): issue 7.

CPU (inductor's C++ backend, fp32 tiny model, batch 2 left-padded): the compiled decode core
(``FlashForCausalLM.decode_logits``) gives the eager logits and greedy tokens step after step and
compiles once although the cache's host bookkeeping changes every step; the compiled ``DecodeStep``
records what the eager one records, appends to the cache in place (no copy of the cache in the
generated code), and raises on a recompile; ``generate(compile=True)`` samples like the eager path
from the same generator. CUDA (@pytest.mark.cuda): graph + compile gives the eager path's tokens
(fp32 exactly; bf16 exactly up to a near tie of two logits, where fused kernels may round the other
way), greedy at batch 1 and 3, and sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import pytest
import torch
from helpers import left_padded_prompts, make_pair, one_thread  # noqa: F401 (one_thread: autouse fixture)

from flashlm.generation import generate, main
from flashlm.generation.cuda_graph import (
    COMPILE_MODES,
    DecodeStep,
    SamplingKey,
    cache_capacity,
    compile_mode,
    kept_decode_steps,
    release_graphs,
)

PROMPTS = [[5, 17, 99, 3, 44, 7], [8, 120]]
STEPS = 10


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _prefill(flash, ids, mask, cache):
    out = flash(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------
def test_compiled_decode_logits_match_eager_and_compile_once():
    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    compiled = torch.compile(functools.partial(flash.decode_logits, compiled=True), fullgraph=True, dynamic=False)
    with torch.inference_mode():
        eager_cache, compiled_cache = flash.allocate_cache(2, 32), flash.allocate_cache(2, 32)
        tokens = _prefill(flash, ids, mask, eager_cache).argmax(-1)
        assert torch.equal(_prefill(flash, ids, mask, compiled_cache).argmax(-1), tokens)
        before = _unique_graphs()
        for _ in range(STEPS):
            logits = []
            for cache, fn in ((eager_cache, flash.decode_logits), (compiled_cache, compiled)):
                cache.check_room(2, 1)
                logits.append(fn(tokens[:, None], cache))
                cache.note_appended(2, 1)  # host bookkeeping changes every step: no guard may see it
            torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)
            assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))
            tokens = logits[0].argmax(-1)
        assert _unique_graphs() - before == 1  # compiled at the first step, never again
    assert compiled_cache.cache_seqlens.tolist() == eager_cache.cache_seqlens.tolist() == [6 + STEPS, 2 + STEPS]
    for layer in range(flash.config.num_layers):
        torch.testing.assert_close(compiled_cache.k[layer], eager_cache.k[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled_cache.v[layer], eager_cache.v[layer], atol=1e-5, rtol=0)
    # the eager core is the model's own decode forward
    with torch.inference_mode():
        cache = flash.allocate_cache(2, 32)
        first = _prefill(flash, ids, mask, cache).argmax(-1)
        via_forward = flash(first[:, None], past_key_values=cache).logits[:, -1]
        cache.reset()
        _prefill(flash, ids, mask, cache)
        cache.check_room(2, 1)
        assert torch.equal(flash.decode_logits(first[:, None], cache), via_forward)


def test_compiled_decode_step_matches_eager_step_in_place_and_refuses_recompiles():
    from torch._inductor.utils import run_and_get_code

    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    free = generate(flash, ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=[]).sequences
    eos = int(free[1, ids.shape[1] + 3])  # row 1 stops at its 4th new token: finished rows feed padding
    key = SamplingKey(eos_ids=(eos,), pad_token_id=0)
    capacity = 40  # a size no other buffer has: the generated code must not allocate a copy of the cache
    with torch.inference_mode():
        steps = {}
        for compile in (False, True):
            cache = flash.allocate_cache(2, capacity)
            step = steps[compile] = DecodeStep(flash, cache, 2, key, compile=compile)
            before = _unique_graphs()
            _, code = run_and_get_code(step.warm_up) if compile else (None, [])
            assert _unique_graphs() - before == int(compile)
            step.begin(_prefill(flash, ids, mask, cache))
            for _ in range(STEPS - 1):
                step()
            assert _unique_graphs() - before == int(compile)  # no recompile over the steps
        eager, compiled = steps[False], steps[True]
        for name in ("history", "tokens", "finished", "all_done", "step_idx"):
            assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
        assert compiled.cache.cache_seqlens.tolist() == eager.cache.cache_seqlens.tolist()
        assert compiled.cache.max_len_bound == eager.cache.max_len_bound == ids.shape[1] + STEPS - 1
        assert compiled.compile_mode == "default" and compiled.compile_s > 0 and eager.compile_s == 0
        assert bool(compiled.finished[1]) and int(compiled.history[1, 4]) == 0  # row 1 stopped
        # the append is in place: the attention op reads the cache the caller passed, never a copy
        code = "\n".join(code)
        assert "torch.ops.flashlm.kvcache_attention" in code
        assert f"(2, {capacity}," not in "\n".join(re.findall(r"empty_strided\w*\(\(.*", code))
        # a Python value the compiled body reads changed: a recompile, which raises instead of running
        compiled.key = dataclasses.replace(key, pad_token_id=5)
        with pytest.raises(Exception, match="recompile"):
            compiled()


def test_generate_compile_on_cpu_samples_like_eager():
    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "top_k": 40,
          "top_p": 0.9, "eos_token_id": []}
    g_eager, g_compiled = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    eager = generate(flash, ids, generator=g_eager, **kw)
    compiled = generate(flash, ids, generator=g_compiled, compile=True, **kw)
    assert compiled.compile_mode == "default" and compiled.capture_s > 0 and not compiled.cuda_graph
    assert eager.compile_mode is None
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(g_compiled.get_state(), g_eager.get_state())  # same draws, none for the warm-up


def test_compile_argument_errors():
    default, flash = make_pair()
    ids = torch.tensor([[5, 6, 7]])
    assert compile_mode(False) is None and compile_mode(None) is None and compile_mode(True) == "default"
    assert all(compile_mode(m) == m for m in COMPILE_MODES)
    for bad in ("reduce-overhead", "max-autotune"):  # torch.compile's own CUDA graphs: refused
        with pytest.raises(ValueError, match="captured by flashlm"):
            generate(flash, ids, max_new_tokens=2, compile=bad)
    with pytest.raises(ValueError, match="compile must be"):
        generate(flash, ids, max_new_tokens=2, compile="fast")
    with pytest.raises(ValueError, match="needs the flash model"):
        generate(default, ids, max_new_tokens=2, compile=True)
    with pytest.raises(ValueError, match="needs the flash model"):
        DecodeStep(default, flash.allocate_cache(1, 8), 1, SamplingKey(), compile=True)
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--prompt-ids", "5", "--device", "cpu", "--compile", "fast"])


def test_cli_compile_graph_only_on_cpu_falls_back(capsys):
    assert main(["--model", "tiny", "--prompt-ids", "5,17,99", "--max-new-tokens", "3", "--device", "cpu",
                 "--compile", "graph", "--json"]) == 0
    captured = capsys.readouterr()
    assert "--compile" in captured.err and "eager" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["cuda_graph"] is False and result["compile_mode"] is None


# --------------------------------------------------------------------------------------------------
# CUDA: graph + compile
# --------------------------------------------------------------------------------------------------
GPU_MODEL = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}
GPU_PROMPTS = [[5, 17, 99, 3, 44, 7], [8, 120], [33, 61, 200, 9]]
BF16_TIE = 0.02  # |eager logit gap| under which bf16 kernels that round differently may pick either token


def _eager_step_logits(flash, ids, mask, new_tokens):
    """The eager path's logits at every step, fed its own tokens: (steps, batch, vocab) fp32 (the cache
    capacity generate uses: the attention kernel splits the keys by capacity)."""
    cache = flash.allocate_cache(ids.shape[0], cache_capacity(ids.shape[1] + new_tokens.shape[1]))
    logits = [_prefill(flash, ids, mask, cache)]
    for t in range(new_tokens.shape[1] - 1):
        logits.append(flash(new_tokens[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits).float()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [GPU_PROMPTS[:1], GPU_PROMPTS], ids=["batch1", "batch3-left-padded"])
def test_graph_compile_greedy_tokens_equal_eager(dtype, rows):
    _, flash = make_pair("cuda", dtype, **GPU_MODEL)
    ids, mask = left_padded_prompts(rows, "cuda")
    kw = {"attention_mask": mask, "max_new_tokens": 24, "eos_token_id": []}
    eager = generate(flash, ids, cuda_graph=False, **kw)
    fast = generate(flash, ids, cuda_graph=True, compile=True, **kw)
    assert fast.cuda_graph and fast.compile_mode == "default" and fast.capture_s > 0
    step = kept_decode_steps(flash)[ids.shape[0]]
    again = generate(flash, ids, cuda_graph=True, compile=True, **kw)
    # the decode step reused, not re-captured (an unpadded prompt's prefill graph is captured on this
    # second use: capture_s counts it), and replayed alike
    assert kept_decode_steps(flash)[ids.shape[0]] is step and torch.equal(again.sequences, fast.sequences)
    assert again.prefill_graph == bool(mask.all())  # an all-ones mask is no padding
    width = ids.shape[1]
    got, want = fast.sequences[:, width:], eager.sequences[:, width:]
    if dtype == torch.float32 or torch.equal(got, want):
        assert torch.equal(got, want)
    else:  # bf16: equal up to the first step where the two picks nearly tie in the eager logits
        with torch.inference_mode():
            logits = _eager_step_logits(flash, ids, mask, want)
        t = int((got != want).any(0).nonzero()[0])
        rows_off = (got[:, t] != want[:, t]).nonzero().flatten()
        gap = logits[t, rows_off, want[rows_off, t]] - logits[t, rows_off, got[rows_off, t]]
        assert float(gap.max()) <= BF16_TIE, (f"step {t}: compiled picked {got[rows_off, t].tolist()}, eager "
                                              f"{want[rows_off, t].tolist()}, eager logit gaps {gap.tolist()}")
    assert release_graphs(flash) == 1


@pytest.mark.cuda
def test_graph_compile_samples_like_eager_with_the_same_generator():
    _, flash = make_pair("cuda", torch.float32, **GPU_MODEL)
    ids, mask = left_padded_prompts(GPU_PROMPTS, "cuda")
    kw = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": True, "temperature": 1.3, "top_k": 40,
          "top_p": 0.9, "eos_token_id": []}
    g_eager = torch.Generator("cuda").manual_seed(3)
    g_fast = torch.Generator("cuda").manual_seed(3)
    eager = generate(flash, ids, generator=g_eager, cuda_graph=False, **kw)
    fast = generate(flash, ids, generator=g_fast, cuda_graph=True, compile=True, **kw)
    assert fast.cuda_graph and fast.compile_mode == "default"
    assert torch.equal(fast.sequences, eager.sequences)
    assert torch.equal(g_fast.get_state(), g_eager.get_state())
    release_graphs(flash)
