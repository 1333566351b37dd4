"""Int8 weight-only decode (issue 27 item 3) on CPU: quantize/dequantize bounds, the Triton kernels under
TRITON_INTERPRET=1 (fp16/fp32) against the torch reference, Int8Linear, quantize_model's module swap and
refusals, state round trips, from_pretrained / generate / flashlm generate with int8, the loss and
explain() of a quantized model, and the quality check: a tiny model trained by `flashlm train` on real
text (Python's own sources) scored by `flashlm eval`, int8 perplexity within 1% of the unquantized one."""

import copy
import io
import json
import os
import pathlib

import pytest
import torch
from helpers import one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from flashlm.errors import InputError
from flashlm.models import build_model, from_pretrained, save_pretrained
from flashlm.models.quantize import is_quantized, projection_kinds, quantize_model
from flashlm.ops import int8_linear as il
from flashlm.ops._dispatch import triton_usable
from flashlm.ops.int8_linear import Int8Linear, int8_linear, int8_linear_ref, quantize_int8

needs_interpret = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                     reason="needs Triton and TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------- quantize

def test_quantize_int8_bounds():
    """Per row: the absmax element maps to +-127, every value within half a step of its original, the int8
    range [-127, 127]; an all-zero row quantizes to zeros with scale 1."""
    w = torch.randn(37, 200) * torch.logspace(-3, 1, 37)[:, None]
    w[5] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert q.min() >= -127 and q.max() <= 127
    deq = il.dequantize_int8(q, scale, torch.float32)
    assert ((deq - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    rows = [i for i in range(37) if i != 5]
    assert (q[rows].abs().amax(1) == 127).all()
    assert (q[5] == 0).all() and scale[5] == 1


@pytest.mark.parametrize("bad", [torch.randn(4), torch.randint(0, 3, (4, 4)), torch.randn(2, 3, 4)])
def test_quantize_int8_refuses_non_matrices(bad):
    with pytest.raises(InputError, match="2-D float"):
        quantize_int8(bad)


# ---------------------------------------------------------------------------------------------- kernels

@needs_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 70, 130])
@pytest.mark.parametrize("n,k,bias", [(37, 200, True), (48, 512, False), (20, 256, True)])
def test_kernel_matches_reference(dtype, m, n, k, bias):
    """The GEMV (M=1), the tl.dot kernel (M <= 64; N and K not multiples of the blocks, and K a multiple)
    and the prefill tiles (M=70, 130): error against the fp64 truth <= 2x the reference's in ``dtype`` + atol."""
    q, scale = quantize_int8(torch.randn(n, k) * 0.05)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    truth = int8_linear_ref(x.double(), q, scale.double(), None if b is None else b.double())
    xl, bl = x.to(dtype), None if b is None else b.to(dtype)
    ref, got = int8_linear_ref(xl, q, scale, bl), int8_linear(xl, q, scale, bl)
    assert got.dtype == dtype and got.shape == (m, n)
    assert _max_err(got, truth) <= 2 * _max_err(ref, truth) + ATOL[dtype]


@needs_interpret
def test_kernel_runs_for_decode_shapes_and_keeps_leading_dims(monkeypatch):
    """(batch, 1, K) x runs the Triton kernel (not the reference) and comes back (batch, 1, N)."""
    calls = []
    real = il.launch_kernels
    monkeypatch.setattr(il, "_int8_linear", il.dispatch(None, lambda *a: calls.append(1) or real(*a),
                                                         il._int8_linear_op, il.int8_linear_ref))
    q, scale = quantize_int8(torch.randn(24, 32))
    x = torch.randn(3, 1, 32, dtype=torch.float16)
    y = int8_linear(x, q, scale)
    assert calls and y.shape == (3, 1, 24)
    torch.testing.assert_close(y, int8_linear_ref(x, q, scale), atol=1e-2, rtol=1e-2)


def test_pick_config_fills_the_machine_for_small_n(monkeypatch):
    """Untuned shapes: BLOCK_N halves until the grid has WAVES programs per SM (4 "SMs" on CPU), never
    below the floor, then split_k doubles while K allows; large N keeps the table's tile; M picks the
    smallest bucket holding it; a TUNED entry wins over all of that."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(il, "TUNED", {})
    monkeypatch.setattr(il, "_PICKED", {})
    goal = il.WAVES * 4
    assert il.pick_config(1, 32, 512, cpu) == il.Int8Config(1, 4, 512)  # 32/16 = 2 programs -> 8 at BLOCK_N 4
    down = il.pick_config(1, 32, 8192, cpu)  # the same N over a long K: split as well
    assert down.block_n == 4 and -(-32 // 4) * down.split_k >= goal and down.split_k <= il.MAX_SPLIT_K
    assert il.pick_config(1, 4096, 2048, cpu) == il.CONFIGS[1]
    assert il.pick_config(5, 4096, 2048, cpu).block_m == 16 and il.pick_config(33, 4096, 2048, cpu).block_m == 64
    assert il.pick_config(300, 4096, 2048, cpu) == il.CONFIGS[512]
    tile = il.Int8Config(1, 64, 256, 8, 2, 2)
    assert il.load_tuned([{"m_bucket": 1, "n": 32, "k": 8192, "tile": tile.as_list()}]) == 1
    assert il.pick_config(1, 32, 8192, cpu) == tile and il.pick_config(1, 32, 512, cpu) != tile
    for bucket, bad in [(3, tile.as_list()), (32, tile.as_list()), (1, [16, 64, 64, 4, 3, 1])]:
        with pytest.raises(InputError, match="m_bucket"):  # unknown bucket; a GEMV tile for M > 1 and back
            il.load_tuned([{"m_bucket": bucket, "n": 32, "k": 64, "tile": bad}])


def test_load_tuned_reads_the_tune_json(tmp_path, monkeypatch):
    monkeypatch.setattr(il, "TUNED", {})
    monkeypatch.setattr(il, "_PICKED", {})
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"tuned": [{"m_bucket": 32, "n": 48, "k": 512, "tile": [32, 16, 64, 4, 3, 4]}]}))
    assert il.load_tuned(path) == 1 and il.TUNED == {(32, 48, 512): il.Int8Config(32, 16, 64, 4, 3, 4)}


@needs_interpret
@pytest.mark.parametrize("tile", [(1, 8, 64, 4, 3, 4), (1, 16, 32, 4, 3, 3), (16, 16, 32, 4, 3, 2),
                                  (16, 32, 64, 4, 3, 5), (64, 32, 32, 4, 3, 1)])
@pytest.mark.parametrize("m", [1, 3, 20])
def test_explicit_tiles_and_split_k_match_reference(tile, m):
    """Any tile the --tune sweep may pick, split-K among them (K a multiple of the slices and not; a
    slice past K when split_k exceeds the K steps), gives the reference's result."""
    for n, k in [(40, 256), (37, 200), (24, 40)]:
        q, scale = quantize_int8(torch.randn(n, k) * 0.05)
        x, b = torch.randn(m, k, dtype=torch.float16), torch.randn(n, dtype=torch.float16)
        truth = int8_linear_ref(x.double(), q, scale.double(), b.double())
        got = il.launch_kernels(x, q, scale, b, il.Int8Config(*tile))
        assert got.shape == (m, n)
        assert _max_err(got, truth) <= 2 * _max_err(int8_linear_ref(x, q, scale, b), truth) + ATOL[torch.float16]


def test_past_kernel_max_m_dequantizes(monkeypatch):
    calls = []
    monkeypatch.setattr(il, "KERNEL_MAX_M", 16)
    monkeypatch.setattr(il, "int8_linear_ref", lambda *a: calls.append(1) or int8_linear_ref(*a))
    q, scale = quantize_int8(torch.randn(8, 16))
    il.launch_kernels(torch.randn(17, 16), q, scale, None)
    assert calls == [1]


def test_refusals_of_the_op():
    q, scale = quantize_int8(torch.randn(8, 16))
    x = torch.randn(2, 16, requires_grad=True)
    with pytest.raises(InputError, match="inference-only"):
        int8_linear(x, q, scale)
    with torch.no_grad():
        assert int8_linear(x, q, scale).shape == (2, 8)
    with pytest.raises(InputError, match="2-D int8"):
        int8_linear(x.detach(), q.float(), scale)
    with pytest.raises(InputError, match="K=16"):
        int8_linear(torch.randn(2, 15), q, scale)
    with pytest.raises(InputError, match="scale"):
        int8_linear(x.detach(), q, scale[:4])
    with pytest.raises(InputError, match="bias"):
        int8_linear(x.detach(), q, scale, torch.randn(7))
    with pytest.raises(InputError, match="bf16/fp16/fp32"):
        int8_linear(torch.randn(2, 16, dtype=torch.float64), q, scale)


def test_compiles_fullgraph():
    """torch.compile traces the op without a graph break (the custom op with its fake on the kernel path)."""
    q, scale = quantize_int8(torch.randn(8, 16))
    x = torch.randn(2, 16, dtype=torch.float16)
    fn = torch.compile(lambda t: int8_linear(t, q, scale), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), int8_linear_ref(x, q, scale), atol=2e-3, rtol=2e-3)


def test_int8_linear_module():
    lin = nn.Linear(16, 12, bias=True).half()
    mod = Int8Linear.from_linear(lin)
    assert mod.weight.dtype == torch.int8 and not mod.weight.requires_grad and mod.bias.dtype == torch.float16
    assert [n for n, _ in mod.named_buffers()] == ["scale"]
    torch.testing.assert_close(mod.dequantize(torch.float32), lin.weight.float(), atol=lin.weight.abs().max().item() / 127,
                               rtol=0)
    x = torch.randn(3, 16, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), lin(x), atol=0.02, rtol=0.02)
    with pytest.raises(InputError, match="meta"):
        Int8Linear.from_linear(nn.Linear(4, 4, device="meta"))


def test_int8_linear_keeps_fp32_scales_when_the_model_is_cast():
    """model.to(bf16) / .half() cast the bias, never the int8 weight nor the fp32 scales."""
    mod = Int8Linear.from_linear(nn.Linear(16, 12, bias=True))
    scale = mod.scale.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        cast(mod)
        assert mod.weight.dtype == torch.int8 and torch.equal(mod.scale, scale) and mod.scale.dtype == torch.float32
    assert mod.bias.dtype == torch.float16 and [n for n, _ in mod.named_buffers()] == ["scale"]


# ---------------------------------------------------------------------------------------------- models

def _tiny(attn="flash", dtype=torch.float16, **overrides):
    torch.manual_seed(0)
    from flashlm.models import get_preset

    return build_model(get_preset("tiny", **overrides), attn=attn, dtype=dtype).eval()


@pytest.mark.parametrize("attn,names", [
    ("flash", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("default", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_quantize_model_swaps_exactly_the_projections(attn, names):
    """Every layer's projections and lm_head become Int8Linear, nothing else; the tied embedding keeps its
    own fp16 tensor (lm_head gets an int8 copy); the model is frozen, in eval mode, marked quantized."""
    model = _tiny(attn)
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb or not model.config.tie_word_embeddings
    quantize_model(model)
    got = sorted(n for n, m in model.named_modules() if isinstance(m, Int8Linear))
    want = sorted([f"model.layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'qkv_proj', 'o_proj') else 'mlp'}"
                   f".{p}" for i in range(model.config.num_layers) for p in names] + ["lm_head"])
    assert got == want
    assert model.model.embed_tokens.weight is emb and emb.dtype == torch.float16
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.quantization == "int8" and is_quantized(model)
    assert set(projection_kinds(model).values()) == {"Int8Linear"}


def test_quantize_model_tied_embedding_keeps_its_values():
    model = _tiny(tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight.clone()
    quantize_model(model)
    assert torch.equal(model.model.embed_tokens.weight, emb) and model.lm_head.weight.dtype == torch.int8
    torch.testing.assert_close(model.lm_head.dequantize(torch.float32), emb.float(),
                               atol=emb.abs().max().item() / 127, rtol=0)


def test_quantize_model_some_modules_only():
    model = quantize_model(_tiny(), modules=("lm_head", "down_proj"))
    assert projection_kinds(model) == {"qkv_proj": "Linear", "o_proj": "Linear", "gate_up_proj": "Linear",
                                       "down_proj": "Int8Linear", "lm_head": "Int8Linear"}


@pytest.mark.parametrize("dtype,kwargs,match", [
    (torch.float16, {"method": "int4"}, "int4"),
    (torch.float16, {"method": "nf4"}, "unknown method"),
    (torch.float32, {}, "bf16 or fp16"),
    (torch.float16, {"modules": ("q_proj",)}, "unknown projection"),
    (torch.float16, {"modules": ()}, "unknown projection"),
])
def test_quantize_model_refusals_change_nothing(dtype, kwargs, match):
    model = _tiny(dtype=dtype)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=match):
        quantize_model(model, **kwargs)
    assert not is_quantized(model) and not hasattr(model, "quantization")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(InputError, match="flashlm causal LM"):
        quantize_model(nn.Linear(4, 4).half())


def test_quantize_model_refuses_a_quantized_model_and_wrapped_projections():
    model = quantize_model(_tiny())
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(model)

    class Wrapped(nn.Linear):  # a LoRA/Float8-like subclass: its extra behaviour would be dropped
        pass

    model = _tiny()
    old = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = Wrapped(old.in_features, old.out_features, bias=False).half()
    with pytest.raises(InputError, match="model.layers.1.mlp.down_proj is a Wrapped"):
        quantize_model(model)
    assert not is_quantized(model)


@pytest.mark.parametrize("attn", ["flash", "default"])
def test_quantized_logits_close_to_unquantized(attn):
    model = _tiny(attn)
    q = quantize_model(copy.deepcopy(model))
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits.float(), q(ids).logits.float()
    assert _max_err(a, b) < 0.05 * a.abs().max().item()


def test_loss_and_explain_of_a_quantized_flash_model():
    """The loss calls the int8 lm_head on logits (the fused losses read a float weight): equal to the
    cross-entropy of the model's own logits; explain() says so and names the projections. Training
    (a parameter made trainable again) is refused by the op."""
    q = quantize_model(_tiny())
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        loss = q(ids, labels=ids).loss
        logits = q(ids).logits.float()
    want = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss.float(), want, atol=2e-3, rtol=2e-3)
    exp = q.explain(ids, labels=ids)
    assert exp["loss"] == "cross_entropy" and exp["projections"]["qkv_proj"] == "Int8Linear"
    assert _tiny().explain(ids, labels=ids)["projections"]["lm_head"] == "Linear"
    q.model.norm.weight.requires_grad_(True)
    with pytest.raises(InputError, match="inference-only"):
        q(ids, labels=ids)


@needs_interpret
@pytest.mark.parametrize("tile", [None, (1, 8, 64, 4, 3, 2), (16, 16, 32, 4, 3, 3), (64, 32, 32, 4, 3, 1)])
@pytest.mark.parametrize("m", [1, 4, 70])
def test_int8_swiglu_linear_equals_swiglu_then_int8_linear(tile, m):
    """The SwiGLU made in the kernel's prologue rounds as ops.swiglu does: the fused result equals
    int8_linear(swiglu_ref(gate_up)) (even K and not, split-K among the tiles); the refusals name gate_up."""
    from flashlm.ops.swiglu import swiglu_ref

    for n, k in [(40, 256), (37, 200)]:
        q, scale = quantize_int8(torch.randn(n, k) * 0.05)
        gu, b = torch.randn(m, 2 * k, dtype=torch.float16), torch.randn(n, dtype=torch.float16)
        want = il.launch_kernels(swiglu_ref(gu), q, scale, b, None if tile is None else il.Int8Config(*tile))
        if tile is None:
            got = il.int8_swiglu_linear(gu, q, scale, b)
        else:
            got = il.launch_kernels(gu, q, scale, b, il.Int8Config(*tile), swiglu=True)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got, il.int8_swiglu_linear_ref(gu, q, scale, b), atol=2e-3, rtol=2e-3)
    with pytest.raises(InputError, match=r"gate_up must be .*2 \* K=400"):
        il.int8_swiglu_linear(torch.randn(2, 200), q, scale)


@needs_interpret
def test_quantized_flash_mlp_runs_the_fused_int8_down_path(monkeypatch):
    """An int8 flash model's MLP calls int8_swiglu_linear (explain() says so) and gives the logits of the
    unfused path (ops.swiglu then the Int8Linear module)."""
    from flashlm.models import flash as flash_mod
    from flashlm.models.kernels import mlp_down_path

    q = quantize_model(_tiny())
    ids = torch.randint(3, 256, (2, 12))
    assert all(mlp_down_path(layer.mlp) == "swiglu_int8_linear" for layer in q.model.layers)
    assert q.explain(ids)["mlp"][0].startswith("swiglu_int8_linear (down_proj Int8Linear")
    calls = []
    real = flash_mod.int8_swiglu_linear
    monkeypatch.setattr(flash_mod, "int8_swiglu_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = q(ids).logits
        assert len(calls) == q.config.num_layers
        monkeypatch.setattr(flash_mod, "mlp_down_path", lambda mlp: "swiglu+module")
        unfused = q(ids).logits
    torch.testing.assert_close(fused, unfused, atol=2e-3, rtol=2e-3)


def test_state_dict_round_trip_and_save_pretrained_refused(tmp_path):
    """A quantized state dict (int8 weights under HF names, scales) loads into a model quantized the same way
    and gives the same logits; it is refused by an unquantized model (strict: the scales are unexpected);
    save_pretrained refuses a quantized model and writes nothing."""
    q = quantize_model(_tiny())
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert "model.layers.0.self_attn.qkv_proj.scale" in state
    other = quantize_model(_tiny(dtype=torch.float16, initializer_range=0.5))
    other.load_state_dict(state)
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, q(ids).logits)
    with pytest.raises(RuntimeError, match="scale"):
        _tiny().load_state_dict(state)
    with pytest.raises(InputError, match="quantized"):
        save_pretrained(q, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_from_pretrained_quantize(tmp_path):
    model = _tiny()
    save_pretrained(model, tmp_path / "ckpt")
    q = from_pretrained(tmp_path / "ckpt", attn="flash", quantize="int8")
    assert q.quantization == "int8" and q.lm_head.weight.dtype == torch.int8
    ref = quantize_model(copy.deepcopy(model))
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref(ids).logits)
    with pytest.raises(InputError, match="bf16 or fp16"):
        from_pretrained(tmp_path / "ckpt", attn="flash", dtype=torch.float32, quantize="int8")
    with pytest.raises(InputError, match="int4"):
        from_pretrained(tmp_path / "ckpt", quantize="int4")


def test_generate_with_int8():
    """generate() on an int8 model: the decode steps (M = batch: the kernels) give the greedy tokens of the
    same model run through the reference (TRITON_INTERPRET unset)."""
    from flashlm.generation import generate

    q = quantize_model(_tiny())
    ids = torch.randint(3, 256, (2, 7))
    out = generate(q, ids, max_new_tokens=6, eos_token_id=[])
    assert out.sequences.shape == (2, 13) and out.decode_path == "eager"
    env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ref = generate(q, ids, max_new_tokens=6, eos_token_id=[])
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
    assert torch.equal(out.sequences, ref.sequences)


def test_generate_cli_quantize(capsys):
    from flashlm.generation.cli import main

    assert main(["--model", "tiny", "--prompt-ids", "5,6,7", "--quantize", "int8", "--dtype", "fp16",
                 "--max-new-tokens", "4", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["quantize"] == "int8" and rec["dtype"] == "float16" and len(rec["new_token_ids"][0]) == 4
    assert main(["--model", "tiny", "--prompt-ids", "5,6", "--quantize", "int8", "--dtype", "fp32"]) == 2
    assert "bf16 or fp16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- quality

TRAIN_MODULES = ("argparse", "textwrap", "string", "csv", "difflib", "pprint")
HELD_OUT_MODULES = ("shlex", "fractions", "heapq")


def _python_source(name: str) -> str:
    import importlib

    return pathlib.Path(importlib.import_module(name).__file__).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`flashlm train` of the tiny preset on Python's own sources (real text; a BPE of 512 tokens trained on
    them), 300 steps on CPU: the run folder."""
    from flashlm.train.cli import main

    root = tmp_path_factory.mktemp("int8_quality")
    (root / "train").mkdir()
    for name in TRAIN_MODULES:
        (root / "train" / f"{name}.txt").write_text(_python_source(name), encoding="utf-8")
    (root / "held.txt").write_text("".join(_python_source(n) for n in HELD_OUT_MODULES), encoding="utf-8")
    assert main(["--model", "tiny", "--data", str(root / "train"), "--output", str(root / "run"),
                 "--max-steps", "300", "--seq-length", "128", "--batch-size", "4", "--lr", "3e-3",
                 "--eval-every", "0", "--save-every", "0", "--no-progress", "--cache-dir", str(root / "cache")]) == 0
    return root


@pytest.mark.slow
def test_int8_perplexity_within_one_percent_after_real_training(trained_run, monkeypatch, capsys):
    """`flashlm eval --quantize int8` on held-out sources: the trained model beats the uniform guess by far
    (it learned), and the int8 copy's perplexity is within 1% of the bf16 model's (the issue's target), the
    record written to --output. Without TRITON_INTERPRET, as the command runs on a CPU (the interpreter
    mis-computes bf16 tl.dot)."""
    from flashlm.evaluate import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = trained_run / "eval.json"
    assert main(["--checkpoint", str(trained_run / "run" / "final"), "--data", str(trained_run / "held.txt"),
                 "--quantize", "int8", "--dtype", "bf16", "--seq-length", "128", "--output", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"] == rec["results"]
    bf16, int8 = rec["results"]["bf16"], rec["results"]["int8"]
    assert bf16["tokens"] == int8["tokens"] > 10_000
    assert bf16["perplexity"] < 0.25 * 512  # far better than uniform over the vocab
    assert abs(rec["int8_vs_unquantized"] - 1) < 0.01, rec


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """An untrained tiny model (vocab 512) saved with a BPE trained on one source file, and a text file."""
    from flashlm.train.data import train_tokenizer

    root = tmp_path_factory.mktemp("int8_eval")
    text = _python_source("textwrap")
    save_pretrained(_tiny(vocab_size=512), root / "ckpt")
    train_tokenizer(iter([text]), 512).save(str(root / "ckpt" / "tokenizer.json"))
    (root / "held.txt").write_text(text[:4000], encoding="utf-8")
    return root


def test_eval_without_quantize(small_checkpoint, capsys):
    from flashlm.evaluate import main

    assert main(["--checkpoint", str(small_checkpoint / "ckpt"), "--data", str(small_checkpoint / "held.txt"),
                 "--dtype", "fp16", "--seq-length", "64", "--max-tokens", "300"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(rec["results"]) == ["fp16"] and rec["results"]["fp16"]["tokens"] == 300 - 5  # 4 windows + a tail
    assert "quantize" not in rec


def test_eval_refusals_write_nothing(small_checkpoint, tmp_path, capsys):
    from flashlm.evaluate import main

    ckpt, held = str(small_checkpoint / "ckpt"), str(small_checkpoint / "held.txt")
    out = tmp_path / "e.json"
    cases = [
        (["--checkpoint", str(tmp_path), "--data", held], "not a model folder"),
        (["--checkpoint", ckpt, "--data", str(tmp_path / "none.txt")], "does not exist"),
        (["--checkpoint", ckpt, "--data", held, "--quantize", "int8", "--dtype", "fp32"], "bf16 or fp16"),
        (["--checkpoint", ckpt, "--data", held, "--seq-length", "1"], "--seq-length"),
        (["--checkpoint", ckpt, "--data", held, "--seq-length", "100000"], "max_position_embeddings"),
        (["--checkpoint", ckpt, "--data", held, "--batch-size", "0"], "--batch-size"),
        (["--checkpoint", ckpt, "--data", held, "--tokenizer", str(tmp_path / "t.json")], "no tokenizer"),
        (["--checkpoint", ckpt, "--data", held, "--output", str(tmp_path / "no" / "e.json")], "--output"),
    ]
    for argv, match in cases:
        assert main([*argv, "--output", str(out)] if "--output" not in argv else argv) == 2, argv
        assert match in capsys.readouterr().err, argv
        assert not out.exists()


def test_eval_windows():
    from flashlm.evaluate import windows

    rows = windows(torch.arange(10), 4)
    assert [r.shape for r in rows] == [(2, 4), (1, 2)]
    assert [r.shape for r in windows(torch.arange(9), 4)] == [(2, 4)]  # a 1-token tail predicts nothing
    with pytest.raises(InputError, match="at least 2"):
        windows(torch.arange(1), 4)


# ---------------------------------------------------------------------------------------------- bench

def test_bench_decode_int8_rows(tmp_path):
    """`flashlm bench decode --quantize int8`: an -int8 twin beside each flashlm row, its bytes per step the
    int8 weights + fp32 scales (the tied-free tiny model: lm_head int8, the embedding left out), and the
    int8 tokens compared with the unquantized row's."""
    from flashlm.bench.decode import main, weight_read_bytes

    out = tmp_path / "d.json"
    assert main(["--device", "cpu", "--preset", "tiny", "--dtype", "fp16", "--batch-sizes", "1", "--contexts", "8",
                 "--new-tokens", "3", "--repeats", "1", "--models", "flashlm-eager,flashlm-graph", "--quantize",
                 "int8", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [p["impl"] for p in data["points"]] == ["flashlm-eager", "flashlm-eager-int8", "flashlm-graph",
                                                   "flashlm-graph-int8"]
    q = quantize_model(_tiny())
    assert data["weight_bytes_per_step_int8"] == weight_read_bytes(q)
    c = q.config
    int8 = sum(m.weight.numel() + 4 * m.out_features for m in q.modules() if isinstance(m, Int8Linear))
    norms = 2 * c.hidden_size * (2 * c.num_layers + 1)
    assert weight_read_bytes(q) == int8 + norms
    eager = data["points"][1]
    assert eager["status"] == "ok" and 0 <= eager["token_agreement_with_bf16"] <= 1
    assert eager["bytes_per_step"] == data["weight_bytes_per_step_int8"] + 2 * c.num_layers * c.num_kv_heads * \
        c.head_dim * 2 * (8 + 3 / 2)
    assert main(["--device", "cpu", "--preset", "tiny", "--quantize", "int8"]) == 2  # fp32 on CPU: refused


def test_bench_int8_linears(tmp_path, capsys):
    from flashlm.bench.decode import main
    from flashlm.bench.int8_linears import shapes
    from flashlm.models import get_preset

    assert shapes(get_preset("llama-1b")) == {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                                              "down": (2048, 8192), "lm_head": (128256, 2048)}
    out = tmp_path / "l.json"
    assert main(["--device", "cpu", "--preset", "tiny", "--dtype", "fp16", "--batch-sizes", "1,3", "--int8-linears",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 * 2 * 3 and all(r["status"] == "ok" and r["gb_per_s"] > 0 for r in rows)
    assert all(r["max_rel_err_vs_dequant"] < 1e-2 for r in rows if r["impl"] == "int8-triton")
    capsys.readouterr()
    assert main(["--device", "cpu", "--int8-linears", "--linear-impls", "int4"]) == 2
    assert "--linear-impls" in capsys.readouterr().err


@needs_interpret
def test_bench_int8_tune_and_int8_configs(tmp_path, capsys, monkeypatch):
    """`--tune`: every candidate tile timed per (projection, M), the default tile among them, the fastest
    correct one per (M bucket, N, K) in "tuned"; `--int8-configs` loads that file into TUNED (a bad file:
    exit 2 before any run); --tune alone (without --int8-linears) is refused."""
    from flashlm.bench.decode import main
    from flashlm.bench.int8_linears import candidates

    monkeypatch.setattr(il, "TUNED", {})
    monkeypatch.setattr(il, "TUNED_HALF", {})
    monkeypatch.setattr(il, "_PICKED", {})
    out = tmp_path / "t.json"
    assert main(["--device", "cpu", "--preset", "tiny", "--dtype", "fp16", "--batch-sizes", "1,20",
                 "--int8-linears", "--tune", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    tuned = data["tuned"]
    distinct = {(r["n"], r["k"]) for r in data["rows"]}  # tiny's qkv and gate_up share a shape: one entry
    assert len(tuned) == 2 * len(distinct) and {e["m_bucket"] for e in tuned} == {1, 32}
    for e in tuned:
        mine = [r for r in data["rows"] if r["shape"] == e["shape"] and r["m"] == e["m"] and r["impl"] == "int8-triton"]
        assert sum(r["default"] for r in mine) == 1 and len(mine) >= len(candidates(e["m"], e["k"]))
        assert e["us"] == min(r["us"] for r in mine) and e["tile"] in [r["tile"] for r in mine]
    # the down projection is tuned as the model runs it: the SwiGLU prologue on a (M, 2K) gate_up
    assert all(e["swiglu"] == (e["shape"] == "down") for e in tuned)
    assert all(r["swiglu"] for r in data["rows"] if r["shape"] == "down")
    # the same kernels on the bf16 weight (no scales): checked against cuBLAS, pick_config's tile among them
    for e in tuned:
        half = [r for r in data["rows"] if r["shape"] == e["shape"] and r["m"] == e["m"] and r["impl"] == "bf16-triton"]
        assert sum(r["default"] for r in half) == 1 and all(r["max_rel_err_vs_cublas"] < 1e-2 for r in half)
        assert e["bf16_triton_us"] == min(r["us"] for r in half) and e["bf16_triton_tile"] in [r["tile"] for r in half]
    assert il.TUNED == {}
    assert main(["--device", "cpu", "--preset", "tiny", "--dtype", "fp16", "--batch-sizes", "1", "--int8-linears",
                 "--int8-configs", str(out), "--output", str(tmp_path / "l.json")]) == 0
    assert len(il.TUNED) == len(il.TUNED_HALF) == len(tuned)
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    assert all(r["tile"] == il.TUNED[(1, r["n"], r["k"])].as_list() for r in rows if r["impl"] == "int8-triton")
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--device", "cpu", "--int8-linears", "--int8-configs", str(tmp_path / "bad.json")]) == 2
    assert main(["--device", "cpu", "--tune"]) == 2
    assert main(["--device", "cpu", "--int8-linears", "--tune", "--batch-sizes", "4097"]) == 2
    err = capsys.readouterr().err
    assert "--int8-configs" in err and "--tune goes with" in err and "dequantize path" in err


# ---------------------------------------------------------------------------------------------- review fixes

def test_layer_alone_with_fp32_inputs_casts_to_the_models_dtype_not_int8():
    """A quantized flash attention layer used on its own with fp32 activations (upcast, as PEFT does): q/k/v
    go to the model's fp16 (the dtype the int8 weights dequantize into), never to the weight's int8; the
    output is the unquantized layer's on the same fp32 input, to int8 rounding."""
    import warnings

    from flashlm.models import kernels as kernels_mod

    model = _tiny()
    q = quantize_model(copy.deepcopy(model))
    assert q.model.layers[0].self_attn.qkv_proj.compute_dtype == torch.float16
    hidden = torch.randn(2, 6, model.config.hidden_size)
    cos, sin = model.model.rotary_emb.tables(torch.arange(6))
    kernels_mod._WARNED_FP32 = False
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = q.model.layers[0].self_attn(hidden, cos, sin)
        want = model.model.layers[0].self_attn.float()(hidden, cos, sin)
    assert any("casting q/k/v to torch.float16" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _max_err(got, want) < 0.05 * want.abs().max().item()


def test_int8_linear_dequantizes_into_its_models_dtype():
    """An fp16 projection without bias: dequantize() and compute_dtype are fp16 (not a bf16 guess), and follow
    a cast of the model (model.to(bf16)), the scales staying fp32."""
    mod = Int8Linear.from_linear(nn.Linear(16, 12, bias=False).half())
    assert mod.compute_dtype == torch.float16 and mod.dequantize().dtype == torch.float16
    mod.to(torch.bfloat16)
    assert mod.compute_dtype == torch.bfloat16 and mod.dequantize().dtype == torch.bfloat16
    assert mod.scale.dtype == torch.float32 and mod.weight.dtype == torch.int8
    mod.to("cpu")  # a move without a dtype keeps it
    assert mod.compute_dtype == torch.bfloat16


@needs_interpret
def test_kernel_reads_strided_scale_and_bias_right():
    """A scale or bias that is a strided view (every other element of a larger tensor) is read by stride,
    not as if contiguous: the kernels give the reference's result."""
    q, scale = quantize_int8(torch.randn(24, 32))
    wide_scale = torch.stack([scale, torch.full_like(scale, 1e3)], 1).reshape(-1)[::2]
    bias = torch.randn(48)[::2]
    assert not wide_scale.is_contiguous() and torch.equal(wide_scale, scale)
    for m in (1, 5):
        x = torch.randn(m, 32, dtype=torch.float16)
        torch.testing.assert_close(int8_linear(x, q, wide_scale, bias), int8_linear_ref(x, q, scale, bias.contiguous()),
                                   atol=1e-2, rtol=1e-2)


def test_refuses_operands_on_different_devices():
    """x, the int8 weight, the scales and the bias must share a device: refused before a kernel is handed a
    pointer it cannot read."""
    q, scale = quantize_int8(torch.randn(8, 16))
    x = torch.randn(2, 16)
    with pytest.raises(InputError, match="same device"):
        int8_linear(x, q.to("meta"), scale)
    with pytest.raises(InputError, match="same device"):
        int8_linear(x, q, scale.to("meta"))
    with pytest.raises(InputError, match="same device"):
        int8_linear(x, q, scale, torch.zeros(8, device="meta"))
