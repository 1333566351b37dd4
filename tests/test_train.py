"""flashlm.train end to end on CPU: the tiny preset learns a generated corpus, saves, resumes bit-exactly,
refuses bad input clearly, and runs under torchrun as 2 gloo processes with FSDP2."""

import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import types

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse fixture)
from safetensors.torch import load_file

from flashlm import train as T
from flashlm.train import loop as L
from flashlm.train.checkpoint import ConfigMismatchError

BASE = ["--model", "tiny", "--attn", "default", "--vocab-size", "512", "--seq-length", "64", "--no-progress"]


def _write_corpus(root, n_docs=300, seed=0):
    """Documents with learnable structure (a tiny grammar plus counting), as .jsonl and .txt."""
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    verbs = ["sees", "likes", "helps", "calls", "meets"]
    objs = ["the cat", "a dog", "the red ball", "some bread", "the old tree"]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(n_docs):
            n = rng.randint(3, 12)
            text = " ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(objs)}." for _ in range(n))
            f.write(json.dumps({"text": text}) + "\n")
    (root / "count.txt").write_text(" ".join(f"{i} {i + 1} {i + 2}." for i in range(150)))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(corpus, cache, out, *extra):
    return T.train([*BASE, "--data", str(corpus), "--cache-dir", str(cache), "--output", str(out), *map(str, extra)])


def _params(folder):
    return load_file(str(folder / "model.safetensors"))


def test_tiny_preset_learns_and_writes_its_run_folder(corpus, cache, tmp_path):
    out = tmp_path / "run"
    res = _run(corpus, cache, out, "--max-steps", 40, "--batch-size", 8, "--lr", 3e-3,
               "--eval-every", 20, "--save-every", 20)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert len(res.losses) == 40
    assert first > 5.5 and last < 0.6 * first, (first, last)  # ln(512) = 6.24 at init
    (s1, e1), (s2, e2) = res.eval_losses
    assert (s1, s2) == (20, 40) and e2 < e1 < first

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib"} <= set(metrics[0])
    assert metrics[-1]["tokens"] == 40 * 8 * 64
    # the summary's median step throughput lies within the per-step figures of the timed steps (2..40)
    timed = sorted(m["tokens_per_s"] for m in metrics[1:])
    assert timed[0] <= res.median_step_tokens_per_s <= timed[-1]
    # each step's figure is its own: eval/save steps were ~250x the median when timed between
    # read-backs (measured 0.74x .. 1.26x now on a loaded 2-core box)
    median = res.median_step_tokens_per_s
    assert all(median / 3 <= m["tokens_per_s"] <= 3 * median for m in metrics[1:]), [m["tokens_per_s"] for m in metrics]
    assert [m["step"] for m in metrics if "eval_s" in m] == [20, 40]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000020", "step_0000040"]
    assert (out / "tokenizer.json").is_file() and (out / "final" / "tokenizer.json").is_file()

    # The final folder loads with flashlm and, when installed, transformers, giving the same logits.
    from flashlm.models import from_pretrained

    model = from_pretrained(out / "final", attn="default")
    assert model.config.vocab_size == 512
    ids = torch.randint(0, 300, (2, 16))
    ours = model(ids).logits
    if importlib.util.find_spec("transformers") is not None:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out / "final").eval()
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_each_step_is_timed_by_its_own_work(corpus, cache, tmp_path, monkeypatch):
    """On a fake clock where a batch's forward costs 1 s and a save 30 s, every step takes 1 s:
    eval and save steps (read back twice in a row) and the steps after them (which paid for the
    eval and the save) too; evaluations and saves are timed apart."""
    clock = [0.0]
    monkeypatch.setattr(L, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def costing(fn, seconds):
        def wrapped(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(L, "model_inputs", costing(L.model_inputs, 1.0))  # each train or eval batch
    monkeypatch.setattr(L, "check_finite_params", costing(L.check_finite_params, 30.0))  # each save
    out = tmp_path / "clocked"
    res = _run(corpus, cache, out, "--max-steps", 9, "--batch-size", 4, "--eval-every", 3, "--eval-batches", 2,
               "--eval-fraction", 0.05, "--save-every", 4)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 4 * 64
    assert [m["tokens_per_s"] for m in metrics] == [tokens_per_step] * 9
    assert [(m["step"], m["eval_s"]) for m in metrics if "eval_s" in m] == [(3, 2.0), (6, 2.0), (9, 2.0)]
    assert res.tokens_per_s == res.median_step_tokens_per_s == tokens_per_step
    assert (res.eval_s, res.save_s) == (6.0, 90.0)  # saves at steps 4, 8 and the last


def test_resume_is_bit_exact_and_activation_checkpointing_changes_nothing(corpus, cache, tmp_path):
    common = ["--max-steps", 6, "--batch-size", 4, "--grad-accum", 2, "--lr", 3e-3, "--eval-every", 3,
              "--save-every", 0]
    full = _run(corpus, cache, tmp_path / "full", *common)

    part = _run(corpus, cache, tmp_path / "resumed", *common, "--stop-after", 3)
    assert part.final_dir is None and part.last_checkpoint.name == "step_0000003"
    rest = _run(corpus, cache, tmp_path / "resumed", *common, "--resume", "auto")
    assert rest.start_step == 3
    assert part.losses + rest.losses == full.losses  # exact float equality, step by step
    assert part.eval_losses + rest.eval_losses == full.eval_losses
    a, b = _params(tmp_path / "full" / "final"), _params(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log of the resumed run reads like the uninterrupted one
    logged = [json.loads(x)["loss"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == full.losses

    ac = _run(corpus, cache, tmp_path / "ac", *common, "--stop-after", 3, "--activation-checkpointing")
    assert ac.losses == full.losses[:3]


def _tokenizer_json(path, vocab_size, corpus):
    from flashlm.train import data as D

    tok = D.train_tokenizer(D.read_documents(D.find_files(corpus)), 300)
    # a small corpus stops BPE early: pad with added tokens to exactly vocab_size
    tok.add_special_tokens([f"<extra_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(path))
    return path


def test_clear_errors(corpus, cache, tmp_path):
    def fails(exc, match, *extra, data=corpus, out=tmp_path / "err"):
        with pytest.raises(exc, match=match):
            _run(data, cache, out, "--max-steps", 2, "--batch-size", 2, *extra)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n \n")
    fails(ValueError, "hold no text", data=empty)
    binary = tmp_path / "binary"
    binary.mkdir()
    torch.save({"w": torch.zeros(64)}, binary / "weights.txt")  # a zip with NUL bytes, named .txt
    fails(ValueError, r"--data: .*weights.txt is not UTF-8 text \(it holds NUL bytes", data=binary)
    fails(ValueError, "no .txt or .jsonl files", data=tmp_path / "err")  # exists, no data files
    fails(ValueError, "--seq-length 1000 exceeds the model's max_position_embeddings 512", "--seq-length", 1000)
    big = _tokenizer_json(tmp_path / "big.json", 700, corpus)
    fails(ValueError, r"tokenizer/vocab mismatch: .* has 700 tokens but the model's vocab_size is 512",
          "--tokenizer", big)
    fails(ValueError, "vocab_size 256, too small", "--vocab-size", 256)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    fails(ValueError, "--output .* is not writable", out=blocker / "run")
    fails(ValueError, "--batch-size must be >= 1", "--batch-size", 0)
    fails(FileNotFoundError, "--resume: .* neither a checkpoint folder", "--resume", tmp_path)

    # resume from a checkpoint of another model config
    run = tmp_path / "small_vocab"
    _run(corpus, cache, run, "--max-steps", 1, "--batch-size", 2, "--eval-every", 0)
    with pytest.raises(ConfigMismatchError, match=r"vocab_size: 512 \(saved\) != 640 \(now\)"):
        _run(corpus, cache, run, "--max-steps", 2, "--batch-size", 2, "--vocab-size", 640, "--resume", run)


def test_main_reports_errors_in_one_line(corpus, tmp_path, capsys):
    rc = T.main([*BASE, "--data", str(corpus), "--output", str(tmp_path), "--seq-length", "999"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flashlm train: error: --seq-length 999 exceeds the model's max_position_embeddings 512"]


def test_help_states_each_default_once():
    """ArgumentDefaultsHelpFormatter appends "(default: X)" to every flag; flags whose help already
    says what the default is (or whose default is None / a store_true False) must not get a second."""
    parser = T.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help is None:
            continue
        text = " ".join(formatter._expand_help(action).split())
        assert text.lower().count("default") <= 1, (action.option_strings, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (action.option_strings, text)
    help_text = " ".join(parser.format_help().split())
    assert "peak learning rate (AdamW) (default: 0.0003)" in help_text  # plain defaults still shown
    assert "(default: 10% of --max-steps, <= 1000)" in help_text


def test_seq_length_one_is_refused_up_front(corpus, cache, tmp_path):
    out = tmp_path / "seq1"
    with pytest.raises(ValueError, match=r"--seq-length must be >= 2 .*got 1"):
        _run(corpus, cache, out, "--max-steps", 2, "--batch-size", 2, "--seq-length", 1)
    assert not out.exists()  # refused before anything was written


def test_evaluate_builds_no_autograd_graph():
    """Evaluation runs without autograd: no graph kept alive (memory) and no "requires_grad=True to
    a scalar" UserWarning from train.py printed in the middle of the progress bar."""
    import warnings

    from flashlm.models import build_model
    from flashlm.train.data import PackedDataset

    model = build_model("tiny", attn="default")
    ds = PackedDataset(torch.randint(0, 200, (6, 16), dtype=torch.int32), torch.zeros(6, 16, dtype=torch.bool))
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.loss.requires_grad)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = T.evaluate(model, ds, 2, 3, T.Dist(), torch.device("cpu"), contextlib.nullcontext)
    assert seen == [(False, False)] * 3 and math.isfinite(loss)
    assert model.training  # its mode is restored


def _main(*argv) -> int:
    try:
        return T.main([str(a) for a in argv])
    except KeyboardInterrupt:  # escaping, it would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped flashlm train's main")


def test_ctrl_c_says_where_the_run_stands_and_how_to_continue(corpus, cache, tmp_path, monkeypatch, capsys):
    real_step = L._train_step

    def interrupted_at(n):
        def step(run, s):
            if s == n:
                raise KeyboardInterrupt
            return real_step(run, s)

        return step

    out = tmp_path / "run"
    argv = [*BASE, "--data", corpus, "--cache-dir", cache, "--output", out, "--max-steps", 8, "--batch-size", 2,
            "--eval-every", 0]
    monkeypatch.setattr(L, "_train_step", interrupted_at(6))
    assert _main(*argv, "--save-every", 2) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # step 5 was queued when Ctrl-C came (its loss is read after step 6 is queued): 4 is the last logged
    assert f"interrupted after step 4 of 8; last checkpoint {out / 'checkpoints' / 'step_0000004'}" in err
    assert "`--resume auto` (same flags) continues from it" in err

    monkeypatch.setattr(L, "_train_step", real_step)
    assert _main(*argv, "--save-every", 2, "--resume", "auto") == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(L, "_train_step", interrupted_at(2))
    assert _main(*[fresh if a is out else a for a in argv], "--save-every", 0) == 130
    assert "no checkpoint was written" in capsys.readouterr().err

    def interrupted_packing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(L.fdata, "pack", interrupted_packing)
    assert _main(*[tmp_path / "early" if a is out else a for a in argv]) == 130
    assert capsys.readouterr().err.strip().endswith("flashlm train: interrupted before the first step")


def test_resuming_a_finished_run_says_there_is_nothing_to_do(corpus, cache, tmp_path, capsys):
    out = tmp_path / "done"
    argv = [*BASE, "--data", corpus, "--cache-dir", cache, "--output", out, "--max-steps", 4, "--batch-size", 2,
            "--eval-every", 0, "--save-every", 2]
    assert _main(*argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = out / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    for extra in ([], ["--stop-after", 2]):  # at its end, or behind the checkpoint
        assert _main(*argv, "--resume", "auto", *extra) == 0
        cap = capsys.readouterr()
        assert "nothing to do" in cap.err and "steps 4 -> " not in cap.err, cap.err
        summary = json.loads(cap.out.strip().splitlines()[-1])
        assert summary["steps"] == 4 and summary["final_loss"] == first["final_loss"] is not None
    assert final.stat().st_mtime_ns == stamp  # the finished run's model is not written again


def test_flops_and_schedule():
    from flashlm.models import build_model, get_preset

    cfg = get_preset("llama-1b")
    with torch.device("meta"):
        model = build_model(cfg, attn="default", device="meta")
    n_params = sum(p.numel() for p in model.parameters())  # tied: the embedding once
    fpt = T.flops_per_token(model, 2048)
    assert fpt == 6 * n_params + 6 * 16 * 2048 * 32 * 64  # tied head counted as a matmul
    fn = T.lr_lambda(max_steps=100, warmup=10, min_ratio=0.1)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(55) == pytest.approx(0.55) and fn(100) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)


@pytest.mark.skipif(importlib.util.find_spec("flashlm.models.flash") is None, reason="flash model not built yet")
def test_flash_model_trains_packed(corpus, cache, tmp_path):
    args = ["--max-steps", 3, "--batch-size", 2, "--eval-every", 0]
    res = T.train(["--model", "tiny", "--attn", "flash", "--vocab-size", "512", "--seq-length", "64",
                   "--no-progress", "--data", str(corpus), "--cache-dir", str(cache),
                   "--output", str(tmp_path / "flash"), *map(str, args)])
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))


def _torchrun_fsdp_works() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is not available"
    if shutil.which("torchrun") is None:
        return "torchrun not on PATH"
    return None


FSDP_COMMON = ["--max-steps", 4, "--grad-accum", 2, "--lr", 3e-3, "--eval-every", 2, "--save-every", 0]


def _lr_path(common) -> float:
    """Sum of the learning rates of a run's steps: AdamW moves an element by at most ~lr per step
    (its normalized update m / sqrt(v) stays within ~1), so no weight moves farther than this."""
    args = T.build_parser().parse_args([*BASE, *map(str, common), "--data", ".", "--output", "."])
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, args.max_steps // 10)
    schedule = T.lr_lambda(args.max_steps, warmup, args.min_lr_ratio)
    return sum(args.lr * schedule(i) for i in range(args.max_steps))


# Tolerance of "the same training run" on weights, as a fraction of the lr path, per tensor, in RMS.
# Why RMS and not element-wise: 1 and 2 processes (and two CPUs: AVX2/AVX512, thread counts) sum
# gradients in different orders, which moves a gradient by ~1e-6 relative. AdamW turns that into a
# negligible change, except on the rare elements whose gradient is ~0 from cancellation: those get a
# different m / sqrt(v) and can move by up to the whole lr path. One such element of 8192 failed an
# element-wise rtol=1e-4 on another CPU (1.46e-5 = 1.8e-3 of the path; 2e-4 of it on this one). Over a
# whole tensor they are few: the RMS difference measured 2e-6 of the path (2 processes vs 1, and 1
# process with another micro-batch split). A real bug moves every tensor: rank 1's gradient halved
# gave >= 4e-2 of the path on the least-moved tensor (the embedding), a wrong data shard more; so
# 1e-3 leaves ~500x above the noise and ~40x below the smallest bug (test_fsdp2_catches_planted_bugs).
SAME_RUN_RMS = 1e-3


def _weight_mismatches(a: dict, b: dict, path: float) -> list[str]:
    """Tensors whose RMS difference exceeds ``SAME_RUN_RMS`` of the lr path (see above)."""
    assert a.keys() == b.keys()
    bad = []
    for k, value in a.items():
        rms = (value.double() - b[k].double()).pow(2).mean().sqrt().item()
        if not rms <= SAME_RUN_RMS * path:
            bad.append(f"{k}: RMS difference {rms:.3g} = {rms / path:.3g} of the lr path")
    return bad


# Losses are token means over 512 tokens per step: summation order moves them by ~1e-7 relative
# (measured 1.7e-7 between 1 and 2 processes); rtol 1e-5 leaves ~60x. The halved-gradient bug moves
# step 2's loss by 2.8e-3 relative.
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def single(corpus, cache, tmp_path_factory):
    """The 1-process reference run of the FSDP2 tests (batch 4 = their 2 ranks x batch 2)."""
    out = tmp_path_factory.mktemp("single") / "one"
    res = T.train([*BASE, *map(str, FSDP_COMMON), "--data", str(corpus), "--cache-dir", str(cache),
                   "--batch-size", "4", "--output", str(out)])
    return res, _params(out / "final")


def _torchrun(script: list, corpus, cache, out, *extra, fault: str | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault is not None:
        env["FLASHLM_FAULT"] = fault
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script,
              *BASE, *map(str, FSDP_COMMON), "--data", str(corpus), "--cache-dir", str(cache),
              "--batch-size", "2", "--output", str(out), *extra]
    proc = subprocess.run(launch, check=False, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # Seen once (2026-12-01) on a 2-core machine running three other test suites: a gloo rank
        # aborted in its first collective before any step. A bug in our code fails the retry too.
        if "--resume" not in map(str, extra):
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: the folder must hold no other run
        proc = subprocess.run(launch, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(_torchrun_fsdp_works() is not None, reason=str(_torchrun_fsdp_works()))
def test_fsdp2_two_gloo_processes_match_one_process_and_resume(corpus, cache, tmp_path, single):
    """2 CPU processes (gloo) with FSDP2 and batch 2 each == 1 process with batch 4, through a DCP
    checkpoint and resume in the middle."""
    single_res, b = single
    path = _lr_path(FSDP_COMMON)
    out = tmp_path / "fsdp"
    for extra in (["--stop-after", "2"], ["--resume", "auto"]):
        _torchrun(["-m", "flashlm.train"], corpus, cache, out, *extra)
    ckpt = out / "checkpoints" / "step_0000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rng_rank1.pt").is_file()

    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in logged]), torch.tensor(single_res.losses),
                               **LOSS_TOL)
    evals = [(m["step"], m["eval_loss"]) for m in logged if "eval_loss" in m]
    assert [s for s, _ in evals] == [2, 4]
    assert _weight_mismatches(_params(out / "final"), b, path) == []

    # The 2-rank DCP checkpoint resumes in one process (batch 4 = the same global rows): DCP gathers
    # the model and AdamW shards into full tensors and the run continues as the uninterrupted one.
    res = T.train([*BASE, *map(str, FSDP_COMMON), "--data", str(corpus), "--cache-dir", str(cache),
                   "--batch-size", "4", "--output", str(tmp_path / "n_to_1"), "--resume", str(ckpt)])
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(single_res.losses[2:]), **LOSS_TOL)
    assert _weight_mismatches(_params(tmp_path / "n_to_1" / "final"), b, path) == []


@pytest.mark.skipif(_torchrun_fsdp_works() is not None, reason=str(_torchrun_fsdp_works()))
@pytest.mark.parametrize("fault", ["half_grad", "wrong_shard"])
def test_fsdp2_catches_planted_bugs(corpus, cache, tmp_path, single, fault):
    """The tolerance above is loose enough for summation order, not for a bug: with rank 1's
    gradient halved, or rank 1 reading rank 0's rows (tests/fsdp_fault.py), every tensor fails it."""
    _, b = single
    out = tmp_path / fault
    _torchrun([os.path.join(os.path.dirname(__file__), "fsdp_fault.py")], corpus, cache, out, fault=fault)
    bad = _weight_mismatches(_params(out / "final"), b, _lr_path(FSDP_COMMON))
    assert len(bad) == len(b), f"only {len(bad)} of {len(b)} tensors differ: {bad}"


def test_bf16_master_weights_resume_bit_exact_and_learn_like_autocast(corpus, cache, tmp_path):
    """--dtype bf16 in one process: bf16 parameters + fp32 masters (the default) resume bit for bit
    (the masters travel in the optimizer state) and learn as autocast over fp32 parameters does."""
    common = ["--max-steps", 6, "--batch-size", 4, "--lr", 3e-3, "--eval-every", 0, "--save-every", 0,
              "--dtype", "bf16"]
    full = _run(corpus, cache, tmp_path / "full", *common)
    part = _run(corpus, cache, tmp_path / "resumed", *common, "--stop-after", 3)
    rest = _run(corpus, cache, tmp_path / "resumed", *common, "--resume", "auto")
    assert part.losses + rest.losses == full.losses
    final = _params(tmp_path / "full" / "final")
    assert all(t.dtype == torch.bfloat16 for t in final.values())
    auto = _run(corpus, cache, tmp_path / "autocast", *common, "--precision", "autocast")
    # same init and data; bf16 vs fp32 parameters in the forward: close, not equal
    assert full.losses[0] == pytest.approx(auto.losses[0], rel=2e-2)
    assert full.losses[-1] == pytest.approx(auto.losses[-1], rel=5e-2)
    assert full.losses[-1] < full.losses[0]


def test_packing_metadata_from_the_loader_plans_the_flash_model_as_detection_does():
    """cu_seqlens / max_seqlen computed on the CPU by the loader (what flashlm train passes the flash
    model) give the very loss and gradients of the model's own detection from position_ids."""
    from flashlm.attention.padding import prepare_from_position_ids
    from flashlm.models import build_model
    from flashlm.train.data import PackedDataset

    rows = torch.randint(0, 200, (6, 32), dtype=torch.int32)
    starts = torch.zeros(6, 32, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 7] = starts[0, 20] = starts[3, 11] = True  # documents restart inside rows
    batch = PackedDataset(rows, starts).batch(torch.arange(4))
    cu, max_len = prepare_from_position_ids(batch["position_ids"])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 20, 32, 64, 96, 107, 128] and max_len == 32
    model = build_model("tiny", attn="flash")
    grads = []
    for extra in ({}, {"cu_seqlens": cu, "max_seqlen": max_len}):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, **extra).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    # the model does use what it is given: one document per row is another batch
    rows_only = torch.arange(0, 129, 32, dtype=torch.int32)
    assert not torch.equal(model(**batch, cu_seqlens=rows_only, max_seqlen=32).loss.detach(), l0)
