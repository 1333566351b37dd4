"""FP8 training through torchao (issue 27): convert_to_fp8 picks exactly the projections, refuses bad input
before converting anything, keeps state dicts and checkpoints bf16 under HF names; the flash model's SwiGLU
+ Float8Linear down_proj is one node that does not save the activation, and explain() names each MLP's
path; `flashlm train --fp8` refuses a CPU run and a resume with another --fp8; `flashlm bench --fp8` adds
labelled rows; the llama-3b preset has Llama-3.2-3B's shape. CPU tests run torchao's conversion (and
torch's CPU float8 matmul where it exists) with allow_cpu=True; the CUDA tests (sm89+) train a small flash
model in FP8, eager and compiled, both recipes, against bf16."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse fixture)
from test_safety_train import _write_corpus

from flashlm.errors import InputError
from flashlm.models import build_model, from_pretrained, get_preset, save_pretrained
from flashlm.models.config import ModelConfig

FLASH_PROJ = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
DEFAULT_PROJ = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def _torchao():
    return pytest.importorskip("torchao.float8")


def _float8_names(model) -> set[str]:
    from torchao.float8.float8_linear import Float8Linear

    return {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}


def _model(attn="flash", dtype=torch.bfloat16, **overrides):
    torch.manual_seed(0)
    return build_model(get_preset("tiny", **overrides), attn=attn, dtype=dtype)


def _cpu_fp8_matmul() -> None:
    """Skip where torch has no CPU float8 matmul (torch._scaled_mm on CPU came with torch 2.6-ish)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU float8 matmul in this torch: {e}")


# --------------------------------------------------------------------------------------------
# conversion


@pytest.mark.parametrize("attn,names", [("flash", FLASH_PROJ), ("default", DEFAULT_PROJ)])
def test_convert_picks_exactly_the_projections(attn, names):
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8

    model = _model(attn)
    assert convert_to_fp8(model, "rowwise", allow_cpu=True) is model
    layers = get_preset("tiny").num_layers
    assert _float8_names(model) == {f"model.layers.{i}.{n}" for i in range(layers) for n in names}
    assert model.fp8_recipe == "rowwise" and type(model.lm_head) is torch.nn.Linear


def test_lm_head_only_where_asked_and_still_tied():
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8

    model = _model(tie_word_embeddings=True)
    convert_to_fp8(model, lm_head=True, allow_cpu=True)
    assert "lm_head" in _float8_names(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # a tied head keeps sharing the embedding


def _refusal_cases():
    return {
        "recipe": (lambda: _model(), {"recipe": "delayed"}, "unknown FP8 recipe 'delayed'"),
        "fp32": (lambda: _model(dtype=torch.float32), {}, "computes in torch.float32"),
        "cpu": (lambda: _model(), {"allow_cpu": False}, "needs a CUDA GPU of compute capability 8.9+"),
        "dims": (lambda: _model(intermediate_size=136), {},
                 "model.layers.0.mlp.down_proj: weight (out_features, in_features) = (64, 136)"),
    }


@pytest.mark.parametrize("case", sorted(_refusal_cases()))
def test_refusals_convert_nothing(case):
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8

    make, kwargs, message = _refusal_cases()[case]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_to_fp8(model, **{"allow_cpu": True, **kwargs})
    assert not _float8_names(model) and not hasattr(model, "fp8_recipe")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_refuses_a_second_conversion():
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8

    model = convert_to_fp8(_model(), allow_cpu=True)
    with pytest.raises(InputError, match="already converted"):
        convert_to_fp8(model, "rowwise", allow_cpu=True)


def test_refuses_an_int8_model():
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8
    from flashlm.models.quantize import quantize_model

    model = quantize_model(_model(), "int8", modules=["down_proj"])
    with pytest.raises(InputError, match="model.layers.0.mlp.down_proj is a Int8Linear, not a plain nn.Linear"):
        convert_to_fp8(model, allow_cpu=True)
    assert not _float8_names(model)


def test_refuses_a_gpu_before_sm89(monkeypatch):
    from flashlm.models import fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(InputError, match=r"compute capability 8.9\+.*A100-SXM4-80GB\) is 8.0"):
        fp8.check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_device(torch.device("cuda", 0))  # an H100: accepted


def test_torchao_missing_names_the_extra(monkeypatch):
    from flashlm.models.fp8 import convert_to_fp8

    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # an import of it raises ImportError
    model = _model()
    with pytest.raises(InputError, match=r"pip install 'flashlm\[fp8\]'"):
        convert_to_fp8(model, allow_cpu=True)
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())


def test_import_flashlm_does_not_import_torchao():
    import subprocess

    code = "import sys, flashlm, flashlm.models.flash, flashlm.train.cli, flashlm.bench.cli; " \
           "print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------
# state dicts and checkpoints


@pytest.mark.parametrize("attn", ["flash", "default"])
def test_state_dict_and_checkpoint_stay_bf16_under_hf_names(attn, tmp_path):
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8

    plain = _model(attn)
    converted = convert_to_fp8(copy.deepcopy(plain), allow_cpu=True)
    a, b = plain.state_dict(), converted.state_dict()
    assert list(a) == list(b)
    assert all(b[k].dtype == a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    save_pretrained(converted, tmp_path / "fp8")
    save_pretrained(plain, tmp_path / "plain")
    back = from_pretrained(tmp_path / "fp8", attn=attn)
    assert all(torch.equal(v, a[k]) for k, v in back.state_dict().items())
    assert (tmp_path / "fp8" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_a_bf16_checkpoint_loads_into_a_converted_model(tmp_path):
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8
    from flashlm.models.weights import load_state_dict_from_folder

    source = _model()
    save_pretrained(source, tmp_path)
    torch.manual_seed(1)
    target = convert_to_fp8(build_model(get_preset("tiny"), attn="flash", dtype=torch.bfloat16), allow_cpu=True)
    load_state_dict_from_folder(target, tmp_path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


# --------------------------------------------------------------------------------------------
# the MLP composition and explain()


def test_explain_names_each_mlp_path():
    _torchao()
    from flashlm.models.fp8 import convert_to_fp8

    ids = torch.randint(1, 200, (2, 16))
    plain = _model()
    assert plain.explain(ids, labels=ids)["mlp"] == ["swiglu_linear (down_proj Linear)"] * 2
    fused = convert_to_fp8(_model(), allow_cpu=True).explain(ids, labels=ids)
    assert fused["mlp"] == [("swiglu_float8_linear (down_proj Float8Linear(tensorwise); the activation "
                             "recomputed in backward)")] * 2
    assert fused["lm_head"] == "Linear" and fused["projections"]["down_proj"] == "Float8Linear"
    unfused = convert_to_fp8(_model(), "rowwise", fuse_mlp=False, allow_cpu=True).explain(ids, labels=ids)
    assert unfused["mlp"] == [("swiglu + Float8Linear(rowwise) (unfused: the (..., I) activation saved for "
                               "backward)")] * 2
    head = convert_to_fp8(_model(), lm_head=True, allow_cpu=True).explain(ids, labels=ids)
    assert head["lm_head"] == ("Float8Linear(tensorwise); the loss (logits_cross_entropy) reads lm_head.weight "
                               "directly: its matmul is not FP8")


def _saved_bytes(model, ids) -> tuple[float, int]:
    """(loss, bytes of the storages autograd saves for the backward of one training forward; views share)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), sum(storages.values())


def test_fused_fp8_mlp_matches_the_unfused_path_and_saves_the_activation():
    """The one-node SwiGLU + Float8Linear down_proj gives the unfused path's loss and gradients bit for bit
    (the same torchao GEMMs) while autograd keeps at least (layers x tokens x I) bf16 values less (the
    activation; with the torch reference SwiGLU, silu(gate) too)."""
    _torchao()
    _cpu_fp8_matmul()
    from flashlm.models.fp8 import convert_to_fp8

    ids = torch.randint(1, 200, (2, 16))
    fused = convert_to_fp8(_model(), allow_cpu=True)
    unfused = convert_to_fp8(_model(), fuse_mlp=False, allow_cpu=True)
    (loss_f, bytes_f), (loss_u, bytes_u) = _saved_bytes(fused, ids), _saved_bytes(unfused, ids)
    assert loss_f == loss_u
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    cfg = get_preset("tiny")
    activation = cfg.num_layers * ids.numel() * cfg.intermediate_size * 2
    assert bytes_u - bytes_f == 2 * activation  # silu(gate) and the product, per layer


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_fp8_layers_save_no_more_than_eager(recipe):
    """The compiled path must not cost more memory than eager (the issue measured a hand-made float8 +
    torch.compile at 40 GB vs 25): `flashlm train --compile`'s per-layer compile of an FP8 model saves no
    more bytes for the backward than the eager one-node MLP, and gives its loss. On CPU (torch's float8
    matmul, inductor's CPU code), at a shape whose activations dominate the saved bytes."""
    _torchao()
    _cpu_fp8_matmul()
    from flashlm.models.fp8 import convert_to_fp8
    from flashlm.train.parallel import compile_layers

    shape = {"hidden_size": 256, "intermediate_size": 1024, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2,
             "vocab_size": 512}
    ids = torch.randint(3, 512, (2, 128))
    torch._dynamo.reset()  # a fresh compile cache: the other recipe's graphs are not reused
    eager = convert_to_fp8(_model(**shape), recipe, allow_cpu=True)
    compiled = convert_to_fp8(_model(**shape), recipe, allow_cpu=True).prepare_compile()
    compile_layers(compiled)
    (loss_e, bytes_e), (loss_c, bytes_c) = _saved_bytes(eager, ids), _saved_bytes(compiled, ids)
    print(f"{recipe}: saved for backward, eager {bytes_e / 2**20:.2f} MiB, compiled {bytes_c / 2**20:.2f} MiB")
    assert bytes_c <= bytes_e, (bytes_c, bytes_e)
    assert math.isclose(loss_c, loss_e, rel_tol=2e-2), (loss_c, loss_e)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_is_close_to_bf16(recipe):
    _torchao()
    _cpu_fp8_matmul()
    from flashlm.models.fp8 import convert_to_fp8

    ids = torch.randint(1, 200, (4, 32))
    bf16 = _model()(ids, labels=ids).loss.item()
    fp8 = convert_to_fp8(_model(), recipe, allow_cpu=True)(ids, labels=ids).loss.item()
    assert abs(fp8 - bf16) < 0.02 * bf16, (fp8, bf16)


# --------------------------------------------------------------------------------------------
# flashlm train --fp8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


TRAIN = ["--model", "tiny", "--vocab-size", "512", "--seq-length", "32", "--batch-size", "2", "--eval-every", "0",
         "--no-progress", "--lr", "3e-3"]


def _train(corpus, out, *extra):
    from flashlm import train as T

    return T.train([*TRAIN, "--data", str(corpus), "--cache-dir", str(out.parent / "cache"), "--output", str(out),
                    *map(str, extra)])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_fp8_on_cpu_is_refused_and_writes_nothing(corpus, tmp_path, capsys):
    _torchao()
    from flashlm.cli import main as flashlm_main

    out = tmp_path / "run"
    rc = flashlm_main(["train", *TRAIN, "--data", str(corpus), "--output", str(out), "--device", "cpu",
                       "--fp8", "tensorwise", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "--fp8 tensorwise: FP8 matmuls need a CUDA GPU of compute capability 8.9+" in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert flashlm_main(["train", *TRAIN, "--data", str(corpus), "--output", str(out), "--fp8", "rowwise",
                         "--device", "cpu"]) == 2
    assert _tree(out) == {"notes.txt": b"mine"}


@pytest.fixture
def cpu_fp8(monkeypatch):
    """Let `flashlm train --fp8` run on the CPU (torch's CPU float8 matmul): the device checks skipped."""
    _torchao()
    _cpu_fp8_matmul()
    from flashlm.models import fp8
    from flashlm.train import cli

    monkeypatch.setattr(cli, "check_fp8_flag", lambda args: None)
    monkeypatch.setattr(fp8, "check_fp8_device", lambda device, allow_cpu=False: None)


def test_train_fp8_resume_refuses_another_fp8(corpus, tmp_path, cpu_fp8):
    out = tmp_path / "run"
    res = _train(corpus, out, "--fp8", "tensorwise", "--dtype", "bf16", "--max-steps", 4, "--save-every", 2,
                 "--stop-after", 2)
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    before = _tree(out)
    for other in (["--fp8", "rowwise"], []):
        with pytest.raises(InputError, match="--fp8 'tensorwise' \\(saved\\)"):
            _train(corpus, out, *other, "--dtype", "bf16", "--max-steps", 4, "--save-every", 2, "--resume", "auto")
        assert _tree(out) == before
    res = _train(corpus, out, "--fp8", "tensorwise", "--dtype", "bf16", "--max-steps", 4, "--save-every", 2,
                 "--resume", "auto")
    assert res.start_step == 2 and len(res.losses) == 2
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert "model.layers.0.self_attn.q_proj.weight" in weights and not any("qkv" in k for k in weights)


def test_train_resume_of_a_run_from_before_fp8_refuses_fp8(corpus, tmp_path, cpu_fp8):
    """A checkpoint whose train_args lack "fp8" (saved before the flag existed) ran in bf16."""
    out = tmp_path / "run"
    _train(corpus, out, "--dtype", "bf16", "--max-steps", 4, "--save-every", 2, "--stop-after", 2)
    from flashlm.train import checkpoint as ckpt

    state_file = ckpt.latest_checkpoint(out) / "train_state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["train_args"]["fp8"]
    torch.save(state, state_file)
    before = _tree(out)
    with pytest.raises(InputError, match="--fp8 None \\(saved\\) != 'tensorwise' \\(now\\)"):
        _train(corpus, out, "--fp8", "tensorwise", "--dtype", "bf16", "--max-steps", 4, "--save-every", 2,
               "--resume", "auto")
    assert _tree(out) == before


_THEN = "--then"  # separates the runs of one torchrun process (see the end of this file)


def _allow_cpu_fp8():
    """The patches of ``cpu_fp8`` for a torchrun process (``python tests/test_fp8.py <train flags>``)."""
    from flashlm.models import fp8
    from flashlm.train import cli

    cli.check_fp8_flag = lambda args: None
    fp8.check_fp8_device = lambda device, allow_cpu=False: None
    precompute = fp8.precompute_scales

    def counted(model):  # rank 0 says how often the run precomputed the float8 weights' scales
        counted.calls += 1
        precompute(model)
        if torch.distributed.get_rank() == 0:
            print(f"run {counted.run}: precomputed scales {counted.calls}", file=sys.stderr)

    counted.calls = 0
    fp8.precompute_scales = counted
    return counted


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_train_fp8_under_fsdp2_all_gathers_in_float8_and_checkpoints(corpus, tmp_path, cpu_fp8):
    """2 gloo processes, FSDP2, --fp8 tensorwise: float8 all-gather, scales precomputed after every
    optimizer step, a DCP checkpoint resumed, the final weights under HF names; the losses those of the
    one-process FP8 run of the same global batch (FSDP2 casts fp32 masters to float8, one process bf16
    weights: a rounding apart)."""
    import os
    import subprocess

    flags = ["--fp8", "tensorwise", "--dtype", "bf16", "--max-steps", 4, "--save-every", 2]
    one = _train(corpus, tmp_path / "one", *flags, "--batch-size", 4)
    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [*TRAIN, *map(str, flags), "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--output",
           str(out)]
    # one launch, two runs per rank (the second resumes the first's DCP checkpoint): ~15 s of imports less
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
              *run, "--stop-after", "2", _THEN, *run, "--resume", "auto"]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in (1, 2):  # each run: one precompute per optimizer step, 2 steps
        assert f"run {i}: precomputed scales 2" in proc.stderr and f"run {i}: precomputed scales 3" not in proc.stderr
    assert "steps 0 -> 2" in proc.stderr and "steps 2 -> 4" in proc.stderr, proc.stderr[-3000:]  # resumed at 2
    logged = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(one.losses), rtol=1e-2, atol=0)
    from safetensors.torch import load_file

    assert load_file(str(out / "final" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "one" / "final" / "model.safetensors")).keys()


# --------------------------------------------------------------------------------------------
# flashlm bench --fp8


def test_bench_fp8_flags_are_checked():
    _torchao()
    from flashlm.bench.cli import parse_args

    base = ["--device", "cpu", "--compare", "flash"]
    with pytest.raises(ValueError, match="--fp8: unknown 'fp4'"):
        parse_args([*base, "--dtype", "bf16", "--fp8", "fp4"])
    with pytest.raises(ValueError, match="pass --dtype bf16"):
        parse_args([*base, "--fp8", "tensorwise"])  # CPU's default dtype is fp32
    with pytest.raises(ValueError, match="converts the default and flash rows"):
        parse_args(["--device", "cpu", "--dtype", "bf16", "--compare", "hf-sdpa", "--fp8", "tensorwise"])
    cfg, _, notes = parse_args([*base, "--dtype", "bf16", "--fp8", "tensorwise,rowwise", "--compare", "default,flash"])
    assert cfg.fp8 == ("tensorwise", "rowwise") and any("--fp8 on CPU" in n for n in notes)
    assert cfg.row_names() == ["default", "default-fp8-tensorwise", "default-fp8-rowwise", "flash",
                               "flash-fp8-tensorwise", "flash-fp8-rowwise"]


def test_bench_fp8_rows_in_json_and_table(tmp_path, capsys):
    _torchao()
    _cpu_fp8_matmul()
    from flashlm.bench.cli import main

    out = tmp_path / "r.json"
    rc = main(["--device", "cpu", "--dtype", "bf16", "--compare", "flash", "--fp8", "rowwise", "--cases",
               "train,forward,generate", "--warmup-steps", "0", "--benchmark-steps", "1", "--no-progress",
               "--batch-size", "1", "--seq-length", "16", "--new-tokens", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.read_text())
    row = res["models"]["flash-fp8-rowwise"]
    assert row["fp8"]["recipe"] == "rowwise" and row["fp8"]["mlp"] == ["swiglu_float8_linear"]
    assert row["fp8"]["projections"]["down_proj"] == "Float8Linear(rowwise)"
    assert row["cases"]["train"]["status"] == "ok" and row["cases"]["forward"]["status"] == "ok"
    assert row["cases"]["generate"]["status"] == "skipped"
    assert "flash-fp8-rowwise" in res["table"].splitlines()[0] and "flash-fp8-rowwise" in printed
    assert "flash_vs_flash-fp8-rowwise" in res["comparisons"]


# --------------------------------------------------------------------------------------------
# the llama-3b preset


LLAMA_32_3B_JSON = {  # meta-llama/Llama-3.2-3B config.json (the fields this library reads)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 24, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama_3b_preset_is_llama_32_3b():
    cfg = get_preset("llama-3b")
    assert ModelConfig.from_hf_config(LLAMA_32_3B_JSON) == cfg
    for attn in ("flash", "default"):
        model = build_model(cfg, attn=attn, device="meta")
        n = sum(p.numel() for p in model.parameters())  # the tied head counted once
        assert n == cfg.num_parameters() == 3_212_749_824  # Llama-3.2-3B: 3.21B


# --------------------------------------------------------------------------------------------
# CUDA: FP8 training numerics (sm89+, torchao)


def _fp8_gpu():
    _torchao()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need a CUDA GPU of compute capability 8.9+")


SMALL = {"vocab_size": 1024, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 768, "max_position_embeddings": 512}


def _train_steps(recipe, compiled, steps=40):
    """Per-step losses of a small flash model (bf16 weights, AdamW) memorizing one random batch."""
    from flashlm.models.fp8 import convert_to_fp8
    from flashlm.train.parallel import compile_layers

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL), attn="flash", device="cuda", dtype=torch.bfloat16).train()
    if recipe is not None:
        convert_to_fp8(model, recipe)
    if compiled:
        compile_layers(model)
    ids = torch.randint(0, SMALL["vocab_size"], (8, 256), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cuda_fp8_training_tracks_bf16(recipe, compiled):
    """FP8 steps follow the bf16 run while the loss falls smoothly (the first 8 steps within 2%; on the CPU,
    torch's float8 matmul: <= 0.3% at step 5, 2% at step 10) and learn the batch as well (40 steps: below
    half the first loss). Later the memorization cliff amplifies any rounding (CPU, step 40: bf16 0.30,
    tensorwise 0.10, rowwise 0.58), so loss parity is the 300-step run on real text below."""
    _fp8_gpu()
    bf16 = _train_steps(None, compiled)
    fp8 = _train_steps(recipe, compiled)
    assert fp8[-1] < 0.5 * fp8[0] and bf16[-1] < 0.5 * bf16[0], (fp8, bf16)
    for step, (a, b) in enumerate(zip(fp8[:8], bf16[:8])):
        assert abs(a - b) <= 0.02 * b, (step, a, b)


@pytest.mark.cuda
def test_cuda_fused_fp8_mlp_matches_unfused_and_saves_memory():
    _fp8_gpu()
    from flashlm.models.fp8 import convert_to_fp8

    ids = torch.randint(0, SMALL["vocab_size"], (8, 512), device="cuda")
    results = []
    for fuse in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**SMALL), attn="flash", device="cuda", dtype=torch.bfloat16).train()
        convert_to_fp8(model, fuse_mlp=fuse)
        model(ids, labels=ids).loss.backward()  # warm-up (kernels, allocator)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = model(ids, labels=ids).loss
        held = torch.cuda.memory_allocated() - start  # what the graph keeps for the backward
        loss.backward()
        results.append((loss.item(), held, [p.grad.float() for p in model.parameters()]))
    (lf, held_f, gf), (lu, held_u, gu) = results
    assert lf == pytest.approx(lu, rel=1e-3)
    assert all(torch.allclose(a, b, rtol=2e-2, atol=1e-3) for a, b in zip(gf, gu, strict=True))
    activation = SMALL["num_layers"] * ids.numel() * SMALL["intermediate_size"] * 2
    assert held_u - held_f >= 0.9 * activation, (held_u, held_f, activation)


def _python_sources(root: Path) -> Path:
    """Real text: the standard library's top-level modules, one .txt file each (~200 files, a few MB)."""
    import sysconfig

    root.mkdir(parents=True)
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        (root / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"), encoding="utf-8")
    return root


@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cuda_fp8_loss_parity_on_python_sources(recipe, tmp_path):
    """The issue's loss parity: `flashlm train` of the small preset for 300 steps on Python's own sources
    (a BPE of 8192 tokens trained on them, 5% of the rows held out), bf16 vs --fp8 (same seed, tokenizer
    and rows): the final eval loss within 1%."""
    _fp8_gpu()
    from flashlm import train as T

    train_dir = _python_sources(tmp_path / "text")
    common = ["--model", "small", "--vocab-size", "8192", "--data", str(train_dir), "--seq-length", "1024",
              "--batch-size", "8", "--max-steps", "300", "--lr", "1e-3", "--eval-every", "100", "--eval-batches", "16",
              "--eval-fraction", "0.05", "--save-every", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    tok = tmp_path / "bf16" / "tokenizer.json"
    bf16 = T.train([*common, "--output", str(tmp_path / "bf16")])
    fp8 = T.train([*common, "--output", str(tmp_path / recipe), "--fp8", recipe, "--tokenizer", str(tok)])
    (_, e_bf16), (_, e_fp8) = bf16.eval_losses[-1], fp8.eval_losses[-1]
    print(f"final eval loss: bf16 {e_bf16:.4f}, fp8 {recipe} {e_fp8:.4f} ({e_fp8 / e_bf16 - 1:+.2%})")
    assert e_bf16 < 0.6 * bf16.losses[0]  # it learned
    assert abs(e_fp8 - e_bf16) <= 0.01 * e_bf16, (e_fp8, e_bf16)


@pytest.mark.cuda
def test_cuda_train_cli_fp8(corpus, tmp_path):
    _fp8_gpu()
    res = _train(corpus, tmp_path / "run", "--attn", "flash", "--fp8", "tensorwise", "--max-steps", 6,
                 "--save-every", 0)
    assert len(res.losses) == 6 and res.losses[-1] < res.losses[0]


if __name__ == "__main__":  # a torchrun process of test_train_fp8_under_fsdp2_...: flashlm train on CPU with --fp8
    from flashlm import train as T

    counter, runs = _allow_cpu_fp8(), [[]]
    for arg in sys.argv[1:]:  # "<flags> --then <flags>": runs one after the other in this process
        runs.append([]) if arg == _THEN else runs[-1].append(arg)
    destroy, torch.distributed.destroy_process_group = torch.distributed.destroy_process_group, lambda *a: None
    for counter.run, run_argv in enumerate(runs, start=1):  # one process group for all: a re-init can hang
        counter.calls = 0
        if T.main(run_argv):
            sys.exit(1)
    destroy()
