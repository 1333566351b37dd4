"""`flashlm train` resume safety (issue 25): a resume that can read no checkpoint refuses instead of
starting over, a run keeps its tokenizer, a run folder belongs to one process at a time, a refused or
failed command writes nothing, damaged RNG files and non-finite weights are named, and an
unreadable file is reported as unreadable."""

import builtins
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import one_thread  # noqa: F401  (autouse fixture)
from safetensors.torch import load_file, save_file
from test_safety_train import _run, _steps, _write_corpus

from flashlm import folders
from flashlm.errors import InputError
from flashlm.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _other_tokenizer(tokenizer_json: Path, dest: Path) -> Path:
    """The run's tokenizer plus one added token: another tokenizer with the same vocab budget."""
    from flashlm.train import data as D

    tok = D.load_tokenizer(tokenizer_json)
    tok.add_special_tokens(["<other>"])
    tok.save(str(dest))
    return dest


@pytest.fixture(scope="module")
def six_of_nine(corpus, cache, tmp_path_factory):
    """A run stopped after 6 of 9 steps with checkpoints at 3 and 6 (copied by each test that uses it)."""
    out = tmp_path_factory.mktemp("six") / "run"
    _run(corpus, cache, out, "--max-steps", 9, "--save-every", 3, "--stop-after", 6)
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# --------------------------------------------------------------------------- 1: every checkpoint damaged


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(corpus, cache, tmp_path, six_of_nine):
    out = _copy(six_of_nine, tmp_path / "run")
    for step in (3, 6):
        _truncate(out / "checkpoints" / f"step_000000{step}" / "train_state.pt", 2000)
    before = _tree(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match=r"no checkpoint .* can be read.*step_0000006/train_state.pt.*"
                                             r"step_0000003/train_state.pt"):
            _run(corpus, cache, out, "--max-steps", 9, "--save-every", 3, "--resume", "auto", "--lr", "1e-3")
        with pytest.raises(InputError, match="no checkpoint .* can be read"):  # same flags: same refusal
            _run(corpus, cache, out, "--max-steps", 9, "--save-every", 3, "--resume", "auto")
        with pytest.raises(InputError, match=r"step_0000006/train_state.pt"):  # the run folder, named
            _run(corpus, cache, tmp_path / "elsewhere", "--max-steps", 9, "--resume", out)
    assert _tree(out) == before and len(_steps(out)) == 6
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------------- 2: the run's tokenizer


def test_a_run_keeps_its_tokenizer_and_a_refused_resume_writes_none(corpus, cache, tmp_path, six_of_nine, capsys):
    out = _copy(six_of_nine, tmp_path / "run")
    other = _other_tokenizer(out / "tokenizer.json", tmp_path / "other.json")
    before = _tree(out)
    for extra in (["--lr", "1e-3"], []):
        with pytest.raises(InputError, match=r"--tokenizer .*other.json is not the run's tokenizer .*step_0000006"):
            _run(corpus, cache, out, "--max-steps", 9, "--resume", "auto", "--tokenizer", other, *extra)
    with pytest.raises(InputError, match="other settings: --lr"):  # refused later: still writes nothing
        _run(corpus, cache, out, "--max-steps", 9, "--resume", "auto", "--tokenizer", out / "tokenizer.json",
             "--lr", "1e-3")
    assert _tree(out) == before

    # the run's own tokenizer, named explicitly, is the same setting: accepted
    capsys.readouterr()
    res = _run(corpus, cache, out, "--max-steps", 9, "--save-every", 3, "--stop-after", 7, "--resume", "auto",
               "--tokenizer", tmp_path / "run" / "tokenizer.json")
    assert res.start_step == 6 and "(the checkpoint's)" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == before["tokenizer.json"]

    # a run folder whose tokenizer.json was replaced resumes with the checkpoint's, and gets it back
    shutil.copy(other, out / "tokenizer.json")
    res = _run(corpus, cache, out, "--max-steps", 9, "--save-every", 3, "--resume", "auto")
    assert res.start_step == 7 and _steps(out) == list(range(1, 10))
    from flashlm.train import data as D

    kept = D.load_tokenizer(out / "tokenizer.json").to_str()
    assert kept == D.load_tokenizer(out / "checkpoints" / "step_0000003" / "model").to_str()
    assert kept != D.load_tokenizer(other).to_str()
    assert "restoring" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3: one process per folder


_HOLDER = """
import sys, time
from flashlm import folders
lock = folders.lock_folder(sys.argv[1], "--output")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_folder_in_use_is_refused_and_a_killed_holder_leaves_it_free(corpus, cache, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(out)
        with pytest.raises(InputError, match=rf"--output .*run is in use by another process \(pid {holder.pid}\)"):
            _run(corpus, cache, out, "--max-steps", 1)
        with pytest.raises(InputError, match="in use by another process"):
            _run(corpus, cache, out, "--max-steps", 1, "--resume", "auto")
        assert _tree(out) == before
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the dead process's lock
        holder.wait()
    res = _run(corpus, cache, out, "--max-steps", 1)
    assert res.final_dir is not None and _steps(out) == [1]
    assert not (out / folders.LOCK_NAME).exists()  # released (and removed) at the end of the run


def test_the_lock_is_held_while_training(corpus, cache, tmp_path, monkeypatch):
    """A second lock on the folder, taken from inside the running trainer's first save, is refused."""
    out = tmp_path / "run"
    seen = []
    real_save = ckpt.save_checkpoint

    def save_and_probe(*args, **kwargs):
        with pytest.raises(InputError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            folders.lock_folder(out, "--output")
        seen.append(True)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_probe)
    _run(corpus, cache, out, "--max-steps", 1)
    assert seen == [True]
    folders.lock_folder(out, "--output").release()  # free again once the run is over


# ---------------------------------------------------------------- 4: a failed run writes nothing


def test_a_failed_run_writes_nothing_and_a_reused_tokenizer_is_named(corpus, cache, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="the files hold no text"):
        _run(empty, cache, tmp_path / "rx", "--max-steps", 1)
    assert not (tmp_path / "rx").exists()
    (tmp_path / "ry").mkdir()
    with pytest.raises(ValueError, match="the files hold no text"):
        _run(empty, cache, tmp_path / "ry", "--max-steps", 1)
    assert os.listdir(tmp_path / "ry") == []  # an existing folder is kept, left empty

    capsys.readouterr()
    _run(corpus, cache, tmp_path / "rx", "--max-steps", 1)
    assert "trained a byte-level BPE" in capsys.readouterr().err
    (tmp_path / "rz").mkdir()
    shutil.copy(tmp_path / "rx" / "tokenizer.json", tmp_path / "rz" / "tokenizer.json")
    _run(corpus, cache, tmp_path / "rz", "--max-steps", 1)
    err = capsys.readouterr().err
    assert f"tokenizer: {tmp_path / 'rz' / 'tokenizer.json'} (kept in --output" in err


# --------------------------------------------------------------------- 5: RNG files and non-finite weights


def test_a_damaged_rng_file_is_named_and_resume_auto_falls_back(corpus, cache, tmp_path, six_of_nine):
    out = _copy(six_of_nine, tmp_path / "run")
    rng = out / "checkpoints" / "step_0000006" / "rng_rank0.pt"
    _truncate(rng, 200)
    with pytest.raises(InputError, match=r"step_0000006/rng_rank0.pt cannot be read"):
        ckpt.verify_checkpoint(rng.parent)
    with pytest.raises(InputError, match=r"step_0000006/rng_rank0.pt cannot be read"):
        _run(corpus, cache, tmp_path / "other", "--max-steps", 9, "--resume", rng.parent)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_0000006.*rng_rank0.pt"):
        res = _run(corpus, cache, out, "--max-steps", 9, "--save-every", 3, "--resume", "auto")
    assert res.start_step == 3 and _steps(out) == list(range(1, 10))


def test_non_finite_weights_in_a_checkpoint_are_refused_at_resume(corpus, cache, tmp_path, six_of_nine):
    out = _copy(six_of_nine, tmp_path / "run")
    weights = out / "checkpoints" / "step_0000006" / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = _tree(out)
    with pytest.raises(InputError, match=rf"step_0000006 holds NaN/inf .*{name}"):
        _run(corpus, cache, out, "--max-steps", 9, "--resume", "auto")
    assert _tree(out) == before


# ------------------------------------------------------------------- 6: --output '' and unreadable files


def test_an_empty_output_is_refused(corpus, cache, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    for output in ("", "  "):
        with pytest.raises(InputError, match="--output .* names no folder"):
            _run(corpus, cache, output, "--max-steps", 1)
    assert os.listdir(cwd) == ["notes.txt"]


def _deny(monkeypatch, denied: Path) -> None:
    """Make ``open`` refuse ``denied`` as the OS refuses a mode-000 file to a user who is not root."""
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == denied.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


@pytest.mark.parametrize("name", ["model/model.safetensors", "train_state.pt", "rng_rank0.pt"])
def test_an_unreadable_checkpoint_file_is_reported_as_unreadable(corpus, cache, tmp_path, six_of_nine,
                                                                  monkeypatch, name):
    out = _copy(six_of_nine, tmp_path / "run")
    denied = out / "checkpoints" / "step_0000006" / name
    _deny(monkeypatch, denied)
    with pytest.raises(PermissionError, match=rf"{name} is not readable \(permission denied\)"):
        ckpt.verify_checkpoint(denied.parents[1 if name.startswith("model/") else 0])
    before = _tree(out) if name != "train_state.pt" else None
    # not skipped as damaged (it is intact): --resume auto stops instead of falling back to step 3
    with pytest.raises(PermissionError, match=rf"{name} is not readable"):
        _run(corpus, cache, out, "--max-steps", 9, "--resume", "auto")
    monkeypatch.undo()
    if before is not None:
        assert _tree(out) == before


def _without_read_override() -> list[str] | None:
    """A command prefix under which a mode-000 file cannot be read: none needed for a plain user;
    for root, setpriv dropping the capabilities that let root read anything (None: unavailable)."""
    if os.geteuid() != 0:
        return []
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*drop, "true"], check=False, capture_output=True).returncode != 0:
        return None
    return drop


@pytest.mark.skipif(_without_read_override() is None, reason="root, and setpriv cannot drop CAP_DAC_OVERRIDE")
def test_a_mode_000_weights_file_is_reported_as_unreadable(corpus, cache, tmp_path, six_of_nine):
    """Real mode-000 files, read by a process that the OS does refuse (safetensors itself reports the
    refusal as "No such file or directory"): a checkpoint's weights, and a --model folder's."""
    out = _copy(six_of_nine, tmp_path / "run")
    step = out / "checkpoints" / "step_0000006"
    (step / "model" / "model.safetensors").chmod(0)
    common = ["--attn", "default", "--seq-length", 64, "--no-progress", "--batch-size", 2, "--eval-every", 0,
              "--max-steps", 9, "--data", corpus, "--cache-dir", cache]
    preset = ["--model", "tiny", "--vocab-size", 512, *common]
    commands = [[*preset, "--output", out, "--resume", "auto"],
                [*preset, "--output", tmp_path / "b", "--resume", step],
                [*common, "--model", step / "model", "--output", tmp_path / "c"]]
    code = "import sys\nfrom flashlm.train import main\nsys.exit(main(sys.argv[1:]))"
    for argv in commands:
        proc = subprocess.run([*_without_read_override(), sys.executable, "-c", code, *map(str, argv)],
                              check=False, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "model.safetensors is not readable (permission denied)" in proc.stderr, proc.stderr[-2000:]
        assert "No such file" not in proc.stderr
    assert len(_steps(out)) == 6 and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_lock_survives_its_folder_removed_between_makedirs_and_open(tmp_path, monkeypatch):
    """A refused process removes the (empty) folder it created; another process that made the folder just
    before must make it again, not report the run folder as unwritable (review finding)."""
    out = tmp_path / "run"
    real_open, calls = os.open, []

    def open_after_removal(path, *args):
        if not calls:
            calls.append(path)
            os.rmdir(out)  # what the other process's release did
            raise FileNotFoundError(path)
        return real_open(path, *args)

    monkeypatch.setattr(folders.os, "open", open_after_removal)
    lock = folders.lock_folder(out, "--output")
    monkeypatch.setattr(folders.os, "open", real_open)
    assert calls and (out / folders.LOCK_NAME).exists()
    lock.release()
