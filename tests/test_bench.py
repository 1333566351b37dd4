"""`flashlm bench` on CPU: the command runs on the tiny preset and writes a table, JSON and a plot; bad
flags are refused before anything runs; the padded/packed batches are what they claim to be."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse fixture)

from flashlm.bench import cli
from flashlm.bench.batch import make_batch

FAST = ["--warmup-steps", "1", "--benchmark-steps", "2", "--seq-length", "32", "--new-tokens", "4",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """One CPU run of the seed command (tiny preset) shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("bench")
    argv = [*FAST, "--compare", "default,flash,hf-sdpa", "--output", str(out / "r.json")]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(out / "r.png")]
    except ImportError:
        pass
    rc = cli.main(argv)
    return rc, out


def test_cpu_run_writes_json_and_table(seed_run, capsys):
    rc, out = seed_run
    assert rc == 0
    results = json.loads((out / "r.json").read_text())
    for key in ("command", "argv", "environment", "config", "model_config", "inputs", "models", "attention",
                "comparisons", "table", "notes"):
        assert key in results, key
    env = results["environment"]
    for key in ("torch", "cuda", "cudnn", "triton", "transformers", "date", "gpu"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert results["command"].startswith("flashlm bench ")
    cfg = results["config"]
    assert (cfg["model"], cfg["dtype"], cfg["device"]) == ("tiny", "fp32", "cpu")
    assert any("say nothing about GPU speed" in n for n in results["notes"])
    default = results["models"]["default"]
    assert default["status"] == "ok"
    for case in ("train", "forward", "generate"):
        r = default["cases"][case]
        assert r["status"] == "ok", r
        assert r["peak_memory_bytes"] is None  # n/a on CPU, never a made-up figure
    assert default["cases"]["train"]["median_ms"] > 0
    assert default["cases"]["train"]["p10_ms"] <= default["cases"]["train"]["p90_ms"]
    assert default["cases"]["forward"]["tokens_per_s"] > 0
    gen = default["cases"]["generate"]
    assert gen["first_token_ms"] > 0 and gen["per_token_ms"] > 0 and gen["new_tokens"] == 4
    assert results["table"].splitlines()[0].startswith("| Metric | Default |")
    assert "| Train step (ms) |" in results["table"]
    assert results["attention"]["train"]["chosen"] is not None
    if results["models"]["flash"]["status"] == "ok":
        assert "| Flash | Speedup | Improvement |" in results["table"]


def test_cpu_run_records_which_decode_path_ran(seed_run):
    """generate()'s default decode path (cuda_graph="auto") is what the bench times; on CPU it is eager,
    and each row says why; the table shows the path of every model."""
    _, out = seed_run
    results = json.loads((out / "r.json").read_text())
    assert results["config"]["cuda_graph"] == "auto"
    models = results["models"]
    gen = models["default"]["cases"]["generate"]
    assert gen["decode_path"] == "eager" and "needs the flash model" in gen["graph_fallback"]
    if models["flash"]["status"] == "ok":
        gen = models["flash"]["cases"]["generate"]
        assert gen["decode_path"] == "eager" and "CUDA graphs need a CUDA device" in gen["graph_fallback"]
    if models["hf-sdpa"]["status"] == "ok":
        assert models["hf-sdpa"]["cases"]["generate"]["decode_path"] == "hf-dynamic"
    row = next(line for line in results["table"].splitlines() if line.startswith("| Decode path |"))
    assert row.startswith("| Decode path | eager |")


def test_cpu_run_same_weights_same_results(seed_run):
    """Every row loads the same checkpoint: same first-step loss, logits and greedy tokens (fp32)."""
    pytest.importorskip("transformers")
    _, out = seed_run
    models = json.loads((out / "r.json").read_text())["models"]
    ref = models["default"]["cases"]
    for name in ("flash", "hf-sdpa"):
        if models[name]["status"] != "ok":
            continue
        cases = models[name]["cases"]
        assert cases["train"]["first_step_loss"] == pytest.approx(ref["train"]["first_step_loss"], abs=1e-4)
        assert cases["forward"]["last_logits_max_abs_diff_vs_default"] < 1e-4
        assert cases["generate"]["greedy_tokens_equal_vs_default"] == 1.0


def test_padded_run_same_loss_and_logits(tmp_path):
    """Left-padded batch: default (mask), flash (varlen) and HF (mask) agree on the loss and logits."""
    path = tmp_path / "pad.json"
    argv = [*FAST, "--padding-ratio", "0.4", "--cases", "train,forward", "--compare", "default,flash,hf-sdpa",
            "--output", str(path)]
    assert cli.main(argv) == 0
    results = json.loads(path.read_text())
    assert abs(results["inputs"]["padding_ratio"] - 0.4) < 0.05
    models = results["models"]
    ref = models["default"]["cases"]["train"]["first_step_loss"]
    for name in ("flash", "hf-sdpa"):
        if models[name]["status"] == "skipped":
            continue
        assert models[name]["cases"]["train"]["first_step_loss"] == pytest.approx(ref, abs=1e-4), name
        assert models[name]["cases"]["forward"]["last_logits_max_abs_diff_vs_default"] < 1e-4


def test_plot_written(seed_run):
    pytest.importorskip("matplotlib")
    _, out = seed_run
    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "--batch-size"),
    (["--benchmark-steps", "0"], "--benchmark-steps"),
    (["--padding-ratio", "1.0"], "--padding-ratio"),
    (["--padding-ratio", "0.3", "--packed"], "exclusive"),
    (["--compare", "default,foo"], "'foo'"),
    (["--compare", "default,default"], "twice"),
    (["--cases", "train,backward"], "'backward'"),
    (["--dtype", "fp8"], "--dtype"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--model", "no-such-preset"], "preset"),
    (["--attn-backend", "nope"], "--attn-backend"),
    (["--decode-batch-sizes", "1,x"], "--decode-batch-sizes"),
])
def test_bad_flags_are_refused(flags, message, capsys):
    assert cli.main([*FAST, *flags]) == 2
    err = capsys.readouterr().err
    assert "flashlm bench: error:" in err and message in err


def test_cuda_device_refused_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unavailable_model_is_a_skip_note_not_a_crash(tmp_path):
    try:
        import liger_kernel  # noqa: F401

        pytest.skip("liger-kernel is installed here")
    except ImportError:
        pass
    path = tmp_path / "r.json"
    assert cli.main([*FAST, "--compare", "default,hf-liger", "--cases", "forward", "--output", str(path)]) == 0
    results = json.loads(path.read_text())
    assert results["models"]["hf-liger"]["status"] == "skipped"
    assert "liger-kernel" in results["models"]["hf-liger"]["note"]
    assert "skipped" in results["table"]


def test_padded_batch_is_left_padded_with_the_asked_ratio():
    b = make_batch(8, 128, 1000, padding_ratio=0.5, seed=3)
    mask = b.attention_mask
    assert abs(b.padding_ratio - 0.5) < 0.01
    assert int(mask.sum()) == b.real_tokens
    assert (mask.sum(1) >= 1).all()
    assert (mask[:, 1:] >= mask[:, :-1]).all()  # left padding: once a row starts it never stops
    assert len(set(b.row_lengths)) > 1  # random lengths, not one shared length
    assert (b.labels[mask == 0] == -100).all()
    first_real = mask.argmax(1)
    assert (b.labels[torch.arange(8), first_real] == -100).all()


def test_packed_batch_restarts_positions_per_document():
    b = make_batch(4, 64, 1000, packed=True, seed=1)
    assert b.attention_mask is None and b.real_tokens == 4 * 64
    for r, docs in enumerate(b.doc_lengths):
        assert sum(docs) == 64 and len(docs) >= 2
        expected = torch.cat([torch.arange(n) for n in docs])
        assert torch.equal(b.position_ids[r], expected)
        starts = torch.tensor([0, *docs[:-1]]).cumsum(0)
        assert (b.labels[r, starts] == -100).all()  # no loss across a document boundary
    lengths = [n for docs in b.doc_lengths for n in docs]
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == torch.tensor([0, *lengths]).cumsum(0).tolist()


def test_packed_run_reports_document_isolation(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "p.json"
    argv = [*FAST, "--seq-length", "48", "--packed", "--cases", "train,forward,generate", "--compare",
            "default,flash,hf-sdpa", "--output", str(path)]
    assert cli.main(argv) == 0
    results = json.loads(path.read_text())
    assert any("generate skipped with --packed" in n for n in results["notes"])
    models = results["models"]
    # transformers builds a block-diagonal mask from packed position_ids; flash runs varlen
    assert models["hf-sdpa"]["packed_isolation"]["isolated"] is True
    assert "isolated" in models["default"]["packed_isolation"]
    if models["flash"]["status"] == "ok":
        assert models["flash"]["packed_isolation"]["isolated"] is True
        # both isolate documents and score the same targets: same loss on the same weights
        assert models["flash"]["cases"]["train"]["first_step_loss"] == pytest.approx(
            models["hf-sdpa"]["cases"]["train"]["first_step_loss"], abs=1e-4)


def test_kernels_subcommand_dispatches(capsys):
    pytest.importorskip("flashlm.bench.kernels")
    with pytest.raises(SystemExit) as e:
        cli.main(["kernels", "--help"])
    assert e.value.code == 0
    assert "flashlm bench kernels" in capsys.readouterr().out


def test_kernels_prints_refusals_apart_from_the_figures(tmp_path, capsys):
    """cuDNN has no KV-cache entry point (and no CPU): its rows are "refused: <reason>", not ValueError
    rows, and stay out of the figures and of the suggested orders. Same assertions on a GPU machine."""
    from flashlm.bench import kernels

    path = tmp_path / "k.json"
    kernels.main(["--backends", "reference,cudnn", "--modes", "fwd", "--causal", "1", "--tiny",
                  "--json", str(path)])
    out = capsys.readouterr().out
    payload = json.loads(path.read_text())
    assert "ValueError" not in out and "refused: " in out
    decode_refusals = [r for r in payload["refused"] if r["kind"] == "kvcache"]
    assert [r["backend"] for r in decode_refusals] == ["cudnn"]
    assert [r["backend"] for r in payload["decode"]] == ["reference"] and "gbps" in payload["decode"][0]
    assert all("error" not in r and "refused" not in r for r in payload["dense"] + payload["decode"])
    decode_table = out[out.index("decode cache"):]
    cudnn_lines = [line for line in decode_table.splitlines() if line.startswith("cudnn")]
    assert cudnn_lines and all("refused: " in line for line in cudnn_lines), cudnn_lines
    assert set(payload["suggested_orders"]) == {"dense", "kvcache"}


def test_kernels_on_cpu_print_nonzero_figures(tmp_path, capsys):
    """A CPU reaches a few GFLOP/s: printed (and stored) with significant digits, not as 0.0 TFLOP/s."""
    from flashlm.bench import kernels

    path = tmp_path / "k.json"
    kernels.main(["--backends", "reference", "--modes", "fwd", "--causal", "1", "--tiny", "--json", str(path)])
    out = capsys.readouterr().out
    payload = json.loads(path.read_text())
    assert payload["dense"] and all(r["tflops"] > 0 for r in payload["dense"]), payload["dense"]
    assert payload["decode"] and all(r["gbps"] > 0 for r in payload["decode"]), payload["decode"]
    dense_rows = [line.split() for line in out[:out.index("decode cache")].splitlines() if line.startswith("reference")]
    assert dense_rows and all(float(row[-1]) > 0 for row in dense_rows), dense_rows
    decode_rows = [line.split() for line in out[out.index("decode cache"):].splitlines() if line.startswith("reference")]
    assert decode_rows and all(float(row[-1]) > 0 for row in decode_rows), decode_rows


# ------------------------------------------------------------------ the timing helper and the subcommands


def test_timing_helper_drops_warmup_and_runs_hooks_untimed():
    from flashlm.bench.timing import summarize, time_calls, time_loop, time_once

    calls, before, after = [], [], []
    t = time_calls(lambda: calls.append(1), warmup=2, iters=5, before=lambda: before.append(1),
                   after=lambda: after.append(1))
    assert len(calls) == len(before) == len(after) == 7 and len(t.times_s) == 5 and t.clock == "wall"
    assert t.summary()["steps"] == 5 and t.p10_s <= t.median_s <= t.p90_s
    # the CUDA-event clock falls back to the wall clock off CUDA
    assert time_calls(lambda: None, iters=3, clock="cuda_event").clock == "wall"
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.005])
    assert s == pytest.approx({"median_ms": 3.0, "p10_ms": 1.4, "p90_ms": 4.6, "steps": 5})
    loop = time_loop(lambda: None, warmup=1, iters=4)
    assert loop.iters == 4 and 0 <= loop.host_s <= loop.wall_s
    seconds, result = time_once(lambda: 42)
    assert result == 42 and seconds >= 0
    with pytest.raises(ValueError, match="iters >= 1"):
        time_calls(lambda: None, iters=0)


@pytest.mark.parametrize("sub", ["kernels", "decode", "ops", "optim", "loss", "memory", "profile", "launches",
                                 "decode-probe"])
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([sub, "--help"])
    assert exc.value.code == 0
    assert f"flashlm bench {sub}" in capsys.readouterr().out


def test_ops_subcommand_runs_tiny_on_cpu(tmp_path, capsys):
    from flashlm.bench import ops

    path = tmp_path / "ops.json"
    assert cli.main(["ops", "--device", "cpu", "--iters", "2", "--output", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["shapes"] == {"tiny": list(ops.SHAPES["tiny"])} and data["dtype"] == "float32"
    torch_rows = [r for r in data["rows"] if r["impl"] == "torch"]
    assert {r["op"] for r in torch_rows} == {"rms_norm", "add_rms_norm", "swiglu", "rotary_qkv", "rotary"}
    assert all(r["host_us"] > 0 and r["wall_us"] >= r["host_us"] and r["kernels"] is None for r in torch_rows)
    assert {r["mode"] for r in data["rows"]} == {"fwd", "fwd+bwd"}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == data["rows"]


def test_optim_subcommand_runs_tiny_on_cpu(tmp_path):
    path = tmp_path / "optim.json"
    assert cli.main(["optim", "--device", "cpu", "--steps", "2", "--output", str(path)]) == 0
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"master_foreach", "master_fused", "master_triton", "bf16_fused"}
    assert rows["master_foreach"]["median_ms"] > 0 and rows["master_foreach"]["peak_memory_gb"] is None
    assert "error" in rows["master_triton"] or rows["master_triton"]["median_ms"] > 0


def test_loss_subcommand_runs_tiny_on_cpu(tmp_path):
    path = tmp_path / "loss.json"
    assert cli.main(["loss", "--device", "cpu", "--tokens", "16", "--vocabs", "128", "--hidden", "32",
                     "--repeats", "2", "--output", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert (row["tokens"], row["vocab"]) == (16, 128)
    assert all(row[f"{k}_ms"] > 0 for k in ("plain", "ours", "fused"))


def test_profile_subcommand_runs_tiny_on_cpu(tmp_path):
    path = tmp_path / "prof" / "p.json"
    assert cli.main(["profile", "--device", "cpu", "--models", "flash", "--cases", "forward,decode",
                     "--batch", "1", "--seqlen", "8", "--warmup", "0", "--steps", "1", "--points", "1x8",
                     "--tokens", "3", "--repeats", "1", "--output", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["case"], r["mode"]) for r in rows] == [("forward", "eager"), ("decode", "eager")]
    assert rows[0]["median_ms"] > 0 and rows[1]["per_token_ms"] is not None and rows[1]["bytes_per_step"] > 0
    assert "==== flash" in (tmp_path / "prof" / "p.txt").read_text()


def test_launches_subcommand_counts_aten_ops_on_cpu(tmp_path):
    path = tmp_path / "launches.json"
    assert cli.main(["launches", "--device", "cpu", "--preset", "tiny", "--seqlen", "8", "--dtype", "fp32",
                     "--output", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {(r["case"], r["model"]) for r in rows} == {(c, m) for c in ("train", "forward")
                                                       for m in ("default", "flash")}
    assert all(r["count"] > 0 and r["unit"] == "aten ops" for r in rows)


@pytest.mark.parametrize("sub", ["memory", "decode-probe"])
def test_cuda_only_subcommands_refuse_the_cpu_before_writing(sub, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert cli.main([sub, "--device", "cpu", "--output", str(path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not path.exists()


def test_memory_replay_finds_the_peak_and_its_blocks():
    from flashlm.bench.memory import by_site, replay_peak

    frames = [{"filename": "/x/flashlm/models/flash.py", "line": 7, "name": "forward"}]
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": frames},
             {"action": "alloc", "addr": 2, "size": 50, "frames": frames},
             {"action": "free_requested", "addr": 1, "size": 100},
             {"action": "free_completed", "addr": 1, "size": 100},
             {"action": "alloc", "addr": 3, "size": 20, "frames": []}]
    peak, alive = replay_peak(trace, base=10)
    assert peak == 160 and [b["addr"] for b in alive] == [1, 2]
    assert by_site(alive, 5) == [{"where": "flash.py:7 forward", "bytes": 150, "blocks": 2}]
