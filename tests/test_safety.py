"""Data safety and bad inputs (issue 18): no save destroys the user's files, no typo silently changes
the math, and every damaged file or bad argument is named in an `InputError` before anything runs."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse fixture)

from flashlm.errors import InputError
from flashlm.models import build_model, from_pretrained, get_preset, save_pretrained

TINY = get_preset("tiny", vocab_size=64, num_layers=1, hidden_size=32, intermediate_size=64,
                  bos_token_id=None, eos_token_id=3)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(TINY)


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ------------------------------------------------------------------------- save_pretrained targets


def test_save_refuses_a_project_folder_and_the_working_directory(model, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')")
    (proj / "config.json").write_text("{}")  # even with a config.json among them
    before = _tree(proj)
    with pytest.raises(InputError, match=r"not a checkpoint folder .*src/"):
        save_pretrained(model, proj)
    monkeypatch.chdir(proj)
    for path in (".", ""):
        with pytest.raises(InputError, match="working directory|empty path"):
            save_pretrained(model, path)
    assert _tree(proj) == before and sorted(os.listdir(tmp_path)) == ["proj"]  # nothing touched


def test_save_refuses_a_plain_file_before_touching_it(model, tmp_path):
    out = tmp_path / "out"
    out.write_text("my notes")
    with pytest.raises(InputError, match="existing file"):
        save_pretrained(model, out)
    assert out.read_text() == "my notes" and sorted(os.listdir(tmp_path)) == ["out"]


def test_save_replaces_a_checkpoint_or_empty_folder_and_follows_links(model, tmp_path):
    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")
    ck = tmp_path / "ck"
    save_pretrained(build_model(TINY), ck)
    (ck / "tokenizer.json").write_text("{}")  # a checkpoint folder may hold its tokenizer
    os.symlink(ck, tmp_path / "link")
    save_pretrained(model, tmp_path / "link")
    assert os.path.islink(tmp_path / "link")
    assert torch.equal(from_pretrained(ck).lm_head.weight, model.lm_head.weight)
    assert sorted(os.listdir(tmp_path)) == ["ck", "empty", "link"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may delete from read-only folders")
def test_save_refuses_a_read_only_checkpoint(model, tmp_path):
    ck = tmp_path / "ck"
    save_pretrained(model, ck)
    os.chmod(ck, 0o555)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            save_pretrained(build_model(TINY), ck)
        assert sorted(os.listdir(tmp_path)) == ["ck"]
    finally:
        os.chmod(ck, 0o755)


def test_a_killed_save_leaves_nothing_behind_after_the_next_save(model, tmp_path):
    """A save killed mid-write (SIGKILL: no cleanup runs) leaves a hidden temp folder; the next
    save to the same place removes it."""
    ck = tmp_path / "ck"
    script = (
        "import os, signal, safetensors.torch as st\n"
        "from flashlm.models import build_model, get_preset, save_pretrained\n"
        "st.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"save_pretrained(build_model(get_preset('tiny', num_layers=1)), {str(ck)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True)
    assert proc.returncode == -9
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ck.tmp-")]  # the leftover
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_pretrained(model, ck)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert any("interrupted save" in str(w.message) for w in caught)


def test_a_crash_between_the_swap_renames_restores_the_old_checkpoint(model, tmp_path):
    ck = tmp_path / "ck"
    save_pretrained(model, ck)
    os.rename(ck, tmp_path / ".ck.tmp-999999999-abcdef12-old")  # moved aside, new one never swapped in
    with pytest.warns(UserWarning, match="restored"):
        save_pretrained(build_model(TINY), tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_max_shard_size_is_checked(model, tmp_path):
    for bad in ("abc", "0", -5, "MB", True):
        with pytest.raises(InputError, match="max_shard_size"):
            save_pretrained(model, tmp_path / "x", max_shard_size=bad)
    assert not os.listdir(tmp_path)
    save_pretrained(model, tmp_path / "x", max_shard_size="2KiB")
    assert len([f for f in os.listdir(tmp_path / "x") if f.endswith(".safetensors")]) > 1


# --------------------------------------------------------------------------- damaged checkpoints


def test_damaged_checkpoint_files_are_named(model, tmp_path):
    ck = tmp_path / "ck"
    save_pretrained(model, ck)
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors"):
        from_pretrained(ck)

    save_pretrained(model, ck, max_shard_size="4KiB")
    index = ck / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(InputError, match="index.json has no weight_map"):
        from_pretrained(ck)

    (ck / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(InputError, match="config.json is not valid JSON"):
        from_pretrained(ck)


# ------------------------------------------------------------------------------- config.json types


@pytest.mark.parametrize(
    ("key", "value"),
    [("tie_word_embeddings", "false"), ("attention_bias", 0), ("rms_norm_eps", "1e-5"),
     ("rope_theta", True), ("rope_theta", float("inf")), ("vocab_size", "64")],
)
def test_config_json_values_of_the_wrong_type_are_refused(model, tmp_path, key, value):
    ck = tmp_path / "ck"
    save_pretrained(model, ck)
    hf = json.loads((ck / "config.json").read_text())
    hf[key] = value
    (ck / "config.json").write_text(json.dumps(hf))
    with pytest.raises(InputError, match=rf"config.json.*{key} must"):
        from_pretrained(ck)


# --------------------------------------------------------------------------------- models, generate


@pytest.mark.parametrize("attn", ["default", "flash"])
def test_labels_and_cached_tokens_past_the_vocab_are_refused(attn):
    model = build_model(TINY, attn=attn).eval()
    ids = torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[0, 0] = -100  # ignored: fine
    model(ids, labels=labels)
    for bad in (64, -5):
        labels[1, 2] = bad
        with pytest.raises(InputError, match="labels out of range"):
            model(ids, labels=labels)
    if attn == "flash":
        cache = model.allocate_cache(2, 8)
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(InputError, match="input_ids out of range"):
            model(torch.tensor([[64], [1]]), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("attn", ["default", "flash"])
def test_generate_checks_pad_and_eos_ids_and_length_up_front(attn):
    from flashlm.generation import generate

    model = build_model(TINY, attn=attn).eval()
    ids = torch.randint(0, 64, (2, 5))
    first = generate(model, ids, max_new_tokens=1, eos_token_id=[]).sequences[:, -1]
    eos = int(first[0])  # row 0 finishes at once, so a bad pad id would be written right away
    for kwargs, match in [({"pad_token_id": 1000, "eos_token_id": eos}, "pad_token_id must be an int in"),
                          ({"pad_token_id": -1, "eos_token_id": eos}, "pad_token_id must be an int in"),
                          ({"eos_token_id": [eos, 64]}, "eos_token_id must be an int in")]:
        with pytest.raises(InputError, match=match):
            generate(model, ids, max_new_tokens=3, **kwargs)
    long = torch.randint(0, 64, (1, TINY.max_position_embeddings + 1))
    with pytest.raises(InputError, match=r"prompt \(513 tokens\) exceeds the model's max_position_embeddings 512"):
        generate(model, long, max_new_tokens=1)


def test_generate_cli_names_a_bad_tokenizer_file(tmp_path, capsys):
    from flashlm.generation import main

    bad = tmp_path / "tok.json"
    bad.write_text('{"not": "a tokenizer"}')
    assert main(["--model", "tiny", "--prompt", "hi", "--tokenizer", str(bad), "--device", "cpu"]) == 2
    assert "is not a valid tokenizer.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- sanity, bench


def test_sanity_refuses_empty_shapes(capsys):
    from flashlm import sanity

    for argv in (["--batch", "0"], ["--seqlen", "-3"]):
        with pytest.raises(SystemExit) as exc:
            sanity.main(argv)
        assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert sanity.main(["--seqlen", "510"]) == 2
    assert "exceeds the model's max_position_embeddings" in capsys.readouterr().err


def test_bench_refuses_a_folder_as_output_before_running(tmp_path, capsys):
    from flashlm.bench import cli

    data = tmp_path / "data"
    data.mkdir()
    argv = ["--model", "tiny", "--device", "cpu", "--compare", "default", "--cases", "forward",
            "--warmup-steps", "0", "--benchmark-steps", "1", "--seq-length", "8", "--no-progress"]
    assert cli.main([*argv, "--output", str(data)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "is a folder" in err
    assert sorted(os.listdir(tmp_path)) == ["data"] and not os.listdir(data)  # no stray data.tmp


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["default", "flash"])
def test_out_of_vocab_ids_on_cuda_are_refused_and_the_context_survives(attn):
    """On the GPU an id past the vocab would be a device-side assert that loses the process's CUDA
    context: the checks must refuse it first, and the model must keep working after."""
    model = build_model(TINY, attn=attn, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 6), device="cuda")
    labels = ids.clone()
    labels[1, 2] = 64
    with pytest.raises(InputError, match="labels out of range"):
        model(ids, labels=labels)
    with pytest.raises(InputError, match="input_ids out of range"):
        model(ids + 64)
    if attn == "flash":
        cache = model.allocate_cache(2, 8)
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(InputError, match="input_ids out of range"):
            model(torch.tensor([[64], [1]], device="cuda"), past_key_values=cache, use_cache=True)
    assert torch.isfinite(model(ids, labels=ids).loss)  # the context is intact
    torch.cuda.synchronize()
