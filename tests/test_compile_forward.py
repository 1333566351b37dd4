"""The caller that compiles says so: ``compile_forward`` plans compiled calls as compiled (a fullgraph trace
would break on the eager plan's host reads) and leaves the model's eager calls eager."""

import torch

from flashlm.models import build_model


def _padded_batch():
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    return ids, mask


def test_compile_forward_traces_whole_and_leaves_eager_calls_eager():
    torch.manual_seed(0)
    model = build_model("tiny", attn="flash").eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        compiled = model.compile_forward(fullgraph=True, backend="eager")
        got = compiled(ids, attention_mask=mask).logits
    assert model.model.compiled is False and model.host_checks is True
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    assert model.explain(ids, attention_mask=mask)["mode"] == "eager"


def test_module_compile_in_place_plans_every_call_compiled():
    model = build_model("tiny", attn="flash").eval()
    model.compile(fullgraph=True, backend="eager")
    assert model.model.compiled is True and model.host_checks is False
    ids, mask = _padded_batch()
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
