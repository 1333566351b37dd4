"""Everything a run checks and resolves before its model is built: the model config, the
tokenizer (the checkpoint's, --tokenizer, the --model folder's, the one kept in --output, or a
byte-level BPE trained on --data), the checkpoint to resume and whether its settings match, and the
packed train / eval data with its resumable iterator."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from flashlm.errors import InputError
from flashlm.train import checkpoint as ckpt
from flashlm.train import data as fdata
from flashlm.train.parallel import Dist
from flashlm.train.run_folder import check_resume_args, find_resume_dir

DEFAULT_BPE_VOCAB = 512
DEFAULT_SEQ_LENGTH = 1024


@dataclass
class PreparedData:
    """What `prepare_data` resolves and checks before any model is built."""

    config: Any
    hf_folder: Path | None
    tok: Any
    train_ds: fdata.PackedDataset
    eval_ds: fdata.PackedDataset | None
    train_iter: fdata.DataIterator
    resume_dir: Path | None
    changed: list[str]  # batch-shape args a resume changes (warned about)



def prepare_data(args, out: Path, dd: Dist) -> PreparedData:
    """Config, tokenizer, resume checks and packed data: every check of the input runs here, before
    the model is built. Sets ``args.seq_length`` when it was left to its default."""
    config, hf_folder = resolve_model_config(args)
    if args.seq_length is None:
        args.seq_length = min(DEFAULT_SEQ_LENGTH, config.max_position_embeddings)
    if args.seq_length > config.max_position_embeddings:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    if hf_folder is not None:
        ckpt.check_weights_readable(hf_folder)  # a mode-000 file is not "No such file or directory"
    resume_dir = find_resume_dir(args, out)
    files = fdata.find_files(args.data)
    tok, eos_id, config = setup_tokenizer(args, config, hf_folder, files, out, dd, resume_dir)
    changed = []
    if resume_dir is not None:
        # Fail on a config or settings mismatch before any tokenization or model building.
        saved = ckpt.read_train_state(resume_dir)
        ckpt.check_config(saved["config"], config)
        changed = check_resume_args(saved.get("train_args", {}), args)

    # Rank 0 tokenizes (and fills the cache) first; the others then read the cache.
    if dd.main:
        tokens, offsets = fdata.tokenize_corpus(files, tok, args.text_field, args.cache_dir)
    dd.barrier()
    if not dd.main:
        tokens, offsets = fdata.tokenize_corpus(files, tok, args.text_field, args.cache_dir)
    rows, starts = fdata.pack(tokens, offsets, args.seq_length, eos_id, seed=args.seed)
    full = fdata.PackedDataset(rows, starts)
    use_eval = args.eval_every > 0 and args.eval_fraction > 0
    train_ds, eval_ds = full.split(args.eval_fraction if use_eval else 0.0)
    if eval_ds is not None and len(eval_ds) < dd.world_size:
        raise ValueError(
            f"only {len(eval_ds)} held-out rows for {dd.world_size} processes: raise --eval-fraction or add data"
        )
    train_iter = fdata.DataIterator(train_ds, args.batch_size, seed=args.seed, rank=dd.rank, world_size=dd.world_size)
    return PreparedData(config, hf_folder, tok, train_ds, eval_ds, train_iter, resume_dir, changed)


def resolve_model_config(args):
    """(config, hf_folder or None) for --model."""
    from flashlm.models.config import PRESETS, ModelConfig, get_preset

    if args.model in PRESETS:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
        if args.vocab_size is not None:
            # The preset's special ids may fall outside a smaller vocab; they are re-set from the tokenizer.
            overrides.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return get_preset(args.model, **overrides), None
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is neither a preset {sorted(PRESETS)} nor a folder with config.json")
    if args.vocab_size is not None:
        raise ValueError("--vocab-size only applies to a preset --model (a checkpoint folder fixes its vocab)")
    return ModelConfig.from_hf_config(folder), folder


def _first_eos(config) -> int | None:
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _find_tokenizer(args, config, hf_folder, files, out: Path, dd: Dist, resume_dir: Path | None):
    """(tokenizer, its file or None, where it came from): on resume the checkpoint's (a run keeps its
    tokenizer: a differing --tokenizer is refused), else --tokenizer, the --model folder's, the one
    kept in --output, or a byte-level BPE trained on --data. Writes nothing."""
    run_tok = resume_dir / "model" / "tokenizer.json" if resume_dir is not None else None
    if run_tok is not None and run_tok.is_file():
        tok = fdata.load_tokenizer(run_tok)
        if args.tokenizer is not None and fdata.load_tokenizer(args.tokenizer).to_str() != tok.to_str():
            raise InputError(
                f"--resume: --tokenizer {args.tokenizer} is not the run's tokenizer ({run_tok}): a run keeps "
                "the tokenizer it started with (its weights learned those token ids). Resume without "
                f"--tokenizer, or start a new run with it (a new --output, --model {resume_dir / 'model'})"
            )
        return tok, run_tok, f"{run_tok} (the checkpoint's)"
    if args.tokenizer is not None:
        return fdata.load_tokenizer(args.tokenizer), Path(args.tokenizer), f"{args.tokenizer} (--tokenizer)"
    if hf_folder is not None and (hf_folder / "tokenizer.json").is_file():
        path = hf_folder / "tokenizer.json"
        return fdata.load_tokenizer(path), path, f"{path} (the --model folder's)"
    kept = out / "tokenizer.json"
    if kept.is_file():
        return fdata.load_tokenizer(kept), kept, (
            f"{kept} (kept in --output from an earlier run there; pass --tokenizer to use another, or "
            "delete it to train a new one)")
    implicit_vocab = hf_folder is None and args.vocab_size is None
    if config.vocab_size < 257 and not implicit_vocab:
        raise ValueError(
            f"--model {args.model} has vocab_size {config.vocab_size}, too small for a trained byte-level "
            "BPE (>= 257: 256 bytes + EOS); pass --vocab-size (e.g. 512) or --tokenizer"
        )
    # Rank 0 trains once and sends it to the others (the same tokenizer everywhere, no file yet).
    tok = None
    if dd.main:
        bpe_size = max(config.vocab_size, DEFAULT_BPE_VOCAB) if implicit_vocab else config.vocab_size
        tok = fdata.train_tokenizer(fdata.read_documents(files, args.text_field), bpe_size)
    if dd.enabled:
        box = [tok.to_str() if dd.main else None]
        dist.broadcast_object_list(box, src=0)
        if not dd.main:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(box[0])
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    return tok, None, f"trained a byte-level BPE of {n_tok} tokens on --data (kept as {kept})"


def setup_tokenizer(args, config, hf_folder, files, out: Path, dd: Dist, resume_dir: Path | None = None):
    """Load or train the tokenizer (see `_find_tokenizer`: rank 0 says which); returns (tokenizer,
    eos_id, config with eos/vocab checked). Writes nothing: the run folder gets the tokenizer from
    ``run_folder.save_run_tokenizer`` once every input is checked."""
    tok, tok_path, source = _find_tokenizer(args, config, hf_folder, files, out, dd, resume_dir)
    if dd.main:
        print(f"flashlm train: tokenizer: {source}", file=sys.stderr)
    # A preset's vocab without --vocab-size is a default, not a choice: it follows the tokenizer.
    implicit_vocab = hf_folder is None and args.vocab_size is None
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok > config.vocab_size and implicit_vocab:
        vocab = max(DEFAULT_BPE_VOCAB, -(-n_tok // 64) * 64)  # a multiple of 64: friendlier matmul shapes
        if dd.main:
            print(f"flashlm train: the tokenizer has {n_tok} tokens, more than --model {args.model}'s "
                  f"vocab_size {config.vocab_size}; using vocab_size {vocab} (choose it with --vocab-size)",
                  file=sys.stderr)
        config = config.replace(vocab_size=vocab)
    if n_tok > config.vocab_size:
        raise ValueError(
            f"tokenizer/vocab mismatch: {tok_path or 'the trained tokenizer'} has {n_tok} tokens but the "
            f"model's vocab_size is {config.vocab_size}; token ids >= {config.vocab_size} would index past "
            "the embedding (use a matching tokenizer, or --vocab-size for a preset)"
        )
    if hf_folder is None:
        # A fresh model takes its EOS from the tokenizer (a preset's default ids mean nothing here).
        eos = fdata.resolve_eos_id(tok, None)
        if config.eos_token_id != eos:
            config = config.replace(eos_token_id=eos)
        if config.bos_token_id is not None and config.bos_token_id >= n_tok:
            config = config.replace(bos_token_id=None)
    else:
        eos = fdata.resolve_eos_id(tok, _first_eos(config))
    return tok, eos, config

