"""`flashlm train` safety (issue 18, issue 15 §5): the defaults work together, a run folder belongs to
one run, non-finite settings and weights are refused before anything is saved, and a killed run's
damaged files (torn log line, torn checkpoint) are tolerated or named."""

import json
import random

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse fixture)
from safetensors.torch import load_file

from flashlm import train as T
from flashlm.cli import main as flashlm_main
from flashlm.errors import InputError

BASE = ["--model", "tiny", "--attn", "default", "--vocab-size", "512", "--seq-length", "64", "--no-progress",
        "--batch-size", "2", "--eval-every", "0"]


def _write_corpus(path, n_words=6000, seed=0):
    rng = random.Random(seed)
    words = ["alice", "bob", "sees", "likes", "the", "cat", "a", "dog", "red", "ball", "and", "then"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(rng.choice(words) + ("." if i % 9 == 8 else "") for i in range(n_words)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(corpus, cache, out, *extra):
    return T.train([*BASE, "--data", str(corpus), "--cache-dir", str(cache), "--output", str(out), *map(str, extra)])


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_defaults_train_a_tiny_model(corpus, tmp_path, capsys, monkeypatch):
    """`flashlm train --data corpus.txt --output run` with every other flag at its default (tiny
    preset, vocab 256 < a byte-level BPE): the model's vocab follows the tokenizer, seq-length the
    model's positions."""
    monkeypatch.setenv("FLASHLM_CACHE", str(tmp_path / "cache"))
    rc = flashlm_main(["train", "--data", str(corpus), "--output", str(tmp_path / "run"), "--max-steps", "2",
                       "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "using vocab_size 512" in err
    from flashlm.models import from_pretrained

    model = from_pretrained(tmp_path / "run" / "final")
    assert model.config.vocab_size == 512 and _steps(tmp_path / "run") == [1, 2]


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [("--weight-decay", "nan", "--weight-decay must be a finite number"),
     ("--lr", "inf", "--lr must be a finite number"),
     ("--lr", "1e38", r"--lr must be in \(0, 1.0\]"),
     ("--max-grad-norm", "nan", "--max-grad-norm must be a finite"),
     ("--weight-decay", "-1", "--weight-decay must be >= 0"),
     ("--device", "cuda:0" if not torch.cuda.is_available() else "cuda:99", "--device cuda")],
)
def test_absurd_settings_are_refused_before_anything_is_written(corpus, cache, tmp_path, flag, value, match):
    with pytest.raises(InputError, match=match):
        _run(corpus, cache, tmp_path / "run", "--max-steps", 1, flag, value)
    assert not (tmp_path / "run").exists()


def test_non_finite_weights_are_never_saved(corpus, cache, tmp_path):
    """An inf in an embedding row no token uses keeps the loss finite; the run must still refuse to
    save it."""
    from flashlm.models import build_model, get_preset, save_pretrained
    from flashlm.train import data as D

    tok = D.train_tokenizer(D.read_documents([corpus]), 300)
    eos = tok.token_to_id(D.DEFAULT_EOS)
    model = build_model(get_preset("tiny", vocab_size=320, bos_token_id=None, eos_token_id=eos))
    with torch.no_grad():
        model.model.embed_tokens.weight[319] = float("inf")  # past the tokenizer's ids: never looked up
    folder = tmp_path / "start"
    save_pretrained(model, folder)
    tok.save(str(folder / "tokenizer.json"))
    args = ["--model", folder, "--attn", "default", "--seq-length", 64, "--no-progress", "--batch-size", 2,
            "--eval-every", 0, "--max-steps", 1, "--data", corpus, "--cache-dir", cache, "--output", tmp_path / "run"]
    with pytest.raises(FloatingPointError, match=r"model.embed_tokens.weight holds NaN/inf after step 1"):
        T.train(list(map(str, args)))
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_folder_belongs_to_one_run(corpus, cache, tmp_path):
    out = tmp_path / "run"
    _run(corpus, cache, out, "--max-steps", 2, "--save-every", 0)  # finished, no checkpoints
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(InputError, match="holds an earlier run .*--resume auto"):
        _run(corpus, cache, out, "--max-steps", 2)
    with pytest.raises(InputError, match="no checkpoint to resume"):
        _run(corpus, cache, out, "--max-steps", 2, "--resume", "auto")
    assert (out / "metrics.jsonl").read_text() == log  # the old run's log is untouched

    other = tmp_path / "other"
    _run(corpus, cache, other, "--max-steps", 3, "--stop-after", 1)
    with pytest.raises(InputError, match=r"other settings: --lr 0.0003 \(saved\) != 0.001 \(now\)"):
        _run(corpus, cache, other, "--max-steps", 3, "--resume", "auto", "--lr", "1e-3")
    with pytest.raises(InputError, match="would mix two runs"):  # another run's checkpoint into a used folder
        _run(corpus, cache, out, "--max-steps", 3, "--resume", other)
    res = _run(corpus, cache, other, "--max-steps", 3, "--resume", "auto", "--save-every", 1)  # may change
    assert res.start_step == 1 and _steps(other) == [1, 2, 3]


def test_resume_tolerates_a_torn_log_line_and_falls_back_from_a_torn_checkpoint(corpus, cache, tmp_path):
    out = tmp_path / "run"
    _run(corpus, cache, out, "--max-steps", 4, "--save-every", 1, "--stop-after", 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed while logging step 3
    ckpts = out / "checkpoints"
    state = ckpts / "step_0000002" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # killed while copying the checkpoint
    (ckpts / ".tmp-step_0000005").mkdir()  # a killed save's temp folder

    with pytest.raises(InputError, match=r"step_0000002/train_state.pt cannot be read"):
        _run(corpus, cache, out, "--max-steps", 4, "--resume", ckpts / "step_0000002")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_0000002"):
        res = _run(corpus, cache, out, "--max-steps", 4, "--save-every", 1, "--resume", "auto")
    assert res.start_step == 1 and _steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", *(f"step_000000{i}" for i in range(1, 5))]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "final" / "model.safetensors")).values())


def test_a_damaged_log_line_before_the_end_is_named(corpus, cache, tmp_path):
    out = tmp_path / "run"
    _run(corpus, cache, out, "--max-steps", 3, "--save-every", 1, "--stop-after", 2)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("garbage\n" + lines[1] + "\n")
    with pytest.raises(InputError, match=r"metrics.jsonl:1 is not a JSON record"):
        _run(corpus, cache, out, "--max-steps", 3, "--resume", "auto")


def test_a_damaged_token_cache_is_remade(corpus, tmp_path):
    from flashlm.train import data as D

    tok = D.train_tokenizer(D.read_documents([corpus]), 300)
    tokens, offsets = D.tokenize_corpus([corpus], tok, cache_dir=tmp_path)
    (cached,) = (tmp_path / "tokens").iterdir()
    cached.write_bytes(cached.read_bytes()[:50])
    with pytest.warns(UserWarning, match="cache .* is unreadable"):
        again, offsets_again = D.tokenize_corpus([corpus], tok, cache_dir=tmp_path)
    assert torch.equal(again, tokens) and torch.equal(offsets_again, offsets)
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [cached.name]  # re-written, no .tmp left
