"""Checkpoint IO: HF folder format both ways, sharding, tied weights, missing/unexpected keys, atomicity."""

import json
import os

import pytest
import torch

from flashlm.models import (
    MODEL_CLASSES,
    DefaultForCausalLM,
    build_model,
    from_pretrained,
    get_preset,
    save_pretrained,
)
from flashlm.models import weights as flashlm_io

transformers = pytest.importorskip("transformers")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_ours_transformers_ours(tmp_path, tied):
    model = build_model(get_preset("tiny", tie_word_embeddings=tied, num_kv_heads=1)).eval()
    ids = torch.randint(0, 256, (2, 11))
    save_pretrained(model, tmp_path / "ours")
    files = sorted(os.listdir(tmp_path / "ours"))
    assert files == ["config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert ("lm_head.weight" in keys) == (not tied)  # tied weights stored once, as transformers does

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (_logits(hf, ids) - _logits(model, ids)).abs().max() < 1e-5
    hf.save_pretrained(tmp_path / "hf")

    back = from_pretrained(tmp_path / "hf")
    assert isinstance(back, DefaultForCausalLM) and not back.training
    assert back.config == model.config
    assert back.load_report.missing_keys == [] and back.load_report.unexpected_keys == []
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    assert torch.equal(_logits(back, ids), _logits(model, ids))


def test_mistral_round_trip(tmp_path):
    model = build_model(get_preset("tiny", architecture="mistral", sliding_window=6)).eval()
    save_pretrained(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 6
    ids = torch.randint(0, 256, (1, 20))
    assert (_logits(hf, ids) - _logits(model, ids)).abs().max() < 1e-4
    assert torch.equal(_logits(from_pretrained(tmp_path / "m"), ids), _logits(model, ids))


def test_sharded_checkpoints(tmp_path):
    model = build_model(get_preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 7))
    # transformers-written shards
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        save_pretrained(model, tmp_path / "one"), attn_implementation="eager"
    )
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "hf_sharded" / "model.safetensors.index.json")
    assert len(flashlm_io.checkpoint_files(tmp_path / "hf_sharded")) > 1
    assert torch.equal(_logits(from_pretrained(tmp_path / "hf_sharded"), ids), _logits(model, ids))
    # our shards, read by transformers and by us
    save_pretrained(model, tmp_path / "ours_sharded", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(model.state_dict())
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours_sharded", attn_implementation="eager"
    )
    assert (_logits(hf2.eval(), ids) - _logits(model, ids)).abs().max() < 1e-5
    assert torch.equal(_logits(from_pretrained(tmp_path / "ours_sharded"), ids), _logits(model, ids))
    # a shard named in the index but gone
    os.remove(flashlm_io.checkpoint_files(tmp_path / "ours_sharded")[0])
    with pytest.raises(FileNotFoundError, match="names shards that are not in the folder"):
        from_pretrained(tmp_path / "ours_sharded")


def test_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(get_preset("tiny"))
    folder = tmp_path / "ck"
    save_pretrained(model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old HF checkpoints carry this
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 model tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        from_pretrained(folder)
    with pytest.warns(UserWarning, match="rotary_emb.inv_freq"):
        loaded = from_pretrained(folder, allow_missing=True)
    assert loaded.load_report.missing_keys == ["model.layers.1.mlp.up_proj.weight"]
    assert loaded.load_report.unexpected_keys == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    # the missing tensor is initialized, not left as uninitialized memory
    w = loaded.model.layers[1].mlp.up_proj.weight
    assert torch.isfinite(w).all() and 0.01 < w.std() < 0.03
    torch.testing.assert_close(
        loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    )


def test_shape_mismatch_is_reported(tmp_path):
    save_pretrained(build_model(get_preset("tiny")), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), the model expects"):
        from_pretrained(tmp_path / "ck")


def test_dtype_and_device_arguments(tmp_path):
    model = build_model(get_preset("tiny"), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    save_pretrained(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    kept = from_pretrained(tmp_path / "bf16")  # dtype=None keeps the checkpoint's
    assert (
        kept.lm_head.weight.dtype == torch.bfloat16 and kept.model.rotary_emb.inv_freq.dtype == torch.float32
    )
    up = from_pretrained(tmp_path / "bf16", dtype=torch.float32, device="cpu")
    assert up.lm_head.weight.dtype == torch.float32
    assert torch.equal(up.lm_head.weight, model.lm_head.weight.float())
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        from_pretrained(tmp_path / "bf16", dtype=torch.int8)


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    first, second = build_model(get_preset("tiny")), build_model(get_preset("tiny"))
    target = tmp_path / "ck"
    save_pretrained(first, target)
    save_pretrained(second, target)  # replaces the existing folder
    assert torch.equal(from_pretrained(target).lm_head.weight, second.lm_head.weight)

    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(first, target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp folder left behind
    assert torch.equal(from_pretrained(target).lm_head.weight, second.lm_head.weight)  # old checkpoint intact
    # a config transformers cannot express fails before anything is written
    with pytest.raises(ValueError, match="cannot express"):
        save_pretrained(build_model(get_preset("tiny", sliding_window=4)), tmp_path / "never")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_build_model_arguments():
    assert MODEL_CLASSES["default"] is DefaultForCausalLM
    assert set(MODEL_CLASSES) == {"default", "flash"}
    assert isinstance(build_model("tiny"), DefaultForCausalLM)
    with pytest.raises(ValueError, match=r"attn must be one of \['default', 'flash'\], got 'sdpa'"):
        build_model("tiny", attn="sdpa")
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("nope")
    with pytest.raises(TypeError, match="config must be a ModelConfig"):
        build_model(42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained("/nonexistent/folder")


def test_flash_attn_choice():
    """attn="flash" builds the flash model once flashlm.models.flash exists; until then a clear ImportError."""
    try:
        import flashlm.models.flash  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "flashlm.models.flash":
            raise
        with pytest.raises(ImportError, match="attn='flash' needs flashlm.models.flash"):
            build_model("tiny", attn="flash")
    else:
        model = build_model("tiny", attn="flash")
        assert set(model.state_dict()) == set(build_model("tiny").state_dict())  # fused qkv/gate_up: HF names
