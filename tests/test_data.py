"""flashlm.train.data: files, tokenizer, cache, packing semantics, resumable sharded iterator."""

import json

import pytest
import torch

from flashlm.train import data as D

EOS = 0


def _write_corpus(root, n_docs=40):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The first text file. Ünïcödé and emoji 🙂 survive byte-level BPE.\n" * 3)
    with open(root / "sub" / "b.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"body": f"document {i}: " + "ab cd " * (i % 7 + 1), "id": i}) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped
    (root / "ignored.md").write_text("not data")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return D.train_tokenizer(D.read_documents(D.find_files(corpus), "body"), 400)


# --------------------------------------------------------------------------------------------- files


def test_find_files_recursive_sorted_and_filtered(corpus):
    files = D.find_files(corpus)
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert D.find_files([corpus / "a.txt"]) == [corpus / "a.txt"]


def test_find_files_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.find_files(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        D.find_files(tmp_path)
    with pytest.raises(ValueError, match="not a .txt or .jsonl"):
        D.find_files(corpus / "ignored.md")


def test_binary_files_are_refused_naming_the_file(tmp_path):
    """A binary file named .txt (or a folder holding one) is refused, not tokenized into junk."""
    import random

    rng = random.Random(0)
    cases = {
        "weights.txt": b"PK\x03\x04" + bytes(100) + b"some text",  # a zip / torch.save: NUL bytes
        "noise.txt": bytes(rng.randrange(1, 256) for _ in range(4000)),  # no NUL, mostly not UTF-8
        "utf16.jsonl": '{"text": "hello"}\n'.encode("utf-16"),  # text, but not UTF-8
    }
    for name, blob in cases.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "ok.txt").write_text("plain text\n")
        (folder / name).write_bytes(blob)
        for data in (folder, folder / name):
            with pytest.raises(ValueError, match=rf"--data: .*{name} is not UTF-8 text"):
                D.find_files(data)
    # UTF-8 text passes: emoji, a 3-byte character cut at the end of the probed chunk, a few stray
    # latin-1 bytes (decoded with replacement characters, as before)
    fine = tmp_path / "fine"
    fine.mkdir()
    (fine / "a.txt").write_text("emoji 🙂 and Ünïcödé\n" * 50)
    (fine / "b.txt").write_text("€" * 5000)
    (fine / "c.txt").write_bytes("caf\xe9 cr\xe8me, na\xefve fa\xe7ade. ".encode("latin-1") * 30)
    assert [f.name for f in D.find_files(fine)] == ["a.txt", "b.txt", "c.txt"]


def test_read_documents_jsonl_field_and_errors(corpus, tmp_path):
    docs = list(D.read_documents(D.find_files(corpus), "body"))
    assert len(docs) == 41 and docs[1].startswith("document 0:")
    with pytest.raises(ValueError, match=r"b.jsonl:1: no text field 'text' \(found \['body', 'id'\]\)"):
        list(D.read_documents(D.find_files(corpus)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        list(D.read_documents([bad]))


# ------------------------------------------------------------------------------------- tokenizer


def test_trained_byte_level_bpe_round_trips(tokenizer, tmp_path):
    assert 257 <= tokenizer.get_vocab_size() <= 400
    eos = D.resolve_eos_id(tokenizer)
    assert tokenizer.id_to_token(eos) == D.DEFAULT_EOS
    text = "Unseen: Ωmega ∑ 🙂 tabs\tand\nnewlines"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = D.load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert D.tokenizer_hash(loaded) == D.tokenizer_hash(tokenizer)


def test_tokenizer_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        D.train_tokenizer(iter(["abc"]), 256)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        D.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        D.load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="outside the tokenizer's vocab"):
        D.resolve_eos_id(tokenizer, 10**6)


# ------------------------------------------------------------------------------------ tokenization


def test_tokenize_corpus_cache_keyed_by_content(tmp_path, tokenizer):
    root = _write_corpus(tmp_path / "c")
    files = D.find_files(root)
    cache = tmp_path / "cache"
    tokens, offsets = D.tokenize_corpus(files, tokenizer, "body", cache_dir=cache)
    assert tokens.dtype == torch.int32 and offsets[0] == 0 and offsets[-1] == tokens.numel()
    assert offsets.numel() == 42  # 41 documents
    docs = list(D.read_documents(files, "body"))
    assert tokens[offsets[5]:offsets[6]].tolist() == tokenizer.encode(docs[5], add_special_tokens=False).ids
    cached = list((cache / "tokens").glob("*.pt"))
    assert len(cached) == 1
    again = D.tokenize_corpus(files, tokenizer, "body", cache_dir=cache)  # served from the cache
    assert torch.equal(again[0], tokens) and len(list((cache / "tokens").glob("*.pt"))) == 1
    (root / "a.txt").write_text("changed content")
    changed, _ = D.tokenize_corpus(files, tokenizer, "body", cache_dir=cache)
    assert len(list((cache / "tokens").glob("*.pt"))) == 2 and not torch.equal(changed, tokens)


def test_empty_data_is_an_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="hold no text"):
        D.tokenize_corpus(D.find_files(tmp_path), tokenizer, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ packing


def _docs():
    docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36, 37], [41], [51, 52, 53, 54]]
    tokens = torch.tensor([t for d in docs for t in d], dtype=torch.int32)
    offsets = torch.tensor([0] + [len(d) for d in docs]).cumsum(0)
    return docs, tokens, offsets


def test_pack_stream_follows_seeded_document_order():
    docs, tokens, offsets = _docs()
    rows, starts = D.pack(tokens, offsets, seq_length=4, eos_id=EOS, seed=3)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(3)).tolist()
    stream = [t for i in order for t in [*docs[i], EOS]]
    assert rows.shape == (len(stream) // 4, 4)
    assert rows.flatten().tolist() == stream[: rows.numel()]  # the short tail is dropped
    first_tokens = [t for i in order for t in [True] + [False] * len(docs[i])]
    assert starts.flatten().tolist() == first_tokens[: rows.numel()]


def test_batch_positions_and_labels_respect_documents():
    _, tokens, offsets = _docs()
    ds = D.PackedDataset(*D.pack(tokens, offsets, seq_length=6, eos_id=EOS, seed=0))
    b = ds.batch(torch.arange(len(ds)))
    ids, pos, labels = b["input_ids"], b["position_ids"], b["labels"]
    assert ids.dtype == pos.dtype == labels.dtype == torch.int64
    for r in range(len(ds)):
        starts = ds.starts[r].clone()
        starts[0] = True
        for t in range(6):
            # positions restart at each document start and at each row start, else count up
            assert pos[r, t] == (0 if starts[t] else pos[r, t - 1] + 1)
            assert (labels[r, t] == -100) == bool(starts[t])
            if not starts[t]:
                assert labels[r, t] == ids[r, t]
            # the model shifts labels: the EOS closing a document never learns the next one's start
            if ids[r, t] == EOS and t + 1 < 6:
                assert labels[r, t + 1] == -100


def test_pack_too_little_data():
    _, tokens, offsets = _docs()
    with pytest.raises(ValueError, match="fewer than one row"):
        D.pack(tokens, offsets, seq_length=1000, eos_id=EOS)


def test_split_holds_out_tail_rows():
    ds = D.PackedDataset(torch.arange(40, dtype=torch.int32).view(10, 4), torch.zeros(10, 4, dtype=torch.bool))
    train, ev = ds.split(0.2)
    assert len(train) == 8 and len(ev) == 2 and ev.rows[0, 0] == 32
    assert ds.split(0.0) == (ds, None)
    with pytest.raises(ValueError, match="too few"):
        D.PackedDataset(ds.rows[:1], ds.starts[:1]).split(0.5)


# ---------------------------------------------------------------------------------------- iterator


def _row_ids(batch):
    return batch["input_ids"][:, 0].tolist()  # row r's first token is 4 * r


@pytest.fixture
def numbered():
    return D.PackedDataset(torch.arange(44, dtype=torch.int32).view(11, 4), torch.zeros(11, 4, dtype=torch.bool))


def test_iterator_epochs_are_seeded_permutations(numbered):
    it = D.DataIterator(numbered, batch_size=2, seed=5)
    epoch0 = [r for _ in range(5) for r in _row_ids(next(it))]
    # 5 batches of 2 out of 11 rows: 10 distinct rows, one skipped this epoch
    assert len(set(epoch0)) == 10 and set(epoch0) <= {4 * i for i in range(11)}
    assert epoch0 != sorted(epoch0)  # shuffled
    assert it.epoch == 0
    next(it)
    assert it.epoch == 1  # the 11th row did not make a batch: a new epoch, reshuffled
    again = D.DataIterator(numbered, batch_size=2, seed=5)
    assert [r for _ in range(5) for r in _row_ids(next(again))] == epoch0
    other = D.DataIterator(numbered, batch_size=2, seed=6)
    assert [r for _ in range(5) for r in _row_ids(next(other))] != epoch0


def test_iterator_shards_the_global_batch_by_rank(numbered):
    whole = D.DataIterator(numbered, batch_size=4, seed=1)
    ranks = [D.DataIterator(numbered, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary
        assert _row_ids(next(whole)) == _row_ids(next(ranks[0])) + _row_ids(next(ranks[1]))


def test_iterator_resume_is_exact(numbered):
    it = D.DataIterator(numbered, batch_size=3, seed=2)
    for _ in range(4):
        next(it)
    state = it.state_dict()
    expected = [_row_ids(next(it)) for _ in range(6)]
    resumed = D.DataIterator(numbered, batch_size=3, seed=2)
    resumed.load_state_dict(state)
    assert [_row_ids(next(resumed)) for _ in range(6)] == expected
    smaller = D.PackedDataset(numbered.rows[:9], numbered.starts[:9])
    with pytest.raises(ValueError, match="saved for 11 rows"):
        D.DataIterator(smaller, batch_size=3).load_state_dict(state)


def test_iterator_errors(numbered):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        D.DataIterator(numbered, batch_size=6, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        D.DataIterator(numbered, batch_size=1, rank=2, world_size=2)
