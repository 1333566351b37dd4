"""Replace a folder without ever destroying what the user keeps there.

Every writer that replaces a whole folder (``save_pretrained``, training checkpoints, ``final/``)
goes through :func:`stage` / :func:`commit`: the new content is written into a hidden temporary
folder beside the target and swapped in only when complete, so a crash never leaves a half-written
folder under the real name. Before anything is written, :func:`check_replaceable` refuses a target
that is not ours to replace: a plain file, the working directory, or a folder holding anything but
the files this kind of folder is made of (a project folder, ``"."``, a folder of notes).

Temporary folders are named ``.<name>.tmp-<pid>-<hex>`` (and ``...-old`` for the previous content
during the swap). A save first removes such leftovers of earlier saves whose process is gone (a
killed save), and restores an ``-old`` folder when a crash fell between the two renames of a swap.

:func:`lock_folder` gives one process a folder (a training run's ``--output``) for as long as it holds
the lock: an ``flock`` on a file in it, which the kernel drops when the process dies, so a killed run
never leaves its folder stuck.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable

from flashlm.errors import InputError

__all__ = ["HF_CHECKPOINT_ENTRIES", "LOCK_NAME", "FolderLock", "check_replaceable", "clean_leftovers", "commit",
           "discard", "lock_folder", "stage"]

# What an HF checkpoint folder holds (transformers' save_pretrained, tokenizers, flashlm): a folder
# holding only these (and config.json) may be replaced by a new checkpoint; anything else is refused.
HF_CHECKPOINT_ENTRIES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)


def _unexpected(path: str, entries: Iterable[str], dirs: Iterable[str]) -> list[str]:
    """Names in folder ``path`` that match none of the file patterns ``entries`` (or, for
    subfolders, none of ``dirs``)."""
    bad = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        patterns = dirs if os.path.isdir(full) and not os.path.islink(full) else entries
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            bad.append(name + ("/" if os.path.isdir(full) else ""))
    return bad


def check_replaceable(
    path: str | os.PathLike,
    what: str,
    entries: Iterable[str] = HF_CHECKPOINT_ENTRIES,
    dirs: Iterable[str] = (),
    marker: str | None = "config.json",
) -> str:
    """Refuse (``InputError``) to replace ``path`` unless it is absent, an empty folder, or a folder
    of ``what`` (holding ``marker`` and only files matching ``entries`` / subfolders matching
    ``dirs``). A folder we may replace but cannot empty raises ``PermissionError``. Touches nothing.

    Returns the absolute, symlink-resolved target (a link to a checkpoint replaces the folder it
    points at, and the link keeps pointing there).
    """
    raw = os.fspath(path)
    if raw == "":
        raise InputError(f"an empty path names no folder for the {what}: give a folder name")
    target = os.path.realpath(raw)
    cwd = os.path.realpath(os.getcwd())
    if target == cwd or cwd.startswith(target.rstrip(os.sep) + os.sep):
        raise InputError(
            f"refusing to replace {raw!r}: it is the working directory (or holds it); save the {what} "
            "into a new subfolder instead"
        )
    if not os.path.lexists(target):
        return target
    if not os.path.isdir(target):
        raise InputError(f"refusing to save the {what} to {raw!r}: it is an existing file, not a folder")
    if not os.listdir(target):
        return target
    bad = _unexpected(target, entries, dirs)
    if marker is not None and not os.path.exists(os.path.join(target, marker)):
        bad = bad or [f"(no {marker})"]
    if bad:
        raise InputError(
            f"refusing to replace {raw!r}: it is not a {what} folder (it holds {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}), and replacing it would delete those; choose a new or "
            "empty folder, or remove them first"
        )
    for root, subdirs, _ in os.walk(target):
        for d in [root, *(os.path.join(root, s) for s in subdirs)]:
            if not os.access(d, os.W_OK | os.X_OK):
                raise PermissionError(
                    f"cannot replace {raw!r}: {d!r} is read-only, so its files could not be removed "
                    "after the swap; make it writable or save elsewhere"
                )
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_leftovers(target: str) -> None:
    """Remove the temporary folders of earlier saves to ``target`` whose process is gone; restore
    ``target`` from an ``-old`` folder when a save died between moving it aside and swapping in."""
    parent, name = os.path.split(target)
    prefix = f".{name}.tmp-"
    if not os.path.isdir(parent):
        return
    leftovers = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    for n in leftovers:
        pid = n[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # a save in progress in another process
        full = os.path.join(parent, n)
        if n.endswith("-old") and not os.path.lexists(target):
            os.replace(full, target)
            warnings.warn(f"restored {target!r} from {full!r}, left by an interrupted save", stacklevel=3)
            continue
        shutil.rmtree(full, ignore_errors=True)
        warnings.warn(f"removed {full!r}, the temporary folder of an interrupted save", stacklevel=3)


def stage(target: str) -> str:
    """Create and return an empty temporary folder beside ``target`` (after cleaning leftovers)."""
    clean_leftovers(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, target: str) -> None:
    """Swap the complete folder ``tmp`` in at ``target`` (checked by `check_replaceable`); the old
    folder is moved aside first and deleted after."""
    if os.path.lexists(target):
        old = f"{tmp}-old"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):  # the save itself succeeded: say so rather than raise
            warnings.warn(f"saved {target!r}, but the previous version at {old!r} could not be removed; "
                          "the next save to it retries", stacklevel=3)
    else:
        os.replace(tmp, target)


def discard(tmp: str) -> None:
    """Remove a temporary folder after a failed save."""
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ locks

LOCK_NAME = ".flashlm.lock"


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.flashlm.lock`` (see :func:`lock_folder`)."""

    def __init__(self, folder: str, fd: int, created: list[str]) -> None:
        self.folder, self._fd, self._created = folder, fd, created

    def release(self) -> None:
        """Remove the lock file (while still holding it: a waiter then retries on the new file) and
        unlock; remove the folders the lock created if they are still empty (a refused run)."""
        if self._fd is None:
            return
        try:
            os.unlink(os.path.join(self.folder, LOCK_NAME))
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        _remove_if_empty(self._created)


def _remove_if_empty(created: list[str]) -> None:
    """rmdir the folders in ``created`` (outermost first), the deepest first, while they are empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break  # not empty (the run wrote files): keep it and its parents


def _holder(lock_file: str) -> str:
    try:
        with open(lock_file, encoding="ascii", errors="replace") as f:
            pid = f.read().strip()
    except OSError:
        pid = ""
    return f"another process (pid {pid})" if pid.isdigit() else "another process"


def lock_folder(path: str | os.PathLike, what: str) -> FolderLock:
    """Take ``path`` (created if absent) for this process: an exclusive, non-blocking ``flock`` on
    its ``.flashlm.lock``, which holds the owner's pid. ``InputError`` naming the holder if another
    process has it. Held until :meth:`FolderLock.release` or the process ends (the kernel drops the
    lock of a killed process, so it never stays stuck). Folders created here are removed again by
    ``release`` while empty, so a refused command leaves nothing behind."""
    folder = os.path.abspath(os.fspath(path))
    created, d = [], folder
    while not os.path.lexists(d):
        created.insert(0, d)
        d = os.path.dirname(d)
    os.makedirs(folder, exist_ok=True)
    lock_file = os.path.join(folder, LOCK_NAME)
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a refused process removed the folder it had created: make it again
            os.makedirs(folder, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            _remove_if_empty(created)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(
                    f"{what} {os.fspath(path)} is in use by {_holder(lock_file)}: one process at a time "
                    "trains into a run folder; wait for it to finish (or stop it), or choose another folder"
                ) from None
            raise
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: retry
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return FolderLock(folder, fd, created)
