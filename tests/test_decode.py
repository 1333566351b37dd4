"""Fixed-shape decode steps (flashlm.generation.cuda_graph) and generate(cuda_graph=...): issue 7.

CPU: the graph-free path (the same DecodeStep that the GPU captures) gives the tokens of the default
model and of a cache-free loop, with left padding and per-row EOS; the cache's host bookkeeping; the
argument checks. CUDA (@pytest.mark.cuda): the graph path gives the eager path's tokens (greedy and
sampled) at batch 1 and 4 with left padding, and a replayed / eager decode step makes no host sync.
"""

from __future__ import annotations

import gc
import json
import logging
import weakref

import pytest
import torch
from helpers import left_padded_prompts, make_pair, naive_greedy

from flashlm.errors import InputError
from flashlm.generation import generate, main
from flashlm.generation.cuda_graph import (
    CUDAGraphDecodeStep,
    DecodeStep,
    SamplingKey,
    cache_capacity,
    capture_stream,
    graph_unavailable_reason,
    graphed_decode_step,
    kept_decode_steps,
    release_graphs,
)
from flashlm.models.config import get_preset
from flashlm.models.kv_cache import StaticKVCache

PROMPTS = [[5, 17, 99, 3, 44, 7], [8, 120], [33, 61, 200, 9], [250]]


# --------------------------------------------------------------------------------------------------
# CPU: the graph-free path
# --------------------------------------------------------------------------------------------------
def test_decode_step_left_padded_matches_default_and_cache_free_loop():
    default, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    with torch.inference_mode():
        cache = flash.allocate_cache(4, 32)
        step = DecodeStep(flash, cache, 4, SamplingKey())
        out = flash(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step.begin(out.logits[:, -1])
        for _ in range(6):
            step()
    assert int(step.step_idx) == 7
    assert cache.cache_seqlens.tolist() == [len(p) + 6 for p in PROMPTS]  # left-aligned rows, +1 per step
    assert cache.max_len_bound == ids.shape[1] + 6
    tokens = step.new_tokens(7)
    for row, prompt in enumerate(PROMPTS):
        assert tokens[row].tolist() == naive_greedy(flash, prompt, 7)
    ref = generate(default, ids, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    assert torch.equal(tokens, ref.sequences[:, ids.shape[1]:])


def test_decode_step_with_our_kernels_matches_the_torch_ops():
    """kernels="triton" (the interpreter, fp32): the decode step's fused RoPE + cache append, add +
    RMSNorm and SwiGLU kernels give the torch ops' greedy tokens and the same cache contents."""
    torch.manual_seed(0)
    _, ref = make_pair()
    ours = type(ref)(get_preset("tiny", kernels="triton")).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.model.op_sets["decode"].names["rotary_qkv_append"] == "triton"
    # a kvcache backend is bound, so the steps take _decode_step (the fused append), not index_put_
    assert ours.model.layers[0].self_attn.backends.get(("kvcache", torch.float32, False, False)) is not None
    ids, mask = left_padded_prompts(PROMPTS[:2])
    runs = []
    for model in (ref, ours):
        with torch.inference_mode():
            cache = model.allocate_cache(2, 16)
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            step = DecodeStep(model, cache, 2, SamplingKey())
            step.begin(out.logits[:, -1])
            for _ in range(5):
                step()
        runs.append((step.new_tokens(6), cache))
    assert torch.equal(runs[1][0], runs[0][0])
    for layer in range(ref.config.num_layers):
        torch.testing.assert_close(runs[1][1].k[layer], runs[0][1].k[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runs[1][1].v[layer], runs[0][1].v[layer], atol=1e-5, rtol=1e-5)


def test_cuda_graph_auto_on_cpu_is_the_eager_path_and_says_why(caplog):
    default, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    a = generate(flash, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], cuda_graph=False)
    with caplog.at_level(logging.INFO, logger="flashlm.generation"):
        b = generate(flash, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])  # "auto" by default
    c = generate(flash, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], max_cache_len=12)
    assert not a.cuda_graph and not b.cuda_graph and a.capture_s == 0.0
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)
    assert a.graph_fallback == "cuda_graph=False" and a.decode_path == "eager"
    assert "CUDA graphs need a CUDA device; the inputs are on cpu" in b.graph_fallback
    # said once per reason in the log (a loop of calls does not repeat it), always in the result
    assert sum("CUDA graphs need a CUDA device" in r.getMessage() for r in caplog.records) <= 1
    assert c.graph_fallback == b.graph_fallback
    d = generate(default, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert not d.cuda_graph and "needs the flash model" in d.graph_fallback


def test_cuda_graph_true_where_it_cannot_work_is_an_input_error():
    default, flash = make_pair()
    ids = torch.tensor([[5, 6, 7]])
    for model, why in ((flash, "CUDA graphs need a CUDA device"), (default, "CUDA-graph decoding needs the flash")):
        with pytest.raises(InputError, match=f"cuda_graph=True: {why}"):
            generate(model, ids, max_new_tokens=3, cuda_graph=True)
    with pytest.raises(RuntimeError, match="cuda_graph must be"):  # catchable as flash-attn's error type
        generate(flash, ids, cuda_graph="yes")


def test_per_row_eos_finished_rows_emit_padding():
    default, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    free = generate(flash, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).sequences[:, ids.shape[1]:]
    eos = int(free[1, 1])  # row 1 stops at its second token; other rows wherever that id shows up
    out = generate(flash, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[eos, 255], pad_token_id=0)
    ref = generate(default, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[eos, 255], pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.num_new_tokens, ref.num_new_tokens)
    got = out.sequences[:, ids.shape[1]:]
    for row in range(len(PROMPTS)):
        hits = [i for i, t in enumerate(free[row].tolist()) if t in (eos, 255)]
        stop = hits[0] + 1 if hits else 8
        assert int(out.num_new_tokens[row]) == stop
        assert got[row, :stop].tolist() == free[row, :stop].tolist()
        assert (got[row, stop:] == 0).all()
    assert got.shape[1] == int(out.num_new_tokens.max())  # steps after the last EOS are dropped


def test_finished_rows_feed_padding_and_all_done_flag():
    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS[:2])
    first = generate(flash, ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[]).sequences[:, -1]
    with torch.inference_mode():
        cache = flash.allocate_cache(2, 16)
        step = DecodeStep(flash, cache, 2, SamplingKey(eos_ids=(int(first[0]),), pad_token_id=7))
        out = flash(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step.begin(out.logits[:, -1])
        assert step.finished.tolist() == [True, int(first[1]) == int(first[0])]
        step()
    assert step.tokens[0] == 7 and step.history[0, 1] == 7  # row 0 finished: it feeds padding
    assert bool(step.all_done) == bool(step.finished.all())


def test_cache_host_bookkeeping_for_replayed_steps():
    cache = StaticKVCache(2, 3, 8, 2, 4)
    cache.prepare_for_capture(2)
    assert not cache.is_empty and cache.cache_seqlens.tolist() == [0, 0, 0]
    cache.reset().advance(2, torch.tensor([5, 3], dtype=torch.int32), 5)  # a prefill
    for _ in range(3):  # what a graph replay's caller records (the device half ran in the graph)
        cache.check_room(2, 1)
        cache.note_appended(2, 1)
    assert cache.max_len_bound == 8 and cache.cache_seqlens[:2].tolist() == [5, 3]
    with pytest.raises(ValueError, match="room for 8 tokens"):
        cache.check_room(2, 1)
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.prepare_for_capture(4)


def test_prefill_logits_is_the_forward_of_an_unpadded_prompt():
    _, flash = make_pair()
    ids = torch.tensor([PROMPTS[0], PROMPTS[2] + [1, 2]])
    with torch.inference_mode():
        cache, other = flash.allocate_cache(2, 16), flash.allocate_cache(2, 16)
        want = flash(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        other.check_room(2, ids.shape[1])
        got = flash.prefill_logits(ids, other)
        assert other.max_len_bound == 0  # the host half is the caller's
        other.note_appended(2, ids.shape[1])
        assert torch.equal(got, want) and torch.equal(other.cache_seqlens, cache.cache_seqlens)
        for layer in range(flash.config.num_layers):
            assert torch.equal(other.k[layer], cache.k[layer]) and torch.equal(other.v[layer], cache.v[layer])
        with pytest.raises(ValueError, match="empty cache"):
            flash.prefill_logits(ids, other)


def test_a_kept_decode_step_does_not_keep_its_model_alive():
    """Captured steps live in a table keyed weakly by the model (not in model.__dict__), and a step
    holds its model weakly: dropping the model drops its entry; the orphaned step says why it cannot run."""
    from flashlm.generation import cuda_graph

    _, flash = make_pair()
    step = DecodeStep(flash, flash.allocate_cache(1, 16), 1, SamplingKey())
    cuda_graph._KEPT[flash] = {1: step}
    assert kept_decode_steps(flash) == {1: step} and step.model is flash
    ref = weakref.ref(flash)
    del flash
    gc.collect()
    assert ref() is None and ref not in [weakref.ref(m) for m in cuda_graph._KEPT]
    with pytest.raises(RuntimeError, match="deleted"):
        step()


def test_capacity_and_argument_errors():
    assert cache_capacity(10) == 256 and cache_capacity(256) == 256 and cache_capacity(257) == 512
    assert cache_capacity(10, 12) == 12
    with pytest.raises(ValueError, match="max_cache_len"):
        cache_capacity(10, 9)
    _, flash = make_pair()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_cache_len"):
        generate(flash, ids, max_new_tokens=4, max_cache_len=6)
    assert "CUDA device" in graph_unavailable_reason(flash, torch.device("cpu"), SamplingKey())
    assert release_graphs(flash) == 0
    with pytest.raises(ValueError, match="CUDA graphs need"):
        graphed_decode_step(flash, 1, 8, SamplingKey(), device="cpu")


def test_cli_compile_on_cpu_falls_back_with_a_note(capsys):
    assert main(["--model", "tiny", "--prompt-ids", "5,17,99", "--prompt-ids", "8", "--max-new-tokens", "4",
                 "--device", "cpu", "--compile", "--json", "--no-eos"]) == 0
    captured = capsys.readouterr()
    assert "--compile" in captured.err and "eager" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["cuda_graph"] is False and result["num_new_tokens"] == [4, 4]
    assert result["decode_path"] == "eager" and "CUDA device" in result["graph_fallback"]


def test_cli_cuda_graph_flag_on_cpu(capsys):
    base = ["--model", "tiny", "--prompt-ids", "5,17,99", "--max-new-tokens", "3", "--device", "cpu"]
    assert main(base) == 0  # --cuda-graph auto (default): eager, and the line says why
    assert "eager decode: CUDA graphs need a CUDA device" in capsys.readouterr().out
    assert main([*base, "--cuda-graph", "on"]) == 2
    assert "cuda_graph=True: CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert main([*base, "--cuda-graph", "off", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["graph_fallback"] == "cuda_graph=False"


# --------------------------------------------------------------------------------------------------
# CUDA: the graph path
# --------------------------------------------------------------------------------------------------
GPU_MODEL = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch4-left-padded"])
def test_graph_greedy_identical_to_eager(rows):
    _, flash = make_pair("cuda", torch.bfloat16, **GPU_MODEL)
    ids, mask = left_padded_prompts(rows, "cuda")
    eager = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], cuda_graph=False)
    graph = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], cuda_graph=True)
    assert graph.cuda_graph and graph.capture_s > 0 and not eager.cuda_graph
    assert torch.equal(graph.sequences, eager.sequences)
    step = kept_decode_steps(flash)[ids.shape[0]]
    assert not [k for k, v in vars(flash).items() if isinstance(v, dict) and step in v.values()]  # not on the model
    again = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], cuda_graph=True)
    assert kept_decode_steps(flash)[ids.shape[0]] is step  # reused, not re-captured
    third = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], cuda_graph=True)
    assert third.capture_s == 0.0  # nothing captured once the prompt shape was seen twice
    assert torch.equal(again.sequences, eager.sequences)
    # per-row EOS through the graph: the same rows stop at the same tokens
    eos = [int(eager.sequences[-1, ids.shape[1] + 3])]
    e = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos, cuda_graph=False)
    g = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos, cuda_graph=True)
    assert torch.equal(g.sequences, e.sequences) and torch.equal(g.num_new_tokens, e.num_new_tokens)
    assert release_graphs(flash) == 1


@pytest.mark.cuda
def test_captures_share_one_stream_and_leave_little_memory_behind():
    """Every warm-up and capture runs on one stream per card: cuBLAS keeps a 32 MiB workspace per stream
    it ran on, so captures for several batch sizes and prompt lengths (decode steps and prefills) must not
    leave a workspace each once their graphs are released."""
    dev = torch.device("cuda", torch.cuda.current_device())
    assert capture_stream(dev) is capture_stream(torch.device("cuda"))
    _, flash = make_pair("cuda", torch.bfloat16, **GPU_MODEL)
    ids, _ = left_padded_prompts(PROMPTS, "cuda")
    generate(flash, ids[:1], max_new_tokens=4, eos_token_id=[], cuda_graph=True)  # first captures, stream made
    release_graphs(flash)
    before = torch.cuda.memory_allocated()
    for rows in (1, 2, 4):
        for length in (5, 9):
            for _ in range(2):  # a prefill graph is captured on a prompt length's second use
                out = generate(flash, ids[:rows, -length:], max_new_tokens=4, eos_token_id=[], cuda_graph=True)
            assert out.cuda_graph and out.prefill_graph
    release_graphs(flash)
    assert torch.cuda.memory_allocated() - before < 8 * 2**20


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_generate_on_cuda_takes_the_graph_with_eager_tokens(dtype):
    """Fast by default: generate() without cuda_graph= replays the graph on CUDA, same greedy tokens."""
    _, flash = make_pair("cuda", dtype, **GPU_MODEL)
    ids, mask = left_padded_prompts(PROMPTS, "cuda")
    eager = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], cuda_graph=False)
    auto = generate(flash, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert auto.cuda_graph and auto.graph_fallback is None and auto.decode_path == "cuda_graph"
    assert torch.equal(auto.sequences, eager.sequences)
    release_graphs(flash)


@pytest.mark.cuda
def test_graph_sampling_matches_eager_with_the_same_generator():
    _, flash = make_pair("cuda", torch.bfloat16, **GPU_MODEL)
    ids, mask = left_padded_prompts(PROMPTS, "cuda")
    kw = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": True, "temperature": 1.3, "top_k": 40,
          "top_p": 0.9, "eos_token_id": []}
    g_eager = torch.Generator("cuda").manual_seed(3)
    g_graph = torch.Generator("cuda").manual_seed(3)
    eager = generate(flash, ids, generator=g_eager, cuda_graph=False, **kw)
    graph = generate(flash, ids, generator=g_graph, cuda_graph=True, **kw)
    assert graph.cuda_graph
    assert torch.equal(graph.sequences, eager.sequences)
    assert torch.equal(g_eager.get_state(), g_graph.get_state())  # the caller's stream advanced alike
    other = generate(flash, ids, generator=torch.Generator("cuda").manual_seed(4), cuda_graph=True, **kw)
    assert not torch.equal(other.sequences, graph.sequences)
    release_graphs(flash)


@pytest.mark.cuda
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_decode_steps_make_no_host_sync(do_sample):
    _, flash = make_pair("cuda", torch.bfloat16, **GPU_MODEL)
    ids, mask = left_padded_prompts(PROMPTS, "cuda")
    key = SamplingKey(do_sample=do_sample, top_k=20, top_p=0.9, eos_ids=(3,), pad_token_id=0)
    gen = torch.Generator("cuda").manual_seed(0) if do_sample else None
    with torch.inference_mode():
        graphed, _ = graphed_decode_step(flash, 4, ids.shape[1] + 16, key, device="cuda")
        eager = DecodeStep(flash, flash.allocate_cache(4, graphed.capacity), 4, key, gen)
        for step in (graphed, eager):
            cache = step.cache.reset()
            out = flash(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            step.begin(out.logits[:, -1])
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any device->host read below raises
            try:
                for _ in range(8):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            assert int(step.step_idx) == 9
    assert isinstance(graphed, CUDAGraphDecodeStep)
    release_graphs(flash)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_graph_from_the_second_use_of_a_prompt_shape_gives_the_eager_tokens(dtype):
    _, flash = make_pair("cuda", dtype, **GPU_MODEL)
    ids = torch.tensor([PROMPTS[0], PROMPTS[2] + [1, 2]], device="cuda")
    kw = {"max_new_tokens": 12, "eos_token_id": []}
    eager = generate(flash, ids, cuda_graph=False, **kw)
    runs = [generate(flash, ids, **kw) for _ in range(3)]
    assert [r.prefill_graph for r in runs] == [False, True, True]
    assert runs[1].capture_s > 0 and runs[2].capture_s == 0.0  # captured once, before the timed prefill
    for run in runs:
        assert torch.equal(run.sequences, eager.sequences)
    ones = generate(flash, ids, attention_mask=torch.ones_like(ids), **kw)  # no padding: same path
    assert ones.prefill_graph and torch.equal(ones.sequences, eager.sequences)
    assert not generate(flash, ids[:, 1:], **kw).prefill_graph  # another length: eager the first time
    padded, mask = left_padded_prompts(PROMPTS[:2], "cuda")
    assert not generate(flash, padded, attention_mask=mask, **kw).prefill_graph
    assert not generate(flash, padded, attention_mask=mask, **kw).prefill_graph  # padding: always eager
    step = kept_decode_steps(flash)[2]  # the batch-2 step generate() kept, with its prefill graphs
    with torch.inference_mode():  # the cache's tensors were made under generate()'s inference mode
        step.cache.reset()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the replay reads nothing back
        try:
            logits = step.prefills.run(ids)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want = flash(ids, past_key_values=flash.allocate_cache(2, 32), use_cache=True, logits_to_keep=1)
        assert torch.equal(logits, want.logits[:, -1])
    assert step.cache.cache_seqlens.tolist() == [ids.shape[1]] * 2
    release_graphs(flash)


@pytest.mark.cuda
def test_attention_data_checks_refuse_capture(monkeypatch):
    _, flash = make_pair("cuda", torch.bfloat16, **GPU_MODEL)
    ids = torch.tensor([[5, 6, 7]], device="cuda")
    monkeypatch.setenv("FLASHLM_ATTN_CHECKS", "1")
    with pytest.raises(ValueError, match="FLASHLM_ATTN_CHECKS"):
        generate(flash, ids, max_new_tokens=4, cuda_graph=True)
    assert not generate(flash, ids, max_new_tokens=4, cuda_graph="auto").cuda_graph


# --------------------------------------------------------------------------------------------------
# The decode benchmark (CPU smoke run: the command works and its JSON holds what it says)
# --------------------------------------------------------------------------------------------------
def test_decode_bench_cpu_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    from flashlm.bench.decode import main as bench_main

    out = tmp_path / "decode.json"
    rc = bench_main(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "2", "--contexts", "8",
                     "--new-tokens", "3", "--repeats", "1", "--models",
                     "flashlm-graph,flashlm-graph-inductor,flashlm-eager,hf-dynamic", "--output", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    by_impl = {p["impl"]: p for p in data["points"]}
    assert by_impl["flashlm-graph"]["status"] == by_impl["flashlm-graph-inductor"]["status"] == "skipped"
    assert data["inductor_mode"] == "default"
    for impl in ("flashlm-eager", "hf-dynamic"):
        p = by_impl[impl]
        assert p["status"] == "ok" and p["first_token_ms"] > 0 and p["batch"] == 2 and p["context"] == 8
        config = get_preset("tiny")
        kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
        assert p["bytes_per_step"] == data["weight_bytes_per_step"] + kv * 2 * (8 + 3 / 2)
    # same weights, fp32: transformers' greedy tokens are flashlm's
    assert by_impl["hf-dynamic"]["token_agreement_with_flashlm"] == 1.0
    assert data["command"].startswith("flashlm bench decode") and "| impl" in data["table"]
    # CPU: no bandwidth figure, so no %-of-peak column rather than a made-up one, and a note says so
    assert data["peak_gbs"] is None and data["peak_basis"] is None and "% peak" not in data["table"]
    assert "pct_of_peak" not in by_impl["flashlm-eager"]
    assert any("no %-of-peak column" in n for n in data["notes"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["targets"]["per_token_ms_b1_ctx128"] == 1.2
    assert bench_main(["--models", "nope"]) == 2
    assert bench_main(["--device", "cpu", "--peak-gbs", "0"]) == 2
    assert data["kernels"] == "auto"


def test_decode_bench_kernels_flag(tmp_path, monkeypatch):
    """--kernels sets the flashlm model's kernels (recorded in the JSON); "triton" is refused, before any
    model is built, where Triton cannot run (CPU without TRITON_INTERPRET=1)."""
    from flashlm.bench.decode import main as bench_main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "d.json"
    assert bench_main(["--device", "cpu", "--kernels", "triton", "--output", str(out)]) == 2
    assert not out.exists()
    assert bench_main(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "1", "--contexts", "8",
                       "--new-tokens", "2", "--repeats", "1", "--models", "flashlm-eager", "--kernels", "torch",
                       "--output", str(out)]) == 0
    assert json.loads(out.read_text())["kernels"] == "torch"


@pytest.mark.parametrize(("name", "gpu", "gbs", "basis"), [
    ("NVIDIA H200", "H200", 4300.0, "measured copy"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3000.0, "measured copy"),
    ("NVIDIA H100 PCIe", None, None, None),  # HBM2e, 2 TB/s: not the SXM card's figure
    ("NVIDIA H200 NVL", None, None, None),
    ("NVIDIA A100-SXM4-80GB", None, None, None),
    (None, None, None, None),  # the CPU
])
def test_decode_bench_peak_bandwidth_by_gpu_name(name, gpu, gbs, basis):
    from flashlm.bench.bandwidth import GPU_BANDWIDTH, peak_bandwidth
    from flashlm.bench.decode import format_table

    peak = peak_bandwidth(name)
    if gpu is None:
        assert peak is None
    else:
        assert (peak.gpu, peak.gbs, peak.basis) == (gpu, gbs, basis)
        assert GPU_BANDWIDTH[gpu].datasheet_gbs == {"H200": 4800.0, "H100 SXM": 3350.0}[gpu]
        assert f"{gbs:.0f} GB/s ({gpu}, measured copy; datasheet" in peak.label
    given = peak_bandwidth(name, 1234.0)  # --peak-gbs wins on any GPU, and says it was given
    assert (given.gbs, given.basis, given.gpu) == (1234.0, "--peak-gbs", None)
    point = {"impl": "flashlm-graph", "batch": 1, "context": 128, "status": "ok", "first_token_ms": 9.0,
             "per_token_ms": 1.0, "tokens_per_s": 1000.0, "gb_per_s": 2150.0, "pct_of_peak": 50.0}
    assert "% peak" in format_table([point], given.label) and "(given by --peak-gbs)" in format_table([point], given.label)
    assert "% peak" not in format_table([point])
