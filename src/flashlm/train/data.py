"""Training data: local text files -> tokens (cached on disk) -> packed rows -> a resumable iterator.

Pipeline (all deterministic given the files, the tokenizer and the seed):

1. :func:`find_files` lists ``.txt`` / ``.jsonl`` files (a file, a folder searched recursively in
   sorted order, or a list of either). A ``.txt`` file is one document; a ``.jsonl`` file holds one
   document per line in a text field (``text_field``, default ``"text"``).
2. :func:`load_tokenizer` reads a ``tokenizer.json`` (HF ``tokenizers`` format) or
   :func:`train_tokenizer` trains a byte-level BPE on the documents.
3. :func:`tokenize_corpus` encodes every document once and caches ``(tokens, doc_offsets)`` on disk
   under a key made of the files' content hash, the tokenizer's hash and the text field.
4. :func:`pack` shuffles documents by seed, joins them with EOS after each document, and cuts the
   stream into rows of ``seq_length`` tokens (the tail shorter than one row is dropped).
5. :class:`PackedDataset` turns rows into batches ``{"input_ids", "position_ids", "labels"}``, each
   (batch, seq_length) int64:

   - ``position_ids`` restart at 0 at each document start and at each row start (a document that
     spills into the next row continues there as a new segment from position 0), so the flash
     model's varlen path keeps documents from attending to each other (the default eager model does
     *not* isolate them: it only sees the restarted positions);
   - ``labels`` are HF-style (equal to ``input_ids``; the model shifts them inside) with ``-100`` at
     each document's first token, so the last token of a document (its EOS) is never trained to
     predict the first token of the next, unrelated document.

6. :class:`DataIterator` walks a per-epoch permutation of the rows (``torch.randperm`` seeded by
   ``seed + epoch``), gives rank ``r`` of ``world_size`` the ``r``-th slice of every global batch,
   and has ``state_dict()`` / ``load_state_dict()`` so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flashlm.errors import InputError

__all__ = [
    "DataIterator",
    "PackedDataset",
    "check_text_file",
    "find_files",
    "load_tokenizer",
    "pack",
    "read_documents",
    "resolve_eos_id",
    "tokenize_corpus",
    "tokenizer_hash",
    "train_tokenizer",
]

IGNORE_INDEX = -100
DATA_SUFFIXES = (".txt", ".jsonl")
# Special tokens looked up (in this order) when the model config does not name an EOS id.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
DEFAULT_EOS = "<|endoftext|>"
_CACHE_VERSION = 1
# Binary detection reads this many leading bytes (git's heuristic looks for NUL in the first 8000).
PROBE_BYTES = 8192
# Share of the probed characters that may be undecodable or control characters: stray latin-1
# bytes in text stay far below it, random bytes (compressed or encrypted data) reach ~60%.
MAX_JUNK_FRACTION = 0.3
# Undecodable bytes (U+FFFD after decoding) and control characters text does not hold (all C0 but
# tab, newline, vertical tab, form feed, carriage return and escape; DEL).
_JUNK = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\ufffd]")


def default_cache_dir() -> Path:
    """``$FLASHLM_CACHE`` or ``~/.cache/flashlm``; tokenized corpora go under ``tokens/``."""
    return Path(os.environ.get("FLASHLM_CACHE", Path.home() / ".cache" / "flashlm"))


# --------------------------------------------------------------------------------------------- files


def find_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """List the ``.txt`` / ``.jsonl`` files of ``data`` (a file, a folder, or a list of them).

    Folders are searched recursively; files come in sorted path order so hashing and packing are
    reproducible. Raises ``FileNotFoundError`` for a missing path and ``ValueError`` if no data file
    is found.
    """
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"--data: {p} does not exist")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
        elif p.suffix in DATA_SUFFIXES:
            files.append(p)
        else:
            raise ValueError(f"--data: {p} is not a .txt or .jsonl file (allowed: {DATA_SUFFIXES})")
    if not files:
        raise ValueError(f"--data: no .txt or .jsonl files found in {[str(i) for i in items]}")
    for f in files:
        check_text_file(f)
    return files


def check_text_file(path: Path) -> None:
    """Refuse (``InputError`` naming the file) a file whose first :data:`PROBE_BYTES` bytes are not
    UTF-8 text: a NUL byte, or more than :data:`MAX_JUNK_FRACTION` of the characters undecodable or
    control characters. Documents are read with ``errors="replace"``, so a binary file would
    otherwise train silently on replacement characters."""
    with open(path, "rb") as fh:
        head = fh.read(PROBE_BYTES)
    # incremental: a multi-byte character cut at the end of the probe is not an error
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    junk = len(_JUNK.findall(text))
    if b"\0" in head or junk > MAX_JUNK_FRACTION * max(1, len(text)):
        why = "it holds NUL bytes" if b"\0" in head else f"{junk} of its first {len(text)} characters are not text"
        raise InputError(
            f"--data: {path} is not UTF-8 text ({why}: a binary file, or text in another encoding such as "
            "UTF-16); convert it to UTF-8 or leave it out of --data"
        )


def read_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of ``files`` in order: a whole ``.txt`` file, or each ``.jsonl`` line's
    ``text_field``. Empty documents are skipped. A malformed jsonl line raises ``ValueError`` with
    its file and line number."""
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(
                        f"{f}:{lineno}: no text field {text_field!r} (found {keys}); "
                        "pass the field name with --text-field"
                    )
                text = obj[text_field]
                if not isinstance(text, str):
                    raise TypeError(f"{f}:{lineno}: field {text_field!r} is {type(text).__name__}, not str")
                if text.strip():
                    yield text


def files_hash(files: Sequence[Path]) -> str:
    """sha256 over each file's name-independent content hash, in order (renaming keeps the cache)."""
    h = hashlib.sha256()
    for f in files:
        fh = hashlib.sha256()
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                fh.update(block)
        h.update(f.suffix.encode() + fh.digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike):
    """Load a ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a folder that holds one."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("training needs the `tokenizers` package: pip install 'flashlm[train]'") from None
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"--tokenizer: {p} not found (expected a tokenizers tokenizer.json)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception)
        raise ValueError(f"--tokenizer: {p} is not a valid tokenizer.json ({e})") from None


def train_tokenizer(documents: Iterator[str], vocab_size: int, eos_token: str = DEFAULT_EOS):
    """Train a byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token).

    ``vocab_size`` includes the 256 byte tokens and ``eos_token``; on a small corpus BPE may stop
    with fewer merges, so the result can be smaller than asked (never larger).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(
            f"a byte-level BPE needs vocab_size >= 257 (256 bytes + EOS), got {vocab_size}; "
            "pass a tokenizer.json with --tokenizer or use a model with a larger vocab"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's JSON serialization (vocab, merges, normalizer, ...)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def resolve_eos_id(tokenizer, eos_token_id: int | None = None) -> int:
    """The EOS id put between packed documents: ``eos_token_id`` if given (the model config's),
    else the first of :data:`EOS_CANDIDATES` the tokenizer knows."""
    if eos_token_id is not None:
        if not 0 <= eos_token_id < tokenizer.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"eos_token_id {eos_token_id} is outside the tokenizer's vocab "
                f"({tokenizer.get_vocab_size(with_added_tokens=True)} tokens)"
            )
        return eos_token_id
    for name in EOS_CANDIDATES:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    raise ValueError(
        f"cannot find an end-of-text token in the tokenizer (looked for {EOS_CANDIDATES}); "
        "set eos_token_id in the model's config.json"
    )


# -------------------------------------------------------------------------------------- tokenization


def tokenize_corpus(
    files: Sequence[Path],
    tokenizer,
    text_field: str = "text",
    cache_dir: str | os.PathLike | None = None,
    batch_docs: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every document once, with an on-disk cache.

    Returns ``tokens`` (T,) int32 (all documents back to back, no separators) and ``offsets``
    (num_docs + 1,) int64 with document ``i`` at ``tokens[offsets[i]:offsets[i + 1]]``.
    The cache file is ``<cache_dir>/tokens/<key>.pt`` with key = sha256(files' contents, tokenizer
    JSON, text field, format version), written atomically (temp file + ``os.replace``).
    Raises ``ValueError`` if the files hold no text.
    """
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        f"{_CACHE_VERSION}|{files_hash(files)}|{tokenizer_hash(tokenizer)}|{text_field}".encode()
    ).hexdigest()[:32]
    path = cache_root / "tokens" / f"{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["tokens"], blob["offsets"]
        except (RuntimeError, OSError, KeyError, EOFError) as e:  # a damaged cache is re-made, not fatal
            warnings.warn(f"tokenized-data cache {path} is unreadable ({str(e).splitlines()[0]}); "
                          "tokenizing again", stacklevel=2)

    chunks: list[torch.Tensor] = []
    lengths: list[int] = []
    batch: list[str] = []

    def flush():
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = torch.tensor(enc.ids, dtype=torch.int32)
            chunks.append(ids)
            lengths.append(len(ids))
        batch.clear()

    for doc in read_documents(files, text_field):
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    if not chunks or sum(lengths) == 0:
        raise ValueError(f"--data: the files hold no text ({[str(f) for f in files][:5]})")
    tokens = torch.cat(chunks)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"tokens": tokens, "offsets": offsets}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError):  # an unwritable cache only costs a re-tokenization next time
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return tokens, offsets


# --------------------------------------------------------------------------------------------- pack


def pack(
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    seq_length: int,
    eos_id: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle documents (by ``seed``), append EOS to each, and cut the stream into rows.

    Returns ``rows`` (R, seq_length) int32 and ``starts`` (R, seq_length) bool, True where a
    document begins. The stream's tail shorter than ``seq_length`` is dropped.
    """
    n_docs = offsets.numel() - 1
    order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    lengths = offsets[1:] - offsets[:-1]
    # Gather the shuffled documents with one index tensor (no Python loop over documents).
    seg_len = lengths[order] + 1  # +1 for the EOS after each document
    seg_start = torch.zeros_like(seg_len)
    seg_start[1:] = seg_len.cumsum(0)[:-1]
    total = int(seg_len.sum())
    n_rows = total // seq_length
    if n_rows == 0:
        raise ValueError(
            f"the data has {total} tokens (with EOS), fewer than one row of --seq-length {seq_length}"
        )
    pos_in_seg = torch.arange(total) - torch.repeat_interleave(seg_start, seg_len)
    src = torch.repeat_interleave(offsets[:-1][order], seg_len) + pos_in_seg
    is_eos = pos_in_seg == torch.repeat_interleave(seg_len - 1, seg_len)
    stream = torch.where(is_eos, torch.full_like(src, eos_id), tokens[src.clamp(max=tokens.numel() - 1)].long())
    starts = pos_in_seg == 0
    keep = n_rows * seq_length
    rows = stream[:keep].to(torch.int32).view(n_rows, seq_length)
    return rows, starts[:keep].view(n_rows, seq_length)


@dataclass
class PackedDataset:
    """Packed rows plus the document-start mask; ``batch(indices)`` builds model inputs."""

    rows: torch.Tensor  # (R, S) int32 token ids
    starts: torch.Tensor  # (R, S) bool, True at each document's first token

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def seq_length(self) -> int:
        return self.rows.shape[1]

    def split(self, eval_fraction: float) -> tuple[PackedDataset, PackedDataset | None]:
        """Hold out the last ``round(eval_fraction * R)`` rows (at least 1 when the fraction is > 0)
        for evaluation. Rows are cut from the document-shuffled stream, so the held-out rows are a
        random sample of documents; one document may straddle the split."""
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
        if eval_fraction == 0.0:
            return self, None
        n_eval = max(1, round(eval_fraction * len(self)))
        if n_eval >= len(self):
            raise ValueError(
                f"only {len(self)} rows of seq-length {self.seq_length}: too few to hold out "
                f"{n_eval} for evaluation (lower --eval-fraction or --seq-length, or add data)"
            )
        n_train = len(self) - n_eval
        return (
            PackedDataset(self.rows[:n_train], self.starts[:n_train]),
            PackedDataset(self.rows[n_train:], self.starts[n_train:]),
        )

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as ``input_ids`` / ``position_ids`` / ``labels``, each (B, S) int64."""
        input_ids = self.rows[indices].long()
        starts = self.starts[indices].clone()
        starts[:, 0] = True  # each row starts a segment: a spilled-over document restarts at 0
        col = torch.arange(self.seq_length).expand_as(input_ids)
        last_start = torch.where(starts, col, torch.zeros_like(col)).cummax(dim=1).values
        position_ids = col - last_start
        labels = input_ids.masked_fill(starts, IGNORE_INDEX)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


class DataIterator:
    """Endless, resumable, rank-sharded iterator over a :class:`PackedDataset`.

    Each ``next()`` consumes one global batch of ``batch_size * world_size`` rows from the current
    epoch's permutation and returns this rank's ``batch_size`` rows. An epoch ends when fewer than
    a global batch remain (those rows are skipped for that epoch); the next epoch reshuffles with
    ``seed + epoch``. ``state_dict()`` is the same on every rank.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if len(dataset) < batch_size * world_size:
            raise ValueError(
                f"the data packs into {len(dataset)} rows of seq-length {dataset.seq_length}, fewer "
                f"than one global batch ({batch_size} x {world_size} ranks); add data or lower "
                "--batch-size / --seq-length"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        global_bs = self.batch_size * self.world_size
        if self.index + global_bs > len(self._perm):
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        lo = self.index + self.rank * self.batch_size
        out = self.dataset.batch(self._perm[lo : lo + self.batch_size])
        self.index += global_bs
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_rows": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position. The dataset must have the same number of rows (same data, tokenizer,
        seq-length); a different batch size or world size keeps the epoch and row position."""
        if state["num_rows"] != len(self.dataset):
            raise ValueError(
                f"data position saved for {state['num_rows']} rows, but the data now packs into "
                f"{len(self.dataset)} rows: resume with the same --data, --tokenizer and --seq-length"
            )
        self.seed = state["seed"]
        self.epoch, self.index = state["epoch"], state["index"]
        self._perm = self._permutation(self.epoch)
