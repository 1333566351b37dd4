"""`flashlm sanity`: the command passes on a correct model and its comparison catches a wrong one."""

import pytest
import torch

from flashlm import sanity

pytest.importorskip("transformers")


def test_sanity_command_passes(capsys):
    assert sanity.main(["--seqlen", "24"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "max abs diff" in line]
    assert len(lines) == 3 and all(line.rstrip().endswith("ok") for line in lines)
    for name in ("plain batch", "left-padded batch", "prefill + 8 decode steps"):
        assert name in out
    assert "passed" in out


def test_sanity_comparison_catches_a_wrong_model(tmp_path):
    import transformers

    from flashlm.models import build_model, save_pretrained

    config = sanity.sanity_config("sanity")
    ours = build_model(config).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        save_pretrained(ours, tmp_path / "m"), attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # a wrong RoPE base: plain, padded and decoded logits all drift
        ours.model.rotary_emb.inv_freq.mul_(1.01)
    diffs = sanity.compare(ours, theirs, batch=2, seqlen=16, seed=0, device="cpu")
    assert len(diffs) == 3 and all(d > 1e-4 for d in diffs.values()), diffs


def test_sanity_tolerance_exit_code(capsys):
    # tol < 0 cannot be met by any diff: the command must say FAIL and exit 1
    assert sanity.main(["--seqlen", "8", "--batch", "2", "--tol", "-1"]) == 1
    assert "FAIL" in capsys.readouterr().out
