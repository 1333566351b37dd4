"""flashlm.generation: greedy/sampled decoding with the flash (static cache) and default models."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from helpers import left_padded_prompts, make_pair, naive_greedy

from flashlm.bench.timing import time_steps
from flashlm.generation import generate, main, sample_next_token, top_k_filter, top_p_filter

PROMPTS = [[5, 17, 99, 3, 44, 7], [8, 120], [33, 61, 200, 9]]


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 3, "attn_logit_softcap": 4.0}])
def test_greedy_identical_for_default_and_flash(overrides):
    default, flash = make_pair(**overrides)
    ids, mask = left_padded_prompts(PROMPTS)
    out_f = generate(flash, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    out_d = generate(default, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert out_f.sequences.shape == (3, ids.shape[1] + 8)
    assert torch.equal(out_f.sequences, out_d.sequences)
    assert torch.equal(out_f.sequences[:, : ids.shape[1]], ids)
    # and both equal the cache-free loop on each prompt alone
    for row, prompt in enumerate(PROMPTS):
        assert out_f.sequences[row, ids.shape[1]:].tolist() == naive_greedy(flash, prompt, 8)
    assert out_f.num_new_tokens.tolist() == [8, 8, 8]


@pytest.mark.parametrize("which", ["flash", "default"])
def test_on_step_reports_the_start_then_every_token(which):
    """generate() times nothing itself: on_step(0) comes after the checks and setup, before the
    prefill (the first forward), then on_step(i) after the i-th token is recorded, before the streamer."""
    default, flash = make_pair()
    model = flash if which == "flash" else default
    ids, mask = left_padded_prompts(PROMPTS)
    calls, forwards, streamed = [], [], []
    handle = model.register_forward_hook(lambda *_: forwards.append(len(calls)))
    try:
        out = generate(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], on_step=calls.append,
                       streamer=lambda t: streamed.append(len(calls)))
    finally:
        handle.remove()
    assert calls == [0, 1, 2, 3, 4, 5] and out.num_new_tokens.tolist() == [5, 5, 5]
    assert forwards[0] == 1  # the prefill ran after on_step(0)
    assert streamed == [2, 3, 4, 5, 6]  # the streamer sees token i after on_step(i) (calls holds 0..i)
    with_hook = out.sequences
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[]).sequences,
                       with_hook)


def test_time_steps_times_generate_through_on_step():
    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    timing, out = time_steps(lambda on_step: generate(flash, ids, attention_mask=mask, max_new_tokens=4,
                                                      eos_token_id=[], on_step=on_step))
    assert timing.steps == 4 and timing.first_s > 0 and timing.per_step_s > 0 and out.sequences.shape[1] == 10
    one, _ = time_steps(lambda on_step: generate(flash, ids, attention_mask=mask, max_new_tokens=1, on_step=on_step))
    assert one.steps == 1 and one.first_s > 0 and math.isnan(one.per_step_s)
    with pytest.raises(RuntimeError, match="on_step"):  # the hook not passed on: no silent zero
        time_steps(lambda on_step: generate(flash, ids, attention_mask=mask, max_new_tokens=2))


def test_time_steps_first_step_and_mean_of_the_later_ones():
    def loop(on_step):
        on_step(0)
        time.sleep(0.06)
        on_step(1)
        for i in range(2, 5):
            time.sleep(0.02)
            on_step(i)
        return "done"

    timing, result = time_steps(loop)
    assert result == "done" and timing.steps == 4
    assert 0.06 <= timing.first_s < 0.5 and 0.02 <= timing.per_step_s < 0.2


def test_timing_fields_are_gone_with_a_pointer_to_time_steps():
    _, flash = make_pair()
    out = generate(flash, torch.tensor([[5, 17]]), max_new_tokens=2, eos_token_id=[])
    for name in ("first_token_s", "per_token_s", "tokens_per_s"):
        assert not hasattr(out, name)
        with pytest.raises(AttributeError, match=r"time_steps.*docs/decode\.md"):
            getattr(out, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        out.nope  # noqa: B018


def test_eos_stops_each_row():
    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    free = generate(flash, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    new = free.sequences[:, ids.shape[1]:]
    eos = int(new[1, 2])  # row 1's third token becomes "EOS"
    out = generate(flash, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    got = out.sequences[:, ids.shape[1]:]
    for row in range(3):
        hits = (new[row] == eos).nonzero().flatten().tolist()
        stop = hits[0] + 1 if hits else 6
        assert out.num_new_tokens[row] == stop
        assert got[row, :stop].tolist() == new[row, :stop].tolist()
        assert (got[row, stop:] == 0).all()
    # every row stopping early ends the loop early
    eos_all = [int(new[r, 0]) for r in range(3)]
    out = generate(flash, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos_all)
    assert out.sequences.shape[1] == ids.shape[1] + 1 and out.num_new_tokens.tolist() == [1, 1, 1]


def test_right_padding_is_refused():
    _, flash = make_pair()
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        generate(flash, ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokens"):
        generate(flash, ids, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(flash, ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(flash, ids, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(flash, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 256\)"):
        generate(flash, ids + 300)


def test_sampling_reproducible_with_generator():
    default, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    kw = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "top_k": 50,
          "top_p": 0.95, "eos_token_id": []}
    a = generate(flash, ids, generator=torch.Generator().manual_seed(7), **kw).sequences
    b = generate(flash, ids, generator=torch.Generator().manual_seed(7), **kw).sequences
    c = generate(flash, ids, generator=torch.Generator().manual_seed(8), **kw).sequences
    d = generate(default, ids, generator=torch.Generator().manual_seed(7), **kw).sequences
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)
    # top_k=1 sampling is greedy
    g = generate(flash, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[]).sequences
    s = generate(flash, ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1, eos_token_id=[],
                 generator=torch.Generator().manual_seed(0)).sequences
    assert torch.equal(g, s)


def test_exponential_race_samples_the_distribution():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = p.log().expand(40000, -1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, do_sample=True, generator=gen)
    freq = torch.bincount(tokens, minlength=5).float() / 40000
    assert freq[4] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)  # ~4 sigma at n=40000
    # temperature sharpens: T -> 0 approaches greedy
    cold = sample_next_token(logits[:2000], do_sample=True, temperature=0.05, generator=gen)
    assert (cold == 0).float().mean() > 0.99


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[True, False, False, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = probs.log()
    assert torch.isfinite(top_p_filter(lp, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(lp, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(lp, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(lp[:, [3, 1, 0, 2]], 0.5)).tolist() == [[False, False, True, False]]


def test_streamer_gets_every_step():
    _, flash = make_pair()
    ids, mask = left_padded_prompts(PROMPTS)
    seen = []
    out = generate(flash, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[], streamer=seen.append)
    assert len(seen) == 4 and all(t.shape == (3,) and t.device.type == "cpu" for t in seen)
    assert torch.equal(torch.stack(seen, 1), out.sequences[:, ids.shape[1]:])

    class PutEnd:
        def __init__(self):
            self.puts, self.ended = 0, False

        def put(self, tokens):
            self.puts += 1

        def end(self):
            self.ended = True

    s = PutEnd()
    generate(flash, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[], streamer=s)
    assert s.puts == 3 and s.ended


def test_cli_prompt_ids_json(capsys):
    rc = main(["--model", "tiny", "--prompt-ids", "5,17,99", "--prompt-ids", "8 120", "--max-new-tokens", "4",
               "--attn", "flash", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["batch"] == 2 and result["prompt_len"] == 3
    assert all(1 <= n <= 4 for n in result["num_new_tokens"])
    assert [len(ids) for ids in result["new_token_ids"]] == result["num_new_tokens"]
    # same seed and weights with the default model: same tokens
    rc = main(["--model", "tiny", "--prompt-ids", "5,17,99", "--prompt-ids", "8 120", "--max-new-tokens", "4",
               "--attn", "default", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_token_ids"] == result["new_token_ids"]


def test_cli_reports_the_latencies_it_measures(capsys):
    rc = main(["--model", "tiny", "--prompt-ids", "5,17,99", "--prompt-ids", "8 120", "--max-new-tokens", "4",
               "--no-eos", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["first_token_ms"] > 0 and result["per_token_ms"] > 0
    assert result["tokens_per_s"] == pytest.approx(2 / (result["per_token_ms"] / 1e3), rel=0.01)
    rc = main(["--model", "tiny", "--prompt-ids", "5,17", "--max-new-tokens", "1", "--no-eos"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "first token" in text and "per token n/a" in text


def test_cli_text_prompt_with_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(253)])}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    rc = main(["--model", "tiny", "--prompt", "w1 w2 w3", "--tokenizer", str(path), "--max-new-tokens", "3",
               "--do-sample", "--top-p", "0.9", "--stream"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prompt_len"] == 3 and isinstance(result["text"][0], str)
    assert "first token" in out
    rc = main(["--model", "tiny", "--prompt", "w1", "--max-new-tokens", "2"])
    assert rc == 2 and "tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["default", "flash"])
def test_more_positions_than_the_model_has_are_refused_up_front(which):
    """prompt + max_new_tokens past max_position_embeddings (tiny: 512) would decode at untrained
    positions, and max_new_tokens=10**8 would run until memory is gone: refused before any step."""
    from flashlm.errors import InputError

    model = dict(zip(("default", "flash"), make_pair()))[which]
    ids = torch.randint(3, 256, (1, 10))
    for n in (503, 10**8):
        with pytest.raises(InputError, match=rf"prompt \(10 tokens\) \+ max_new_tokens {n} = {10 + n} positions "
                                             r"exceed the model's max_position_embeddings 512.*at most 502"):
            generate(model, ids, max_new_tokens=n, eos_token_id=[])


@pytest.mark.parametrize("which", ["default", "flash"])
def test_a_kv_cache_larger_than_memory_is_refused_up_front(which):
    """With positions to spare (max_position_embeddings 2**50), 10**12 new tokens need a ~500 TB cache:
    an InputError naming the sizes, not an allocator error (or a run that fills memory)."""
    from flashlm.errors import InputError

    default, flash = make_pair(max_position_embeddings=2**50)
    model = default if which == "default" else flash
    ids = torch.randint(3, 256, (2, 4))
    with pytest.raises(InputError, match=r"KV cache for 2 rows x \d+ positions .* needs [\d.]+ TiB .* more than "
                                         r"the [\d.]+ GiB available on cpu: lower max_new_tokens"):
        generate(model, ids, max_new_tokens=10**12, eos_token_id=[])


def _word_tokenizer(tmp_path, n_words):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_cli_names_both_vocab_sizes_when_the_tokenizer_is_larger(tmp_path, capsys):
    path = _word_tokenizer(tmp_path, 300)  # ids up to 299; the tiny model has 256
    rc = main(["--model", "tiny", "--prompt", "w1 w290", "--tokenizer", path, "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tokenizer's vocab (300 tokens)" in err and "vocab_size 256" in err and "id 290" in err, err


def test_cli_warns_once_when_the_model_can_generate_undecodable_ids(tmp_path, capsys):
    path = _word_tokenizer(tmp_path, 100)  # the tiny model can generate ids 100..255
    rc = main(["--model", "tiny", "--prompt", "w1 w2", "--prompt", "w3", "--tokenizer", path,
               "--max-new-tokens", "3", "--do-sample"])
    err = capsys.readouterr().err
    assert rc == 0
    assert err.count("warning:") == 1, err
    assert "vocab_size 256 is larger than the tokenizer's vocab (100 tokens)" in err and "ids >= 100" in err


@pytest.mark.cuda
def test_a_kv_cache_larger_than_gpu_memory_is_refused_and_a_fitting_one_runs():
    """CUDA: the check reads mem_get_info; a graph kept from an earlier call counts as free (it is
    reused or freed before the new cache), so a second call of the same shape still runs."""
    from flashlm.errors import InputError

    _, flash = make_pair(device="cuda", dtype=torch.bfloat16, max_position_embeddings=2**40)
    ids = torch.randint(3, 256, (2, 4), device="cuda")
    free, _ = torch.cuda.mem_get_info()
    too_many = free // (2 * 2 * 2 * 16 * 2 * 2) + 1024  # batch x layers x k/v x kv heads x head_dim x bf16
    with pytest.raises(InputError, match=r"KV cache for 2 rows .* available on cuda"):
        generate(flash, ids, max_new_tokens=too_many, eos_token_id=[])
    for _ in range(2):  # the first call captures and keeps a graph; the second reuses it
        out = generate(flash, ids, max_new_tokens=8, eos_token_id=[])
        assert out.sequences.shape == (2, 12) and out.cuda_graph
