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


def test_sanity_catches_a_wrong_model_and_exits_1(tmp_path, capsys):
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
    # the command's verdict on these differences: FAIL lines and exit code 1
    assert sanity.report(diffs, tol=1e-4) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL (> 0.0001)") == 3 and "FAILED" in out
    assert sanity.report({name: 0.0 for name in diffs}, tol=1e-4) == 0


@pytest.mark.parametrize("tol", ["-1", "-1e-9", "nan", "inf", "abc"])
def test_sanity_refuses_bad_tolerance(tol, capsys):
    with pytest.raises(SystemExit) as exc:
        sanity.main(["--tol", tol])
    assert exc.value.code == 2  # argparse's usage error, before any model is built
    assert "--tol" in capsys.readouterr().err


def test_help_states_the_real_parameter_count(capsys):
    with pytest.raises(SystemExit) as exc:
        sanity.main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    real = sanity.sanity_config("sanity").num_parameters() / 1e6
    assert f"{real:.2f}M params" in out and "~1M" not in out
